"""Per-host decisions shared by delivery and `relay check`, so that both reach the same code.

Pure: values in, values out (time is passed in). relay.delivery.attempt runs the real session
and sends the mail; relay.check.probe runs the same session up to the point where MAIL FROM
would be sent, and quits. Both ask this module:

    tls_step(requirement, offered, use_tls)   -> TlsStep     (STARTTLS, fail 4.7.321, skip)
    starttls_min_version(requirement, floor)  -> "1.2"…     (lower for opportunistic TLS)
    check_chain(host, chain, now, limits)     -> ChainCheck  (DANE verdict as the trace says)
    session_failure(host, ip, exc, req)       -> (Outcome, RFC 8460 type)  (exception → value)
    unusable_outcome(host) / plan_outcome(plan) / give_up(failures) -> Outcome
    loops_back(ip, port, own_endpoints)       -> bool        (the MX is this relay)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from cryptography.x509.verification import Store

from relay import codes as codetable
from relay import dane
from relay.dane.policy import DomainPlan, HostPlan, PlanAction
from relay.delivery import classify
from relay.errors import SmtpClientError, TlsError, TlsInjection
from relay.model import Action, Outcome, Scope, TlsRequirement
from relay.sts import webpki

STARTTLS_NOT_SUPPORTED = "starttls-not-supported"  # RFC 8460 result type
VALIDATION_FAILURE = "validation-failure"  # RFC 8460: a failure of no other category


class TlsStep(StrEnum):
    STARTTLS = "starttls"  # send STARTTLS
    MISSING = "missing"  # TLS is mandatory and STARTTLS is not offered: 4.7.321
    SKIP = "skip"  # go on in cleartext (not offered and not required, or route tls = none)


def mandatory(req: TlsRequirement) -> bool:
    """TLS is mandatory for DANE (usable TLSA), ENCRYPT (TLSA, none usable) and STS (an
    MTA-STS policy in enforce mode)."""
    return req in (TlsRequirement.DANE, TlsRequirement.ENCRYPT, TlsRequirement.STS)


def tls_step(req: TlsRequirement, offered: bool, use_tls: bool = True) -> TlsStep:
    """What to do after EHLO. `use_tls` False: the opportunistic retry in cleartext."""
    if req is TlsRequirement.NONE or not use_tls or not (mandatory(req) or offered):
        return TlsStep.SKIP
    return TlsStep.STARTTLS if offered else TlsStep.MISSING


def starttls_min_version(req: TlsRequirement, configured: str) -> str:
    """`delivery.min_tls_version` where TLS is mandatory; anything for opportunistic TLS."""
    return configured if mandatory(req) else "1.0"


@dataclass(frozen=True)
class ChainCheck:
    """What the presented chain means for this host.

    `security`: "dane-authenticated", "sts-authenticated" or "tls" when `ok`, "failed"
    otherwise. `dane_text` is the trace's DANE column; `reason` the matcher's own words;
    `result` the relay.dane verdict when DANE was required; `webpki` the web-PKI verdict
    under an MTA-STS policy; `failure_type` the RFC 8460 type of a failure, also of one
    that an MTA-STS testing policy only reports (`ok` stays True then)."""

    ok: bool
    security: str
    dane_text: str
    code: str | None = None
    reason: str = ""
    result: dane.Verdict | None = None
    webpki: webpki.WebPkiVerdict | None = None
    failure_type: str | None = None


@dataclass(frozen=True)
class Limits:
    """The `[dane]` settings verify() needs."""

    ee_check_expiry: bool = False
    max_records: int = 20
    max_chain: int = 10
    roots: Store | None = None  # the web PKI (MTA-STS); None: every web-PKI check fails


def _webpki(host: HostPlan, chain: Sequence[bytes], now: dt.datetime, limits: Limits
            ) -> webpki.WebPkiVerdict:
    if limits.roots is None:
        return webpki.WebPkiVerdict(False, "no web-PKI trust store loaded",
                                    webpki.NOT_TRUSTED)
    return webpki.verify(chain, host.name, limits.roots, now, max_chain=limits.max_chain)


def check_chain(host: HostPlan, chain: Sequence[bytes], now: dt.datetime,
                limits: Limits = Limits()) -> ChainCheck:
    """The TLS session is up: is its chain good enough for this host's requirement?"""
    if host.requirement is TlsRequirement.STS:
        w = _webpki(host, chain, now, limits)
        if not w.ok:
            return ChainCheck(False, "failed", f"MTA-STS failed: {w.reason}",
                              codetable.STS_CERTIFICATE, w.reason, webpki=w,
                              failure_type=w.result_type)
        return ChainCheck(True, "sts-authenticated", f"MTA-STS: {w.reason}", None, w.reason,
                          webpki=w)
    if host.sts == "testing":  # deliver as without a policy; the check is only reported
        w = _webpki(host, chain, now, limits)
        base = "no usable TLSA record: TLS without authentication" \
            if host.requirement is TlsRequirement.ENCRYPT else "not required"
        if w.ok:
            return ChainCheck(True, "tls", f"{base}; MTA-STS testing: {w.reason}", None,
                              w.reason, webpki=w)
        return ChainCheck(True, "tls", f"{base}; MTA-STS testing, would fail: {w.reason}",
                          None, w.reason, webpki=w, failure_type=w.result_type)
    if host.requirement is TlsRequirement.DANE:
        v = dane.verify(host.usable_tlsa, list(chain), host.reference_names, now,
                        ee_check_expiry=limits.ee_check_expiry,
                        max_records=limits.max_records, max_chain=limits.max_chain)
        if not v.ok:
            return ChainCheck(False, "failed", f"failed: {v.reason}",
                              v.code or codetable.TLSA_INVALID, v.reason, v)
        return ChainCheck(True, "dane-authenticated", f"authenticated: {v.reason}", None,
                          v.reason, v)
    if host.requirement is TlsRequirement.ENCRYPT:
        return ChainCheck(True, "tls", "no usable TLSA record: TLS without authentication")
    return ChainCheck(True, "tls", "not required")


def session_failure(host: HostPlan, ip: str, exc: SmtpClientError, req: TlsRequirement
                    ) -> tuple[Outcome, str | None]:
    """A session that ended with an exception (connect, greeting, EHLO, STARTTLS, TLS):
    the outcome and, for TLS failures where TLS was mandatory, the RFC 8460 type. A
    STARTTLS response injection has its own outcome (classify.starttls_injection) and,
    where TLS was mandatory, the RFC 8460 type `validation-failure`."""
    detail = f"{host.name} [{ip}]: {exc}"
    if isinstance(exc, TlsInjection):
        sts = codetable.STS_STARTTLS if req is TlsRequirement.STS else None
        out = classify.starttls_injection(f"{host.name} [{ip}]", mandatory=mandatory(req),
                                          code=sts)
        return out, VALIDATION_FAILURE if mandatory(req) else None
    if isinstance(exc, TlsError) or exc.phase in ("starttls", "tls"):
        if mandatory(req):
            code = codetable.STS_STARTTLS if req is TlsRequirement.STS else \
                codetable.STARTTLS_NOT_SUPPORTED
            return classify.local(code, detail), STARTTLS_NOT_SUPPORTED
        return classify.connection_failed(detail), None
    if exc.code is not None and exc.reply is not None:
        out = classify.from_reply(exc.phase, exc.code, None, exc.reply)
        if out.action is Action.DELIVERED:
            out = classify.connection_failed(detail)
    elif exc.phase == "connect":
        out = classify.connection_failed(detail)
    else:
        out = classify.connection_lost(detail)
    return replace(out, scope=Scope.SITE), None


def starttls_missing(host: HostPlan, ip: str) -> Outcome:
    detail = f"{host.name} [{ip}] does not offer STARTTLS"
    if host.requirement is TlsRequirement.STS:
        return classify.local(codetable.STS_STARTTLS, detail)
    return classify.starttls_not_supported(detail)


def chain_failure(host: HostPlan, ip: str, check: ChainCheck) -> Outcome:
    return classify.local(check.code or codetable.TLSA_INVALID,
                          f"{host.name} [{ip}]: {check.reason}")


def chain_failure_type(check: ChainCheck, outcome: Outcome) -> str | None:
    """The RFC 8460 result type of a chain that failed (or that testing reports)."""
    return check.failure_type or codetable.tlsrpt_result_type(outcome.code)


def unusable_outcome(host: HostPlan) -> Outcome:
    """A host the plan could not use (DNS failure, mandatory DANE unmet)."""
    return classify.local(host.unusable_code or codetable.DNS_FAILED, host.reason)


def plan_outcome(plan: DomainPlan) -> Outcome:
    """The outcome of a plan that does not deliver (defer, or bounce at once)."""
    outcome = classify.local(plan.code or codetable.DNS_FAILED, plan.reason)
    if plan.action is PlanAction.BOUNCE and outcome.action is Action.DEFERRED:
        outcome = classify.expire(outcome)
    return outcome


def give_up(failures: Sequence[Outcome]) -> Outcome:
    """No host delivered: bounce when every host refused permanently (5xx), else defer
    with the most specific failure (relay.delivery.classify.most_specific)."""
    if not failures:
        return classify.local(codetable.DNS_FAILED, "no usable MX host")
    if all(f.action is Action.BOUNCED for f in failures):
        return failures[0]
    deferred = [f for f in failures if f.action is Action.DEFERRED]
    best = classify.most_specific_outcome(deferred)
    return best or classify.local(codetable.DNS_FAILED, "no usable MX host")


def loops_back(ip: str, port: int, own: frozenset[tuple[str, int]],
               local: frozenset[str] = frozenset()) -> bool:
    """Would (ip, port) reach this relay's own listener? (`own`: DeliverySettings'
    own_endpoints; ("*", port) stands for a wildcard listener: every loopback address
    and every address of this machine (`local`).) The unspecified address (0.0.0.0,
    ::) always reaches this machine."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if (ip, port) in own:
        return True
    if ("*", port) not in own:
        return addr.is_unspecified and any(p == port for _, p in own)
    return addr.is_loopback or addr.is_unspecified or str(addr) in local


def unroutable(ip: str) -> bool:
    """An MX address no mail can go to: unspecified, multicast, broadcast, reserved."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return True
    broadcast = addr.version == 4 and str(addr) == "255.255.255.255"
    return addr.is_unspecified or addr.is_multicast or broadcast or (
        addr.version == 4 and addr.is_reserved)


def greeting_loops(greeting_text: str, own_names: Sequence[str]) -> bool:
    """Postfix's check: the server greets with our own name ("mail loops back to
    myself")."""
    first = greeting_text.split(None, 1)[0].rstrip(".").lower() if greeting_text else ""
    return bool(first) and first in {n.rstrip(".").lower() for n in own_names if n}


def address_gate(host: HostPlan, ip: str, own: frozenset[tuple[str, int]],
                 local: frozenset[str] = frozenset()) -> Outcome | None:
    """Before connecting: this relay itself (a loop, 5.4.6) or an address no mail can go
    to (4.4.4, the next address is tried); None when the address may be used."""
    if loops_back(ip, host.port, own, local):
        return loop_outcome(host, ip)
    if unroutable(ip):
        return classify.no_route(f"{host.name} [{ip}] is not a routable address")
    return None


def loop_outcome(host: HostPlan, ip: str) -> Outcome:
    return classify.local(codetable.LOOP, f"{host.name} [{ip}]:{host.port} is this relay")
