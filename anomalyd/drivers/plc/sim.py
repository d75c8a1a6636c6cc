"""A simulated PLC on loopback: a real python-snap7 Server or pymodbus server.

It owns the command block and plays the PLC's side of the interlock exactly as
docs/plc.md asks a PLC program to: raise ``trigger`` (with a fresh ``part_id`` in
the same write) only while ``trigger_ready`` = 1 and ``trigger_ack`` has fallen;
copy the status block in one read; take the first answer whose
``result_toggle`` differs, check its ``part_id``; keep an own result timeout;
if ``ready`` falls while waiting, give the part up and re-trigger later.
Used by `anomalyd plc-sim`, the demo, the tests, the soak benchmark and for
commissioning without a PLC.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from anomalyd.drivers.plc.base import bytes_from_words, words_from_bytes
from anomalyd.drivers.plc.layout import (
    Command,
    CommandLayout,
    Status,
    StatusLayout,
    pack_command,
    unpack_status,
)


@dataclass(frozen=True)
class PlcSide:
    """One protocol the simulated PLC speaks: its usual port, the daemon's link for it, what it plays."""

    port: int
    link: str  # the plc.type the daemon uses against it
    plays: str


# The protocols of `plc-sim` and the demo, and which daemon link each pairs with.
SIDES = {
    "s7": PlcSide(1102, "s7", "an S7 CPU serving DB100 (status) and DB101 (command)"),
    "modbus": PlcSide(1502, "modbus", "a Modbus TCP server: status at register 0, command at 100"),
    "opcua": PlcSide(4840, "opcua-server", "a client of the daemon's OPC UA server"),
}


@dataclass(frozen=True)
class SimResult:
    """One result as the simulated PLC received it."""

    status: Status
    wait_ms: float  # trigger raised → result_toggle flipped
    part_id: int = 0  # the part_id written with the trigger

    @property
    def attributed(self) -> bool:
        """The answer names the part this trigger was for."""
        return self.status.part_id == self.part_id


class SimulatedPlc:
    """Serves the blocks on 127.0.0.1 and plays the PLC side of the handshake."""

    def __init__(
        self,
        protocol: str = "s7",
        port: int = 1102,
        host: str = "127.0.0.1",
        status_layout: StatusLayout | None = None,
        command_layout: CommandLayout | None = None,
        status_db: int = 100,
        command_db: int = 101,
        status_register: int = 0,
        command_register: int = 100,
        word_order: str = "big",
        opcua: OpcUaClientOptions | None = None,
    ) -> None:
        if protocol not in SIDES:
            raise ValueError(f"protocol must be one of {', '.join(SIDES)}, not {protocol!r}")
        self.protocol, self.port, self.host = protocol, port, host
        self.status_layout = status_layout or StatusLayout()
        self.command_layout = command_layout or CommandLayout()
        self.status_db, self.command_db = status_db, command_db
        self.status_register, self.command_register = status_register, command_register
        self.word_order = word_order
        self._command = Command(enable=True)
        self.next_part_id = 1
        self.opcua_options = opcua or OpcUaClientOptions()
        self._server: Any = None
        self._status_area = bytearray(self.status_layout.size())
        self._command_area = bytearray(self.command_layout.size())

    # ------------------------------------------------------------ server
    def start(self) -> None:
        if self.protocol == "opcua":
            # The daemon is the OPC UA server; this PLC is its client (it connects when the server is up).
            self._server = OpcUaPlcClient(f"opc.tcp://{self.host}:{self.port}/anomalyd", self.opcua_options)
            self._server.start()
            return
        if self.protocol == "s7":
            import snap7
            from snap7.type import SrvArea

            server = snap7.server.Server(log=False)
            server.register_area(SrvArea.DB, self.status_db, self._status_area)
            server.register_area(SrvArea.DB, self.command_db, self._command_area)
            server.start_to(self.host, self.port)
            self._server = server
        else:
            from anomalyd.drivers.plc.modbus import RegisterServer

            status_words = self.status_layout.size() // 2
            command_words = self.command_layout.size() // 2
            size = max(self.status_register + status_words, self.command_register + command_words)
            # The PLC owns the command registers: a client may not write them.
            owned = range(self.command_register, self.command_register + command_words)
            register_server = RegisterServer(self.host, self.port, size, owned)
            register_server.start()
            self._server = register_server
        self.write_command(self._command)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()  # type: ignore[attr-defined]

    @property
    def running(self) -> bool:
        return self._server is not None

    # ------------------------------------------------------------ blocks
    def read_status(self) -> Status:
        if self.protocol == "opcua":
            raw = self._server.read_block()  # type: ignore[attr-defined]
            return unpack_status(raw, self.status_layout) if raw else Status()
        if self.protocol == "s7":
            raw = bytes(self._status_area)
        else:
            words = self._server.read(self.status_register, self.status_layout.size() // 2)  # type: ignore[attr-defined]
            raw = bytes_from_words(words)
        return unpack_status(raw, self.status_layout, self.word_order)

    def write_command(self, command: Command) -> None:
        self._command = command
        if self.protocol == "opcua":
            if self._server is not None:
                self._server.write_command(command)  # type: ignore[attr-defined]
            return
        raw = pack_command(command, self.command_layout, self.word_order)
        if self.protocol == "s7":
            self._command_area[:] = raw
        elif self._server is not None:
            self._server.write(self.command_register, words_from_bytes(raw))  # type: ignore[attr-defined]

    def set_command(self, **changes: bool | int) -> None:
        self.write_command(replace(self._command, **changes))  # type: ignore[arg-type]

    # ------------------------------------------------------------ handshake
    def wait_for(self, predicate: Callable[[Status], bool], timeout_s: float) -> Status | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.read_status()
            if predicate(status):
                return status
            time.sleep(0.002)
        return None

    def inspect_once(
        self, timeout_s: float = 5.0, part_id: int | None = None, interlock: bool = True, recipe: int | None = None
    ) -> SimResult | None:
        """One part: trigger with its part_id, wait for its answer, drop trigger, acknowledge.

        With ``interlock`` (as a PLC program should) the trigger is raised only once
        ``trigger_ready`` = 1 and ``trigger_ack`` has fallen; without it as soon as
        ``trigger_ack`` has fallen (to test how a refused trigger is answered). None: no
        answer within ``timeout_s``, or ``ready`` fell while waiting (re-trigger).
        """
        if recipe is not None and recipe != self._command.recipe_request:
            # A recipe switch: write the request, wait until the daemon can serve it.
            self.set_command(recipe_request=recipe)
            if (
                self.wait_for(
                    lambda s: (recipe == 0 or s.recipe == recipe) and s.trigger_ready and not s.trigger_ack, timeout_s
                )
                is None
            ):
                return None
        # trigger_ack must have fallen in any case: a trigger dropped and raised between two
        # polls of the daemon is no edge at all.
        ready = (lambda s: s.trigger_ready and not s.trigger_ack) if interlock else (lambda s: not s.trigger_ack)
        if self.wait_for(ready, timeout_s) is None:
            return None
        if part_id is None:
            part_id, self.next_part_id = self.next_part_id, (self.next_part_id + 1) & 0xFFFFFFFF
        before = self.read_status()
        started = time.monotonic()
        self.set_command(trigger=True, result_ack=False, part_id=part_id)
        status = self.wait_for(
            lambda s: (s.result_toggle != before.result_toggle and s.result_valid) or (before.ready and not s.ready),
            timeout_s,
        )
        wait_ms = (time.monotonic() - started) * 1000.0
        self.set_command(trigger=False)
        if status is None or status.result_toggle == before.result_toggle:
            return None
        self.set_command(result_ack=True)
        self.wait_for(lambda s: not s.result_valid, 1.0)
        self.set_command(result_ack=False)
        return SimResult(status, wait_ms, part_id)

    def run(
        self,
        trigger_every_ms: float,
        on_result: Callable[[SimResult | None], None],
        stop: threading.Event,
        count: int = 0,
        wait_ready_s: float = 60.0,
        recipe_for: Callable[[int], int] | None = None,
    ) -> int:
        """Trigger every ``trigger_every_ms`` once the daemon is ready; returns results received."""
        received = 0
        if self.wait_for(lambda s: s.ready, wait_ready_s) is None:
            return 0
        while not stop.is_set() and (count == 0 or received < count):
            cycle_start = time.monotonic()
            recipe = recipe_for(self.next_part_id) if recipe_for is not None else None
            result = self.inspect_once(recipe=recipe)
            on_result(result)
            if result is not None:
                received += 1
            stop.wait(max(0.0, trigger_every_ms / 1000.0 - (time.monotonic() - cycle_start)))
        return received


@dataclass(frozen=True)
class OpcUaClientOptions:
    """How the simulated PLC connects to the daemon's OPC UA server."""

    security: str = "none"  # none | sign | sign_and_encrypt
    certificate: str | None = None  # the PLC's (client) certificate and key
    private_key: str | None = None
    server_certificate: str | None = None
    application_uri: str = "urn:anomalyd:plc-sim"
    username: str | None = None
    password: str | None = None


class OpcUaPlcClient:
    """An asyncua client in its own thread: reads the status Block node, writes the command nodes in one request."""

    def __init__(self, url: str, options: OpcUaClientOptions) -> None:
        import asyncio

        self.url, self.options = url, options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opcua-plc", daemon=True)
        self._client: Any = None
        self._nodes: dict[str, Any] = {}
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def _call(self, coro: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10.0)

    async def _ensure(self) -> Any:
        if self._client is not None:
            return self._client
        from asyncua import Client, ua
        from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

        from anomalyd.drivers.plc.opcua import NAMESPACE, node_id

        o = self.options
        client = Client(self.url, timeout=2)
        client.application_uri = o.application_uri
        if o.security != "none":
            mode = (
                ua.MessageSecurityMode.SignAndEncrypt
                if o.security == "sign_and_encrypt"
                else ua.MessageSecurityMode.Sign
            )
            if not (o.certificate and o.private_key):
                raise ValueError("secure OPC UA needs the PLC's certificate and private key")
            await client.set_security(
                SecurityPolicyBasic256Sha256,
                o.certificate,
                o.private_key,
                server_certificate=o.server_certificate,
                mode=mode,
            )
        if o.username:
            client.set_user(o.username)
            client.set_password(o.password or "")
        await client.connect()
        ns = await client.get_namespace_index(NAMESPACE)
        for name in [f.name for f in fields(Command)]:
            self._nodes[name] = client.get_node(f"ns={ns};s={node_id('Command', name)}")
        self._nodes["Block"] = client.get_node(f"ns={ns};s={node_id('Status', 'Block')}")
        self._client = client
        return client

    async def _drop(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.disconnect()

    def read_block(self) -> bytes:
        async def read() -> bytes:
            try:
                await self._ensure()
                return bytes(await self._nodes["Block"].read_value() or b"")
            except Exception as exc:
                await self._drop(exc)
                return b""

        return self._call(read())  # type: ignore[no-any-return]

    def write_command(self, command: Command) -> None:
        from asyncua import ua

        from anomalyd.drivers.plc.layout import COMMAND_FIELDS

        kinds = {"BOOL": ua.VariantType.Boolean, "UINT": ua.VariantType.UInt16, "UDINT": ua.VariantType.UInt32}

        async def write() -> None:
            try:
                await self._ensure()
                names = [f.name for f in fields(Command)]
                values = [ua.DataValue(ua.Variant(getattr(command, n), kinds[COMMAND_FIELDS[n][0]])) for n in names]
                await self._client.write_values([self._nodes[n] for n in names], values)  # one Write request
            except Exception as exc:
                await self._drop(exc)

        self._call(write())

    def stop(self) -> None:
        async def close() -> None:
            client, self._client = self._client, None
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.disconnect()

        with contextlib.suppress(Exception):
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
