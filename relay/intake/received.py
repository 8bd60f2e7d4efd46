"""The `Received:` trace header the listener prepends (RFC 5321 §4.4, RFC 5322 §3.6.7).

Pure: the time is passed in. Everything that comes from the client (the HELO name) or
from outside (TLS parameters, our own configured host name) is reduced to a safe
character set and a bounded length, so that no input can end the header early, inject
another header, or make the line longer than RFC 5322 allows.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import re

MAX_TOKEN = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:/ ]")
_SIMPLE_ADDRESS = re.compile(r"^[A-Za-z0-9.!#$&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9.-]{1,255}$")


def sanitize_token(value: str | None, *, limit: int = MAX_TOKEN) -> str:
    """A client-chosen word reduced to `[A-Za-z0-9.-_:[]]`, others as `?`, bounded."""
    if not value:
        return "unknown"
    text = _UNSAFE.sub("?", value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text


def _comment(value: str, limit: int = 80) -> str:
    text = _COMMENT_UNSAFE.sub("?", value)
    return text[:limit]


def ip_literal(ip: str) -> str:
    """`192.0.2.1` → `[192.0.2.1]`, `2001:db8::1` → `[IPv6:2001:db8::1]`."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "[" + sanitize_token(ip) + "]"
    if addr.version == 6:
        mapped = addr.ipv4_mapped  # type: ignore[union-attr]
        return f"[{mapped}]" if mapped else f"[IPv6:{addr.compressed}]"
    return f"[{addr}]"


def protocol(*, esmtp: bool, tls: bool, auth: bool, smtputf8: bool) -> str:
    """The `with` keyword: SMTP, ESMTP, ESMTPS, ESMTPSA, UTF8SMTPSA … (RFC 3848, 6531)."""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if auth else "")


def received_header(
    *,
    helo: str | None,
    client_ip: str,
    hostname: str,
    proto: str,
    queue_id: str | None,
    now: dt.datetime,
    recipients: tuple[str, ...] = (),
    tls_version: str | None = None,
    tls_cipher: str | None = None,
) -> bytes:
    """The whole header field, folded, ending with CRLF."""
    lines = [f"Received: from {sanitize_token(helo)} ({ip_literal(client_ip)})"]
    if tls_version:
        using = f"using {_comment(tls_version, 20)}"
        if tls_cipher:
            using += f" with cipher {_comment(tls_cipher, 60)}"
        lines.append(f"({using})")
    by = f"by {sanitize_token(hostname)} (dane-relay) with {sanitize_token(proto, limit=20)}"
    if queue_id:
        by += f" id {sanitize_token(queue_id, limit=40)}"
    lines.append(by)
    # One recipient is named (as Postfix does); never several (privacy), never an
    # address outside a conservative ASCII form.
    stamp = email.utils.format_datetime(now)
    if len(recipients) == 1 and _SIMPLE_ADDRESS.match(recipients[0]):
        lines.append(f"for <{recipients[0]}>; {stamp}")
    else:
        lines[-1] += ";"
        lines.append(stamp)
    return ("\r\n\t".join(lines) + "\r\n").encode("ascii")
