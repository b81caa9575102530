"""A test PKI made by code: a CA, a server certificate for localhost and 127.0.0.1 signed by it, and a client
certificate, written as PEM files for TLS servers (``--tls-cert``) and clients (``--ca``, ``--client-cert``)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _certificate(name: str, key, issuer=None, issuer_key=None, *, ca=False, sans=()):
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, certificate, key) -> tuple[Path, Path]:
    path.with_suffix(".crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path.with_suffix(".crt"), path.with_suffix(".key")


def make_pki(root: Path) -> dict[str, Path]:
    """A test CA, a server certificate for localhost / 127.0.0.1 and a client certificate, all as PEM files in
    ``root``: ca, server_cert, server_key, client_cert, client_key."""
    root.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("cspine test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    server = _certificate("localhost", server_key, ca, ca_key, sans=sans)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate("cspine client", client_key, ca, ca_key)
    files = {}
    files["ca"], _ = _write(root / "ca", ca, ca_key)
    files["server_cert"], files["server_key"] = _write(root / "server", server, server_key)
    files["client_cert"], files["client_key"] = _write(root / "client", client, client_key)
    return files
