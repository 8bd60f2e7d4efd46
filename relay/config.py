"""Configuration: frozen pydantic models, a TOML file, and `RELAY_<SECTION>__<KEY>` overrides.

Every default lives in a model. Unknown keys are errors that name the key and the file.
Durations are written `"2s"`, `"15m"`, `"24h"`, `"7d"` or as a number of seconds and are
held as float seconds. Sizes are bytes or `"10MB"`/`"512KiB"`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from relay.errors import ConfigError
from relay.model import DaneMode

DEFAULT_CONFIG = Path("config/relay.toml")
ENV_PREFIX = "RELAY_"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 10**6, "mib": 2**20,
               "gb": 10**9, "gib": 2**30}


def parse_duration(value: Any) -> float:
    """`"15m"` → 900.0; numbers are seconds. Raises ValueError naming the bad value."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative: {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"not a duration: {value!r} (use e.g. \"30s\", \"15m\", \"24h\" or seconds)")


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value!r}")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return int(m.group(1)) * _SIZE_UNITS[unit]
    raise ValueError(f"not a size: {value!r} (use bytes or e.g. \"10MB\", \"512KiB\")")


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError(f"not a network: {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ValueError(f"not a network: {value!r} ({exc})") from None


def _mailbox(value: Any) -> str:
    """`local@domain`, no spaces or control characters; returned as written."""
    if not isinstance(value, str):
        raise ValueError(f"not a mail address: {value!r}")
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127
                                                for ch in value) or "<" in value or ">" in value:
        raise ValueError(f"not a mail address: {value!r} (write local@domain)")
    return value


def _hostport(value: Any) -> str:
    """`"ip"` or `"ip:port"` / `"[v6]:port"`; validated, returned as written."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"not an address: {value!r}")
    split_hostport(value, 53)
    return value


def split_hostport(value: str, default_port: int) -> tuple[str, int]:
    """`"127.0.0.1:5353"` → ("127.0.0.1", 5353); `"::1"` → ("::1", default)."""
    host, port = value, default_port
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"not an address: {value!r}")
            port = int(rest[1:])
    elif value.count(":") == 1:
        host, _, p = value.partition(":")
        port = int(p)
    if not 0 <= port < 65536:
        raise ValueError(f"port out of range in {value!r}")
    return host, port


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]
HostPort = Annotated[str, BeforeValidator(_hostport)]
MailAddress = Annotated[str, BeforeValidator(_mailbox)]


class _Section(BaseModel):
    # validate_default: a default goes through the same validators as a written value,
    # so it has the parsed types (a default written as text becomes a network, a
    # duration, a size) and a bad default fails at import, not in a session.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True,
                              validate_default=True)


class ListenerConfig(_Section):
    """The SMTP listener the organization's mail servers use as their smarthost."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(2525, ge=0, lt=65536)
    """Port to listen on."""
    hostname: str | None = None
    """Name in the 220 banner and in Received: headers (default: this machine's FQDN)."""
    allowed_networks: tuple[Network, ...] = ("127.0.0.0/8", "::1/128")  # type: ignore[assignment]
    """Client networks (CIDR) allowed to relay without authentication."""
    tls_cert: Path | None = None
    """PEM certificate chain; STARTTLS is offered when this and tls_key are set."""
    tls_key: Path | None = None
    """PEM private key for tls_cert."""
    users_file: Path | None = None
    """`user:hash` lines (made with `relay passwd USER`) for AUTH PLAIN/LOGIN after TLS."""
    max_message_size: Size = 10_240_000
    """Largest message accepted, in bytes or e.g. "10MB" (Postfix's message_size_limit)."""
    data_memory_limit: Size | None = None
    """Memory for all messages in flight together (received, not yet committed), each
    counted twice its size (the message and the store's copy while it is committed);
    past it, DATA waits for room (up to 30 s) or gets 451 4.3.1, and a message that
    outgrows it is refused with 451 4.3.1 (default: 128 MiB, or four times
    max_message_size if that is larger; at least twice max_message_size)."""
    max_recipients: int = Field(1000, ge=1)
    """Recipients per message; more get 452 4.5.3 (Postfix's smtpd_recipient_limit)."""
    max_connections: int = Field(200, ge=1)
    """Simultaneous client connections in total; more get 421 4.7.0."""
    max_connections_per_ip: int = Field(50, ge=1)
    """Simultaneous connections from one client IP; more get 421 4.7.0."""
    reserved_connections: int | None = Field(None, ge=0)
    """Of max_connections, this many are kept for clients in allowed_networks and for
    sessions that authenticated; other clients share the rest and get 421 4.7.0 when it
    is full (default: a fifth of max_connections)."""
    command_timeout: Duration = 300.0
    """Idle time allowed between commands (Postfix's smtpd_timeout)."""
    line_timeout: Duration = 30.0
    """Once the first byte of a command line has arrived, the time allowed for the rest
    of it (a client dripping bytes is cut much sooner than command_timeout); also bounds
    the TLS handshake after STARTTLS."""
    stress_command_timeout: Duration = 10.0
    """While the untrusted clients' share of the connections is full, the command and
    line timeout of their sessions (Postfix's smtpd_timeout under stress: 10 s); trusted
    sessions keep command_timeout."""
    data_timeout: Duration = 600.0
    """Time allowed for the whole DATA phase of one message."""
    auth_failure_delay: Duration = 1.0
    """A failed AUTH is answered (535) after this delay, doubled for each further
    failure from the same client address within auth_failure_window (at most 16 times
    the delay); the address's AUTH attempts are checked one at a time. 0 = no delay."""
    auth_failure_limit: int = Field(10, ge=0)
    """This many failed AUTH from one client address within auth_failure_window lock
    the address out: its AUTH commands get 421 4.7.0 for auth_lockout (0 = never)."""
    auth_failure_window: Duration = 600.0
    """How long a failed AUTH counts against its client address."""
    auth_lockout: Duration = 600.0
    """How long a locked-out client address gets 421 4.7.0 to AUTH."""
    max_line_length: int = Field(4096, ge=1000)
    """Longest command or DATA line accepted, in octets."""
    max_hops: int = Field(50, ge=2)
    """A message with this many Received: headers is refused with 554 5.4.6 (a mail
    loop; Postfix's hopcount_limit)."""
    drain_timeout: Duration = 30.0
    """At the first SIGTERM, how long open transactions may take to finish (at most
    data_timeout) before the relay stops."""
    workers: int | Literal["auto"] = 1
    """Intake processes (1 to 31). 1: the listener runs in the relay's one process. N > 1 (or
    "auto": one per CPU the relay may use): N worker processes each listen on the same
    address and port (SO_REUSEPORT; the kernel spreads the connections) and commit to
    the queue themselves, while delivery, reporting, metrics and health stay in the main
    process, which restarts a worker that dies. The connection limits and
    data_memory_limit are divided among the workers (see docs/mail-flow.md)."""

    @model_validator(mode="after")
    def _reserve_below_total(self) -> ListenerConfig:
        if self.reserved_connections is not None \
                and self.reserved_connections >= self.max_connections:
            raise ValueError("reserved_connections must be smaller than max_connections")
        if isinstance(self.workers, int) and not 1 <= self.workers <= 31:
            raise ValueError("workers must be 1 to 31, or \"auto\"")
        if self.data_memory_limit is not None \
                and self.data_memory_limit < 2 * self.max_message_size:
            raise ValueError("data_memory_limit must be at least twice max_message_size "
                             "(a message is counted twice its size)")
        return self

    @property
    def effective_workers(self) -> int:
        if self.workers == "auto":
            try:
                cpus = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                cpus = os.cpu_count() or 1
            return max(1, min(cpus, 31))
        return self.workers

    @property
    def effective_data_memory_limit(self) -> int:
        if self.data_memory_limit is not None:
            return self.data_memory_limit
        return max(128 * 2**20, 4 * self.max_message_size)


class QueueConfig(_Section):
    """The durable queue: a SQLite file (one node), or PostgreSQL shared by several nodes."""

    path: Path = Path("queue/relay.db")
    """The SQLite file (WAL mode, synchronous=FULL); keep it on a local disk."""
    url: str | None = None
    """"postgresql://user@host/db": one queue shared by several relay nodes (absent: SQLite)."""
    node: str | None = None
    """This node's name in a shared queue: leases, the log and metrics (default: the host name)."""
    readers: int = Field(4, ge=1, le=64)
    """Read connections kept open (PostgreSQL: besides the writer's own connection)."""
    trace_retention: Duration = 7 * 86400.0
    """How long finished messages keep their delivery trace (not their body)."""
    commit_batch: int = Field(512, ge=1)
    """Most messages written in one group commit."""


class DnsConfig(_Section):
    """The DNSSEC-validating resolver and the bounds of every lookup."""

    nameservers: tuple[HostPort, ...] = ()
    """Validating resolvers whose AD bit is trusted, "ip" or "ip:port"; empty = the system's."""
    timeout: Duration = 10.0
    """Time allowed for one lookup."""
    require_validating_resolver: bool = True
    """Defer deliveries (4.4.312) while the resolver does not validate, rather than drop DANE."""
    max_mx_hosts: int = Field(10, ge=1)
    """MX hosts considered per domain."""
    max_addresses_per_host: int = Field(8, ge=1)
    """Addresses tried per MX host."""
    max_records_per_rrset: int = Field(100, ge=1)
    """Records read from one RRset."""
    max_cname_chain: int = Field(8, ge=1)
    """CNAME links followed."""
    cache_max_ttl: Duration = 3600.0
    """Longest time an answer is cached (its TTL is honoured below this)."""
    tlsa_cache_max_ttl: Duration = 300.0
    """Longest time a TLSA answer is cached."""
    failure_cache_ttl: Duration = 5.0
    """How long SERVFAIL and timeouts are cached."""


class DaneConfig(_Section):
    """DANE matching (RFC 7672)."""

    ee_check_expiry: bool = False
    """Fail an expired DANE-EE(3) leaf with 4.7.322 (the RFC says not to check; the source
    service does)."""
    max_records: int = Field(20, ge=1)
    """DANE-TA records tried for path building per host (in a fixed order); DANE-EE
    records are all checked (one digest each)."""
    max_chain_length: int = Field(10, ge=1)
    """Certificates of a presented chain considered."""


class DomainPolicy(_Section):
    """Per destination domain: `[domains."example.com"]`."""

    dane: DaneMode = DaneMode.OPPORTUNISTIC
    """"opportunistic" (DANE where the DNS says so), "mandatory" (never without an
    authenticated DANE session) or "off" (ignore TLSA; opportunistic TLS)."""
    mta_sts: Literal["policy", "enforce", "off"] = "policy"
    """MTA-STS for this domain: "policy" (as its published policy says), "enforce" (a
    policy in testing mode is enforced) or "off" (the policy is neither fetched nor
    applied)."""


class MtaStsConfig(_Section):
    """MTA-STS (RFC 8461): policies fetched over HTTPS for domains that do not use DANE."""

    enabled: bool = True
    """Discover, fetch and apply MTA-STS policies (DANE still wins where a host has
    usable TLSA records)."""
    ca_file: Path | None = None
    """PEM file of the trusted CAs for the policy fetch and for MX certificates under a
    policy; default: the system's trust store. It replaces the system's store."""
    connect_timeout: Duration = 10.0
    """TCP connect and TLS handshake with the policy host."""
    fetch_timeout: Duration = 20.0
    """Whole policy fetch (connect, request, the response to its last byte)."""
    max_policy_size: Size = 65536
    """Largest policy body read; a larger one is a fetch failure."""
    refresh_interval: Duration = 86400.0
    """Cached policies are checked again (TXT id, then a fetch) this often in the
    background, so that an expired policy rarely makes delivery wait (RFC 8461 §10.2)."""
    refresh_before: Duration = 86400.0
    """A cached policy this close to its expiry is fetched again in the background."""
    failure_retry: Duration = 300.0
    """After a failed fetch, the same policy host is not asked again for this long."""


class RouteConfig(_Section):
    """A fixed next hop for a domain instead of its MX: `[[routes]]`."""

    domain: str
    """"example.org", or ".example.org" for its subdomains too."""
    hosts: tuple[str, ...]
    """"host" or "host:port", tried in order."""
    tls: Literal["dane", "encrypt", "may", "none"] = "dane"
    """dane: DANE where the host has secure TLSA records, else opportunistic TLS;
    encrypt: TLS without authentication; may: opportunistic; none: cleartext."""


class DeliveryConfig(_Section):
    """Outbound delivery: schedule, concurrency and the SMTP client's timeouts."""

    enabled: bool = True
    """Run the delivery workers in `relay serve`."""
    port: int = Field(25, gt=0, lt=65536)
    """Destination port of every MX host (25; tests use another)."""
    retry_schedule: tuple[Duration, ...] = Field((900.0,), min_length=1)
    """Waits between attempts; the last entry repeats (["15m", "15m", "1h"] is the source
    service's own schedule)."""
    max_lifetime: Duration = 86400.0
    """After this, a recipient still failing bounces with the 5.x.x form of its last code."""
    helo_name: str | None = None
    """Name sent in EHLO (default: listener.hostname)."""
    max_connections: int = Field(100, ge=1)
    """Simultaneous outbound sessions in total."""
    max_connections_per_domain: int = Field(10, ge=1)
    """Simultaneous outbound sessions per destination domain."""
    initial_connections_per_domain: int = Field(5, ge=1)
    """A destination starts with this many simultaneous sessions; each session that gets
    as far as a transaction adds one (up to max_connections_per_domain), each that fails
    to connect or is refused before one takes one away (Postfix's
    initial_destination_concurrency)."""
    dead_destination_time: Duration = 300.0
    """A destination whose first connections all fail (a whole window of them) is not
    tried for this long: its due mail is deferred at once, without a connection; then one
    connection probes it. Never longer than half the shortest retry_schedule entry."""
    reserved_connections: int | None = Field(None, ge=0)
    """Of max_connections, this many are kept for mail not tried yet: deferred mail uses
    the others, so that a wave of retries to slow or dead destinations never holds up new
    mail (default: a fifth of max_connections)."""
    max_recipients_per_transaction: int = Field(100, ge=1)
    """Recipients sent in one SMTP transaction."""
    ipv4: bool = True
    """Connect over IPv4."""
    ipv6: bool = True
    """Connect over IPv6."""
    lease: Duration = 30.0
    """Work claimed by a node that dies returns to the queue after this; renewed every third
    of it while the work runs (another node takes over within lease + poll_interval)."""
    poll_interval: Duration = 1.0
    """Longest sleep of the scheduler between looks at the queue."""
    connect_timeout: Duration = 30.0
    """TCP connect."""
    greeting_timeout: Duration = 300.0
    """Waiting for the 220 greeting (RFC 5321 §4.5.3.2.1: 5 minutes)."""
    mail_timeout: Duration = 300.0
    """Reply to MAIL FROM (and EHLO)."""
    rcpt_timeout: Duration = 300.0
    """Reply to each RCPT TO."""
    data_init_timeout: Duration = 120.0
    """Reply to DATA."""
    data_block_timeout: Duration = 180.0
    """Each write of the message body."""
    data_end_timeout: Duration = 600.0
    """Reply to the final dot."""
    tls_timeout: Duration = 60.0
    """The STARTTLS handshake."""
    min_tls_version: Literal["1.2", "1.3"] = "1.2"
    """Lowest TLS version accepted when TLS is mandatory."""
    connection_cache_time: Duration = 2.0
    """How long an idle connection (already verified under the same policy) is kept for
    the next message to the same host; 0 turns reuse off (Postfix's
    smtp_connection_cache_time_limit)."""
    connection_reuse_limit: int = Field(100, ge=1)
    """Most messages sent over one connection."""
    connection_reuse_time: Duration = 300.0
    """Oldest age of a connection that is still reused (Postfix's
    smtp_connection_reuse_time_limit)."""
    honor_tls_required_no: bool = False
    """Honour a "TLS-Required: No" header field (RFC 8689 §5): such a message is delivered
    despite DANE and MTA-STS failures. Off by default: the relay exists to enforce."""

    @model_validator(mode="after")
    def _reserve_below_max(self) -> DeliveryConfig:
        if self.reserved_connections is not None \
                and self.reserved_connections >= self.max_connections:
            raise ValueError("reserved_connections must be smaller than max_connections")
        return self

    @property
    def effective_reserved_connections(self) -> int:
        if self.reserved_connections is not None:
            return self.reserved_connections
        return self.max_connections // 5

    @property
    def effective_dead_time(self) -> float:
        """dead_destination_time, at most half the shortest retry gap: mail deferred for a
        dead destination comes back after it may be tried again."""
        return min(self.dead_destination_time, min(self.retry_schedule) / 2)


class NdrConfig(_Section):
    """Non-delivery reports (RFC 3464)."""

    enabled: bool = True
    """Send NDRs to the envelope sender (never to a null sender)."""
    postmaster: MailAddress | None = None
    """Where an NDR that itself fails goes, once; then it is dropped. Also where mail to
    `RCPT TO:<postmaster>` (no domain, RFC 5321 §4.5.1) goes, from any client; unset,
    that recipient is refused with 550 5.1.1."""
    delay_warning: Duration | None = None
    """Warn the sender once a message has been delayed this long (off when unset)."""
    reporting_mta: str | None = None
    """Name in Reporting-MTA and the NDR's From (default: listener.hostname)."""


class TlsRptConfig(_Section):
    """SMTP TLS reporting (RFC 8460): aggregate reports of our TLS sessions, per policy
    domain (the TLSA base domain for DANE hosts, else the recipient domain), to the
    addresses a domain publishes in its `_smtp._tls` TXT record."""

    enabled: bool = False
    """Record every TLS session's result and send the reports."""
    submitter: str | None = None
    """Our domain in reports: file name, Subject, TLS-Report-Submitter (default:
    listener.hostname)."""
    organization_name: str | None = None
    """organization-name in reports (default: the submitter)."""
    contact_info: str | None = None
    """contact-info in reports (default: postmaster@<submitter>)."""
    from_address: str | None = None
    """From: of report mail (default: tlsrpt-noreply@<submitter>); the envelope sender is
    null, so a report that cannot be delivered never causes another message."""
    interval: Duration = 86400.0
    """Length of a reporting period; periods are aligned to the UTC epoch, so "24h" is
    one UTC day (RFC 8460 §4.1)."""
    max_delay: Duration = 3600.0
    """Reports go out at a random time up to this long after their period ends."""
    retry_interval: Duration = 300.0
    """First wait before an HTTPS report or a failed discovery is tried again; the wait
    doubles each time, up to one hour."""
    retry_lifetime: Duration = 86400.0
    """A report not delivered this long after it was first due is given up
    (RFC 8460 §5.5: up to 24 hours)."""
    https_timeout: Duration = 30.0
    """Time allowed for one HTTPS POST of a report."""
    https_ca_file: Path | None = None
    """PEM file of the CAs that HTTPS report endpoints are verified against (PKIX, with
    the host name); default: the system's trust store."""
    dkim_key_file: Path | None = None
    """PEM RSA private key to DKIM-sign report mail (RFC 8460 §3 requires a signature;
    publish the public key with "s=tlsrpt" or "s=*")."""
    dkim_selector: str | None = None
    """DKIM selector of dkim_key_file; required with it."""
    dkim_domain: str | None = None
    """DKIM signing domain (default: the submitter)."""

    @model_validator(mode="after")
    def _dkim_pair(self) -> TlsRptConfig:
        if (self.dkim_key_file is None) != (self.dkim_selector is None):
            raise ValueError("dkim_key_file and dkim_selector go together")
        return self


class MetricsConfig(_Section):
    """The Prometheus endpoint."""

    listen: HostPort | None = None
    """"host:port" of the /metrics and /healthz endpoint; unset = off."""


class LogConfig(_Section):
    """The event log on stdout."""

    format: Literal["json", "text"] = "json"
    """"json" (one object per line) or "text" for people."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level written."""


class Config(_Section):
    listener: ListenerConfig = ListenerConfig()
    queue: QueueConfig = QueueConfig()
    dns: DnsConfig = DnsConfig()
    dane: DaneConfig = DaneConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    ndr: NdrConfig = NdrConfig()
    tlsrpt: TlsRptConfig = TlsRptConfig()
    mta_sts: MtaStsConfig = MtaStsConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    domains: dict[str, DomainPolicy] = {}
    """Per-domain DANE and MTA-STS policy overrides."""
    routes: tuple[RouteConfig, ...] = ()
    """Fixed next hops instead of MX."""


def _env_value(raw: str) -> Any:
    """An env value is read as a TOML value when it parses as one, else as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == "RELAY_CONFIG":
            continue
        section, _, key = name[len(ENV_PREFIX):].partition("__")
        if not section or not key:
            raise ConfigError(f"{name}: expected RELAY_<SECTION>__<KEY>", source="environment")
        out.setdefault(section.lower(), {})[key.lower()] = _env_value(raw)
    return out


def _format_error(err: Any, source: str, env_keys: set[tuple[str, str]]) -> tuple[str, str]:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    where = source
    if len(loc) >= 2 and (loc[0], loc[1]) in env_keys:
        where = f"environment RELAY_{loc[0].upper()}__{loc[1].upper()}"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return key, f"{where}: {key}: {msg}"


def build(data: dict[str, Any], *, source: str, environ: Mapping[str, str] | None = None) -> Config:
    """Validate `data` (parsed TOML) with env overrides applied on top."""
    overrides = env_overrides(environ or {})
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    env_keys: set[tuple[str, str]] = set()
    for section, values in overrides.items():
        current = merged.setdefault(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"{source}: {section}: must be a table", source=source, key=section)
        current.update(values)
        env_keys.update((section, k) for k in values)
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        lines = [_format_error(e, source, env_keys) for e in exc.errors()]
        raise ConfigError("\n".join(m for _, m in lines), source=source, key=lines[0][0]) from None


def resolve_path(
    cli_path: str | os.PathLike[str] | None, environ: Mapping[str, str]
) -> tuple[Path, bool]:
    """The config file to read and whether it was named explicitly (then it must exist)."""
    if cli_path:
        return Path(cli_path), True
    if environ.get("RELAY_CONFIG"):
        return Path(environ["RELAY_CONFIG"]), True
    return DEFAULT_CONFIG, False


def load(cli_path: str | os.PathLike[str] | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    path, explicit = resolve_path(cli_path, environ)
    if not path.exists():
        if explicit:
            raise ConfigError(f"{path}: config file does not exist", source=str(path))
        return build({}, source="defaults", environ=environ)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}", source=str(path)) from None
    return build(data, source=str(path), environ=environ)


def dump(config: Config) -> dict[str, Any]:
    """The effective config as plain data (durations back in their written form)."""

    return {k: dump_value(k, v) for k, v in config.model_dump(mode="python").items()}


def dump_value(name: str, value: Any) -> Any:
    """One config value as plain data; `name` tells durations from other numbers."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="python")
    if isinstance(value, dict):
        return {k: dump_value(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [dump_value(name, v) for v in value]
    if isinstance(value, float) and name in _DURATION_FIELDS:
        return format_duration(value)
    if isinstance(value, Path | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, StrEnum):
        return value.value
    return value


def _duration_fields() -> set[str]:
    names: set[str] = set()
    for section in (ListenerConfig, QueueConfig, DnsConfig, DeliveryConfig, NdrConfig,
                    TlsRptConfig, MtaStsConfig):
        for name, f in section.model_fields.items():
            if "parse_duration" in repr(f.annotation) or any(
                getattr(m, "func", None) is parse_duration for m in f.metadata
            ):
                names.add(name)
    return names


_DURATION_FIELDS = _duration_fields()
