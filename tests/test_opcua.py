"""OPC UA with the real daemon and real asyncua clients on loopback: the handshake, security, reconnects."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from anomalyd.daemon.handshake import ErrorCode
from anomalyd.drivers.plc.sim import OpcUaClientOptions, SimulatedPlc
from tests.conftest import ANOMALYD, free_port
from tests.harness import launch, station_config

pytestmark = pytest.mark.e2e  # every test here starts the daemon or a peer as a process


class OpcUaStation:
    def __init__(self, tmp_path: Path, bundle: Path, source: Path, plc: dict[str, object]) -> None:
        self.port = free_port()
        link = {"type": "opcua-server", "port": self.port, **plc}
        self.config, _ = station_config(
            tmp_path, bundle, source, link, "opcua.yaml", metrics={"enabled": False}, page={"enabled": False}
        )
        self.log = tmp_path / "daemon.log"
        self.process = launch(self.config, self.log)

    def plc(self, options: OpcUaClientOptions | None = None) -> SimulatedPlc:
        plc = SimulatedPlc("opcua", port=self.port, opcua=options)
        plc.start()
        if plc.wait_for(lambda s: s.ready, 90.0) is None:
            raise AssertionError(f"no ready over OPC UA: {plc._server.last_error}\n{self.log.read_text()[-2000:]}")  # type: ignore[union-attr]
        return plc

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=15)


@pytest.fixture
def stations(tmp_path: Path) -> Iterator[list[OpcUaStation]]:
    made: list[OpcUaStation] = []
    yield made
    for s in made:
        if s.process.poll() is None:
            s.process.kill()
            s.process.wait()


@pytest.mark.parametrize("secure", [False, True], ids=["loopback-none", "sign-and-encrypt-with-user"])
def test_the_handshake_over_opcua(stations, e2e_bundle: Path, sample_dir: Path, tmp_path: Path, secure: bool) -> None:
    plc_config: dict[str, object] = {}
    options = None
    if secure:
        server, client = tmp_path / "server", tmp_path / "client"
        _cert(server)
        _cert(client, "--client", "urn:plant:line3:plc")
        (tmp_path / "password").write_text("s3cret-line3\n")
        plc_config = {
            "security": "sign_and_encrypt",
            "certificate": str(server / "server.der"),
            "private_key": str(server / "server.key.pem"),
            "trusted_clients": str(client / "client.der"),
            "username": "line3",
            "password_file": str(tmp_path / "password"),
        }
        options = OpcUaClientOptions(
            security="sign_and_encrypt",
            certificate=str(client / "client.der"),
            private_key=str(client / "client.key.pem"),
            server_certificate=str(server / "server.der"),
            application_uri="urn:plant:line3:plc",
            username="line3",
            password="s3cret-line3",
        )
    station = OpcUaStation(tmp_path, e2e_bundle, sample_dir, plc_config)
    stations.append(station)
    plc = station.plc(options)
    try:
        results = [plc.inspect_once(10.0, part_id=100 + i) for i in range(4)]
        assert all(r is not None and r.attributed for r in results)
        assert [r.status.inspection_id for r in results] == [1, 2, 3, 4]  # type: ignore[union-attr]
        assert plc.wait_for(lambda s: not s.result_valid, 2.0)  # result_ack honoured
        plc.set_command(enable=False)
        assert plc.wait_for(lambda s: not s.trigger_ready, 2.0)
        refused = plc.inspect_once(5.0, part_id=200, interlock=False)
        assert refused is not None and refused.attributed
        assert refused.status.fail and refused.status.error_code == ErrorCode.DISABLED
        plc.set_command(enable=True)
        # A PLC that disconnects and comes back (a new session): the daemon went on serving.
        plc.stop()
        plc = station.plc(options)
        again = plc.inspect_once(10.0, part_id=300)
        assert again is not None and again.attributed and again.status.inspection_id == 6
    finally:
        plc.stop()
    assert station.stop() == 0


def _cert(out: Path, *client: str) -> None:
    subprocess.run(
        [*ANOMALYD, "opcua-cert", "--out", str(out), "--host", "localhost", *client], check=True, capture_output=True
    )


def test_sign_and_encrypt_with_trusted_clients_only(
    stations, e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    server, trusted, stranger = tmp_path / "server", tmp_path / "trusted", tmp_path / "stranger"
    _cert(server)
    _cert(trusted, "--client", "urn:plant:line3:plc")
    _cert(stranger, "--client", "urn:somewhere:else")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "plc.der").write_bytes((trusted / "client.der").read_bytes())
    station = OpcUaStation(
        tmp_path,
        e2e_bundle,
        sample_dir,
        {
            "security": "sign_and_encrypt",
            "certificate": str(server / "server.der"),
            "private_key": str(server / "server.key.pem"),
            "trusted_clients": str(allowed),
        },
    )
    stations.append(station)

    def options(folder: Path, uri: str) -> OpcUaClientOptions:
        return OpcUaClientOptions(
            security="sign_and_encrypt",
            certificate=str(folder / "client.der"),
            private_key=str(folder / "client.key.pem"),
            server_certificate=str(server / "server.der"),
            application_uri=uri,
        )

    plc = station.plc(options(trusted, "urn:plant:line3:plc"))
    try:
        res = plc.inspect_once(10.0, part_id=7)
        assert res is not None and res.attributed and res.status.inspection_id == 1
    finally:
        plc.stop()

    # A client whose certificate is not in trusted_clients is refused; so is one without security.
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    async def stranger_connects() -> None:
        client = Client(f"opc.tcp://127.0.0.1:{station.port}/anomalyd", timeout=3)
        client.application_uri = "urn:somewhere:else"
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            str(stranger / "client.der"),
            str(stranger / "client.key.pem"),
            server_certificate=str(server / "server.der"),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
        await client.connect()
        await client.disconnect()

    async def plain_connects() -> None:
        client = Client(f"opc.tcp://127.0.0.1:{station.port}/anomalyd", timeout=3)
        await client.connect()
        await client.disconnect()

    for attempt in (stranger_connects, plain_connects):
        with pytest.raises(Exception):  # noqa: B017  (asyncua raises several types for a refusal)
            asyncio.run(attempt())
    # The daemon kept running and serves the trusted PLC again.
    plc = station.plc(options(trusted, "urn:plant:line3:plc"))
    try:
        res = plc.inspect_once(10.0, part_id=8)
        assert res is not None and res.attributed and res.status.inspection_id == 2
    finally:
        plc.stop()
    assert station.stop() == 0


def test_no_security_beyond_loopback_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("plc:\n  type: opcua-server\n  host: 0.0.0.0\n")
    out = subprocess.run([*ANOMALYD, "check-config", str(config)], capture_output=True, text=True)
    assert out.returncode == 2 and "not loopback and security is none" in out.stderr


def test_plc_layout_lists_the_opcua_nodes(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("plc:\n  type: opcua-server\n")
    out = subprocess.run(
        [*ANOMALYD, "plc-layout", "--config", str(config), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "nsu=urn:anomalyd;s=anomalyd/Status/part_id" in out.stdout
    table = (tmp_path / "o" / "opcua_nodes.csv").read_text()
    assert "anomalyd/Command/trigger,Boolean,read/write" in table and "anomalyd/Status/Block,ByteString,read" in table


def _secure_station(stations: list[OpcUaStation], tmp_path: Path, bundle: Path, source: Path, **plc: object):  # type: ignore[no-untyped-def]
    server, trusted = tmp_path / "server", tmp_path / "trusted"
    _cert(server)
    _cert(trusted, "--client", "urn:plant:line3:plc")
    station = OpcUaStation(
        tmp_path,
        bundle,
        source,
        {
            "security": "sign_and_encrypt",
            "certificate": str(server / "server.der"),
            "private_key": str(server / "server.key.pem"),
            "trusted_clients": str(trusted / "client.der"),
            **plc,
        },
    )
    stations.append(station)
    options = OpcUaClientOptions(
        security="sign_and_encrypt",
        certificate=str(trusted / "client.der"),
        private_key=str(trusted / "client.key.pem"),
        server_certificate=str(server / "server.der"),
        application_uri="urn:plant:line3:plc",
    )
    return station, options


def test_no_session_on_a_none_channel_while_security_is_on(
    stations, e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    """The attack: a client with no certificate opens a None channel (for discovery) and a session on it."""
    from asyncua import Client, ua

    station, options = _secure_station(stations, tmp_path, e2e_bundle, sample_dir)
    plc = station.plc(options)  # the trusted PLC works
    plc.stop()
    url = f"opc.tcp://127.0.0.1:{station.port}/anomalyd"

    async def attack() -> tuple[list[str], str]:
        client = Client(url, timeout=3)
        await client.connect_socket()
        await client.send_hello()
        await client.open_secure_channel()  # SecurityMode None: allowed, for discovery
        endpoints = await client.get_endpoints()  # discovery still works
        params = ua.CreateSessionParameters()
        params.ClientNonce = os.urandom(32)
        params.ClientDescription = ua.ApplicationDescription(ApplicationUri="urn:attacker")
        params.EndpointUrl = url
        params.SessionName = "attacker"
        params.RequestedSessionTimeout = 60_000
        params.MaxResponseMessageSize = 0
        outcome = "session created"
        try:
            await client.uaclient.create_session(params)
            activate = ua.ActivateSessionParameters()
            activate.UserIdentityToken = ua.AnonymousIdentityToken()
            await client.uaclient.activate_session(activate)
            node = client.get_node(ua.NodeId("anomalyd/Command/trigger", 2))
            await node.write_value(ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)))
            outcome = "trigger written"
        except ua.uaerrors.BadSecurityModeRejected:
            outcome = "refused"
        finally:
            client.disconnect_socket()
        return [str(e.SecurityMode) for e in endpoints], outcome

    modes, outcome = asyncio.run(attack())
    assert modes == [str(ua.MessageSecurityMode.SignAndEncrypt)]  # the only endpoint offered
    assert outcome == "refused"
    modes, outcome = asyncio.run(attack())  # again, from the same address: refused, logged once
    assert outcome == "refused"
    assert station.stop() == 0
    log = station.log.read_text()
    assert log.count('"opcua.session_refused"') == 1 and '"client": "127.0.0.1"' in log
    assert '"inspection"' not in log  # nothing was triggered by the attacker


def test_opcua_cert_ip_san_not_a_ca_days_and_expiry_warnings(
    stations, e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    import datetime as dt
    import ipaddress

    from cryptography import x509

    out = tmp_path / "ip"
    subprocess.run(
        [*ANOMALYD, "opcua-cert", "--out", str(out), "--host", "192.168.10.5", "--days", "20"],
        check=True,
        capture_output=True,
    )
    cert = x509.load_der_x509_certificate((out / "server.der").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.168.10.5")]
    assert san.get_values_for_type(x509.DNSName) == []
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=19) < left <= dt.timedelta(days=20)
    assert (out / "server.key.pem").stat().st_mode & 0o777 == 0o600
    # A server certificate with 20 days left: the daemon warns; the client's (730 days) is only logged.
    short = tmp_path / "short"
    subprocess.run(
        [*ANOMALYD, "opcua-cert", "--out", str(short), "--host", "localhost", "--days", "20"],
        check=True,
        capture_output=True,
    )
    station2, _ = _secure_station(
        stations,
        tmp_path / "s2",
        e2e_bundle,
        sample_dir,
        certificate=str(short / "server.der"),
        private_key=str(short / "server.key.pem"),
    )
    deadline = time.monotonic() + 60
    while '"daemon.ready"' not in station2.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert station2.stop() == 0
    log = station2.log.read_text()
    expiring = [json.loads(line) for line in log.splitlines() if '"opcua.certificate_expiring"' in line]
    assert [e["certificate"] for e in expiring] == ["server"] and 18.9 < expiring[0]["days_left"] <= 20
    assert '"opcua.certificate"' in log and '"client:client.der"' in log


def test_opcua_connections_beyond_the_cap_are_refused(
    stations, e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    import socket

    station = OpcUaStation(tmp_path, e2e_bundle, sample_dir, {"max_clients": 2})
    stations.append(station)
    plc = station.plc()  # one client: the PLC
    try:
        held = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", station.port), timeout=3)
            held.append(s)
        closed = []
        for s in held:
            s.settimeout(1.0)  # a refused connection is closed by the server at once; a served one stays silent
            try:
                closed.append(s.recv(1) == b"")
            except TimeoutError:
                closed.append(False)
        assert closed == [False, True, True]  # the PLC and one more; the rest refused
        res = plc.inspect_once(10.0, part_id=3)
        assert res is not None and res.attributed  # the PLC is served throughout
    finally:
        for s in held:
            s.close()
        plc.stop()
    assert station.stop() == 0


def test_status_values_carry_the_answers_time_and_only_configured_token_policies(
    stations, e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    """What a SCADA historian reads: each answer field stamped with the time that answer was decided."""
    import datetime as dt

    from asyncua import Client, ua

    station = OpcUaStation(tmp_path, e2e_bundle, sample_dir, {})
    stations.append(station)
    plc = station.plc()
    url = f"opc.tcp://127.0.0.1:{station.port}/anomalyd"
    try:
        before = dt.datetime.now(dt.timezone.utc)
        answered = plc.inspect_once(10.0, part_id=4242)
        after = dt.datetime.now(dt.timezone.utc)
        assert answered is not None and answered.attributed
        # Heartbeats go on (100 ms each); the answer's time must not follow them.
        beat = plc.read_status().heartbeat
        assert plc.wait_for(lambda s: (s.heartbeat - beat) % 65536 >= 5, 5.0)

        async def read() -> tuple[dict[str, ua.DataValue], list[set[str]]]:
            async with Client(url, timeout=5) as client:
                values = {
                    name: await client.get_node(ua.NodeId(f"anomalyd/Status/{name}", 2)).read_data_value()
                    for name in ("part_id", "score", "pass", "fail", "inspection_id", "heartbeat", "Block")
                }
                endpoints = await client.get_endpoints()
            tokens = [{str(t.TokenType) for t in e.UserIdentityTokens} for e in endpoints]
            return values, tokens

        values, tokens = asyncio.run(read())
    finally:
        plc.stop()
    assert values["part_id"].Value.Value == 4242  # the values are those of the answer we time
    answer_fields = ("part_id", "score", "pass", "fail", "inspection_id")
    decided = {values[n].SourceTimestamp for n in answer_fields}
    assert len(decided) == 1, "every field of one answer carries one decision time"
    (stamp,) = decided
    assert stamp is not None and before <= stamp <= after, (before, stamp, after)
    for v in values.values():
        assert v.ServerTimestamp is not None and v.ServerTimestamp >= v.SourceTimestamp  # type: ignore[operator]
    beat = values["heartbeat"].SourceTimestamp
    assert beat is not None and beat > stamp + dt.timedelta(seconds=0.3)  # changed since: its own time
    assert tokens and all(t == {str(ua.UserTokenType.Anonymous)} for t in tokens), tokens  # no user: no UserName
    assert station.stop() == 0
