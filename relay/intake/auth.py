"""SMTP AUTH users: the users file, scrypt password hashes and `relay passwd USER`.

The users file (`listener.users_file`) holds one `user:hash` line per user; blank lines
and lines starting with `#` are ignored. A hash looks like
`$scrypt$n=16384,r=8,p=1$<salt, base64>$<key, base64>`: self-describing, so the cost can
be raised later without breaking existing lines. Plaintext passwords are never accepted.
Verification runs in a worker thread (scrypt costs ~50 ms of CPU by design) and takes
the same time for an unknown user as for a wrong password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from relay.errors import ConfigError

SCHEME = "scrypt"
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2**14, 8, 1
KEY_LEN = 32
SALT_LEN = 16
MAX_N = 2**20  # refuse absurd costs from a tampered file (memory = 128 * r * n bytes)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@dataclass(frozen=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def encode(self) -> str:
        return f"${SCHEME}$n={self.n},r={self.r},p={self.p}${_b64(self.salt)}${_b64(self.key)}"

    @classmethod
    def decode(cls, text: str) -> ScryptHash:
        """Parse `$scrypt$n=…,r=…,p=…$salt$key`; ValueError when it is not one."""
        parts = text.split("$")
        if len(parts) != 5 or parts[0] != "" or parts[1] != SCHEME:
            raise ValueError("not a $scrypt$ hash")
        try:
            params = dict(item.split("=", 1) for item in parts[2].split(","))
            n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
            salt, key = _unb64(parts[3]), _unb64(parts[4])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"malformed $scrypt$ hash: {exc}") from None
        if n < 2 or n & (n - 1) or n > MAX_N or not 1 <= r <= 32 or not 1 <= p <= 16:
            raise ValueError("scrypt parameters out of range")
        if len(salt) < 8 or len(key) < 16:
            raise ValueError("scrypt salt or key too short")
        return cls(n, r, p, salt, key)


def _derive(password: bytes, h: ScryptHash | None = None, *, n: int = DEFAULT_N,
            r: int = DEFAULT_R, p: int = DEFAULT_P, salt: bytes | None = None,
            dklen: int = KEY_LEN) -> bytes:
    if h is not None:
        n, r, p, salt, dklen = h.n, h.r, h.p, h.salt, len(h.key)
    assert salt is not None
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=dklen,
                          maxmem=128 * r * n + 2**20)


def hash_password(password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R,
                  p: int = DEFAULT_P) -> str:
    """A new `$scrypt$…` string with a random salt."""
    salt = secrets.token_bytes(SALT_LEN)
    key = _derive(password.encode("utf-8"), n=n, r=r, p=p, salt=salt)
    return ScryptHash(n, r, p, salt, key).encode()


def verify_password(password: bytes, encoded: str | ScryptHash) -> bool:
    """Constant-time check of `password` against a `$scrypt$` hash."""
    h = ScryptHash.decode(encoded) if isinstance(encoded, str) else encoded
    return hmac.compare_digest(_derive(password, h), h.key)


def parse_users(text: str, source: str) -> dict[str, ScryptHash]:
    users: dict[str, ScryptHash] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        where = f"{source}:{lineno}"
        if not sep or not user:
            raise ConfigError(f"{where}: expected user:hash", source=source,
                              key="listener.users_file")
        try:
            users[user] = ScryptHash.decode(encoded)
        except ValueError as exc:
            raise ConfigError(
                f"{where}: user {user!r}: {exc} (make lines with `relay passwd USER`; "
                "plaintext passwords are not accepted)",
                source=source, key="listener.users_file") from None
    return users


class UserDb:
    """The users file, re-read when it changes (no restart needed to add a user)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._mtime: int | None = None
        self._users: dict[str, ScryptHash] = {}
        self._dummy = ScryptHash.decode(hash_password(secrets.token_hex(16)))
        self.reload()

    def reload(self) -> None:
        """Read the file; ConfigError when it is missing or has a bad line."""
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"listener.users_file: cannot read {self.path}: {exc}",
                              source=str(self.path), key="listener.users_file") from None
        users = parse_users(text, str(self.path))
        with self._lock:
            self._users, self._mtime = users, stat.st_mtime_ns

    def _refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return  # keep the users we have
        if mtime != self._mtime:
            try:
                self.reload()
            except ConfigError:
                pass  # a half-written file: keep the previous users

    def __len__(self) -> int:
        return len(self._users)

    def verify(self, user: str, password: bytes) -> bool:
        """Blocking (scrypt): call it from a worker thread."""
        self._refresh()
        with self._lock:
            h = self._users.get(user)
        ok = verify_password(password, h or self._dummy)
        return ok and h is not None
