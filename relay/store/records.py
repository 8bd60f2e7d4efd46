"""Values the store hands out and takes in (pure dataclasses, JSON shapes of the contract)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.model import RecipientStatus


def iso(ts: float | None) -> str | None:
    """Epoch seconds → `"2026-11-28T10:00:00Z"` (UTC, whole seconds); None stays None."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- delivery ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Due recipients of one message for one destination domain, leased to a worker."""

    message_id: str
    sender: str
    domain: str
    received_at: float
    recipients: tuple[tuple[int, str, int], ...]  # (recipient_id, address, attempts so far)
    smtputf8: bool
    size: int
    kind: str = ""  # the message's extra["kind"]: "ndr", "tlsrpt", ... ("" for client mail)
    requiretls: bool = False  # MAIL FROM ... REQUIRETLS (RFC 8689)
    taken_from: str | None = None  # the expired lease this claim replaced (a takeover)
    fresh: bool = False  # never tried (some recipient still `queued`): new mail
    body: bytes | None = field(default=None, repr=False, compare=False)  # with the claim
    body_sha256: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class RecipientUpdate:
    """The result of an attempt for one recipient.

    `attempts=None` adds one to the stored count; `next_attempt_at` is needed for
    `deferred` (None keeps the stored value); `ndr_state`/`warned_at` None keep theirs.
    """

    recipient_id: int
    status: RecipientStatus
    code: str = ""
    reply: str = ""
    next_attempt_at: float | None = None
    attempts: int | None = None
    ndr_state: str | None = None  # "pending" | "sent" | "none"
    warned_at: float | None = None


@dataclass(frozen=True)
class AttemptTrace:
    """One row of the message trace: one host tried for one recipient."""

    recipient_id: int
    at: float
    mx: str = ""
    ip: str = ""
    dnssec: str = ""
    tlsa: str = ""
    tls: str = ""
    dane: str = ""
    code: str = ""
    reply: str = ""
    policy: str = ""  # the TLS policy applied: "dane", "mta-sts enforce id=…", ...


@dataclass(frozen=True)
class JobResult:
    """Everything `Store.record` writes for one job, in one transaction with the others."""

    message_id: str
    updates: tuple[RecipientUpdate, ...] = ()
    attempts: tuple[AttemptTrace, ...] = ()


# --- operator views ---------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    at: float
    mx: str
    ip: str
    dnssec: str
    tlsa: str
    tls: str
    dane: str
    code: str
    reply: str
    policy: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"at": iso(self.at), "mx": self.mx, "ip": self.ip, "dnssec": self.dnssec,
                "tlsa": self.tlsa, "tls": self.tls, "dane": self.dane,
                "code": self.code or None, "reply": self.reply, "policy": self.policy}


@dataclass(frozen=True)
class RecipientInfo:
    id: int
    address: str
    domain: str
    status: RecipientStatus
    attempts: int = 0
    next_attempt_at: float | None = None
    code: str = ""
    reply: str = ""
    updated_at: float | None = None
    lease_owner: str | None = None
    leased_until: float | None = None
    ndr_state: str | None = None
    warned_at: float | None = None
    history: tuple[Attempt, ...] = ()

    def summary_json(self) -> dict[str, Any]:
        return {"address": self.address, "status": str(self.status), "code": self.code or None}

    def detail_json(self) -> dict[str, Any]:
        pending = not self.status.final
        return {
            "address": self.address,
            "domain": self.domain,
            "status": str(self.status),
            "attempts": self.attempts,
            "next_attempt_at": iso(self.next_attempt_at) if pending else None,
            "code": self.code or None,
            "reply": self.reply,
            "lease": ({"owner": self.lease_owner, "until": iso(self.leased_until)}
                      if self.lease_owner else None),
            "history": [a.as_json() for a in self.history],
        }


@dataclass(frozen=True)
class MessageInfo:
    id: str
    sender: str
    received_at: float
    size: int
    held: bool
    recipients: tuple[RecipientInfo, ...]
    finished_at: float | None = None
    smtputf8: bool = False
    body_8bit: bool = False
    client_ip: str = ""
    client_helo: str = ""
    auth_user: str | None = None
    has_body: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    requiretls: bool = False
    held_reason: str = ""  # why the relay held it ("corrupt: …"); "" for an operator's hold

    def summary_json(self) -> dict[str, Any]:
        """The `relay queue list --json` element."""
        return {
            "id": self.id,
            "sender": self.sender,
            "received_at": iso(self.received_at),
            "size": self.size,
            "held": self.held,
            "held_reason": (self.held_reason or None) if self.held else None,
            "recipients": [r.summary_json() for r in self.recipients],
        }

    def detail_json(self) -> dict[str, Any]:
        """The `relay queue show --json` object: the list element, with more fields."""
        return {
            **self.summary_json(),
            "smtputf8": self.smtputf8,
            "client_ip": self.client_ip,
            "client_helo": self.client_helo,
            "finished_at": iso(self.finished_at),
            "requiretls": self.requiretls,
            "recipients": [r.detail_json() for r in self.recipients],
        }


@dataclass(frozen=True)
class Stats:
    now: float
    by_status: dict[str, int]
    by_code: tuple[tuple[str, str, int], ...]  # (code, status, count)
    messages: int  # with a recipient still queued or deferred
    held: int
    bytes: int
    finished: int  # finished messages kept for their trace
    oldest_received_at: float | None
    top_deferred_domains: tuple[tuple[str, int], ...]

    @property
    def oldest_age(self) -> float | None:
        if self.oldest_received_at is None:
            return None
        return max(0.0, self.now - self.oldest_received_at)

    def as_json(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "held": self.held,
            "bytes": self.bytes,
            "finished": self.finished,
            "recipients": {s.value: self.by_status.get(s.value, 0) for s in RecipientStatus},
            "by_code": [{"code": c, "status": s, "count": n} for c, s, n in self.by_code],
            "oldest_age": self.oldest_age,
            "oldest_received_at": iso(self.oldest_received_at),
            "top_deferred_domains": [
                {"domain": d, "deferred": n} for d, n in self.top_deferred_domains
            ],
        }


def build_jobs(rows: Sequence[Any], msgs: Sequence[Any], max_recipients: int | None) -> list[Job]:
    """Jobs from claimed rows, in fair order: never-tried and deferred groups in turn.

    rows: (recipient id, message id, domain, address, attempts, status, next_attempt_at[,
    taken_from]); msgs: (id, sender, received_at, smtputf8, size[, kind[, requiretls[,
    body, body_sha256]]]) — the body only when it came with the claim.
    """
    meta = {m[0]: m for m in msgs}
    groups: dict[tuple[str, str], list[Any]] = {}
    for row in rows:
        groups.setdefault((row[1], row[2]), []).append(row)
    fresh, retry = [], []
    for key, members in groups.items():
        members.sort(key=lambda r: r[0])
        due = min(r[6] for r in members)
        is_fresh = any(r[5] == RecipientStatus.QUEUED for r in members)
        (fresh if is_fresh else retry).append((due, key, members, is_fresh))
    fresh.sort(key=lambda g: (g[0], g[1]))
    retry.sort(key=lambda g: (g[0], g[1]))
    ordered = []
    for i in range(max(len(fresh), len(retry))):
        ordered.extend(lst[i] for lst in (fresh, retry) if i < len(lst))
    jobs = []
    for _, (mid, domain), members, is_fresh in ordered:
        m = meta[mid]
        body = m[7] if len(m) > 8 and m[7] is not None else None
        step = max_recipients or len(members)
        for i in range(0, len(members), step):
            part = members[i:i + step]
            taken = next((r[7] for r in part if len(r) > 7 and r[7]), None)
            jobs.append(Job(message_id=mid, sender=m[1], domain=domain, received_at=m[2],
                            recipients=tuple((r[0], r[3], r[4]) for r in part),
                            smtputf8=bool(m[3]), size=m[4],
                            kind=str(m[5] or "") if len(m) > 5 else "",
                            requiretls=bool(m[6]) if len(m) > 6 else False,
                            taken_from=taken, fresh=is_fresh,
                            body=None if body is None else bytes(body),
                            body_sha256=None if body is None or m[8] is None
                            else bytes(m[8])))
    return jobs
