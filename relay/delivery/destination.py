"""Gather one destination's DNS facts and turn them into a plan (delivery and `relay check`).

    plan = await plan_destination("example.org", resolver, config)

MX (or the `[[routes]]` next hops) → A/AAAA of every host concurrently (per
`delivery.ipv4` / `delivery.ipv6`) → TLSA `_<port>._tcp.<base>` only where relay.dane.policy
asks for it (never for a host whose addresses are insecure) → relay.dane.policy.finish.
Beside the MX lookup, the domain's MTA-STS policy is looked up (relay.sts.source: cache,
TXT, fetch) and applied to each host (relay.sts.decide.apply_host: DANE wins where a host
has usable TLSA records). Every decision is made by the pure steps of relay.dane.policy
and relay.sts.decide; this module only does lookups.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from relay import codes
from relay.config import Config
from relay.dane.policy import (
    DomainPlan,
    HostPlan,
    HostTarget,
    MxDecision,
    PlanAction,
    find_route,
    finish,
    host_step,
    is_ip,
    mx_step,
    normalize,
    options_for,
    resolver_step,
    route_step,
    tlsa_step,
)
from relay.delivery.requiretls import host as requiretls_host
from relay.dns.resolve import Resolver, ValidationProbe
from relay.model import DnsAnswer, MxRecord, StsState
from relay.sts.decide import apply_host
from relay.sts.source import StsSource


async def plan_destination(domain: str, resolver: Resolver, config: Config, *,
                           port: int | None = None,
                           probe: ValidationProbe | None = None,
                           sts: StsSource | None = None,
                           requiretls: bool = False) -> DomainPlan:
    """The plan for `domain`. `port`: destination port (default `delivery.port`; a route
    hop's own port wins). `probe`: the resolver check to use; by default the resolver's
    cached probe (`Resolver.validation()`), consulted only when
    `dns.require_validating_resolver` is true. `sts`: where MTA-STS policies come from
    (None: MTA-STS is not looked at). `requiretls`: the message demands DANE- or
    MTA-STS-authenticated TLS (relay.delivery.requiretls). Never raises for DNS trouble."""
    d = normalize(domain)
    opts = options_for(config, d, port=port)
    route = find_route(config, d)
    if opts.require_validating_resolver:
        if probe is None:
            probe = await resolver.validation()
        gate = resolver_step(d, probe.validating, probe.detail, opts, route)
        if gate is not None:
            return gate
    state: StsState | None = None
    if route is not None:
        mx = route_step(d, route, opts)
        if sts is not None:
            state = StsState("route", detail=f"[[routes]] {route.domain}: MTA-STS applies to "
                             "the domain's MX hosts only")
    elif sts is not None:
        answer, state = await asyncio.gather(resolver.query(d, "MX"), sts.lookup(d))
        mx = mx_step(d, answer, opts)
    else:
        mx = mx_step(d, await resolver.query(d, "MX"), opts)
    if mx.plan is not None:
        return replace(mx.plan, sts=state)
    if state is not None and state.state == "dnssec-invalid":
        return replace(DomainPlan(d, PlanAction.DEFER, codes.DNSSEC_INVALID,
                                  f"MTA-STS: {state.detail}", mx_secure=mx.mx_secure,
                                  mx_answer=mx.mx_answer, dane_mode=opts.dane_mode,
                                  failure_type="dnssec-invalid"), sts=state)
    hosts = await asyncio.gather(*(plan_host(t, resolver, mx) for t in mx.targets))
    if requiretls and state is not None and state.applies and state.mode == "testing":
        state = replace(state, mode="enforce")  # RFC 8689 §4.2.1
    planned = [apply_host(h, state) for h in hosts]
    if requiretls:
        planned = [requiretls_host(h) for h in planned]
    return replace(finish(mx, planned), sts=state)


async def plan_host(target: HostTarget, resolver: Resolver, mx: MxDecision) -> HostPlan:
    """One host: its addresses, then the TLSA lookups the policy asks for, in order."""
    types = [t for t, on in (("A", mx.opts.ipv4), ("AAAA", mx.opts.ipv6)) if on]
    answers: list[DnsAnswer] = []
    if not (mx.route and is_ip(target.name)):  # MX targets are names, even "192.0.2.1"
        answers = list(await asyncio.gather(*(resolver.query(target.name, t) for t in types)))
    progress = host_step(target, answers, mx)
    if progress.plan is not None:
        return progress.plan
    pending = progress.pending
    assert pending is not None
    tlsa: list[DnsAnswer] = []
    while True:
        step = tlsa_step(pending, tlsa)
        if isinstance(step, HostPlan):
            return step
        tlsa.append(await resolver.query(step.qname, "TLSA"))


def answer_dict(a: DnsAnswer) -> dict[str, Any]:
    """One DNS answer as plain data (for `relay check --json` and traces)."""
    return {
        "qname": a.qname, "type": a.rdtype, "rcode": str(a.rcode), "security": a.security,
        "records": [_record_text(r) for r in a.records],
        "canonical_name": a.canonical_name,
        "chain": [{"owner": c.owner, "target": c.target, "secure": c.secure} for c in a.chain],
        "ede": [{"code": e.code, "text": e.text} for e in a.ede], "reason": a.reason,
    }


def _record_text(r: object) -> str:
    if isinstance(r, MxRecord):
        return f"{r.preference} {r.exchange or '.'}"
    return str(r)


def host_dict(h: HostPlan) -> dict[str, Any]:
    return {
        "name": h.name, "preference": h.preference, "port": h.port,
        "addresses": [{"ip": a.ip, "secure": a.secure} for a in h.addresses],
        "dnssec": h.dnssec, "canonical_name": h.canonical_name,
        "tlsa_bases": list(h.tlsa_bases), "tlsa_base": h.tlsa_base, "sni": h.sni,
        "tlsa": [str(r) for r in h.tlsa], "usable_tlsa": [str(r) for r in h.usable_tlsa],
        "requirement": str(h.requirement) if h.requirement else None, "usable": h.usable,
        "code": h.unusable_code, "reason": h.reason, "failure_type": h.failure_type,
        "reference_names": list(h.reference_names), "sts": h.sts or None,
        "lookups": [answer_dict(a) for a in h.lookups],
    }


def sts_dict(st: StsState | None) -> dict[str, Any] | None:
    """The MTA-STS state of a plan as plain data (`relay check --json`)."""
    if st is None:
        return None
    return {"state": st.state, "mode": st.mode or None, "published_mode":
            st.published_mode or None, "id": st.policy_id or None, "mx": list(st.patterns),
            "policy": list(st.lines), "source": st.source or None, "max_age": st.max_age or None,
            "expires_at": st.expires_at, "failure_type": st.failure_type,
            "detail": st.detail or None}


def plan_dict(p: DomainPlan) -> dict[str, Any]:
    """A DomainPlan as plain JSON-ready data."""
    return {
        "domain": p.domain, "action": str(p.action), "code": p.code, "reason": p.reason,
        "mx_secure": p.mx_secure, "implicit_mx": p.implicit_mx, "dane_mode": str(p.dane_mode),
        "route": p.route, "failure_type": p.failure_type, "sts": sts_dict(p.sts),
        "mx": answer_dict(p.mx_answer) if p.mx_answer else None,
        "hosts": [host_dict(h) for h in p.hosts],
    }
