"""relay.intake.received: the Received: header and what goes into it."""

from __future__ import annotations

import datetime as dt
import email

from relay.intake.received import ip_literal, protocol, received_header, sanitize_token

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def header(**kw: object) -> bytes:
    args: dict[str, object] = {"helo": "client.example", "client_ip": "192.0.2.7",
                               "hostname": "relay.example", "proto": "ESMTPS",
                               "queue_id": "abc123", "now": NOW,
                               "recipients": ("b@example.com",)}
    args.update(kw)
    return received_header(**args)  # type: ignore[arg-type]


def test_shape() -> None:
    h = header(tls_version="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384")
    assert h == (b"Received: from client.example ([192.0.2.7])\r\n"
                 b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
                 b"\tby relay.example (dane-relay) with ESMTPS id abc123\r\n"
                 b"\tfor <b@example.com>; Fri, 02 Jan 2026 03:04:05 +0000\r\n")


def test_several_or_odd_recipients_are_not_named() -> None:
    for rcpts in (("a@example.com", "b@example.com"), ('"x;y"@example.com',), ("ü@example.com",)):
        h = header(recipients=rcpts)
        assert b" for " not in h
        assert h.endswith(b"id abc123;\r\n\tFri, 02 Jan 2026 03:04:05 +0000\r\n")


def test_hostile_helo_cannot_break_the_header() -> None:
    for helo in ("a\r\nX-Injected: yes", "evil;(comment)<x>\"\\", "x" * 5000, "ünï\x00\x7f", ""):
        h = header(helo=helo)
        msg = email.message_from_bytes(h + b"Subject: s\r\n\r\nbody\r\n")
        assert msg.keys() == ["Received", "Subject"]
        assert h.count(b";") == 1
        assert all(len(line) < 200 for line in h.split(b"\r\n"))
        assert all(32 <= c < 127 or c in (9, 10, 13) for c in h)
    assert sanitize_token("") == "unknown"
    assert sanitize_token("a" * 500).endswith("...") and len(sanitize_token("a" * 500)) == 103


def test_ip_literals_and_protocols() -> None:
    assert ip_literal("2001:db8::1") == "[IPv6:2001:db8::1]"
    assert ip_literal("::ffff:192.0.2.1") == "[192.0.2.1]"
    assert ip_literal("not-an-ip\r\n") == "[not-an-ip??]"
    assert protocol(esmtp=False, tls=True, auth=True, smtputf8=True) == "SMTP"
    assert protocol(esmtp=True, tls=False, auth=False, smtputf8=False) == "ESMTP"
    assert protocol(esmtp=True, tls=True, auth=True, smtputf8=False) == "ESMTPSA"
    assert protocol(esmtp=True, tls=True, auth=False, smtputf8=True) == "UTF8SMTPS"
