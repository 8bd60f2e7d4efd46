"""From an attempt's outcomes to what the store records and the log says.

`job_result` turns the outcomes of one job (or one default outcome: an internal error,
a dead destination) into recipient updates (delivered, bounced, deferred to the next
plan point of relay.delivery.retry, or expired) and trace rows, logging `delivered`,
`bounced`, `deferred` and `expired` per recipient; `log_hosts` logs one `attempt` per
host tried. `sts_bounce_due` says whether an MTA-STS failure is about to bounce mail
(RFC 8461 §5.1: look at the policy once more first).
"""

from __future__ import annotations

from relay.config import DeliveryConfig
from relay.delivery import classify, retry
from relay.delivery.notices import utc
from relay.delivery.trace import AttemptReport, policy_text
from relay.log import event
from relay.model import Action, Outcome, RecipientStatus
from relay.store import AttemptTrace, Job, JobResult, RecipientUpdate

_STS_DETAILS = ("7.341", "7.342", "7.343")  # MTA-STS failure codes (relay.codes)


def sts_bounce_due(d: DeliveryConfig, job: Job, report: AttemptReport,
                   started: float) -> bool:
    """Would a recipient now bounce (5xx, or expiry) for an MTA-STS failure?"""
    for _, addr, attempts in job.recipients:
        out = report.outcomes.get(addr)
        if out is None or out.code.partition(".")[2] not in _STS_DETAILS:
            continue
        if out.action is Action.BOUNCED or retry.next_attempt(
                job.received_at, attempts + 1, started, d.retry_schedule,
                d.max_lifetime) is None:
            return True
    return False


def job_result(d: DeliveryConfig, job: Job, outcomes: dict[str, Outcome],
               report: AttemptReport | None, started: float, *,
               default: Outcome | None = None, after: float | None = None) -> JobResult:
    """`after`: a deferred recipient's next attempt is the first plan point after this
    time (not after `started`): a dead destination's mail waits out its dead time (if
    the plan has a point after it; else the next point, where it expires)."""
    updates: list[RecipientUpdate] = []
    traces: list[AttemptTrace] = []
    for rid, addr, attempts in job.recipients:
        out = outcomes.get(addr) or default
        assert out is not None
        n = attempts + 1
        fields = {"id": job.message_id, "recipient": addr, "domain": job.domain,
                  "code": out.code, "reply": out.reply}
        if out.action is Action.DELIVERED:
            updates.append(RecipientUpdate(rid, RecipientStatus.DELIVERED, out.code,
                                           out.reply, attempts=n))
            mx = report.delivered_by.mx if report and report.delivered_by else None
            event("delivered", mx=mx, **fields)
        elif out.action is Action.BOUNCED:
            updates.append(RecipientUpdate(rid, RecipientStatus.BOUNCED, out.code, out.reply,
                                           attempts=n, ndr_state="pending"))
            event("bounced", **fields)
        else:
            nxt = None
            if after is not None:
                nxt = retry.next_attempt(job.received_at, n, after, d.retry_schedule,
                                         d.max_lifetime)
            if nxt is None:
                nxt = retry.next_attempt(job.received_at, n, started, d.retry_schedule,
                                         d.max_lifetime)
            if nxt is None:
                final = classify.expire(out)
                updates.append(RecipientUpdate(rid, RecipientStatus.BOUNCED, final.code,
                                               final.reply, attempts=n, ndr_state="pending"))
                event("expired", **{**fields, "code": final.code})
            else:
                updates.append(RecipientUpdate(rid, RecipientStatus.DEFERRED, out.code,
                                               out.reply, next_attempt_at=nxt, attempts=n))
                event("deferred", next_attempt_at=utc(nxt).isoformat(), **fields)
        for h in report.hosts if report else ():
            traces.append(AttemptTrace(rid, at=started, mx=h.mx, ip=h.ip, dnssec=h.dnssec,
                                       tlsa=h.tlsa, tls=h.tls, dane=h.dane, code=h.code,
                                       reply=h.reply, policy=h.policy))
        if report is None or not report.hosts:
            traces.append(AttemptTrace(rid, at=started, code=out.code, reply=out.reply,
                                       dnssec=report.plan.mx_answer.security
                                       if report and report.plan.mx_answer else "",
                                       policy=policy_text(report.plan, None)
                                       if report else ""))
    return JobResult(job.message_id, tuple(updates), tuple(traces))


def log_hosts(job: Job, report: AttemptReport) -> None:
    for h in report.hosts:
        dns_failure = None
        if h.code in ("4.4.312", "4.7.324") and not h.ip:
            dns_failure = "dnssec" if h.code == "4.7.324" else "failure"
        event("attempt", id=job.message_id, domain=job.domain, mx=h.mx, ip=h.ip or None,
              dnssec=h.dnssec, tlsa=h.tlsa, tls=h.tls or None, dane=h.dane or None,
              security=h.security or None, code=h.code or None, policy=h.policy or None,
              tls_version=h.tls_info.version if h.tls_info else None,
              dns_failure=dns_failure)
    if not report.hosts and report.plan.code:
        kind = {"4.4.312": "failure", "4.7.324": "dnssec"}.get(report.plan.code)
        event("attempt", id=job.message_id, domain=job.domain, code=report.plan.code,
              reason=report.plan.reason, dns_failure=kind)
