"""`relay check DOMAIN [--json] [--no-connect]`: the delivery worker's checks, no mail sent.

Like Postfix's posttls-finger or the source service's connectivity analyzer: probe the
resolver (`. DNSKEY` with AD), plan the destination exactly as delivery does
(relay.delivery.destination: MX → A/AAAA → TLSA per SPEC's DANE rules), then, per address of every
usable host (in MX order), connect, EHLO, STARTTLS where the plan asks for it, match the
presented chain against the TLSA records, EHLO again, and QUIT — never MAIL FROM.
Every per-host decision comes from relay.delivery.verdict, the module delivery uses, so the code
shown is the one delivery would record.

The verdict: the first host in MX order that would take the mail decides
(`dane-authenticated`, `tls`, `plain`); if none would, `defer` with the most specific code
(or `bounce` when every host refused permanently, or for null MX / NXDOMAIN). Exit 0 when
delivery would happen, 1 otherwise. Unlike delivery, which randomizes hosts of equal
preference, the check walks them in the plan's order, and waits at most
CHECK_MAX_WAIT seconds per SMTP step.

The report is one JSON-ready dict (`run_check`); relay.check.render renders it as text.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from relay import codes as codetable
from relay.check import render as checkfmt
from relay.config import Config
from relay.dane.policy import DomainPlan, HostPlan, PlanAction
from relay.delivery import verdict
from relay.delivery.attempt import DeliverySettings
from relay.delivery.destination import answer_dict, plan_destination, sts_dict
from relay.dns.resolve import Resolver, ValidationProbe, check_validating
from relay.errors import ConfigError, SmtpClientError, TlsError
from relay.model import Action, Outcome, TlsRequirement
from relay.smtp.client import SmtpSession, Timeouts
from relay.smtp.protocol import TlsInfo
from relay.sts.record import policy_url, txt_name
from relay.sts.source import StsSource

CHECK_MAX_WAIT = 60.0  # seconds per SMTP step (delivery waits up to the configured ones)
PARALLEL = 8  # addresses probed at once
DELIVERING = ("dane-authenticated", "sts-authenticated", "tls", "plain")
Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- one address ----------------------------------------------------------------------------


@dataclass
class AddressCheck:
    """What happened on one address: the steps in order and the facts they found."""

    ip: str
    port: int
    steps: list[dict[str, str]] = field(default_factory=list)
    connected: bool = False
    greeting: str | None = None
    ehlo: list[str] | None = None
    starttls_offered: bool | None = None
    tls: TlsInfo | None = None
    chain: checkfmt.ChainCheckFacts | None = None
    security: str = ""  # dane-authenticated | tls | plain | failed
    outcome: Outcome | None = None  # the failure, when security == "failed"
    failure_type: str | None = None
    plain_retry: bool = False
    quit_before_mail: bool = False

    def step(self, status: str, text: str) -> None:
        self.steps.append({"status": status, "text": text})

    def fail(self, outcome: Outcome, failure_type: str | None = None) -> AddressCheck:
        self.security, self.outcome, self.failure_type = "failed", outcome, failure_type
        self.step("fail", f"→ {outcome.code} {codetable.text(outcome.code) or outcome.reply}")
        return self


class AddressProbe:
    """Delivery's per-address session (relay.delivery.attempt.Deliverer._try), ending in QUIT."""

    def __init__(self, settings: DeliverySettings, clock: Clock = _utcnow) -> None:
        self.settings = settings
        self.clock = clock
        self.limits = verdict.Limits(settings.ee_check_expiry, settings.max_tlsa_records,
                                     settings.max_chain, settings.roots)

    async def run(self, host: HostPlan, ip: str) -> AddressCheck:
        s, port = self.settings, host.port
        res = AddressCheck(ip, port)
        gate = verdict.address_gate(host, ip, s.own_endpoints, s.local_addresses)
        if gate is not None:
            res.step("fail", f"[{ip}]:{port}: {gate.reply}")
            return res.fail(gate)
        req = host.requirement or TlsRequirement.MAY
        use_tls = True
        while True:
            try:
                sess = await SmtpSession.connect(ip, port, helo_name=s.helo_name,
                                                 timeouts=s.timeouts)
            except SmtpClientError as exc:
                res.step("fail", f"connect/greeting: {exc}")
                return res.fail(*verdict.session_failure(host, ip, exc, req))
            res.connected = True
            res.greeting = str(sess.greeting) if sess.greeting else None
            res.step("ok", f"connected to [{ip}]:{port}: {res.greeting}")
            try:
                return await self._session(sess, host, ip, req, res, use_tls)
            except TlsError as exc:
                sess.close()
                res.step("fail", f"{exc.phase}: {exc}")
                if req is TlsRequirement.MAY and use_tls and exc.phase == "tls":
                    use_tls = False  # delivery reconnects and goes on in cleartext
                    res.plain_retry = True
                    res.step("warn", "opportunistic TLS: the relay would reconnect and "
                             "deliver in cleartext")
                    continue
                return res.fail(*verdict.session_failure(host, ip, exc, req))
            except SmtpClientError as exc:
                sess.close()
                res.step("fail", f"{exc.phase}: {exc}")
                return res.fail(*verdict.session_failure(host, ip, exc, req))
            finally:
                if not sess.closed:
                    await sess.quit()
                    sess.close()

    async def _session(self, sess: SmtpSession, host: HostPlan, ip: str,
                       req: TlsRequirement, res: AddressCheck, use_tls: bool) -> AddressCheck:
        reply = await sess.ehlo()
        res.ehlo = sorted(sess.extensions.keywords) if sess.extensions.esmtp else []
        offered = sess.extensions.starttls
        res.starttls_offered = offered
        hello = "EHLO" if sess.extensions.esmtp else "HELO (EHLO refused)"
        res.step("ok", f"{hello}: {reply.code}" + (
            f" {', '.join(res.ehlo)}" if res.ehlo else ""))
        res.step("ok" if offered else ("fail" if verdict.mandatory(req) else "warn"),
                 "STARTTLS offered" if offered else "STARTTLS not offered")
        step = verdict.tls_step(req, offered, use_tls)
        if step is verdict.TlsStep.MISSING:
            return res.fail(verdict.starttls_missing(host, ip),
                            verdict.STARTTLS_NOT_SUPPORTED)
        security = "plain"
        if step is verdict.TlsStep.STARTTLS:
            try:
                tls = await sess.starttls(host.sni, min_version=verdict.starttls_min_version(
                    req, self.settings.min_tls_version))
            except TlsError as exc:
                if verdict.mandatory(req) or not sess.usable:
                    raise
                res.step("warn", f"STARTTLS refused ({exc}): opportunistic, the session "
                         "goes on in cleartext")
                tls = None
            if tls is not None:
                res.tls = tls
                bits = f" ({tls.bits} bits)" if tls.bits else ""
                res.step("ok", f"TLS {tls.version} {tls.cipher}{bits}, SNI "
                         f"{tls.server_hostname or '(none)'}, {len(tls.chain)} certificate(s)")
                judged = verdict.check_chain(host, tls.chain, self.clock(), self.limits)
                res.chain = checkfmt.chain_facts(host, tls.chain, judged, self.clock())
                what = "MTA-STS" if req is TlsRequirement.STS else "DANE"
                if not judged.ok:
                    res.step("fail", f"{what}: {judged.reason}")
                    out = verdict.chain_failure(host, ip, judged)
                    return res.fail(out, verdict.chain_failure_type(judged, out))
                res.step("warn" if judged.failure_type else "ok", f"{what}: {judged.dane_text}")
                security = judged.security
                await sess.ehlo()
                res.step("ok", "EHLO again on the TLS session")
        elif not use_tls:
            res.step("warn", "cleartext (retry after the failed TLS handshake)")
        elif req is TlsRequirement.NONE:
            res.step("info", "cleartext (route tls = \"none\")")
        else:
            res.step("warn", "cleartext: opportunistic TLS, STARTTLS not offered")
        res.security = security
        await sess.quit()
        res.quit_before_mail = True
        res.step("ok", "QUIT before MAIL FROM: no mail sent")
        return res


def capped(t: Timeouts, limit: float = CHECK_MAX_WAIT) -> Timeouts:
    return Timeouts(**{f.name: min(getattr(t, f.name), limit) for f in fields(Timeouts)})


# --- the whole check ------------------------------------------------------------------------


@dataclass
class HostResult:
    host: HostPlan
    addresses: list[AddressCheck] = field(default_factory=list)


async def run_check(domain: str, cfg: Config, *, connect: bool = True,
                    hostname: str | None = None, clock: Clock = _utcnow) -> dict[str, Any]:
    """Run every check for `domain` and return the report (JSON-ready)."""
    resolver = Resolver.from_config(cfg.dns)
    probe = await check_validating(resolver)
    sts = StsSource(resolver, cfg)  # no store: a fresh look, nothing cached
    trust_error = None
    if cfg.mta_sts.enabled:
        try:
            sts.trust  # noqa: B018 - loads the trust store now
        except ConfigError as exc:
            trust_error = str(exc)
    plan = await plan_destination(domain, resolver, cfg, probe=probe,
                                  sts=sts if trust_error is None else None)
    name = hostname or cfg.listener.hostname or socket.getfqdn()
    settings = DeliverySettings.from_config(
        cfg, name, roots=sts.trust.roots if cfg.mta_sts.enabled and not trust_error else None)
    settings = replace(settings, timeouts=capped(settings.timeouts))
    results = [HostResult(h) for h in plan.hosts]
    if connect and plan.action is PlanAction.DELIVER:
        gate = asyncio.Semaphore(PARALLEL)
        prober = AddressProbe(settings, clock)

        async def one(host: HostPlan, ip: str) -> AddressCheck:
            async with gate:
                return await prober.run(host, ip)

        jobs = [(r, asyncio.ensure_future(one(r.host, a.ip)))
                for r in results if r.host.usable
                for a in r.host.addresses[: settings.max_addresses]]
        for r, job in jobs:
            r.addresses.append(await job)
    report = build_report(domain, cfg, probe, resolver, plan, results, connect=connect,
                          now=clock())
    report["mta_sts"] = await sts_report(plan, resolver, sts, trust_error)
    report["summary"] = checkfmt.summary(report)
    report["advice"] = checkfmt.advice(report, cfg.delivery.max_lifetime)
    return report


async def sts_report(plan: DomainPlan, resolver: Resolver, sts: StsSource,
                     trust_error: str | None) -> dict[str, Any]:
    """The MTA-STS steps: TXT record, fetch, policy, which MX hosts match."""
    d = plan.domain
    out: dict[str, Any] = {"url": policy_url(d), **(sts_dict(plan.sts) or {"state": "off"})}
    if trust_error:
        out.update(state="failed", detail=trust_error)
    if plan.sts is None or plan.sts.state in ("off", "route"):
        out["txt"] = None
        out["fetch"] = None
    else:
        out["txt"] = answer_dict(await resolver.query(txt_name(d), "TXT"))
        got = sts.last_fetch.get(d)
        out["fetch"] = None if got is None else {
            "ok": got.policy is not None, "ip": got.ip or None,
            "failure_type": got.failure_type or None, "detail": got.detail or None}
    out["hosts"] = [{"name": h.name, "sts": h.sts or None,
                     "matches": h.sts in ("enforce", "testing", "dane")} for h in plan.hosts]
    return out


def _decide(plan: DomainPlan, results: list[HostResult], connect: bool
            ) -> tuple[str, Outcome | None, tuple[HostResult, AddressCheck | None] | None]:
    """(verdict, failure outcome, deciding host/address) the way delivery walks hosts."""
    if plan.action is not PlanAction.DELIVER:
        out = verdict.plan_outcome(plan)
        return ("bounce" if out.action is Action.BOUNCED else "defer"), out, None
    failures = [verdict.unusable_outcome(r.host) for r in results if not r.host.usable]
    usable = [r for r in results if r.host.usable]
    if not connect:
        first = usable[0]
        req = first.host.requirement
        kind = {TlsRequirement.DANE: "dane-authenticated", TlsRequirement.STS:
                "sts-authenticated", TlsRequirement.ENCRYPT: "tls"}.get(req, "plain") \
            if req else "plain"
        return kind, None, (first, None)
    for r in usable:
        for a in r.addresses:
            if a.outcome is None:
                return a.security, None, (r, a)
            failures.append(a.outcome)
            if a.outcome.code == codetable.LOOP:
                return "bounce", a.outcome, (r, a)
    out = verdict.give_up(failures)
    return ("bounce" if out.action is Action.BOUNCED else "defer"), out, None


def build_report(domain: str, cfg: Config, probe: ValidationProbe, resolver: Resolver,
                 plan: DomainPlan, results: list[HostResult], *, connect: bool,
                 now: dt.datetime) -> dict[str, Any]:
    kind, failure, decided = _decide(plan, results, connect)
    code = failure.code if failure else None
    hosts = [_host_dict(r, connect and plan.action is PlanAction.DELIVER) for r in results]
    report: dict[str, Any] = {
        "domain": plan.domain or domain,
        "verdict": kind,
        "code": code,
        "code_text": codetable.text(code) if code else None,
        "reply": failure.reply if failure else None,
        "deliverable": kind in DELIVERING,
        "connected": any(r.addresses for r in results),  # an SMTP connection was tried
        "checked_at": now.isoformat(timespec="seconds"),
        "resolver": {
            "nameservers": [f"{h}:{p}" for h, p in resolver.nameservers],
            "validating": probe.validating, "reachable": probe.reachable,
            "detail": probe.detail, "required": cfg.dns.require_validating_resolver,
        },
        "mx": _mx_dict(plan),
        "plan": {"action": str(plan.action), "code": plan.code, "reason": plan.reason,
                 "sts": sts_dict(plan.sts),
                 "dane_mode": str(plan.dane_mode), "route": plan.route,
                 "failure_type": plan.failure_type},
        "hosts": hosts,
        "decided_by": None,
    }
    if decided is not None:
        r, a = decided
        report["decided_by"] = {"host": r.host.name, "ip": a.ip if a else None,
                                "requirement": str(r.host.requirement)
                                if r.host.requirement else None}
    report["summary"] = checkfmt.summary(report)
    report["advice"] = checkfmt.advice(report, cfg.delivery.max_lifetime)
    return report


def _mx_dict(plan: DomainPlan) -> dict[str, Any]:
    a = plan.mx_answer
    if a is None:
        records = [f"{h.preference} {h.name}" for h in plan.hosts] if plan.route else []
        return {"queried": False, "security": None, "rcode": None, "records": records,
                "implicit": False, "null_mx": False, "route": plan.route, "ede": [],
                "reason": "", "chain": []}
    d = answer_dict(a)
    return {"queried": True, "security": a.security, "rcode": d["rcode"],
            "records": d["records"], "implicit": plan.implicit_mx,
            "null_mx": plan.code == codetable.NULL_MX, "route": plan.route, "ede": d["ede"],
            "reason": a.reason, "chain": d["chain"]}


def _host_dict(r: HostResult, connected: bool) -> dict[str, Any]:
    h = r.host
    lookups = [answer_dict(a) for a in h.lookups]
    if not h.usable:
        outcome = "unusable"
    elif not connected:
        outcome = "not-checked"
    else:
        ok = [a for a in r.addresses if a.outcome is None]
        outcome = ok[0].security if ok else "failed"
    return {
        "name": h.name, "preference": h.preference, "port": h.port,
        "addresses": [{"ip": a.ip, "secure": a.secure} for a in h.addresses],
        "addresses_secure": h.addresses_secure, "dnssec": h.dnssec,
        "canonical_name": h.canonical_name,
        "address_lookups": [x for x in lookups if x["type"] != "TLSA"],
        "tlsa_lookups": [x for x in lookups if x["type"] == "TLSA"],
        "tlsa_bases": list(h.tlsa_bases), "tlsa_base": h.tlsa_base, "sni": h.sni,
        "tlsa": checkfmt.tlsa_status(h.tlsa, h.usable_tlsa),
        "reference_names": list(h.reference_names),
        "requirement": str(h.requirement) if h.requirement else None,
        "usable": h.usable, "code": h.unusable_code, "reason": h.reason,
        "failure_type": h.failure_type, "outcome": outcome, "sts": h.sts or None,
        "connections": [_address_dict(a) for a in r.addresses],
    }


def _address_dict(a: AddressCheck) -> dict[str, Any]:
    tls = None
    if a.tls is not None:
        tls = {"version": a.tls.version, "cipher": a.tls.cipher, "bits": a.tls.bits,
               "sni": a.tls.server_hostname}
    chain = a.chain
    return {
        "ip": a.ip, "port": a.port, "connected": a.connected, "greeting": a.greeting,
        "ehlo": a.ehlo, "starttls_offered": a.starttls_offered, "tls": tls,
        "chain": chain.certificates if chain else [],
        "dane": chain.dane if chain else None,
        "security": a.security, "code": a.outcome.code if a.outcome else None,
        "reply": a.outcome.reply if a.outcome else None, "failure_type": a.failure_type,
        "plain_retry": a.plain_retry, "quit_before_mail": a.quit_before_mail,
        "steps": a.steps,
    }
