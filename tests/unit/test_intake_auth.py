"""relay.intake.auth: scrypt hashes, the users file, constant-time verification."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.errors import ConfigError
from relay.intake.auth import ScryptHash, UserDb, hash_password, parse_users, verify_password


def test_hash_round_trip_and_salt() -> None:
    h = hash_password("pw", n=2**10)
    assert h.startswith("$scrypt$n=1024,r=8,p=1$")
    assert verify_password(b"pw", h)
    assert not verify_password(b"pw2", h)
    assert hash_password("pw", n=2**10) != h
    parsed = ScryptHash.decode(h)
    assert len(parsed.salt) == 16 and len(parsed.key) == 32


@pytest.mark.parametrize("bad", [
    "plaintext", "$scrypt$n=1024,r=8$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5", "$md5$x$y$z",
    "$scrypt$n=1000,r=8,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5",  # n not a power of 2
    "$scrypt$n=1073741824,r=8,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5",  # absurd cost
    "$scrypt$n=1024,r=8,p=1$!!$a2V5",
])
def test_bad_hashes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        ScryptHash.decode(bad)


def test_users_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"# comment\n\nalice:{hash_password('a', n=2**10)}\n")
    db = UserDb(path)
    assert len(db) == 1
    assert db.verify("alice", b"a")
    assert not db.verify("alice", b"b")
    assert not db.verify("bob", b"a")
    path.write_text(path.read_text() + f"bob:{hash_password('b', n=2**10)}\n")
    assert db.verify("bob", b"b")  # re-read on change
    with pytest.raises(ConfigError, match="plaintext passwords are not accepted"):
        parse_users("carol:secret\n", "users")
    with pytest.raises(ConfigError, match="users:1: expected user:hash"):
        parse_users("no-colon\n", "users")
    with pytest.raises(ConfigError, match="cannot read"):
        UserDb(tmp_path / "missing")
