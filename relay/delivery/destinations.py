"""Per-destination concurrency and dead destinations, as Postfix's queue manager does it.

Pure: no I/O, no clock (every call takes `now`). One `Sites` per scheduler, keyed by
destination domain. The scheduler asks it how many more jobs each domain may start
(`free`, `caps` for the claim), tells it when a job starts and how an attempt ended
(`finished` with the attempt's `Feedback`), and asks whether a domain is dead.

The rules (Postfix's qmgr: SCHEDULER_README, "concurrency scheduling"):

- **Slow start.** A destination starts with a window of `initial` simultaneous
  connections (Postfix's `initial_destination_concurrency`, 5). Each attempt that
  reached a server which took a transaction (positive feedback) widens it by one, up to
  `limit` (`delivery.max_connections_per_domain`).
- **Backoff.** Each attempt whose every address failed before a transaction could begin
  (connect refused or timed out, no or a 4xx greeting, EHLO/HELO refused: a *site
  failure*) narrows the window by one, down to one.
- **Dead.** Failures are counted in pseudo-cohorts: each site failure adds 1/window. When
  a whole cohort has failed (the sum reaches 1, Postfix's
  `default_destination_concurrency_failed_cohort_limit`) with no success in between, the
  destination is marked dead for `dead_time` seconds: its due mail is deferred at once
  with the failure's code, without a connection and without a delivery slot. A
  destination that fails its first connections (4 of a window of 5) is dead after them.
- **Probe.** When the dead time is over the destination gets a window of one: one
  connection probes it. Success → slow start from `initial` again; a site failure →
  dead again at once.
- **Forgetting.** A destination with nothing in flight, not dead, not failing and not
  probing is forgotten (Postfix drops an empty queue too): it starts at `initial` next
  time. One that failed or is probing is remembered until its deferred mail is due
  again (`remember`), so that failures one at a time still add up to a dead mark.

Other results (TLS or DANE failures, DNS failures, a 4xx/5xx to MAIL or RCPT) move
nothing: they depend on the policy of the job (TLS report mail is relaxed) or on the
recipient, not on whether the site answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from relay.delivery.trace import AttemptReport
from relay.model import Action, Outcome

SITE_PHASES = frozenset({"connect", "greeting", "ehlo", "helo"})
DEAD = -1  # `caps` value of a dead domain: its due work is claimed to be deferred at once


class Feedback(Enum):
    POSITIVE = "positive"  # a server took a transaction (whatever it said to the recipients)
    NEGATIVE = "negative"  # a site failure: no address got as far as a transaction
    NEUTRAL = "neutral"  # anything else (policy, DNS, recipient): no change


def feedback(report: AttemptReport) -> Feedback:
    """How an attempt's report counts for its destination's concurrency."""
    if report.delivered_by is not None:
        return Feedback.POSITIVE
    tried = [h for h in report.hosts if h.ip]
    if tried and all(h.phase in SITE_PHASES for h in tried) and all(
            o.action is Action.DEFERRED for o in report.outcomes.values()):
        return Feedback.NEGATIVE  # (a 5xx greeting bounces at once: nothing to suspend)
    return Feedback.NEUTRAL


@dataclass(frozen=True)
class DeadSite:
    """Why and until when a destination is not tried (for the deferrals and the log)."""

    domain: str
    code: str
    reply: str
    since: float
    until: float
    failures: int

    def outcome(self) -> Outcome:
        """The outcome given to its due recipients: Postfix's wording."""
        return Outcome(Action.DEFERRED, self.code,
                       f"delivery temporarily suspended: {self.reply}")


@dataclass
class _Site:
    window: float
    active: int = 0
    fail_cohorts: float = 0.0
    failures: int = 0  # site failures since the last success
    failed_at: float = 0.0  # the last of them
    dead: DeadSite | None = None
    probe_since: float | None = None  # dead time over: one connection at a time until a result


@dataclass(frozen=True)
class Change:
    """A change of state worth logging: "dead" or "recovered"."""

    kind: str
    domain: str
    dead: DeadSite | None = None


class Sites:
    def __init__(self, *, limit: int, initial: int, dead_time: float,
                 remember: float | None = None) -> None:
        """`remember`: how long a destination whose dead time is over is kept probing
        while no work for it comes (default: one dead time; the scheduler passes the
        longest retry gap, when the mail deferred for it comes back at the latest)."""
        self.limit = max(1, limit)
        self.initial = max(1, min(initial, self.limit))
        self.dead_time = max(0.0, dead_time)
        self.remember = self.dead_time if remember is None else max(remember, 0.0)
        self._sites: dict[str, _Site] = {}

    def __len__(self) -> int:
        return len(self._sites)

    # --- questions ------------------------------------------------------------------

    def _site(self, domain: str, now: float) -> _Site | None:
        site = self._sites.get(domain)
        if site is not None and site.dead is not None and now >= site.dead.until:
            site.probe_since = site.dead.until  # the dead time is over: probe with one
            site.dead = None                    # connection
            site.window = 1.0
        return site

    def dead(self, domain: str, now: float) -> DeadSite | None:
        site = self._site(domain, now)
        return None if site is None else site.dead

    def window(self, domain: str, now: float) -> int:
        site = self._site(domain, now)
        return self.initial if site is None else max(1, math.floor(site.window + 1e-9))

    def active(self, domain: str) -> int:
        site = self._sites.get(domain)
        return 0 if site is None else site.active

    def free(self, domain: str, now: float) -> int:
        """More jobs `domain` may start now (DEAD when it is dead)."""
        site = self._site(domain, now)
        if site is None:
            return self.initial
        if site.dead is not None:
            return DEAD
        return max(0, self.window(domain, now) - site.active)

    def caps(self, now: float) -> dict[str, int]:
        """`free` of every domain with state (a domain not listed may start `initial`):
        what a claim may hand out per domain."""
        self._forget(now)
        return {d: self.free(d, now) for d in list(self._sites)}

    # --- what happened --------------------------------------------------------------

    def started(self, domain: str, now: float) -> None:
        site = self._site(domain, now)
        if site is None:
            site = self._sites[domain] = _Site(float(self.initial))
        site.active += 1

    def finished(self, domain: str, result: Feedback, now: float,
                 outcome: Outcome | None = None) -> Change | None:
        """A job to `domain` ended with `result` (`outcome`: what its recipients got, for
        the reason of a dead mark). Returns the change worth logging, if any."""
        site = self._site(domain, now)
        if site is None:  # started before a reset: count it as new
            site = self._sites[domain] = _Site(float(self.initial), active=1)
        site.active = max(0, site.active - 1)
        if result is Feedback.POSITIVE:
            return self._success(domain, site)
        if result is Feedback.NEGATIVE:
            return self._failure(domain, site, now, outcome)
        return None

    def _success(self, domain: str, site: _Site) -> Change | None:
        was_down = site.dead is not None or site.probe_since is not None
        site.fail_cohorts = 0.0
        site.failures = 0
        if was_down:
            site.dead = None
            site.probe_since = None
            site.window = float(self.initial)
            return Change("recovered", domain)
        site.window = min(float(self.limit), site.window + 1.0)
        return None

    def _failure(self, domain: str, site: _Site, now: float,
                 outcome: Outcome | None) -> Change | None:
        if site.dead is not None:
            return None  # already dead: an attempt started before it was marked
        site.failures += 1
        site.failed_at = now
        site.fail_cohorts += 1.0 / max(site.window, 1.0)
        site.window = max(1.0, site.window - 1.0)
        if site.fail_cohorts < 1.0 - 1e-9 or self.dead_time <= 0:
            return None
        code = outcome.code if outcome is not None else "4.4.1"
        reply = outcome.reply if outcome is not None else "connection failed"
        site.dead = DeadSite(domain, code, reply, now, now + self.dead_time, site.failures)
        site.probe_since = None
        site.fail_cohorts = 0.0
        return Change("dead", domain, site.dead)

    def _forget(self, now: float) -> None:
        """Drop what carries no state worth keeping: nothing in flight, not dead, not
        failing and not probing (a destination that failed, or is left probing, is kept
        for `remember` seconds, so that its next jobs count towards the cohort or probe)."""
        drop = []
        for domain in list(self._sites):
            site = self._site(domain, now)
            assert site is not None
            if site.active or site.dead is not None:
                continue
            if site.failures and now < site.failed_at + self.remember:
                continue  # failing: its next jobs count towards the cohort
            if site.probe_since is not None and now < site.probe_since + self.remember:
                continue
            drop.append(domain)
        for domain in drop:
            del self._sites[domain]
