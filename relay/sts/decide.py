"""MTA-STS decisions (RFC 8461 §3.3, §4, §5, §2), pure: what the cache and the TXT
record say to do, what a policy demands of each MX host beside DANE, and the state an
attempt records.

    cache_step(cached, txt, now, refresh_before)  -> Step     (use, fetch, refresh, none)
    fetch_allowed(cached, txt_id, now, retry)     -> bool     (not after a recent failure)
    state_of(policy, policy_id, source, override, ...) -> StsState
    apply_host(host, state)                       -> HostPlan (the host's STS requirement)

Precedence (RFC 8461 §2): a host with secure, usable TLSA records is DANE's: its
requirement stays DANE (no web-PKI check is added, none is relaxed); only the MX
filtering of an enforce policy still applies to it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from relay import codes
from relay.dane.policy import HostPlan
from relay.model import StsState, TlsRequirement
from relay.sts.record import Mode, Policy, mx_matches

# RFC 8460 result types of discovery and fetch failures (§4.3.2.2).
FETCH_ERROR = "sts-policy-fetch-error"
POLICY_INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"
MX_MISMATCH = "validation-failure"


@dataclass(frozen=True)
class Cached:
    """A policy cache entry as the store keeps it (relay.store.sts)."""

    domain: str
    policy_id: str
    policy: Policy | None  # None when only a failure is remembered
    fetched_at: float | None
    expires_at: float | None
    failed_at: float | None = None
    failed_id: str = ""
    failure: str = ""
    failure_type: str = ""

    def valid(self, now: float) -> bool:
        return self.policy is not None and self.expires_at is not None and now < self.expires_at


class TxtKind(StrEnum):
    RECORD = "record"  # exactly one valid v=STSv1 record
    ABSENT = "absent"  # none, several or malformed: no policy published now
    FAILED = "failed"  # the lookup failed (SERVFAIL, timeout)
    BOGUS = "bogus"  # the lookup failed DNSSEC validation


@dataclass(frozen=True)
class Txt:
    kind: TxtKind
    id: str = ""
    detail: str = ""


class Step(StrEnum):
    USE = "use"  # the cached policy, fresh and current
    REFRESH = "refresh"  # the cached policy now, a fetch in the background (near expiry)
    FETCH = "fetch"  # fetch now (nothing valid cached, or the id changed)
    NONE = "none"  # no policy: none published and none cached
    DEFER = "defer"  # the TXT lookup was bogus and nothing is cached: DNS failure


def cache_step(cached: Cached | None, txt: Txt, now: float, refresh_before: float) -> Step:
    """RFC 8461 §5.1: a fresh cached policy with the published id is used; a changed id
    or an expired policy is fetched; without a live record a valid cached policy still
    applies (an attacker who hides the TXT record must not remove the policy)."""
    valid = cached is not None and cached.valid(now)
    if txt.kind is TxtKind.RECORD:
        if valid and cached is not None and cached.policy_id == txt.id:
            assert cached.expires_at is not None and cached.policy is not None
            margin = refresh_margin(cached.policy.max_age, refresh_before)
            return Step.REFRESH if cached.expires_at - now < margin else Step.USE
        return Step.FETCH
    if valid:
        return Step.USE
    return Step.DEFER if txt.kind is TxtKind.BOGUS else Step.NONE


def refresh_margin(max_age: int, refresh_before: float) -> float:
    """How long before its expiry a policy is fetched again: `mta_sts.refresh_before`,
    but at most a quarter of its max_age (a one-hour policy is not refreshed all hour)."""
    return min(refresh_before, max_age / 4)


def fetch_allowed(cached: Cached | None, txt_id: str, now: float, retry: float) -> bool:
    """Not again within `retry` seconds of a failed fetch for the same record id (a
    hostile or broken policy server costs one fetch per `retry`, not one per message)."""
    if cached is None or cached.failed_at is None or cached.failed_id != txt_id:
        return True
    return now - cached.failed_at >= retry


def effective_mode(published: Mode, override: str) -> str:
    """A domain's `mta_sts = "enforce"` enforces a testing policy (never a none one)."""
    if override == "enforce" and published is Mode.TESTING:
        return Mode.ENFORCE.value
    return published.value


def state_of(policy: Policy, policy_id: str, source: str, override: str, *,
             expires_at: float | None = None, failure_type: str | None = None,
             detail: str = "") -> StsState:
    mode = effective_mode(policy.mode, override)
    return StsState("policy" if policy.mode is not Mode.NONE else "none", mode, policy_id,
                    policy.mx, policy.lines, source, policy.max_age, expires_at,
                    failure_type, detail, policy.mode.value)


def apply_host(host: HostPlan, state: StsState | None) -> HostPlan:
    """What the policy makes of one host of the plan (see the module docstring)."""
    if state is None or not state.applies or not host.usable:
        return host
    matched = any(mx_matches(p, host.name) for p in state.patterns)
    enforce = state.mode == Mode.ENFORCE.value
    if not matched:
        if not enforce:
            return replace(host, sts="mismatch")
        return replace(host, requirement=None, unusable_code=codes.STS_MX_MISMATCH,
                       reason=f"MTA-STS policy (enforce, id {state.policy_id}) does not list "
                       f"{host.name} (mx: {', '.join(state.patterns) or 'none'})",
                       failure_type=MX_MISMATCH, sts="mismatch")
    if host.requirement is TlsRequirement.DANE:
        return replace(host, sts="dane")  # RFC 8461 §2: DANE decides
    if not enforce:
        return replace(host, sts="testing")
    if host.requirement is TlsRequirement.NONE:
        return host  # cleartext by configuration (a route): never reached for MX hosts
    return replace(host, requirement=TlsRequirement.STS, sts="enforce",
                   reason=f"{host.reason}; MTA-STS enforce (id {state.policy_id}): TLS and a "
                   f"web-PKI certificate for {host.name}")
