"""Results to the MES over MQTT, against a real broker (Debian's mosquitto) started on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.harness import Running, wait_until

MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists()), None
)
needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None, reason="mosquitto is not installed (Debian: apt-get install mosquitto; .ci/run does)"
)


# Started as root, mosquitto drops to the user `mosquitto`, who cannot read the test's files: stay root.
_USER = "user root\n" if os.geteuid() == 0 else ""


class Broker:
    """mosquitto on a loopback port, persistent so a subscriber's session outlives a broker restart."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        folder.mkdir(exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {folder}/\nlog_dest stderr\n{_USER}",
            encoding="utf-8",
        )
        self.log = folder / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert MOSQUITTO is not None
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=self.log.open("ab")
        )

        def accepts() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_until(accepts, 10.0, "mosquitto listening")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # saves the persistent sessions
            self.process.wait(timeout=10)


class Subscriber:
    """A paho client nobody in the daemon shares code with: what an MES would run."""

    def __init__(self, port: int, topic: str, client_id: str = "mes-test", clean: bool = False) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict[str, object], bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        self.client.reconnect_delay_set(0.2, 0.5)  # type: ignore[arg-type]
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _message(self, client: object, userdata: object, message: object) -> None:
        with self._lock:
            self.messages.append((message.topic, json.loads(message.payload), bool(message.retain)))  # type: ignore[attr-defined]

    def of(self, suffix: str) -> list[dict[str, object]]:
        with self._lock:
            return [m for t, m, _ in self.messages if t.endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "mosquitto")
    b.start()
    yield b
    b.stop()


def _metric(r: Running, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def _records(r: Running) -> dict[int, tuple[int, str, float | None, int]]:
    with sqlite3.connect(r.data / "inspections.sqlite") as db:
        rows = db.execute("SELECT inspection_id, part_id, verdict, score, error_code FROM inspections").fetchall()
    return {row[0]: row[1:] for row in rows}


@pytest.mark.e2e
@needs_mosquitto
def test_every_answer_reaches_the_mes_in_order_through_an_outage(
    broker: Broker,
    daemon_factory,  # type: ignore[no-untyped-def]
    e2e_bundle: Path,
    sample_dir: Path,
) -> None:
    sub = Subscriber(broker.port, "plant/line7/#")
    wait_until(lambda: sub.client.is_connected(), 10.0, "subscriber connected")
    r = daemon_factory(
        e2e_bundle,
        sample_dir / "test",
        daemon__line="line7",
        mqtt={"enabled": True, "port": broker.port, "topic_prefix": "plant/line7", "queue_size": 10,
              "keepalive_s": 5},
    )  # fmt: skip
    try:
        wait_until(lambda: {"line": "line7", "state": "online"} in sub.of("/state"), 15.0, "state online")
        answered = [r.plc.inspect_once(timeout_s=10.0) for _ in range(6)]
        assert all(a is not None and a.attributed for a in answered)
        wait_until(lambda: len(sub.of("/result")) >= 6, 15.0, "6 results on MQTT")
        records = _records(r)
        for a, message in zip(answered, sub.of("/result"), strict=True):
            assert a is not None
            iid = a.status.inspection_id
            # Attribution: the message names the part the PLC was answered for, with the record's verdict and score.
            assert message["inspection_id"] == iid and message["part_id"] == a.part_id == records[iid][0]
            assert message["verdict"] == records[iid][1] and message["passed"] == (not a.status.fail)
            assert message["score"] == pytest.approx(records[iid][2]) and message["error_code"] == 0
            assert message["line"] == "line7" and message["bundle_id"] and message["time"].endswith("+00:00")  # type: ignore[union-attr]
            if message["verdict"] == "NG":  # the archive's image names, so the MES can fetch the picture
                wanted = set(message["images"].values())  # type: ignore[attr-defined]
                assert len(wanted) == 2
                wait_until(lambda: wanted <= {p.name for p in (r.data / "archive").rglob("*")}, 10.0, "archived")  # noqa: B023

        # The broker goes away: the line keeps its pace, the results wait (10 kept, the oldest 3 dropped).
        broker.stop()
        wait_until(lambda: _metric(r, "anomalyd_mqtt_connected") == 0, 15.0, "daemon sees the broker gone")
        during = [r.plc.inspect_once(timeout_s=10.0) for _ in range(13)]
        assert all(a is not None and a.attributed and a.status.error_code == 0 for a in during)
        assert _metric(r, "anomalyd_mqtt_dropped_total") == 3
        assert _metric(r, "anomalyd_mqtt_waiting") == 10
        broker.start()
        wait_until(lambda: len(sub.of("/result")) >= 16, 60.0, "the queued results after the outage")
        # Nothing more may come (three were dropped): the daemon has nothing left to send.
        wait_until(lambda: _metric(r, "anomalyd_mqtt_waiting") == 0, 15.0, "the queue empty")
        after = [m["inspection_id"] for m in sub.of("/result")[6:]]
        expected = [a.status.inspection_id for a in during[3:]]  # type: ignore[union-attr]
        assert after == expected, "the 10 newest, in order, each once"
        assert _metric(r, "anomalyd_mqtt_waiting") == 0
        assert _metric(r, "anomalyd_mqtt_published_total") == 16

        # The daemon dies: the broker publishes its last will, retained for whoever subscribes later.
        r.process.send_signal(signal.SIGKILL)
        r.process.wait(timeout=10)
        late = Subscriber(broker.port, "plant/line7/state", client_id="late", clean=True)
        wait_until(lambda: late.of("/state") and late.of("/state")[-1]["state"] == "offline", 30.0, "last will")
        assert late.messages[-1][2], "the state is retained"
        late.close()
    finally:
        sub.close()


def test_mqtt_settings_are_checked_at_start(tmp_path: Path) -> None:
    from anomalyd.config_loader import ConfigError, load_config

    config = tmp_path / "anomalyd.yaml"
    config.write_text("mqtt:\n  enabled: true\n  password_file: /etc/pw\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"password_file needs mqtt\.username"):
        load_config(config)
    config.write_text("mqtt:\n  topic_prefix: 'plant/#'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="topic_prefix"):
        load_config(config)


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (as a plant's PKI would issue)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plant test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.mark.e2e
@needs_mosquitto
def test_tls_and_a_password_or_no_results(
    tmp_path: Path,
    e2e_bundle: Path,
    sample_dir: Path,
) -> None:
    """A broker that wants TLS and a user: with the right password the results arrive, with a wrong one none."""
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        pytest.skip("mosquitto_passwd is not installed (Debian's mosquitto package has it)")
    folder = tmp_path / "tls-broker"
    folder.mkdir()
    ca, cert, key = _tls_files(folder)
    users = folder / "users"
    subprocess.run([passwd, "-b", "-c", str(users), "line7", "right-password"], check=True, capture_output=True)
    users.chmod(0o600)
    broker = Broker(folder)
    broker.conf.write_text(
        f"listener {broker.port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        f"allow_anonymous false\npassword_file {users}\npersistence false\nlog_dest stderr\n{_USER}",
        encoding="utf-8",
    )
    broker.start()
    try:
        import paho.mqtt.client as mqtt

        sub = Subscriber.__new__(Subscriber)  # the MES side: TLS with the same CA and its own user
        sub.messages, sub._lock = [], threading.Lock()
        sub.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="mes-tls", clean_session=True)
        sub.client.tls_set(ca_certs=str(ca))
        sub.client.username_pw_set("line7", "right-password")
        sub.client.on_connect = lambda c, u, f, rc, p: c.subscribe("anomalyd/line7/#", qos=1)
        sub.client.on_message = sub._message
        sub.client.connect("127.0.0.1", broker.port)
        sub.client.loop_start()
        wait_until(lambda: sub.client.is_connected(), 10.0, "subscriber over TLS")
        for password, expected in (("wrong-password", 0), ("right-password", 3)):
            (tmp_path / "pw").write_text(password + "\n")
            run = tmp_path / password
            run.mkdir()
            r = _start(run, e2e_bundle, sample_dir, broker.port, ca, tmp_path / "pw")
            try:
                for _ in range(3):
                    answer = r.plc.inspect_once(10.0)
                    assert answer is not None and answer.attributed and answer.status.error_code == 0  # line unhurt
                if expected:
                    wait_until(lambda: len(sub.of("/result")) >= 3, 15.0, "results over TLS")
                else:
                    wait_until(
                        lambda: (
                            '"mqtt.refused"' in (run / "daemon.log").read_text()  # noqa: B023
                            and _metric(r, "anomalyd_mqtt_waiting") == 3  # noqa: B023
                        ),
                        15.0,
                        "the broker's refusal, the three results waiting",
                    )
                    assert _metric(r, "anomalyd_mqtt_connected") == 0 and _metric(r, "anomalyd_mqtt_waiting") == 3
                    assert '"mqtt.refused"' in (run / "daemon.log").read_text()
            finally:
                r.process.kill()
                r.process.wait()
                r.plc.stop()
        assert len(sub.of("/result")) == 3  # none from the daemon with the wrong password
        sub.close()
    finally:
        broker.stop()


def _start(folder: Path, bundle: Path, sample_dir: Path, port: int, ca: Path, password: Path) -> Running:
    from tests.harness import start_daemon

    return start_daemon(
        folder, bundle, sample_dir / "test", daemon__line="line7",
        mqtt={"enabled": True, "port": port, "tls": True, "ca_file": str(ca), "username": "line7",
              "password_file": str(password)},
    )  # fmt: skip
