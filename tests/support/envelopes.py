"""What the store tests enqueue: a fixed time and a 5 KB message from a client."""

from __future__ import annotations

import re

from relay.model import Envelope

T0 = 1_795_000_000.0  # a fixed "now" (2026-11-18); the store never reads the clock
BODY = b"From: a@example.org\r\nSubject: test\r\n\r\n" + b"x" * 5000 + b"\r\n"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def env(*rcpts: str, sender: str = "alice@example.org", body: bytes = BODY) -> Envelope:
    return Envelope(sender=sender, recipients=rcpts, body=body, client_ip="192.0.2.7",
                    client_helo="mail.example.org")
