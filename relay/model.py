"""Values shared by every module: statuses, DNS facts, TLSA records, outcomes.

Pure: no I/O, no clock. Modules with richer private types keep them to themselves;
what crosses a module boundary lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class RecipientStatus(StrEnum):
    QUEUED = "queued"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"

    @property
    def final(self) -> bool:
        return self in (RecipientStatus.DELIVERED, RecipientStatus.BOUNCED)


# --- DNS -------------------------------------------------------------------------------


class Rcode(StrEnum):
    """The class of a DNS answer, as delivery cares about it."""

    OK = "ok"
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"
    SERVFAIL = "servfail"
    TIMEOUT = "timeout"
    REFUSED = "refused"

    @property
    def failed(self) -> bool:
        return self in (Rcode.SERVFAIL, Rcode.TIMEOUT, Rcode.REFUSED)


@dataclass(frozen=True)
class Ede:
    """An Extended DNS Error (RFC 8914) sent by the resolver."""

    code: int
    text: str = ""

    # EDE codes 1-12 except 3 ("Stale Answer") and 4 ("Forged Answer") are DNSSEC ones.
    @property
    def dnssec(self) -> bool:
        return self.code in (1, 2, 5, 6, 7, 8, 9, 10, 11, 12)


@dataclass(frozen=True)
class CnameLink:
    owner: str
    target: str
    secure: bool


@dataclass(frozen=True)
class TlsaRecord:
    """One TLSA record as published. `data` is the certificate association data.

    A record that dnspython would refuse (wrong digest length, unknown parameters) is
    still represented here; relay.dane decides whether it is usable.
    """

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass(frozen=True)
class MxRecord:
    preference: int
    exchange: str  # absolute name without the trailing dot; "" for the null MX target "."


@dataclass(frozen=True)
class DnsAnswer:
    """The answer to one question, with its DNSSEC state.

    `secure` is True only when every link (CNAMEs included) came back with AD.
    `records` holds MxRecord, str (addresses) or TlsaRecord values by rdtype.
    `dnssec_failure` is True when the failure is known to be a DNSSEC one (EDE from
    the resolver, or a re-query with CD that succeeded).
    """

    qname: str
    rdtype: str
    rcode: Rcode
    secure: bool
    records: tuple[object, ...] = ()
    canonical_name: str = ""
    chain: tuple[CnameLink, ...] = ()
    ede: tuple[Ede, ...] = ()
    dnssec_failure: bool = False
    reason: str = ""

    @property
    def security(self) -> str:
        """'secure', 'insecure' or 'bogus' (for traces and `relay check`)."""
        if self.dnssec_failure:
            return "bogus"
        return "secure" if self.secure else "insecure"


# --- Delivery policy --------------------------------------------------------------------


class TlsRequirement(StrEnum):
    """What a host demands of the TLS session."""

    DANE = "dane"  # TLS mandatory + authentication against usable TLSA records
    ENCRYPT = "encrypt"  # TLS mandatory, no authentication (TLSA present but none usable)
    STS = "sts"  # TLS mandatory + a web-PKI certificate for the MX name (MTA-STS enforce)
    MAY = "may"  # opportunistic TLS; cleartext if STARTTLS is absent or fails
    NONE = "none"  # cleartext only (routes that ask for it)


class DaneMode(StrEnum):
    """Per-domain override of the DANE policy."""

    OPPORTUNISTIC = "opportunistic"  # the default: DANE where the DNS says so
    MANDATORY = "mandatory"  # no delivery without an authenticated DANE session
    OFF = "off"  # ignore TLSA; opportunistic TLS


@dataclass(frozen=True)
class StsState:
    """The MTA-STS policy (RFC 8461) that applies to one destination in one attempt.

    `state`: "policy" (a policy applies), "none" (no policy published, or mode none),
    "failed" (a policy is published but none could be fetched and none is cached:
    delivery goes on as without one), "off" (turned off by configuration), "route" (a
    [[routes]] next hop: not the domain's MX), "dnssec-invalid" (the TXT lookup was
    bogus and no policy is cached). `mode` is the effective mode (a domain's
    `mta_sts = "enforce"` makes testing enforce); `published_mode` the policy's own.
    """

    state: str
    mode: str = ""  # "enforce" | "testing" | "none" | ""
    policy_id: str = ""
    patterns: tuple[str, ...] = ()
    lines: tuple[str, ...] = ()  # the policy text, line by line (TLS-RPT policy-string)
    source: str = ""  # "fetched" | "cached"
    max_age: int = 0
    expires_at: float | None = None
    failure_type: str | None = None  # RFC 8460 sts-* type of a discovery/fetch failure
    detail: str = ""
    published_mode: str = ""

    @property
    def applies(self) -> bool:
        return self.state == "policy" and self.mode in ("enforce", "testing")

    def summary(self) -> str:
        """One line for traces: `mta-sts enforce id=2024 (cached)`."""
        if self.state == "policy":
            src = f" ({self.source})" if self.source else ""
            return f"mta-sts {self.mode} id={self.policy_id}{src}"
        return f"mta-sts {self.state}" + (f": {self.detail}" if self.detail else "")


# --- Outcomes ---------------------------------------------------------------------------


class Action(StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


class Scope(StrEnum):
    """How far a failure reaches (as Postfix's smtp_trouble.c classifies it)."""

    RECIPIENT = "recipient"
    MESSAGE = "message"
    SITE = "site"  # the destination host/domain


@dataclass(frozen=True)
class Outcome:
    """The result of an attempt for one recipient: a value, never an exception."""

    action: Action
    code: str  # enhanced status code, e.g. "2.0.0", "4.7.323", "5.1.1"
    reply: str = ""  # remote reply or our explanation
    scope: Scope = Scope.RECIPIENT

    @property
    def final(self) -> bool:
        return self.action is not Action.DEFERRED


@dataclass(frozen=True)
class Envelope:
    """A message as accepted by the listener."""

    sender: str  # "" for the null sender
    recipients: tuple[str, ...]
    body: bytes  # with CRLF line ends, Received header prepended, not dot-stuffed
    smtputf8: bool = False
    body_8bit: bool = False
    client_ip: str = ""
    client_helo: str = ""
    auth_user: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    requiretls: bool = False  # MAIL FROM ... REQUIRETLS (RFC 8689)


KIND_TLSRPT = "tlsrpt"  # Envelope.extra["kind"] of TLS report mail: DANE relaxed, never counted


@dataclass(frozen=True)
class SessionResult:
    """One result to count: a successful or failed session for one policy."""

    policy_domain: str
    policy_type: str  # "tlsa" | "sts" | "no-policy-found"
    policy_strings: tuple[str, ...]  # the TLSA records, or the MTA-STS policy's lines
    mx_host: str
    result_type: str = ""  # "" for success, else an RFC 8460 result type
    sending_ip: str = ""
    receiving_ip: str = ""
    detail: str = ""  # failure-reason-code
    count: int = 1

    @property
    def success(self) -> bool:
        return not self.result_type
