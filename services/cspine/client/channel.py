"""Channels to a cspine server: TLS when a CA or a client certificate is given or the address asks for it
(``grpcs://`` or ``https://``), plaintext otherwise; the bearer token's call metadata; ClientError."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_SERVER = "127.0.0.1:50051"
# A StudyAnalysis carries the DICOM SEG and SR bytes, which can be far larger than gRPC's default 4 MiB.
MAX_RECEIVE_BYTES = 256 * 1024 * 1024
# Address schemes, stripped before grpc sees the address: whether each asks for TLS.
SCHEMES = {"grpcs://": True, "https://": True, "grpc://": False, "http://": False}
TLS_PORT = 443  # of a TLS address that names no port


class ClientError(Exception):
    """A call the server (or the channel) failed: the gRPC status code's name and its message."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> ClientError:
        return cls(error.code().name, error.details() or "")


@dataclass(frozen=True)
class Tls:
    """The PEM files of a client's TLS: ``ca``, the CA that signed the server's certificate (None: the system's
    roots), and ``client_cert`` with ``client_key`` where the server asks for a client certificate. Nothing
    given: TLS only where the address asks for it."""

    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def __post_init__(self) -> None:
        _check_pair(self.client_cert, self.client_key)

    def open(self, address: str) -> grpc.Channel:
        """A channel to ``address`` with these files (open_channel)."""
        return open_channel(address, ca=self.ca, client_cert=self.client_cert, client_key=self.client_key)


def _check_pair(client_cert: Path | None, client_key: Path | None) -> None:
    if (client_cert is None) != (client_key is None):
        raise ValueError("a client certificate needs its private key and the other way round: give both")


def read_pem(path: Path | str, what: str) -> bytes:
    """The bytes of a PEM file; ValueError naming ``what`` and the path when it is missing or no PEM."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist or is not a file")
    data = path.read_bytes()
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} is not a PEM file")
    return data


def channel_credentials(
    ca: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS for a client: trust ``ca`` (the system's roots when None), and show ``client_cert`` where the
    server asks for one."""
    _check_pair(client_cert, client_key)
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else read_pem(ca, "CA certificate"),
        private_key=None if client_key is None else read_pem(client_key, "client private key"),
        certificate_chain=None if client_cert is None else read_pem(client_cert, "client certificate"),
    )


def parse_address(address: str) -> tuple[str, bool]:
    """The gRPC target of ``address`` and whether the address asks for TLS: ``grpcs://host[:port]`` and
    ``https://host[:port]`` do (port 443 when none is named), ``grpc://`` and ``http://`` do not, and a bare
    ``host:port`` says nothing (False)."""
    for scheme, tls in SCHEMES.items():
        if address.lower().startswith(scheme):
            target = address[len(scheme) :].rstrip("/")
            if tls and (":" not in target or target.endswith("]")):  # a host name, an IPv4 or a [IPv6] alone
                target = f"{target}:{TLS_PORT}"
            return target, tls
    return address, False


def open_channel(
    address: str, *, ca: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None
) -> grpc.Channel:
    """A channel to the cspine server at ``address`` that takes answers of up to 256 MiB: TLS when ``ca`` or a
    client certificate is given or the address asks for it (parse_address), plaintext otherwise."""
    target, tls = parse_address(address)
    options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
    if tls or ca is not None or client_cert is not None or client_key is not None:
        return grpc.secure_channel(target, channel_credentials(ca, client_cert, client_key), options=options)
    return grpc.insecure_channel(target, options=options)


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (``authorization: Bearer TOKEN``); none without a token."""
    return (("authorization", f"Bearer {token}"),) if token else ()
