"""OPC UA server link (asyncua): the blocks as an address space, for PLCs that may not use S7 PUT/GET.

The address space (namespace ``urn:anomalyd``, string node ids, stable):

* ``anomalyd/Status`` (object): one read-only variable per status field
  (``anomalyd/Status/ready``, ``…/inspection_id``, …) and ``anomalyd/Status/Block``,
  a ByteString holding the whole block packed as in S7 (big-endian, offsets of
  the layout): reading that one node always gives one consistent answer.
* ``anomalyd/Command`` (object): one writable variable per command field
  (``trigger``, ``result_ack``, ``enable``, ``part_id``, ``recipe_request``).

The handshake is the one of S7 and Modbus. The status is written in one step
on the server's event loop (no client request is served in between); the
commands are read in one step. Security: Basic256Sha256 Sign or SignAndEncrypt
with the server certificate and the trusted client certificates from the YAML,
optionally a user name and password; ``none`` only on loopback.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from anomalyd.drivers.plc.base import PlcBlocks, PlcDisconnected, PlcError, client_timeout_setting, register_plc
from anomalyd.drivers.plc.layout import (
    COMMAND_FIELDS,
    STATUS_FIELDS,
    Command,
    Status,
    pack_status,
)
from anomalyd.log import get_logger
from anomalyd.settings import ConfigPath, is_loopback, refuse_keys, setting

log = get_logger(__name__)

NAMESPACE = "urn:anomalyd"
APPLICATION_URI = "urn:anomalyd:server"
_VARIANTS = {"BOOL": "Boolean", "UINT": "UInt16", "UDINT": "UInt32", "REAL": "Float"}
# The status fields an answer sets: each carries the answer's decision time as its SourceTimestamp.
ANSWER_FIELDS = frozenset(
    ("result_valid", "result_toggle", "inspection_id", "pass", "fail", "error", "error_code", "score", "threshold",
     "latency_ms", "part_id", "busy", "missed_triggers")
)  # fmt: skip
_UNSET = object()


class OpcUaServerConfig(PlcBlocks):
    """The daemon serves the blocks over OPC UA (for PLCs and SCADA that may not use S7 PUT/GET)."""

    type: Literal["opcua-server"] = "opcua-server"

    @model_validator(mode="before")
    @classmethod
    def _unused(cls, data: Any) -> Any:
        return refuse_keys(
            data, {"command_layout": "OPC UA clients write the Command nodes, not a block (docs/plc.md, OPC UA)"}
        )

    host: str = setting("127.0.0.1", "Listen address", "Loopback by default; elsewhere security is required.")
    port: int = setting(4840, "TCP port", "OPC UA port (4840 is the registered one).", ge=1, le=65535)
    security: Literal["none", "sign", "sign_and_encrypt"] = setting(
        "none", "Security", "Basic256Sha256 Sign or SignAndEncrypt; none only on loopback (or allow_insecure_remote)."
    )
    certificate: ConfigPath | None = setting(
        None, "Server certificate", "DER or PEM file (anomalyd opcua-cert makes one)."
    )
    private_key: ConfigPath | None = setting(None, "Server private key", "PEM file of the server certificate's key.")
    trusted_clients: ConfigPath | None = setting(
        None, "Trusted clients", "Folder (or file) of client certificates allowed to connect (PLC, SCADA)."
    )
    username: str | None = setting(None, "User name", "Optional user name clients must log in with.")
    password_file: ConfigPath | None = setting(None, "Password file", "File holding that user's password.")
    client_timeout_heartbeats: int = client_timeout_setting()
    max_clients: int = setting(
        8, "Most clients", "Connections served at once; more are refused (a PLC and a SCADA need two).", ge=1, le=256
    )
    allow_insecure_remote: bool = setting(
        False, "Allow insecure remote", "Serve without security beyond loopback (an isolated machine network only)."
    )

    @model_validator(mode="after")
    def _secure_beyond_loopback(self) -> OpcUaServerConfig:
        if not is_loopback(self.host) and self.security == "none" and not self.allow_insecure_remote:
            raise ValueError(
                f"host {self.host} is not loopback and security is none: set security sign_and_encrypt with "
                "certificate, private_key and trusted_clients (or allow_insecure_remote: true, not recommended)"
            )
        if self.security != "none" and not (self.certificate and self.private_key and self.trusted_clients):
            raise ValueError(f"security {self.security} needs certificate, private_key and trusted_clients")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        return self


def node_id(block: str, name: str) -> str:
    """The string identifier of a field's node (``anomalyd/Status/ready``)."""
    return f"anomalyd/{block}/{name}"


def node_table() -> list[dict[str, str]]:
    """Every node a client uses: identifier, type, access, meaning (for plc-layout and docs/plc.md)."""
    rows = [
        {"node": node_id("Status", name), "type": _VARIANTS[kind], "access": "read", "meaning": meaning}
        for name, (kind, meaning) in STATUS_FIELDS.items()
    ]
    rows.append(
        {
            "node": node_id("Status", "Block"),
            "type": "ByteString",
            "access": "read",
            "meaning": "the whole status block as bytes (S7 layout): one read, one consistent answer",
        }
    )
    rows += [
        {"node": node_id("Command", name), "type": _VARIANTS[kind], "access": "read/write", "meaning": meaning}
        for name, (kind, meaning) in COMMAND_FIELDS.items()
    ]
    return rows


_SESSION_SERVICES = ("CreateSessionRequest_Encoding_DefaultBinary", "ActivateSessionRequest_Encoding_DefaultBinary")


def _guard_sessions() -> None:
    """Refuse CreateSession/ActivateSession on a channel whose mode the server was not configured for.

    asyncua keeps a SecurityMode None channel open on a secured server so that
    clients can discover its endpoints; without this, a client with no
    certificate could open a session on it and write the commands. Discovery
    (GetEndpoints, FindServers) stays possible. Applied once per process to
    asyncua's processor; a server opts in through ``iserver.anomalyd_modes``.
    """
    from asyncua import ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
    from asyncua.server.uaprocessor import UaProcessor

    if getattr(UaProcessor, "_anomalyd_guarded", False):
        return
    original = UaProcessor._process_message
    session_ids = {ua.NodeId(getattr(ua.ObjectIds, name)) for name in _SESSION_SERVICES}

    read_ids = {
        ua.NodeId(getattr(ua.ObjectIds, name))
        for name in ("ReadRequest_Encoding_DefaultBinary", "PublishRequest_Encoding_DefaultBinary")
    }

    async def process(self: Any, typeid: Any, requesthdr: Any, seqhdr: Any, body: Any) -> Any:
        if typeid in read_ids and self.session is not None:
            self.iserver.anomalyd_last_read = time.monotonic()  # a client reads (or subscribes to) the block
        modes = getattr(self.iserver, "anomalyd_modes", None)
        if modes is not None and typeid in session_ids:
            policy = self._connection.security_policy
            mode = getattr(policy, "Mode", ua.MessageSecurityMode.None_)
            if mode not in modes or policy.URI != SecurityPolicyBasic256Sha256.URI:
                peer = str(self.name[0]) if isinstance(self.name, tuple) else str(self.name)
                refused: set[str] = self.iserver.anomalyd_refused
                if peer not in refused:  # once per client address, not once per retry
                    refused.add(peer)
                    log.warning("opcua.session_refused", client=peer, mode=str(mode), policy=policy.URI)
                raise ua.uaerrors.BadSecurityModeRejected
        return await original(self, typeid, requesthdr, seqhdr, body)

    UaProcessor._process_message = process  # type: ignore[method-assign]
    UaProcessor._anomalyd_guarded = True  # type: ignore[attr-defined]


def _load_certificate(path: Path) -> Any:
    from cryptography import x509

    data = path.read_bytes()
    return x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)


def certificate_expiry(config: OpcUaServerConfig) -> dict[str, float]:
    """When (Unix time) each certificate in use expires: the server's own and every trusted client's."""
    paths: list[tuple[str, Path]] = []
    if config.certificate is not None:
        paths.append(("server", config.certificate))
    trusted = config.trusted_clients
    if trusted is not None:
        files = [trusted] if trusted.is_file() else sorted(f for f in trusted.iterdir() if f.is_file())
        paths += [(f"client:{f.name}", f) for f in files if f.suffix.lower() in (".der", ".pem", ".crt")]
    out: dict[str, float] = {}
    for name, path in paths:
        try:
            cert = _load_certificate(path)
        except (OSError, ValueError) as exc:
            log.warning("opcua.certificate_unreadable", certificate=str(path), error=str(exc))
            continue
        out[name] = cert.not_valid_after_utc.timestamp()
    return out


class _Users:
    """One user name and password (asyncua's user manager interface)."""

    def __init__(self, username: str, password: str) -> None:
        self.username, self.password = username, password

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None):  # type: ignore[no-untyped-def]
        import hmac

        from asyncua.crypto.permission_rules import User, UserRole

        if username == self.username and password is not None and hmac.compare_digest(password, self.password):
            return User(role=UserRole.User, name=username)
        return None


@register_plc(OpcUaServerConfig)
class OpcUaServerLink:
    # We are the server: a port that cannot be bound is a set-up fault, not a PLC outage.
    serves: ClassVar[bool] = True

    @staticmethod
    def certificate_expiry(config: OpcUaServerConfig) -> dict[str, float]:
        """When each configured certificate expires (the daemon exports and warns ahead)."""
        return certificate_expiry(config)

    @staticmethod
    def write_layout(config: OpcUaServerConfig, out: Path) -> str:
        """The OPC UA nodes as CSV and Markdown for the PLC programmer."""
        from anomalyd.drivers.plc import export

        rows = node_table()
        lines = [
            f"OPC UA nodes (namespace {NAMESPACE}; string node ids, e.g. nsu={NAMESPACE};s=anomalyd/Status/part_id)",
            "",
            "| node | type | access | meaning |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r['node']} | {r['type']} | {r['access']} | {r['meaning']} |" for r in rows]
        text = "\n".join(lines) + "\n"
        out.mkdir(parents=True, exist_ok=True)
        (out / "opcua_nodes.csv").write_text(export.rows_csv(rows), encoding="utf-8")
        (out / "opcua_nodes.md").write_text(text, encoding="utf-8")
        return text + f"\nOPC UA node table → {out / 'opcua_nodes.csv'} and .md"

    def __init__(self, config: OpcUaServerConfig) -> None:
        self.config = config
        self.name = f"opc.tcp://{config.host}:{config.port}/anomalyd"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._status_nodes: dict[str, Any] = {}
        self._command_nodes: dict[str, Any] = {}
        self._block_node: Any = None
        self._ns = 0
        self._written: dict[str, object] = {}  # each status node's value as last written
        self._decided_at = 0.0

    # ------------------------------------------------------------ server thread
    def open(self) -> None:
        if self._server is not None:
            return
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="opcua-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(30.0) or self._error is not None:
            raise PlcError(f"{self.name}: OPC UA server did not start: {self._error}")
        log.info("opcua.serving", endpoint=self.name, security=self.config.security, namespace=NAMESPACE)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._server.stop())
        loop.close()

    async def _start(self) -> None:
        from asyncua import Server, ua

        c = self.config
        users = None
        if c.username and c.password_file:
            users = _Users(c.username, c.password_file.read_text(encoding="utf-8").strip())
        server = Server(user_manager=users) if users else Server()  # type: ignore[arg-type]
        await server.init()
        _guard_sessions()
        server.iserver.anomalyd_last_read = None  # type: ignore[attr-defined]
        server.iserver.max_connections = c.max_clients  # beyond it asyncua refuses the TCP connection
        server.set_endpoint(f"opc.tcp://{c.host}:{c.port}/anomalyd")
        server.set_server_name("anomalyd")
        await server.set_application_uri(APPLICATION_URI)
        if c.security == "none":
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            from asyncua.crypto.truststore import TrustStore
            from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

            policy = (
                ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt
                if c.security == "sign_and_encrypt"
                else ua.SecurityPolicyType.Basic256Sha256_Sign
            )
            server.set_security_policy([policy])
            assert c.certificate and c.private_key and c.trusted_clients
            await server.load_certificate(str(c.certificate))
            await server.load_private_key(str(c.private_key))
            import shutil
            import tempfile

            # asyncua's trust store reads folders: one certificate is copied into a scratch folder, which
            # goes once loaded (the store keeps what it loaded in memory; one per start had piled up in /tmp).
            with tempfile.TemporaryDirectory(prefix="anomalyd-opcua-trust-") as scratch:
                folder = c.trusted_clients
                if folder.is_file():
                    shutil.copy(folder, Path(scratch) / folder.name)
                    folder = Path(scratch)
                store = TrustStore([folder], [])
                await store.load()
            options = CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
            server.set_certificate_validator(CertificateValidator(options, store))
            # Sessions only on a channel of the configured mode and policy (discovery stays open).
            mode = (
                ua.MessageSecurityMode.SignAndEncrypt
                if c.security == "sign_and_encrypt"
                else ua.MessageSecurityMode.Sign
            )
            server.iserver.anomalyd_modes = {mode}  # type: ignore[attr-defined]
            server.iserver.anomalyd_refused = set()  # type: ignore[attr-defined]
        # Token policies only for what is configured: a user name, or anonymous (never both, never one
        # that cannot work, as asyncua's default list would advertise).
        server.set_identity_tokens([ua.UserNameIdentityToken if users is not None else ua.AnonymousIdentityToken])
        self._ns = await server.register_namespace(NAMESPACE)
        root = await server.nodes.objects.add_object(self._nid("anomalyd"), "anomalyd")
        status = await root.add_object(self._nid("anomalyd/Status"), "Status")
        command = await root.add_object(self._nid("anomalyd/Command"), "Command")
        defaults_status, defaults_command = Status(), Command(enable=True)
        for name, (kind, _m) in STATUS_FIELDS.items():
            value = getattr(defaults_status, "passed" if name == "pass" else name)
            self._status_nodes[name] = await status.add_variable(
                self._nid(node_id("Status", name)), name, _variant(value, kind)
            )
        self._block_node = await status.add_variable(
            self._nid(node_id("Status", "Block")), "Block", ua.Variant(b"", ua.VariantType.ByteString)
        )
        for f in fields(Command):
            kind = COMMAND_FIELDS[f.name][0]
            node = await command.add_variable(
                self._nid(node_id("Command", f.name)),
                f.name,
                _variant(getattr(defaults_command, f.name), kind),
            )
            await node.set_writable()
            self._command_nodes[f.name] = node
        await server.start()
        self._server = server

    def _nid(self, identifier: str) -> Any:
        from asyncua import ua

        return ua.NodeId(identifier, self._ns)  # type: ignore[arg-type]

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        if self._loop is None or self._server is None:
            raise PlcDisconnected(f"{self.name}: not serving")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout or max(self.config.timeout_s, 1.0))
        except TimeoutError as exc:
            future.cancel()
            raise PlcDisconnected(f"{self.name}: the OPC UA server did not answer") from exc

    # ------------------------------------------------------------ PlcLink
    def read_command(self) -> Command:
        from asyncua import ua

        async def read() -> Command:
            aspace = self._server.iserver.aspace
            values: dict[str, Any] = {}
            for name, node in self._command_nodes.items():  # synchronous reads: one consistent snapshot
                raw = aspace.read_attribute_value(node.nodeid, ua.AttributeIds.Value).Value.Value
                values[name] = bool(raw) if COMMAND_FIELDS[name][0] == "BOOL" else int(raw or 0)
            return Command(**values)

        return self._call(read())  # type: ignore[no-any-return]

    def write_status(self, status: Status) -> None:
        import datetime as dt

        from asyncua import ua

        block = pack_status(status, self.config.status_layout)

        async def write() -> None:
            # One coroutine on the server's loop: a client's Read is served before or after it, and the
            # Block node (written last) always holds one whole answer. Subscribers are notified.
            # Timestamps (for historians): a new answer's fields carry the time it was decided as their
            # SourceTimestamp, each one, changed or not; any other field, the time it changed here
            # (an unchanged one is not rewritten, so it keeps its time); ServerTimestamp is the write.
            now = ua.DateTime.now(dt.timezone.utc)
            new_answer = status.decided_at != self._decided_at
            decided = ua.DateTime.fromtimestamp(status.decided_at, dt.timezone.utc) if status.decided_at else now
            for name, (kind, _m) in STATUS_FIELDS.items():
                value = getattr(status, "passed" if name == "pass" else name)
                if new_answer and name in ANSWER_FIELDS:
                    source = decided
                elif self._written.get(name, _UNSET) != value:
                    source = now
                else:
                    continue
                await self._server.write_attribute_value(
                    self._status_nodes[name].nodeid,
                    ua.DataValue(_variant(value, kind), SourceTimestamp=source, ServerTimestamp=now),
                )
                self._written[name] = value
            self._decided_at = status.decided_at
            await self._server.write_attribute_value(
                self._block_node.nodeid,
                ua.DataValue(ua.Variant(block, ua.VariantType.ByteString), SourceTimestamp=now, ServerTimestamp=now),
            )

        self._call(write())

    def read_status(self) -> Status | None:
        return None  # our own address space: fresh at every start

    def client_seen(self, within_s: float) -> bool:
        """A client session has read (or been sent by subscription) the status within ``within_s``."""
        server = self._server
        last = getattr(server.iserver, "anomalyd_last_read", None) if server is not None else None
        return last is not None and time.monotonic() - last <= within_s

    def close(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        self._server = None
        self._loop = None


def _variant(value: Any, kind: str) -> Any:
    from asyncua import ua

    if kind == "BOOL":
        return ua.Variant(bool(value), ua.VariantType.Boolean)
    if kind == "UINT":
        return ua.Variant(int(value) & 0xFFFF, ua.VariantType.UInt16)
    if kind == "UDINT":
        return ua.Variant(int(value) & 0xFFFFFFFF, ua.VariantType.UInt32)
    return ua.Variant(float(value), ua.VariantType.Float)
