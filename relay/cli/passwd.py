"""`relay passwd USER`: one line of the listener's users file (scrypt, never plaintext)."""

from __future__ import annotations

import argparse
import getpass
import sys

from relay.intake.auth import hash_password


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise ValueError("passwords do not match")
        return first
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def cmd_passwd(args: argparse.Namespace) -> int:
    """`relay passwd USER`: read a password (twice on a terminal), print `USER:hash`."""
    user: str = args.user
    if not user or ":" in user or any(ch.isspace() or not ch.isprintable() for ch in user):
        print("relay: passwd: the user name must be printable, without ':' or spaces",
              file=sys.stderr)
        return 2
    try:
        password = _read_password()
    except (ValueError, EOFError, KeyboardInterrupt) as exc:
        print(f"relay: passwd: {exc or 'no password'}", file=sys.stderr)
        return 1
    if not password:
        print("relay: passwd: empty password refused", file=sys.stderr)
        return 1
    print(f"{user}:{hash_password(password)}")
    return 0
