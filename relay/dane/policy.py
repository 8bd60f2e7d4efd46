"""The delivery policy for one destination domain, from its DNS facts (SPEC "DANE rules").

Pure: values in, values out; no I/O, no clock. The work is split in steps so that the
orchestration (relay.delivery.destination) knows which lookups to do next, and never looks up
TLSA for a host whose addresses are insecure:

    resolver_step(domain, probe, opts)      -> DomainPlan | None   (resolver not validating)
    mx_step(domain, mx_answer, opts)        -> MxDecision           (final plan, or hosts)
    route_step(domain, route, opts)         -> MxDecision           ([[routes]] next hops)
    host_step(target, addr_answers, mx, opts) -> HostProgress       (plan, or TLSA bases)
    tlsa_step(pending, tlsa_answers)        -> HostPlan | TlsaNext  (decided, or ask next)
    finish(mx, hosts)                       -> DomainPlan           (deliver / defer)

Hosts come out in preference order (ties by name); the caller shuffles equal preferences
with `shuffle_equal_preference(hosts, rng)`. Security never reorders hosts.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from relay import codes, dane
from relay.config import Config, RouteConfig, split_hostport
from relay.model import (
    DaneMode,
    DnsAnswer,
    MxRecord,
    Rcode,
    StsState,
    TlsaRecord,
    TlsRequirement,
)

# RFC 8460 result types used for failures decided here.
DNSSEC_INVALID = "dnssec-invalid"
DANE_REQUIRED = "dane-required"

# When no host is usable, the domain is deferred with the most specific code.
_SPECIFICITY = {codes.DNSSEC_INVALID: 3, codes.TLSA_INVALID: 2, codes.DNS_FAILED: 1}
_STRENGTH = {TlsRequirement.NONE: 0, TlsRequirement.MAY: 1, TlsRequirement.ENCRYPT: 2,
             TlsRequirement.STS: 3, TlsRequirement.DANE: 4}


class PlanAction(StrEnum):
    DELIVER = "deliver"
    DEFER = "defer"
    BOUNCE = "bounce"


@dataclass(frozen=True)
class PolicyOptions:
    """What the configuration says for one destination domain."""

    dane_mode: DaneMode = DaneMode.OPPORTUNISTIC
    port: int = 25
    max_mx_hosts: int = 10
    max_addresses_per_host: int = 8
    ipv4: bool = True
    ipv6: bool = True
    require_validating_resolver: bool = True


def normalize(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def domain_mode(config: Config, domain: str) -> DaneMode:
    """`domains."<domain>".dane` (exact name, case-insensitive), default opportunistic."""
    d = normalize(domain)
    for name, pol in config.domains.items():
        if normalize(name) == d:
            return pol.dane
    return DaneMode.OPPORTUNISTIC


def find_route(config: Config, domain: str) -> RouteConfig | None:
    """The `[[routes]]` entry for a domain: an exact `domain` first, else the longest
    `.parent` entry covering it (".example.org" covers example.org and its subdomains)."""
    d = normalize(domain)
    best: RouteConfig | None = None
    for route in config.routes:
        r = route.domain.strip().lower().rstrip(".")
        if r == d:
            return route
        if r.startswith(".") and (d == r[1:] or d.endswith(r)) and (
                best is None or len(r) > len(best.domain)):
            best = route
    return best


def options_for(config: Config, domain: str, *, port: int | None = None) -> PolicyOptions:
    return PolicyOptions(
        dane_mode=domain_mode(config, domain),
        port=port or config.delivery.port,
        max_mx_hosts=config.dns.max_mx_hosts,
        max_addresses_per_host=config.dns.max_addresses_per_host,
        ipv4=config.delivery.ipv4,
        ipv6=config.delivery.ipv6,
        require_validating_resolver=config.dns.require_validating_resolver,
    )


def tlsa_qname(base: str, port: int) -> str:
    return f"_{port}._tcp.{base}"


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# --- values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostTarget:
    """A host to resolve: an MX exchange, the implicit MX, or a route's next hop."""

    name: str
    preference: int
    port: int
    floor: TlsRequirement = TlsRequirement.MAY  # least TLS demanded (routes may raise it)
    dane: bool = True  # False: never look up TLSA (dane = "off", route tls = "none")


@dataclass(frozen=True)
class HostAddress:
    ip: str
    secure: bool

    @property
    def family(self) -> int:
        return 6 if ":" in self.ip else 4


@dataclass(frozen=True)
class HostPlan:
    """What the relay will (or will not) do with one host."""

    name: str
    preference: int
    port: int
    addresses: tuple[HostAddress, ...]
    addresses_secure: bool
    canonical_name: str  # CNAME-expanded host name ("" when it has no addresses)
    tlsa_bases: tuple[str, ...]  # TLSA base domains to try, in order (empty: no lookup)
    tlsa_base: str | None  # the base whose secure TLSA RRset decided; None: no TLSA
    tlsa: tuple[TlsaRecord, ...]  # that secure RRset (usable or not)
    usable_tlsa: tuple[TlsaRecord, ...]  # usable ones, digest agility applied
    requirement: TlsRequirement | None  # None: the host is unusable
    unusable_code: str | None  # e.g. "4.7.324" when unusable
    reason: str
    reference_names: tuple[str, ...]  # DANE-TA name checks: base, MX host, domain if secure
    failure_type: str | None = None  # RFC 8460 result type of the failure, if any
    lookups: tuple[DnsAnswer, ...] = ()  # address and TLSA answers (trace, relay check)
    sts: str = ""  # MTA-STS for this host (relay.sts.decide): "" none, "enforce" (web
    # PKI required), "testing" (checked and reported only), "dane" (DANE decides),
    # "mismatch" (not in the policy's mx patterns)

    @property
    def usable(self) -> bool:
        return self.requirement is not None

    @property
    def sni(self) -> str:
        """SNI = the TLSA base domain, else the host name."""
        return self.tlsa_base or self.name

    @property
    def dnssec(self) -> str:
        if self.unusable_code == codes.DNSSEC_INVALID:
            return "bogus"
        return "secure" if self.addresses_secure else "insecure"


@dataclass(frozen=True)
class DomainPlan:
    """The plan for one destination domain: deliver to `hosts`, or defer / bounce."""

    domain: str
    action: PlanAction
    code: str | None  # None when delivering
    reason: str
    hosts: tuple[HostPlan, ...] = ()
    mx_secure: bool = False
    implicit_mx: bool = False
    mx_answer: DnsAnswer | None = None
    dane_mode: DaneMode = DaneMode.OPPORTUNISTIC
    route: str | None = None  # the [[routes]] domain that applied
    failure_type: str | None = None
    sts: StsState | None = None  # the MTA-STS policy applied (None: not looked up)

    @property
    def usable_hosts(self) -> tuple[HostPlan, ...]:
        return tuple(h for h in self.hosts if h.usable)


@dataclass(frozen=True)
class MxDecision:
    """After the MX step: either a final plan, or the hosts to resolve."""

    domain: str
    plan: DomainPlan | None
    targets: tuple[HostTarget, ...] = ()
    mx_secure: bool = False
    implicit: bool = False
    mx_answer: DnsAnswer | None = None
    opts: PolicyOptions = field(default_factory=PolicyOptions)
    route: str | None = None


@dataclass(frozen=True)
class HostPending:
    """A host whose addresses are known and whose TLSA lookups are due."""

    target: HostTarget
    addresses: tuple[HostAddress, ...]
    addresses_secure: bool
    canonical_name: str
    tlsa_bases: tuple[str, ...]
    reference_extra: tuple[str, ...]  # reference names besides the TLSA base
    mode: DaneMode
    domain: str
    lookups: tuple[DnsAnswer, ...]
    note: str = ""


@dataclass(frozen=True)
class HostProgress:
    plan: HostPlan | None = None
    pending: HostPending | None = None


@dataclass(frozen=True)
class TlsaNext:
    """Look up TLSA for this base next (qname = `_<port>._tcp.<base>`)."""

    base: str
    qname: str


# --- steps ----------------------------------------------------------------------------------


def _defer(domain: str, code: str, reason: str, opts: PolicyOptions, **kw: Any) -> DomainPlan:
    return DomainPlan(domain, PlanAction.DEFER, code, reason, dane_mode=opts.dane_mode, **kw)


def resolver_step(domain: str, validating: bool | None, detail: str,
                  opts: PolicyOptions, route: RouteConfig | None = None) -> DomainPlan | None:
    """Defer (4.4.312) when the resolver was found not validating and the configuration
    requires a validating one; None to go on. `validating=None`: not probed yet."""
    if validating is not False or not opts.require_validating_resolver:
        return None
    if opts.dane_mode is DaneMode.OFF or (route is not None and route.tls == "none"):
        return None  # nothing here depends on DNSSEC
    return _defer(normalize(domain), codes.DNS_FAILED,
                  f"DNS resolver does not validate DNSSEC ({detail}); deliveries wait because "
                  "dns.require_validating_resolver = true (DANE cannot be enforced)", opts)


def mx_step(domain: str, answer: DnsAnswer, opts: PolicyOptions) -> MxDecision:
    """RFC 7672 §2.2.1 / RFC 5321 §5.1 / RFC 7505 on the MX answer of `domain`."""
    d = normalize(domain)
    common: dict[str, Any] = {"mx_answer": answer, "mx_secure": answer.secure}

    def final(plan: DomainPlan) -> MxDecision:
        return MxDecision(d, plan, opts=opts, **common)

    if answer.dnssec_failure:
        return final(_defer(d, codes.DNSSEC_INVALID, f"MX lookup for {d} failed DNSSEC "
                            f"validation: {answer.reason}", opts, failure_type=DNSSEC_INVALID,
                            **common))
    if answer.rcode is Rcode.NXDOMAIN:
        return final(DomainPlan(d, PlanAction.BOUNCE, codes.NO_SUCH_DOMAIN,
                                f"domain {d} does not exist (NXDOMAIN)",
                                dane_mode=opts.dane_mode, **common))
    if answer.rcode.failed:
        return final(_defer(d, codes.DNS_FAILED,
                            f"MX lookup for {d} failed ({answer.rcode}): {answer.reason}",
                            opts, **common))
    if (opts.dane_mode is DaneMode.MANDATORY and not answer.secure):
        return final(_defer(d, codes.TLSA_INVALID,
                            f"DANE is mandatory for {d} (domains.\"{d}\".dane) but its MX "
                            "lookup is not DNSSEC-authenticated", opts,
                            failure_type=DANE_REQUIRED, **common))
    if answer.rcode is Rcode.NODATA:  # no MX: the domain itself (implicit MX)
        target = HostTarget(d, 0, opts.port, dane=opts.dane_mode is not DaneMode.OFF)
        return MxDecision(d, None, (target,), implicit=True, opts=opts, **common)
    mxs = [r for r in answer.records if isinstance(r, MxRecord)]
    real = [r for r in mxs if r.exchange]
    if not real:  # "0 ." (RFC 7505): the domain accepts no mail
        return final(DomainPlan(d, PlanAction.BOUNCE, codes.NULL_MX,
                                f"domain {d} publishes a null MX: it accepts no mail",
                                dane_mode=opts.dane_mode, **common))
    best: dict[str, int] = {}
    for r in real:
        name = normalize(r.exchange)
        best[name] = min(r.preference, best.get(name, r.preference))
    ordered = sorted(best.items(), key=lambda kv: (kv[1], kv[0]))[:opts.max_mx_hosts]
    targets = tuple(HostTarget(n, p, opts.port, dane=opts.dane_mode is not DaneMode.OFF)
                    for n, p in ordered)
    return MxDecision(d, None, targets, opts=opts, **common)


def route_step(domain: str, route: RouteConfig, opts: PolicyOptions) -> MxDecision:
    """Next hops from a `[[routes]]` entry, in the configured order, with their TLS level.
    tls "dane"/"may": DANE where the hop has secure TLSA, else opportunistic; "encrypt":
    TLS mandatory (DANE where TLSA says so); "none": cleartext, no TLSA lookup."""
    floor = {"dane": TlsRequirement.MAY, "may": TlsRequirement.MAY,
             "encrypt": TlsRequirement.ENCRYPT, "none": TlsRequirement.NONE}[route.tls]
    targets = []
    for i, hop in enumerate(route.hosts):
        host, port = split_hostport(hop, opts.port)
        targets.append(HostTarget(normalize(host), i, port, floor,
                                  dane=route.tls != "none" and opts.dane_mode is not DaneMode.OFF))
    return MxDecision(normalize(domain), None, tuple(targets), opts=opts, route=route.domain)


def _unusable(target: HostTarget, code: str, reason: str, *, failure_type: str | None = None,
              lookups: tuple[DnsAnswer, ...] = (), addresses: tuple[HostAddress, ...] = (),
              secure: bool = False, canonical: str = "", bases: tuple[str, ...] = (),
              base: str | None = None, tlsa: tuple[TlsaRecord, ...] = (),
              refs: tuple[str, ...] = ()) -> HostPlan:
    return HostPlan(target.name, target.preference, target.port, addresses, secure, canonical,
                    bases, base, tlsa, (), None, code, reason, refs, failure_type, lookups)


def _dns_failure_code(answer: DnsAnswer) -> tuple[str, str | None]:
    if answer.dnssec_failure:
        return codes.DNSSEC_INVALID, DNSSEC_INVALID
    return codes.DNS_FAILED, None


def _interleave(v4: list[str], v6: list[str]) -> list[str]:
    out: list[str] = []
    for i in range(max(len(v4), len(v6))):
        out += [x[i] for x in (v4, v6) if i < len(x)]
    return out


def host_step(target: HostTarget, answers: Sequence[DnsAnswer], mx: MxDecision
              ) -> HostProgress:
    """From a host's A/AAAA answers: unusable, opportunistic without TLSA lookup (insecure
    addresses), or the TLSA base domains to query (RFC 7672 §2.2.2, SPEC)."""
    opts, lookups = mx.opts, tuple(answers)
    refs = [target.name]
    if mx.mx_secure and not mx.route and mx.domain not in refs:
        refs.append(mx.domain)
    if mx.route and is_ip(target.name):  # a route's hop given as an address: no DNS, no TLSA
        plan = HostPlan(target.name, target.preference, target.port,
                        (HostAddress(target.name, False),), False, target.name, (), None, (),
                        (), target.floor, None, "next hop is an IP address: no TLSA lookup",
                        tuple(refs), None, lookups)
        return HostProgress(plan=_apply_mode(plan, opts.dane_mode, mx.domain))
    bogus = [a for a in answers if a.dnssec_failure]
    if bogus:
        return HostProgress(plan=_unusable(
            target, codes.DNSSEC_INVALID, f"address lookup {bogus[0].qname} {bogus[0].rdtype} "
            f"failed DNSSEC validation: {bogus[0].reason}", failure_type=DNSSEC_INVALID,
            lookups=lookups))
    ok = [a for a in answers if a.rcode is Rcode.OK and a.records]
    failed = [a for a in answers if a.rcode.failed]
    if not ok:
        if failed:
            code, ft = _dns_failure_code(failed[0])
            why = f"address lookup {failed[0].qname} {failed[0].rdtype} failed " \
                  f"({failed[0].rcode}): {failed[0].reason}"
        else:
            code, ft = codes.DNS_FAILED, None
            why = f"host {target.name} has no address records"
            if not answers:
                why += " (no address family enabled: delivery.ipv4 / delivery.ipv6)"
        return HostProgress(plan=_unusable(target, code, why, failure_type=ft, lookups=lookups))
    v4 = sorted({str(r) for a in ok if a.rdtype == "A" for r in a.records})
    v6 = sorted({str(r) for a in ok if a.rdtype == "AAAA" for r in a.records})
    secure = all(a.secure for a in ok)
    addrs = tuple(HostAddress(ip, secure) for ip in
                  _interleave(v4, v6)[:opts.max_addresses_per_host])
    first = ok[0]
    canonical = first.canonical_name or target.name
    cnamed = bool(first.chain) and canonical != target.name
    note = ""
    if failed:
        note = f"; {failed[0].rdtype} lookup failed ({failed[0].rcode}), using the other family"
    if not target.dane:
        bases: tuple[str, ...] = ()
        why = "TLSA not consulted (dane = \"off\" or route tls = \"none\")"
    elif secure:
        bases = (canonical, target.name) if cnamed else (target.name,)
        why = ""
    elif cnamed and first.chain[0].secure:  # only the first CNAME is secure
        bases = (target.name,)
        why = ""
    else:
        bases = ()
        why = "host addresses are not DNSSEC-signed: no TLSA lookup, opportunistic TLS"
    if not bases:
        plan = HostPlan(target.name, target.preference, target.port, addrs, secure, canonical,
                        (), None, (), (), target.floor, None, why + note, tuple(refs), None,
                        lookups)
        return HostProgress(plan=_apply_mode(plan, opts.dane_mode, mx.domain))
    return HostProgress(pending=HostPending(target, addrs, secure, canonical, bases,
                                            tuple(refs), opts.dane_mode, mx.domain, lookups,
                                            note))


def tlsa_step(pending: HostPending, answers: Sequence[DnsAnswer]) -> HostPlan | TlsaNext:
    """Given the TLSA answers so far (one per base, in order): the host's plan, or the
    next base to query (after a secure denial / insecure answer at the CNAME-expanded
    name, the original name is tried)."""
    bases, t = pending.tlsa_bases, pending.target
    if not answers:
        return TlsaNext(bases[0], tlsa_qname(bases[0], t.port))
    lookups = pending.lookups + tuple(answers)
    i, ans = len(answers) - 1, answers[-1]
    base = bases[i]

    def refs(b: str | None) -> tuple[str, ...]:
        return tuple(dict.fromkeys(([b] if b else []) + list(pending.reference_extra)))

    def plan(req: TlsRequirement | None, reason: str, *, code: str | None = None,
             ft: str | None = None, tlsa_base: str | None = None,
             tlsa: tuple[TlsaRecord, ...] = (), usable: tuple[TlsaRecord, ...] = ()
             ) -> HostPlan:
        return HostPlan(t.name, t.preference, t.port, pending.addresses,
                        pending.addresses_secure, pending.canonical_name, bases, tlsa_base,
                        tlsa, usable, req, code, reason + pending.note, refs(tlsa_base or base),
                        ft, lookups)

    if ans.dnssec_failure:
        return plan(None, f"TLSA lookup {ans.qname} failed DNSSEC validation: {ans.reason}",
                    code=codes.DNSSEC_INVALID, ft=DNSSEC_INVALID)
    if ans.rcode is Rcode.SERVFAIL:
        return plan(None, f"TLSA lookup {ans.qname} answered SERVFAIL ({ans.reason}); an "
                    "absent TLSA RRset must be proven by NODATA or NXDOMAIN",
                    code=codes.DNSSEC_INVALID, ft=DNSSEC_INVALID)
    if ans.rcode.failed:
        return plan(None, f"TLSA lookup {ans.qname} failed ({ans.rcode}): {ans.reason}",
                    code=codes.DNS_FAILED)
    if ans.rcode is Rcode.OK and ans.secure:
        records = tuple(r for r in ans.records if isinstance(r, TlsaRecord))
        usable = tuple(dane.usable_records(records))
        if usable:
            req, why = TlsRequirement.DANE, f"{len(usable)} usable TLSA record(s) at {ans.qname}"
        else:
            req = TlsRequirement.ENCRYPT
            why = f"TLSA records at {ans.qname} but none usable (usages 0/1 or malformed): " \
                  "TLS mandatory without authentication"
        req = max(req, t.floor, key=_STRENGTH.__getitem__)
        return _apply_mode(plan(req, why, tlsa_base=base, tlsa=records, usable=usable),
                           pending.mode, pending.domain)
    if i + 1 < len(bases):
        return TlsaNext(bases[i + 1], tlsa_qname(bases[i + 1], t.port))
    if ans.secure:
        why = f"no TLSA records at {ans.qname} (authenticated denial): opportunistic TLS"
    else:
        why = f"TLSA answer for {ans.qname} is not DNSSEC-signed: opportunistic TLS"
    return _apply_mode(plan(t.floor, why), pending.mode, pending.domain)


def _apply_mode(plan: HostPlan, mode: DaneMode, domain: str) -> HostPlan:
    """`dane = "mandatory"`: a host that would not be DANE-authenticated is unusable."""
    if mode is not DaneMode.MANDATORY or plan.requirement in (None, TlsRequirement.DANE):
        return plan
    return HostPlan(plan.name, plan.preference, plan.port, plan.addresses,
                    plan.addresses_secure, plan.canonical_name, plan.tlsa_bases,
                    plan.tlsa_base, plan.tlsa, plan.usable_tlsa, None, codes.TLSA_INVALID,
                    f"DANE is mandatory for {domain} (domains.\"{domain}\".dane) but this host "
                    f"has no usable DNSSEC-authenticated TLSA records ({plan.reason})",
                    plan.reference_names, DANE_REQUIRED, plan.lookups)


def finish(mx: MxDecision, hosts: Sequence[HostPlan]) -> DomainPlan:
    """Deliver when a host is usable; else defer with the most specific failure code."""
    hosts = tuple(sorted(hosts, key=lambda h: (h.preference, h.name)))
    common: dict[str, Any] = {
        "hosts": hosts, "mx_secure": mx.mx_secure, "implicit_mx": mx.implicit,
        "mx_answer": mx.mx_answer, "dane_mode": mx.opts.dane_mode, "route": mx.route}
    if any(h.usable for h in hosts):
        n = sum(h.usable for h in hosts)
        return DomainPlan(mx.domain, PlanAction.DELIVER, None,
                          f"{n} of {len(hosts)} host(s) usable", **common)
    if not hosts:
        return DomainPlan(mx.domain, PlanAction.DEFER, codes.DNS_FAILED, "no host to try",
                          **common)
    worst = max(hosts, key=lambda h: _SPECIFICITY.get(h.unusable_code or "", 0))
    reason = "no usable host: " + "; ".join(f"{h.name}: {h.reason}" for h in hosts)
    return DomainPlan(mx.domain, PlanAction.DEFER, worst.unusable_code or codes.DNS_FAILED,
                      reason, failure_type=worst.failure_type, **common)


def shuffle_equal_preference(hosts: Sequence[HostPlan], rng: random.Random
                             ) -> tuple[HostPlan, ...]:
    """RFC 5321 §5.1: randomize among hosts of equal preference (order kept otherwise)."""
    out: list[HostPlan] = []
    group: list[HostPlan] = []
    for h in [*hosts, None]:
        if group and (h is None or h.preference != group[0].preference):
            rng.shuffle(group)
            out += group
            group = []
        if h is not None:
            group.append(h)
    return tuple(out)
