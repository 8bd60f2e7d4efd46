"""Envelope addresses of MAIL FROM / RCPT TO: RFC 5321 §4.1.2 grammar, RFC 6531 (SMTPUTF8).

Pure: no I/O. `parse_path` takes what follows `FROM:`/`TO:` and returns either a `Path`
(the mailbox and the ESMTP parameters) or a `Refusal` carrying the SMTP reply. Forms that
would turn the relay into an open relay through a downstream MTA are refused with
`553 5.1.3`: source routes (`<@a,@b:u@c>`), `%` and `!` routing in the local part, and a
quoted local part containing `@` (`"a@b"@c`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from relay.idn import label_to_ascii

MAX_LOCAL = 64  # octets, RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # octets, §4.5.3.1.2
MAX_PATH = 256  # octets including the angle brackets, §4.5.3.1.3

_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   "!#$%&'*+-/=?^_`{|}~")
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_VALUE = re.compile(r"^[\x21-\x3c\x3e-\x7e]+$")


@dataclass(frozen=True)
class Refusal:
    """An SMTP reply refusing the command: `code status text`."""

    code: int
    status: str
    text: str

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"


@dataclass(frozen=True)
class Mailbox:
    local: str  # as written, quotes included for a quoted local part
    domain: str  # as written; "[1.2.3.4]" / "[IPv6:…]" for an address literal
    quoted: bool = False
    literal: bool = False

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def ascii(self) -> bool:
        return self.address.isascii()


@dataclass(frozen=True)
class Path:
    mailbox: Mailbox | None  # None for the null path <> and for <postmaster>
    params: dict[str, str | None] = field(default_factory=dict)  # keyword upper-cased
    postmaster: bool = False  # RCPT TO:<postmaster> without a domain (RFC 5321 §4.5.1)

    @property
    def address(self) -> str:
        return self.mailbox.address if self.mailbox else ""


def _bad(role: str, why: str) -> Refusal:
    status = "5.1.7" if role == "sender" else "5.1.3"
    return Refusal(501, status, f"Bad {role} address syntax: {why}")


def _routing(why: str) -> Refusal:
    return Refusal(553, "5.1.3", why)


def _control(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF


def _split_path(text: str) -> tuple[str, str] | None:
    """`<…> params` → (inside of the brackets, rest); quotes may hide `>`."""
    in_quotes = escaped = False
    for i, ch in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quotes:
            escaped = True
        elif ch == '"':
            in_quotes = not in_quotes
        elif ch == ">" and not in_quotes:
            return text[1:i], text[i + 1:]
    return None


def parse_params(text: str) -> dict[str, str | None] | Refusal:
    """`SIZE=123 BODY=8BITMIME SMTPUTF8` → {"SIZE": "123", "BODY": "8BITMIME", "SMTPUTF8": None}."""
    params: dict[str, str | None] = {}
    for token in text.split(" "):
        if not token:
            continue
        key, eq, value = token.partition("=")
        if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
            return Refusal(501, "5.5.4", "Syntax error in parameters")
        if key.upper() in params:
            return Refusal(501, "5.5.4", f"Duplicate parameter {key.upper()}")
        params[key.upper()] = value if eq else None
    return params


def _local_part(local: str, role: str) -> Refusal | bool:
    """Checks the local part; returns whether it is quoted, or a refusal."""
    if not local:
        return _bad(role, "empty local part")
    if len(local.encode("utf-8")) > MAX_LOCAL:
        return Refusal(553, "5.1.3", f"Local part longer than {MAX_LOCAL} octets")
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            return _bad(role, "unterminated quoted string")
        content: list[str] = []
        body, i = local[1:-1], 0
        while i < len(body):
            ch = body[i]
            if ch == "\\":
                if i + 1 >= len(body):
                    return _bad(role, "dangling backslash")
                nxt = body[i + 1]
                if not 32 <= ord(nxt) <= 126:
                    return _bad(role, "bad quoted pair")
                content.append(nxt)
                i += 2
                continue
            if ch == '"' or _control(ch):
                return _bad(role, "bad character in quoted string")
            content.append(ch)
            i += 1
        text = "".join(content)
        if "@" in text:
            return _routing("Quoted local parts containing '@' are not accepted")
        if "%" in text or "!" in text:
            return _routing("Routing with '%' or '!' in the local part is not accepted")
        return True
    for atom in local.split("."):
        if not atom:
            return _bad(role, "empty atom in local part")
        for ch in atom:
            if ch in _ATEXT:
                continue
            if not ch.isascii() and not _control(ch):
                continue  # UTF8-non-ascii (RFC 6531); SMTPUTF8 is checked separately
            if ch == "@":
                return _routing("Routing in the local part is not accepted")
            return _bad(role, "bad character in local part")
    if "%" in local or "!" in local:
        return _routing("Routing with '%' or '!' in the local part is not accepted")
    return False


def _domain(domain: str, role: str) -> Refusal | bool:
    """Checks the domain; returns whether it is an address literal, or a refusal."""
    if not domain:
        return _bad(role, "empty domain")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        return Refusal(553, "5.1.3", f"Domain longer than {MAX_DOMAIN} octets")
    if domain.startswith("["):
        if not domain.endswith("]"):
            return _bad(role, "bad address literal")
        inner = domain[1:-1]
        try:
            if inner[:5].upper() == "IPV6:":
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            return _bad(role, "bad address literal")
        return True
    for label in domain.split("."):
        if label.isascii():
            if not _LABEL.match(label):
                return _bad(role, "bad domain")
            continue
        if any(_control(ch) for ch in label):
            return _bad(role, "bad domain")
        try:
            encoded = label_to_ascii(label)  # IDNA2008: faß.de is not fass.de
        except ValueError:
            return _bad(role, "bad internationalized domain label")
        if not _LABEL.match(encoded):
            return _bad(role, "bad internationalized domain label")
    return False


def parse_mailbox(text: str, role: str = "recipient") -> Mailbox | Refusal:
    """`local@domain` (no brackets) → Mailbox, or the refusal."""
    if any(_control(ch) for ch in text):
        return _bad(role, "control character")
    if text.startswith('"'):
        # the quoted string ends at the first unescaped quote
        i, escaped = 1, False
        while i < len(text):
            ch = text[i]
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                break
            i += 1
        local, rest = text[: i + 1], text[i + 1:]
        if not rest.startswith("@"):
            return _bad(role, "missing domain")
        domain = rest[1:]
    else:
        local, at, domain = text.rpartition("@")
        if not at:
            return _bad(role, "missing domain")
        if "@" in local:
            return _routing("Routing in the local part is not accepted")
    quoted = _local_part(local, role)
    if isinstance(quoted, Refusal):
        return quoted
    literal = _domain(domain, role)
    if isinstance(literal, Refusal):
        return literal
    return Mailbox(local, domain, quoted, literal)


def parse_path(text: str, *, role: str) -> Path | Refusal:
    """What follows `MAIL FROM:` (role "sender") or `RCPT TO:` (role "recipient").

    The null path `<>` is accepted for the sender only; `<postmaster>` (any case, no
    domain) for the recipient only, as a Path with `postmaster` set and no mailbox
    (RFC 5321 §4.5.1: every SMTP server must accept it). Without angle brackets a single
    token is taken as the mailbox (as Postfix does by default).
    """
    text = text.lstrip(" ")
    if any(_control(ch) for ch in text):
        return _bad(role, "control character")
    if text.startswith("<"):
        split = _split_path(text)
        if split is None:
            return _bad(role, "missing '>'")
        inner, rest = split
        if rest and not rest.startswith(" "):
            return _bad(role, "text after '>'")
    else:
        inner, _, rest = text.partition(" ")
    params = parse_params(rest)
    if isinstance(params, Refusal):
        return params
    if len(inner.encode("utf-8")) + 2 > MAX_PATH:
        return Refusal(553, "5.1.3", f"Path longer than {MAX_PATH} octets")
    if inner == "":
        if role == "sender" and text.startswith("<"):
            return Path(None, params)
        return _bad(role, "empty address")
    if role == "recipient" and inner.lower() == "postmaster" and text.startswith("<"):
        return Path(None, params, postmaster=True)  # case-insensitive (RFC 5321 §4.1.1.3)
    if inner.startswith("@"):
        return _routing("Source routes are not accepted")
    mailbox = parse_mailbox(inner, role)
    if isinstance(mailbox, Refusal):
        return mailbox
    return Path(mailbox, params)


NEED_SMTPUTF8 = Refusal(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
