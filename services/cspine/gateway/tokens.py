"""Bearer tokens and their roles: the roles, the store that keeps only the tokens' SHA-256 hashes, the tokens
file (``ROLE TOKEN`` lines) with the embedded default's generated one, and the look-up of a token in it for the
commands run beside that default. Which role may call which RPC is auth.py's."""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TOKENS_FILE = "tokens"  # in the data directory: the embedded default's generated tokens
MIN_TOKEN_LENGTH = 16
DIGEST_PREFIX = "sha256:"  # a tokens file may hold a token's hash instead of the token itself


class Role(enum.Enum):
    """What a token may do. Each role may do everything the roles ranked below it may."""

    ANALYST = "analyst"  # analyses studies, reads the support set
    CURATOR = "curator"  # also adds cases to and removes them from the support set

    @property
    def rank(self) -> int:
        return RANK[self]


RANK = {Role.ANALYST: 1, Role.CURATOR: 2}


def digest_of(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Caller:
    """Who makes the current call: a role and a short fingerprint of the token's hash (never the token)."""

    role: Role
    fingerprint: str  # the first 8 hex digits of the token's SHA-256

    @property
    def identity(self) -> str:
        return f"{self.role.value}:{self.fingerprint}"


def check_token(token: str) -> str | None:
    """Why ``token`` cannot be a bearer token, or None. The reason never contains the token."""
    if len(token) < MIN_TOKEN_LENGTH:
        return f"the token is shorter than {MIN_TOKEN_LENGTH} characters"
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        return "the token must be printable ASCII without spaces"
    return None


# ------------------------------------------------------------------------------------------------------
# The tokens file


@dataclass(frozen=True)
class _Line:
    """One entry of a tokens file: its line number, role, hash, and the token where the file holds it."""

    number: int
    role: Role
    digest: bytes
    token: str | None


def _parse_tokens_file(path: Path) -> Iterator[_Line]:
    """The entries of a ``ROLE TOKEN`` file (``ROLE sha256:HEX`` for a hash); ValueError names the line,
    never its token."""
    roles = ", ".join(role.value for role in Role)
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}, line {number}: expected 'ROLE TOKEN', found {len(fields)} fields")
        role_name, token = fields
        try:
            role = Role(role_name.lower())
        except ValueError:  # not named: a line written the wrong way round would show its token here
            raise ValueError(f"{path}, line {number}: unknown role (expected one of {roles})") from None
        if token.startswith(DIGEST_PREFIX):
            try:
                digest = bytes.fromhex(token[len(DIGEST_PREFIX) :])
            except ValueError:
                digest = b""
            if len(digest) != hashlib.sha256().digest_size:
                raise ValueError(f"{path}, line {number}: {DIGEST_PREFIX} must be followed by 64 hex digits")
            yield _Line(number, role, digest, None)
            continue
        problem = check_token(token)
        if problem is not None:
            raise ValueError(f"{path}, line {number}: {problem}")
        yield _Line(number, role, digest_of(token), token)


class TokenStore:
    """Bearer tokens and their roles, held only as SHA-256 hashes."""

    def __init__(self, entries: Iterable[tuple[bytes, Role]]) -> None:
        self._entries = tuple(entries)
        if not self._entries:
            raise ValueError("no tokens: every call but health would be refused")

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[Role | str, str]]) -> TokenStore:
        """From (role, token) pairs; a role may be given by name (``"analyst"``)."""
        entries = []
        seen: dict[bytes, int] = {}
        for number, (role, token) in enumerate(pairs, start=1):
            problem = check_token(token)
            if problem is not None:
                raise ValueError(f"pair {number}: {problem}")
            digest = digest_of(token)
            if digest in seen:
                raise ValueError(f"pair {number}: the same token as pair {seen[digest]}")
            seen[digest] = number
            entries.append((digest, Role(role)))
        return cls(entries)

    @classmethod
    def from_file(cls, path: Path | str) -> TokenStore:
        """From a file of ``ROLE TOKEN`` lines (``ROLE sha256:HEX`` keeps only the hash on the server);
        blank lines and ``#`` comments are allowed."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokens file {path} does not exist")
        if path.stat().st_mode & 0o077:
            logger.warning("tokens file %s can be read by other users: chmod 600 it", path)
        seen: dict[bytes, int] = {}
        entries = []
        for line in _parse_tokens_file(path):
            if line.digest in seen:
                raise ValueError(f"{path}, line {line.number}: the same token as line {seen[line.digest]}")
            seen[line.digest] = line.number
            entries.append((line.digest, line.role))
        if not entries:
            raise ValueError(f"tokens file {path} holds no tokens")
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def caller_of(self, token: str) -> Caller | None:
        """The caller that ``token`` identifies, or None. Every entry is compared, in constant time, so the
        time taken does not tell which one (if any) matched."""
        digest = digest_of(token)
        found = None
        for entry, role in self._entries:
            if hmac.compare_digest(entry, digest):
                found = role
        return None if found is None else Caller(found, digest.hex()[:8])

    def role_of(self, token: str) -> Role | None:
        caller = self.caller_of(token)
        return None if caller is None else caller.role


# ------------------------------------------------------------------------------------------------------
# The embedded default's tokens


def ensure_default_tokens(data_dir: Path) -> tuple[TokenStore, dict[Role, str] | None]:
    """The tokens of ``data_dir/tokens``; made on first use, one per role, and then (only then) returned in
    plain text as well, for the caller to show once."""
    path = Path(data_dir) / TOKENS_FILE
    if path.exists():
        return TokenStore.from_file(path), None
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = {role: secrets.token_urlsafe(32) for role in Role}
    text = "".join(
        [
            "# cspine access tokens, one 'ROLE TOKEN' per line. Keep this file private (mode 0600).\n",
            *(f"{role.value} {token}\n" for role, token in tokens.items()),
        ]
    )
    if not _create_private_file(path, text):  # another process made it first: its tokens count
        return TokenStore.from_file(path), None
    logger.info("generated access tokens in %s", path)
    return TokenStore.from_pairs(tokens.items()), tokens


def _create_private_file(path: Path, text: str) -> bool:
    """Write ``path`` readable by its owner only, whole or not at all; False where it already exists."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        with os.fdopen(os.open(temporary, flags, 0o600), "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o600)  # the umask only removes bits; set exactly 0600 before writing
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, path)  # unlike a rename, never replaces a file made meanwhile
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)
    return True


def find_client_token(data_dir: Path, role: Role = Role.ANALYST) -> str | None:
    """A token of ``data_dir/tokens`` that may do what ``role`` may, the least privileged first; None when
    there is no such file or token. For the CLI clients run beside the embedded default."""
    path = Path(data_dir) / TOKENS_FILE
    if not path.is_file():
        return None
    usable = [line for line in _parse_tokens_file(path) if line.token is not None and line.role.rank >= role.rank]
    return min(usable, key=lambda line: line.role.rank).token if usable else None
