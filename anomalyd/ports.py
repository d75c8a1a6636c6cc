"""Free loopback ports for the demo, the benchmarks and the tests."""

from __future__ import annotations

import socket

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and never handed out before by this process.

    The kernel may give the same ephemeral port to two binds in a row once the
    first is closed (seen in CI: one daemon's metrics and page ports were
    equal, and it could not start), so ports already handed out are skipped.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
