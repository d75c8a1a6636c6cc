"""The base of the project's own exceptions: caught at the CLI boundary and printed as one line."""


class AnomalydError(Exception):
    """An error with a message a person can act on."""


KNOWN_ERRORS: tuple[type[BaseException], ...] = (AnomalydError, FileNotFoundError)


class StartupError(AnomalydError):
    """Something a person must fix before the daemon can start (a folder, a port, a file)."""
