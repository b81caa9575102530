"""What every client command (analyze, support, evaluate study, loadtest) shares: the flags naming the server's TLS
files and where ``cspine serve`` keeps the tokens it generated, with defaults from ``ClientConfig``; reading them
back (tls_of, client_token); and how a failed call is reported."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cspine.client import ClientError, Tls, parse_address
from cspine.config import DEFAULT_DATA_DIR, ClientConfig

__all__ = ["add_data_dir_argument", "add_tls_arguments", "client_token", "report_failure", "tls_of"]

# What to try next, by status code, for the failures an integrator meets first; UNAVAILABLE by whether the
# channel was TLS, for a TLS server refuses a plaintext client and the other way round.
HINTS = {
    "UNAVAILABLE": "is a cspine server listening on {args.server}? (--server, env CSPINE_SERVER; "
    "one serving TLS needs --ca, or a grpcs:// address)",
    "UNAVAILABLE TLS": "is a cspine server listening on {args.server} with TLS, its certificate signed by --ca "
    "(the system's CAs without it)? one started with --tls-client-ca also needs --client-cert and --client-key",
    "DEADLINE_EXCEEDED": "the call took longer than --timeout {args.timeout:g} s",
    "UNAUTHENTICATED": "the server wants a bearer token (--token, env CSPINE_TOKEN)",
}


def report_failure(error: ClientError, args: argparse.Namespace) -> int:
    """Print a failed call and, for the common failures, what to try next; the exit status, 2."""
    print(f"cspine: error: {error}", file=sys.stderr)
    tls = parse_address(args.server)[1] or any((args.ca, args.client_cert, args.client_key))
    hint = HINTS.get(f"{error.code} TLS" if tls else error.code)
    if hint:
        print(f"cspine: {hint.format(args=args)}", file=sys.stderr)
    return 2


def _text(path: Path | None) -> str | None:
    """A path setting as the flag's default: the text a user would have typed (None stays None)."""
    return None if path is None else str(path)


def add_data_dir_argument(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, client: ClientConfig, purpose: str
) -> None:
    """``--data-dir`` (``client.data_dir``, env CSPINE_DATA_DIR): where ``cspine serve`` keeps its data and
    generated tokens."""
    p.add_argument(
        "--data-dir",
        default=_text(client.data_dir),
        help=f"{purpose} (env CSPINE_DATA_DIR, default {DEFAULT_DATA_DIR})",
    )


def add_tls_arguments(
    p: argparse.ArgumentParser, client: ClientConfig, server: str = "--server", note: str = ""
) -> None:
    """``--ca``, ``--client-cert`` and ``--client-key`` (``client``'s, env CSPINE_CA, CSPINE_CLIENT_CERT,
    CSPINE_CLIENT_KEY): the files of a TLS channel to ``server`` (the flag naming the address); read back by
    tls_of."""
    group = p.add_argument_group(
        "TLS (to a server started with --tls-cert)",
        f"Without them: plaintext, unless {server} is grpcs://HOST[:PORT] (TLS with the system's CAs). {note}".strip(),
    )
    group.add_argument(
        "--ca",
        metavar="PEM",
        default=_text(client.ca),
        help="connect with TLS and trust the server's certificate if this CA signed it (env CSPINE_CA; "
        "default: the system's CAs where the address asks for TLS)",
    )
    group.add_argument(
        "--client-cert",
        metavar="PEM",
        default=_text(client.client_cert),
        help="connect with TLS and show this client certificate, which a server started with --tls-client-ca "
        "asks for (env CSPINE_CLIENT_CERT; needs --client-key)",
    )
    group.add_argument(
        "--client-key",
        metavar="PEM",
        default=_text(client.client_key),
        help="the private key of --client-cert (env CSPINE_CLIENT_KEY)",
    )


def tls_of(args: argparse.Namespace) -> Tls:
    """The TLS files add_tls_arguments' flags name; ValueError when only one of the client's pair is given."""
    files = (args.ca, args.client_cert, args.client_key)
    return Tls(*(None if name is None else Path(name).expanduser() for name in files))


def client_token(args: argparse.Namespace, role_name: str = "analyst", required: bool = True) -> str | None:
    """``--token`` if given, else the token of ``role_name`` (or a stronger one) that ``cspine serve`` generated
    in ``--data-dir``. None when there is none and not ``required`` (the server then says what it wants);
    otherwise ClientError UNAUTHENTICATED naming the file."""
    if args.token:
        return args.token
    from cspine.gateway.tokens import TOKENS_FILE, Role, find_client_token  # the file `cspine serve` wrote

    data_dir = Path(args.data_dir).expanduser()
    token = find_client_token(data_dir, Role(role_name))
    if token is None and required:
        where = data_dir / TOKENS_FILE
        raise ClientError("UNAUTHENTICATED", f"no {role_name} token in {where}: pass --token (env CSPINE_TOKEN)")
    return token
