"""The `_mta-sts` TXT record and the policy file of RFC 8461 §3, and MX patterns (§4.1).

Pure: text in, values out. Everything a policy server controls is bounded by the caller
(size, time); here malformed input is a value (`Malformed`), never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

MAX_AGE_CAP = 31_557_600  # §3.2: max_age is at most one year (in seconds)
MAX_POLICY_BYTES = 64 * 1024  # a policy is a few lines; more is hostile or broken
MAX_MX_PATTERNS = 1000 # `mx:` lines honoured; more is a malformed policy
WELL_KNOWN = "/.well-known/mta-sts.txt"

_TXT_VERSION = re.compile(r"^v=STSv1[ \t]*;")
_TXT_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_EXT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_EXT_VALUE = re.compile(r"^[\x21-\x3a\x3c\x3e-\x7e]+$")
_POLICY_VALUE = re.compile(r"^[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*$")
_MAX_AGE = re.compile(r"^[0-9]{1,10}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class Mode(StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True)
class Malformed:
    """Why a record or a policy was refused (shown to operators, reported in TLS-RPT)."""

    reason: str


@dataclass(frozen=True)
class TxtRecord:
    """A valid `v=STSv1; id=…;` record."""

    id: str
    text: str


@dataclass(frozen=True)
class Discovery:
    """What the `_mta-sts` TXT RRset says: a record, or why there is none."""

    record: TxtRecord | None
    reason: str = ""


def txt_name(domain: str) -> str:
    return f"_mta-sts.{normalize(domain)}"


def policy_host(domain: str) -> str:
    return f"mta-sts.{normalize(domain)}"


def policy_url(domain: str) -> str:
    return f"https://{policy_host(domain)}{WELL_KNOWN}"


def normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _fields(rest: str) -> list[str] | None:
    parts = rest.split(";")
    if parts and not parts[-1].strip(" \t"):
        parts = parts[:-1]  # one trailing delimiter is allowed
    fields = [p.strip(" \t") for p in parts]
    return None if not fields or any(not f for f in fields) else fields


def parse_txt(text: str) -> TxtRecord | Malformed:
    """One TXT record (its strings joined) per the ABNF of §3.1."""
    m = _TXT_VERSION.match(text)
    if not m:
        return Malformed("does not start with v=STSv1;")
    fields = _fields(text[m.end():])
    if fields is None:
        return Malformed("empty field (stray \";\")")
    found: str | None = None
    for f in fields:
        name, eq, value = f.partition("=")
        if not eq or not _EXT_NAME.match(name):
            return Malformed(f"malformed field {f[:40]!r}")
        if name == "id":
            if not _TXT_ID.match(value):
                return Malformed("id= must be 1 to 32 letters or digits")
            found = found or value  # a repeated field: the first one counts (§3.2)
        elif not _EXT_VALUE.match(value):
            return Malformed(f"malformed value of {name}=")
    if found is None:
        return Malformed("no id= field")
    return TxtRecord(found, text)


def discover(txts: Sequence[str]) -> Discovery:
    """From every TXT string at `_mta-sts.<domain>`: records not starting "v=STSv1;" are
    discarded; exactly one must remain, and parse (§3.1). Otherwise there is no policy."""
    records = [t for t in txts if _TXT_VERSION.match(t)]
    if not records:
        return Discovery(None, "no v=STSv1 record")
    if len(records) > 1:
        return Discovery(None, f"{len(records)} v=STSv1 records (exactly one is needed)")
    parsed = parse_txt(records[0])
    if isinstance(parsed, Malformed):
        return Discovery(None, f"malformed v=STSv1 record: {parsed.reason}")
    return Discovery(parsed)


# --- the policy file (§3.2) ----------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """A parsed policy. `text` is the policy as served (TLS-RPT's policy strings)."""

    mode: Mode
    mx: tuple[str, ...]  # patterns, lower case: "mail.example.com" or "*.example.net"
    max_age: int  # seconds, capped at MAX_AGE_CAP
    text: str

    @property
    def lines(self) -> tuple[str, ...]:
        """The policy's lines without line ends (RFC 8460 §4.4 policy-string)."""
        return tuple(line.rstrip("\r") for line in self.text.split("\n") if line.strip())

    def matches(self, host: str) -> bool:
        return any(mx_matches(p, host) for p in self.mx)


def _mx_pattern(value: str) -> str | None:
    v = value.lower().rstrip(".")
    name = v[2:] if v.startswith("*.") else v
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(x) for x in labels):
        return None
    return v


def parse_policy(body: bytes) -> Policy | Malformed:
    """The policy file: `key: value` lines ended by LF or CRLF (§3.2). Unknown keys are
    ignored; of a repeated key other than `mx` the first counts; version, mode and max_age
    must be there, and `mx` unless the mode is none."""
    if len(body) > MAX_POLICY_BYTES:
        return Malformed(f"policy larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Malformed(f"not UTF-8 (byte {exc.start})")
    if not text.isascii():
        return Malformed("non-ASCII characters (the policy grammar is ASCII)")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the terminator after the last field
    values: dict[str, str] = {}
    mx: list[str] = []
    for n, raw in enumerate(lines, start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if "\r" in line:
            return Malformed(f"line {n}: bare CR")
        key, colon, value = line.partition(":")
        value = value.strip(" \t")
        if not colon or not _EXT_NAME.match(key):
            return Malformed(f"line {n}: not a \"key: value\" line: {line[:60]!r}")
        if not value or not _POLICY_VALUE.match(value):
            return Malformed(f"line {n}: malformed value of {key}")
        if key == "mx":
            if len(mx) >= MAX_MX_PATTERNS:
                return Malformed(f"more than {MAX_MX_PATTERNS} mx patterns")
            pattern = _mx_pattern(value)
            if pattern is None:
                return Malformed(f"line {n}: mx {value[:60]!r} is not a host name or *.pattern")
            mx.append(pattern)
        else:
            values.setdefault(key, value)
    for required in ("version", "mode", "max_age"):
        if required not in values:
            return Malformed(f"no {required} field")
    if values["version"] != "STSv1":
        return Malformed(f"version {values['version'][:20]!r} is not STSv1")
    try:
        mode = Mode(values["mode"])
    except ValueError:
        return Malformed(f"mode {values['mode'][:20]!r} is not enforce, testing or none")
    if not _MAX_AGE.match(values["max_age"]):
        return Malformed(f"max_age {values['max_age'][:24]!r} is not 1 to 10 digits")
    if not mx and mode is not Mode.NONE:
        return Malformed("no mx field")
    max_age = min(int(values["max_age"]), MAX_AGE_CAP)
    return Policy(mode, tuple(dict.fromkeys(mx)), max_age, text)


def mx_matches(pattern: str, host: str) -> bool:
    """§4.1: the MX host name equals the pattern, or the pattern is `*.<rest>` and the
    host is exactly one label followed by `.<rest>` (case-insensitive)."""
    p, h = normalize(pattern), normalize(host)
    if not p or not h:
        return False
    if p.startswith("*."):
        first, dot, rest = h.partition(".")
        return bool(first) and bool(dot) and first != "*" and rest == p[2:]
    return p == h
