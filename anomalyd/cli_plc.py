"""CLI commands for PLC integration: plc-layout and plc-sim."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from typing import Any


def cmd_plc_layout(args: argparse.Namespace) -> int:
    from anomalyd.config import AppConfig
    from anomalyd.config_loader import load_config
    from anomalyd.drivers.plc.base import PLC_LINKS

    config = load_config(args.config) if args.config else AppConfig()
    # Each link writes its own files: SCL for S7, a register map for Modbus, a node table for OPC UA.
    print(PLC_LINKS[config.plc.type].write_layout(config.plc, args.out))
    return 0


def cmd_plc_sim(args: argparse.Namespace) -> int:
    from anomalyd.drivers.plc.sim import SIDES, SimResult, SimulatedPlc

    side = SIDES[args.protocol]
    port = args.port or side.port
    plc = SimulatedPlc(args.protocol, port=port)
    plc.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(
        f"simulated {args.protocol} PLC on 127.0.0.1:{port} ({side.plays}; the daemon's plc.type: {side.link}); "
        "waiting for the daemon to be ready",
        flush=True,
    )
    print(
        f"{'id':>8} {'part_id':>8} {'verdict':>7} {'score':>7} {'thr':>6} {'err':>4} {'latency':>9} {'wait':>8}",
        flush=True,
    )

    def show(result: SimResult | None) -> None:
        if result is None:
            print("  no result within 5 s", flush=True)
            return
        s = result.status
        verdict = "OK" if s.passed else "NG"
        print(
            f"{s.inspection_id:>8} {s.part_id:>8}{'' if result.attributed else '!'} {verdict:>7} "
            f"{s.score:7.3f} {s.threshold:6.2f} {s.error_code:>4} "
            f"{s.latency_ms:7.1f}ms {result.wait_ms:6.1f}ms",
            flush=True,
        )

    try:
        if args.trigger_every > 0:
            plc.run(args.trigger_every, show, stop, count=args.count, wait_ready_s=args.wait_ready)
        else:
            stop.wait()
    finally:
        plc.stop()
    return 0


def add_plc_commands(sub: Any) -> None:
    p = sub.add_parser("plc-layout", help="print the PLC blocks; write TIA Portal SCL (S7) or a register map (Modbus)")
    p.add_argument("--config", type=Path, help="config file (default: the built-in defaults)")
    p.add_argument("--out", type=Path, default=Path("plc"), help="folder for the generated files")
    p.set_defaults(func=cmd_plc_layout)

    p = sub.add_parser("plc-sim", help="a simulated PLC on loopback that triggers and prints results")
    from anomalyd.drivers.plc.sim import SIDES

    p.add_argument("--protocol", choices=list(SIDES), default="s7")
    p.add_argument("--port", type=int, default=0, help="TCP port (default 1102 for s7, 1502 for modbus)")
    p.add_argument("--trigger-every", type=float, default=500.0, help="ms between triggers (0: serve only)")
    p.add_argument("--count", type=int, default=0, help="stop after this many results (0: run until stopped)")
    p.add_argument("--wait-ready", type=float, default=300.0, help="seconds to wait for ready before giving up")
    p.set_defaults(func=cmd_plc_sim)

    p = sub.add_parser("opcua-cert", help="make a self-signed OPC UA certificate and key (server, or --client URI)")
    p.add_argument("--out", type=Path, required=True, help="folder for NAME.der and NAME.key.pem")
    p.add_argument("--host", help="host name in the certificate (default: this machine's)")
    p.add_argument("--client", metavar="URI", help="make a client certificate with this application URI instead")
    p.add_argument("--days", type=int, default=CERT_DAYS, help=f"validity in days (default {CERT_DAYS})")
    p.set_defaults(func=cmd_opcua_cert)


CERT_DAYS = 730  # two years: renewed at a planned stop, warned 30 days ahead (log and metric)


def make_certificate(out: Path, role: str, uri: str, host: str, days: int) -> tuple[Path, Path]:
    """An RSA-2048 self-signed end-entity certificate for OPC UA (Basic256Sha256).

    The application URI and the host go into the subject alternative name: a
    host that is an IP address as an IP address (clients compare it so), else as
    a DNS name. Not a CA (a certificate that could sign others is a risk if its
    key leaks); valid from yesterday (clock skew) for ``days``.
    """
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"anomalyd {role} {host}")])
    try:
        where: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        where = x509.DNSName(host)
    now = dt.datetime.now(dt.timezone.utc)
    use = ExtendedKeyUsageOID.CLIENT_AUTH if role == "client" else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri), where]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([use]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / f"{role}.key.pem", out / f"{role}.der"
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return cert_path, key_path


def cmd_opcua_cert(args: argparse.Namespace) -> int:
    """A self-signed certificate and key for the OPC UA server (or, with --client, for a client)."""
    import socket

    from anomalyd.drivers.plc.opcua import APPLICATION_URI

    role = "client" if args.client else "server"
    uri = args.client or APPLICATION_URI
    host = args.host or socket.gethostname()
    cert, key = make_certificate(args.out, role, uri, host, args.days)
    print(f"{cert} (application URI {uri}, host {host}, valid {args.days} days) and {key}")
    if not args.client:
        print("give the PLC/SCADA the .der to trust; put the clients' certificates in plc.trusted_clients")
    return 0
