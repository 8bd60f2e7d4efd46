"""One delivery attempt for one destination: resolve → policy → MX walk → verify → outcomes.

    deliverer = Deliverer(resolver, config, settings)
    report = await deliverer.deliver(domain, sender, recipients, body, smtputf8=..., size=...)

The plan (relay.delivery.destination / relay.dane.policy) says which hosts may be used and what each
demands: DANE (TLS + a chain matching a usable TLSA record), ENCRYPT (TLS, no
authentication), MAY (opportunistic) or NONE. Hosts are tried in MX order (random among
equal preference), every address of a host in turn. A host that fails (connection, TLS,
DANE) is left for the next; there is never cleartext where the plan demands TLS. The
first host that completes a transaction decides every recipient (per-recipient replies,
classified by relay.delivery.classify). When no host is left the recipients are deferred with the
code of the most specific failure (or bounced when every host refused with 5xx).

Exceptions from the network are translated into outcomes here, in one place. The
per-host decisions (STARTTLS or not, what the chain means, exception → outcome, which
failure wins) are relay.delivery.verdict's, shared with `relay check` so both reach the same code.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.x509.verification import Store

from relay import codes as codetable
from relay.config import Config
from relay.dane.policy import DomainPlan, HostPlan, PlanAction, shuffle_equal_preference
from relay.delivery import classify
from relay.delivery import requiretls as requiretls_rules
from relay.delivery import verdict as hostverdict
from relay.delivery.connpool import SessionPool
from relay.delivery.destination import plan_destination
from relay.delivery.trace import AttemptReport, HostAttempt, policy_text, tlsa_summary
from relay.dns.resolve import Resolver
from relay.errors import LeaseLost, SmtpClientError, TlsError
from relay.log import event
from relay.model import Outcome, StsState, TlsRequirement
from relay.smtp.client import SmtpSession, Timeouts
from relay.smtp.protocol import Reply, TlsInfo, TransactionResult
from relay.sts.source import StsSource

Clock = Callable[[], float]


@dataclass(frozen=True)
class DeliverySettings:
    """What one attempt needs from the configuration, resolved once."""

    helo_name: str
    timeouts: Timeouts
    min_tls_version: str = "1.2"
    ee_check_expiry: bool = False
    max_tlsa_records: int = 20
    max_chain: int = 10
    own_endpoints: frozenset[tuple[str, int]] = frozenset()  # our listener: a loop
    local_addresses: frozenset[str] = frozenset()  # this machine's (wildcard listener)
    max_addresses: int = 8
    roots: Store | None = None  # the web PKI for MTA-STS (relay.sts.fetch.load_trust)

    @classmethod
    def from_config(cls, cfg: Config, hostname: str, *,
                    roots: Store | None = None) -> DeliverySettings:
        return cls(
            helo_name=cfg.delivery.helo_name or hostname,
            timeouts=Timeouts.from_config(cfg.delivery),
            min_tls_version=cfg.delivery.min_tls_version,
            ee_check_expiry=cfg.dane.ee_check_expiry,
            max_tlsa_records=cfg.dane.max_records,
            max_chain=cfg.dane.max_chain_length,
            own_endpoints=own_endpoints(cfg.listener.host, cfg.listener.port),
            local_addresses=machine_addresses(),
            max_addresses=cfg.dns.max_addresses_per_host,
            roots=roots,
        )


def machine_addresses() -> frozenset[str]:
    """This machine's own IP addresses (Linux /proc; empty elsewhere), for loop detection
    when the listener is bound to a wildcard address."""
    found: set[str] = set()
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for prev, line in itertools.pairwise(lines):
            if "/32 host LOCAL" in line:
                found.add(prev.strip().split()[-1])
    except OSError:
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            found.add(str(ipaddress.IPv6Address(int(raw, 16))))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(found)


def own_endpoints(host: str, port: int) -> frozenset[tuple[str, int]]:
    """Addresses on which our own listener answers (a wildcard listener: all loopback and
    the unspecified address; callers also compare against the local interface list)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return frozenset({(host, port)})
    if addr.is_unspecified:
        return frozenset({("0.0.0.0", port), ("::", port), ("127.0.0.1", port), ("::1", port),
                          ("*", port)})
    return frozenset({(str(addr), port)})


@dataclass
class _HostFailure:
    outcome: Outcome
    trace: HostAttempt


@dataclass(frozen=True)
class _Opened:
    """A session ready for MAIL FROM, and how it was secured (kept with a cached one)."""

    tls: TlsInfo | None
    dane_text: str
    security: str
    use_tls: bool
    local_ip: str
    failure_type: str | None = None  # a failure an MTA-STS testing policy only reports


@dataclass
class _Walk:
    failures: list[Outcome] = field(default_factory=list)
    traces: list[HostAttempt] = field(default_factory=list)


def _trace(host: HostPlan, ip: str, **kw: object) -> HostAttempt:
    return HostAttempt(mx=host.name, ip=ip, dnssec=host.dnssec, tlsa=tlsa_summary(host),
                       **kw)  # type: ignore[arg-type]


def _tls_text(info: TlsInfo | None) -> str:
    return f"{info.version} {info.cipher}".strip() if info else "none"


class Deliverer:
    """Runs attempts. Stateless between attempts except the resolver's cache."""

    def __init__(self, resolver: Resolver, config: Config, settings: DeliverySettings, *,
                 rng: random.Random | None = None, clock: Clock = time.time,
                 sts: StsSource | None = None) -> None:
        self.resolver = resolver
        self.sts = sts
        self.config = config
        self.settings = settings
        self.rng = rng or random.Random()
        self.clock = clock
        d = config.delivery
        self.pool = SessionPool(idle_time=d.connection_cache_time,
                                max_uses=d.connection_reuse_limit,
                                max_age=d.connection_reuse_time)

    @property
    def limits(self) -> hostverdict.Limits:
        s = self.settings
        return hostverdict.Limits(s.ee_check_expiry, s.max_tlsa_records, s.max_chain,
                                  s.roots)

    async def deliver(self, domain: str, sender: str, recipients: Sequence[str], body: bytes,
                      *, smtputf8: bool = False, size: int | None = None,
                      relax_dane: bool = False, requiretls: bool = False,
                      may_send: Callable[[], bool] | None = None) -> AttemptReport:
        """`relax_dane`: for TLS report mail (RFC 8460 §3: reports are delivered despite
        TLS failures of the receiving domain), see `relaxed_plan`. `requiretls`: the
        message was sent with REQUIRETLS (RFC 8689, relay.delivery.requiretls).
        `may_send`: asked before each SMTP transaction; False (the job's lease is lost or
        can no longer be renewed) raises LeaseLost instead of sending."""
        plan = await plan_destination(domain, self.resolver, self.config, sts=self.sts,
                                      requiretls=requiretls)
        return await self.deliver_plan(plan, sender, recipients, body, smtputf8=smtputf8,
                                       size=size, relax_dane=relax_dane and not requiretls,
                                       requiretls=requiretls, may_send=may_send)

    async def recheck_sts(self, domain: str, old: StsState | None) -> bool:
        """RFC 8461 §5.1, before a bounce for an MTA-STS failure: True when the domain's
        policy changed (the caller then tries once more under the new one)."""
        if self.sts is None:
            return False
        return await self.sts.recheck(domain, old) is not None

    async def deliver_plan(self, plan: DomainPlan, sender: str, recipients: Sequence[str],
                           body: bytes, *, smtputf8: bool = False,
                           size: int | None = None, relax_dane: bool = False,
                           requiretls: bool = False,
                           may_send: Callable[[], bool] | None = None) -> AttemptReport:
        report = await self._deliver_plan(plan, sender, recipients, body, smtputf8=smtputf8,
                                          size=size, relax_dane=relax_dane,
                                          requiretls=requiretls, may_send=may_send)
        by_name = {h.name: h for h in report.plan.hosts}
        hosts = tuple(replace(h, policy=policy_text(report.plan, by_name.get(h.mx)))
                      for h in report.hosts)
        delivered = next((h for h in hosts if report.delivered_by is not None
                          and h.mx == report.delivered_by.mx
                          and h.ip == report.delivered_by.ip), report.delivered_by)
        return replace(report, hosts=hosts, delivered_by=delivered)

    async def _deliver_plan(self, plan: DomainPlan, sender: str, recipients: Sequence[str],
                            body: bytes, *, smtputf8: bool = False,
                            size: int | None = None, relax_dane: bool = False,
                            requiretls: bool = False,
                            may_send: Callable[[], bool] | None = None) -> AttemptReport:
        if relax_dane:
            plan = relaxed_plan(plan)
        walk = _Walk()
        for host in plan.hosts:
            if not host.usable:
                code = host.unusable_code or codetable.DNS_FAILED
                walk.traces.append(_trace(host, "", code=code, reply=host.reason,
                                          security="failed", failure_type=host.failure_type))
                walk.failures.append(hostverdict.unusable_outcome(host))
        if plan.action is not PlanAction.DELIVER:
            outcome = hostverdict.plan_outcome(plan)
            return AttemptReport({r: outcome for r in recipients}, tuple(walk.traces), plan)

        for host in shuffle_equal_preference(plan.usable_hosts, self.rng):
            for addr in host.addresses[: self.settings.max_addresses]:
                result = await self._try(host, addr.ip, sender, recipients, body,
                                         smtputf8=smtputf8, size=size, relax=relax_dane,
                                         requiretls=requiretls, may_send=may_send)
                if isinstance(result, _HostFailure):
                    walk.traces.append(result.trace)
                    walk.failures.append(result.outcome)
                    if result.outcome.code == codetable.LOOP:
                        return self._all(plan, recipients, result.outcome, walk)
                    continue
                outcomes, trace = result
                walk.traces.append(trace)
                return AttemptReport(outcomes, tuple(walk.traces), plan, delivered_by=trace)
        return self._give_up(plan, recipients, walk)

    def _all(self, plan: DomainPlan, recipients: Sequence[str], outcome: Outcome,
             walk: _Walk) -> AttemptReport:
        return AttemptReport({r: outcome for r in recipients}, tuple(walk.traces), plan)

    def _give_up(self, plan: DomainPlan, recipients: Sequence[str],
                 walk: _Walk) -> AttemptReport:
        # Bounce when every host refused permanently (5xx greeting/EHLO/MAIL), else defer
        # with the most specific failure.
        return self._all(plan, recipients, hostverdict.give_up(walk.failures), walk)

    # --- one address -----------------------------------------------------------------

    async def _try(self, host: HostPlan, ip: str, sender: str, recipients: Sequence[str],
                   body: bytes, *, smtputf8: bool, size: int | None, relax: bool = False,
                   requiretls: bool = False, may_send: Callable[[], bool] | None = None,
                   ) -> _HostFailure | tuple[dict[str, Outcome], HostAttempt]:
        s = self.settings
        port = host.port
        gate = hostverdict.address_gate(host, ip, s.own_endpoints, s.local_addresses)
        if gate is not None:
            return _HostFailure(gate, _trace(host, ip, code=gate.code, reply=gate.reply,
                                             security="failed"))
        req = host.requirement or TlsRequirement.MAY
        key = (ip, port, req, host.sni, host.usable_tlsa, host.reference_names, relax)
        cached = self.pool.take(key)
        if cached is not None:
            sess, opened = cached
            try:
                result = await self._transact(sess, host, ip, req, opened, sender, recipients,
                                              body, smtputf8=smtputf8, size=size,
                                              requiretls=requiretls, may_send=may_send)
            except SmtpClientError:
                sess.close()  # the cached connection went stale: open a new one
                self.pool.forget(sess)
            except LeaseLost:
                self.pool.give(key, sess, opened)  # unused, still good for another job
                raise
            else:
                await self._release(key, sess, opened, result)
                return result
        plain_retry = False
        while True:
            try:
                sess = await SmtpSession.connect(ip, port, helo_name=s.helo_name,
                                                 timeouts=s.timeouts)
            except SmtpClientError as exc:
                return self._failure(host, ip, exc, req)
            if sess.greeting and hostverdict.greeting_loops(sess.greeting.text,
                                                            (s.helo_name,)):
                await self._quit(sess)
                out = hostverdict.loop_outcome(host, ip)
                return _HostFailure(out, _trace(host, ip, code=out.code, reply=out.reply,
                                                security="failed"))
            opened: _Opened | _HostFailure | None = None
            try:
                opened = await self._open(sess, host, ip, req, use_tls=not plain_retry,
                                          relax=relax)
                if isinstance(opened, _HostFailure):
                    result: _HostFailure | tuple[dict[str, Outcome], HostAttempt] = opened
                else:
                    result = await self._transact(sess, host, ip, req, opened, sender,
                                                  recipients, body, smtputf8=smtputf8,
                                                  size=size, requiretls=requiretls,
                                                  may_send=may_send)
            except TlsError as exc:
                sess.close()
                if (req is TlsRequirement.MAY or relax) and not plain_retry \
                        and exc.phase == "tls":
                    plain_retry = True  # opportunistic: a failed handshake → cleartext
                    continue
                return self._failure(host, ip, exc, req, sess.local_ip)
            except SmtpClientError as exc:
                sess.close()
                return self._failure(host, ip, exc, req, sess.local_ip)
            except (asyncio.CancelledError, LeaseLost):
                sess.close()
                raise
            except Exception as exc:  # a bug or a server we did not foresee: this host
                sess.close()          # fails, the next one is tried
                event("internal_error", level="error", mx=host.name, ip=ip,
                      error=f"{type(exc).__name__}: {exc}")
                out = classify.local("4.3.0", f"{host.name} [{ip}]: {type(exc).__name__}")
                return _HostFailure(out, _trace(host, ip, code=out.code, reply=out.reply,
                                                security="failed", local_ip=sess.local_ip))
            if isinstance(opened, _Opened):
                await self._release(key, sess, opened, result)
            else:
                await self._quit(sess)
            return result

    async def _release(self, key: tuple[object, ...], sess: SmtpSession, opened: _Opened,
                       result: _HostFailure | tuple[dict[str, Outcome], HostAttempt]) -> None:
        """After a transaction: keep the session for the next message, or QUIT it."""
        if isinstance(result, _HostFailure):
            self.pool.forget(sess)
            await self._quit(sess)
        else:
            self.pool.give(key, sess, opened)

    @staticmethod
    async def _quit(sess: SmtpSession) -> None:
        if not sess.closed:
            await sess.quit()
        sess.close()

    async def close(self) -> None:
        """Close the cached connections (the relay is stopping)."""
        await self.pool.close()

    async def _open(self, sess: SmtpSession, host: HostPlan, ip: str, req: TlsRequirement,
                    *, use_tls: bool, relax: bool = False) -> _Opened | _HostFailure:
        """EHLO, STARTTLS and the chain's verdict as the plan demands: a session ready for
        MAIL FROM under this host's policy, or the host's failure."""
        s = self.settings
        local = sess.local_ip
        await sess.ehlo()
        tls: TlsInfo | None = None
        dane_text, security = "not required", "plain"
        step = hostverdict.tls_step(req, sess.extensions.starttls, use_tls)
        if step is hostverdict.TlsStep.MISSING and relax:
            step, dane_text = hostverdict.TlsStep.SKIP, f"STARTTLS missing, {_RELAXED}"
        if step is hostverdict.TlsStep.MISSING:
            out = hostverdict.starttls_missing(host, ip)
            return _HostFailure(out, _trace(host, ip, code=out.code, reply=out.reply,
                                            security="failed", local_ip=local,
                                            failure_type=hostverdict.STARTTLS_NOT_SUPPORTED))
        if step is hostverdict.TlsStep.STARTTLS:
            try:
                tls = await sess.starttls(host.sni, min_version=hostverdict.starttls_min_version(
                    req, s.min_tls_version))
            except TlsError:
                if (hostverdict.mandatory(req) and not relax) or not sess.usable:
                    raise
                tls = None  # opportunistic: STARTTLS refused, the session goes on in clear
            if tls is not None:
                judged = hostverdict.check_chain(host, tls.chain, dt.datetime.now(dt.UTC),
                                                 self.limits)
                if not judged.ok and relax:
                    judged = replace(judged, ok=True, security="tls",
                                     dane_text=f"{judged.dane_text} ({_RELAXED})")
                if not judged.ok:
                    out = hostverdict.chain_failure(host, ip, judged)
                    return _HostFailure(out, _trace(
                        host, ip, tls=_tls_text(tls), dane=judged.dane_text, code=out.code,
                        reply=out.reply, security="failed", local_ip=local,
                        failure_type=hostverdict.chain_failure_type(judged, out),
                        tls_info=tls))
                dane_text, security = judged.dane_text, judged.security
                reported = judged.failure_type
                await sess.ehlo()
                return _Opened(tls, dane_text, security, use_tls, local, reported)
        return _Opened(tls, dane_text, security, use_tls, local)

    async def _transact(self, sess: SmtpSession, host: HostPlan, ip: str,
                        req: TlsRequirement, opened: _Opened, sender: str,
                        recipients: Sequence[str], body: bytes, *, smtputf8: bool,
                        size: int | None, requiretls: bool = False,
                        may_send: Callable[[], bool] | None = None,
                        ) -> _HostFailure | tuple[dict[str, Outcome], HostAttempt]:
        tls = opened.tls
        if requiretls and "REQUIRETLS" not in sess.extensions:
            out = requiretls_rules.missing(host.name, ip)
            return _HostFailure(out, _trace(host, ip, tls=_tls_text(tls), dane=opened.dane_text,
                                            code=out.code, reply=out.reply,
                                            security=opened.security, tls_info=tls,
                                            local_ip=opened.local_ip))
        if may_send is not None and not may_send():
            raise LeaseLost(f"the lease on this work is lost: no transaction with {host.name}")
        txn = await sess.send_mail(sender, recipients, body, smtputf8=smtputf8, size=size,
                                   requiretls=requiretls)
        plain_type = None  # opportunistic TLS that ended in cleartext: a TLS-RPT failure
        if tls is None and req is not TlsRequirement.NONE:
            plain_type = "starttls-not-supported" if opened.use_tls else "validation-failure"
        plain_type = plain_type or opened.failure_type
        trace = _trace(host, ip, tls=_tls_text(tls), dane=opened.dane_text,
                       security=opened.security, tls_info=tls, local_ip=opened.local_ip,
                       failure_type=plain_type)
        if txn.refused is None and txn.mail is not None and txn.mail.transient:
            # A 4xx to MAIL FROM is about this host: try the next one.
            out = _outcome("mail", txn.mail)
            return _HostFailure(out, replace(trace, code=out.code, reply=out.reply))
        outcomes = {r: _recipient_outcome(txn, r) for r in recipients}
        first = next(iter(outcomes.values()))
        return outcomes, replace(trace, code=first.code, reply=first.reply)

    def _failure(self, host: HostPlan, ip: str, exc: SmtpClientError,
                 req: TlsRequirement, local_ip: str = "") -> _HostFailure:
        out, ftype = hostverdict.session_failure(host, ip, exc, req)
        return _HostFailure(out, _trace(host, ip, code=out.code, reply=out.reply,
                                        security="failed", failure_type=ftype,
                                        local_ip=local_ip, phase=exc.phase))


_RELAXED = "ignored for a TLS report"
_RELAXABLE = ("dnssec-invalid", "dane-required", "validation-failure")  # the last: an
# MX host outside an MTA-STS enforce policy's patterns


def relaxed_plan(plan: DomainPlan) -> DomainPlan:
    """The plan for TLS report mail (RFC 8460 §3: reports are sent despite TLS failures;
    they are what tells the domain about them). Hosts whose TLSA lookup failed DNSSEC
    (or that `dane = "mandatory"` or an MTA-STS policy's MX patterns refused) are used
    with opportunistic TLS; at DANE, MTA-STS and TLS-mandatory hosts the check is still
    made first, but a mismatch, a failed handshake or a missing STARTTLS no longer stops
    the session (TLS without authentication, else cleartext). Messages marked
    "TLS-Required: No" get the same plan where delivery.honor_tls_required_no allows.
    What cannot be trusted at all stays refused: a bogus or failed MX or
    address lookup gives no host to connect to."""
    hosts = tuple(
        replace(h, requirement=TlsRequirement.MAY, unusable_code=None,
                reason=f"{h.reason} ({_RELAXED})")
        if not h.usable and h.addresses and h.failure_type in _RELAXABLE else h
        for h in plan.hosts)
    if plan.action is PlanAction.DEFER and plan.hosts and any(h.usable for h in hosts):
        return replace(plan, action=PlanAction.DELIVER, code=None, hosts=hosts,
                       reason=f"{plan.reason} ({_RELAXED})")
    return replace(plan, hosts=hosts)


def _outcome(phase: str, reply: Reply) -> Outcome:
    return classify.from_reply(phase, reply.code, reply.enhanced, reply.text)


def _recipient_outcome(txn: TransactionResult, recipient: str) -> Outcome:
    reply = txn.reply_for(recipient)
    if txn.refused is not None:
        phase = "mail"
    elif txn.mail is not None and not txn.mail.ok:
        phase = "mail"
    elif not txn.recipients[recipient].ok or txn.data is None:
        phase = "rcpt"
    else:
        phase = "data"
    return _outcome(phase, reply)
