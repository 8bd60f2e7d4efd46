"""Where delivery and `relay check` get a domain's MTA-STS policy: discovery through
the validating resolver, the cache in the store, fetches, and the background refresh.

    source = StsSource(resolver, config, store)        # store None: a cache in memory
    state = await source.lookup("example.org")         # relay.model.StsState
    changed = await source.recheck("example.org", state)   # before bouncing (§5.1)

`lookup` never raises and never waits longer than one bounded fetch; concurrent lookups
of one domain share one fetch. The decisions are relay.sts.decide's. `StsRefresher` is
the `relay serve` component that looks at cached policies again before they expire
(RFC 8461 §10.2), so delivery rarely waits for a fetch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from relay.config import Config
from relay.dns.resolve import Resolver
from relay.errors import RelayError, StoreError
from relay.log import event
from relay.model import DnsAnswer, Rcode, StsState
from relay.store.sts import StsRow
from relay.sts import decide
from relay.sts.decide import Cached, Step, Txt, TxtKind
from relay.sts.fetch import Fetched, Trust, fetch_policy, load_trust
from relay.sts.record import Policy, discover, normalize, parse_policy, txt_name
from relay.tasks import cancel_and_wait

Clock = Callable[[], float]
REFRESH_EVERY = 300.0  # seconds between looks for policies due for a refresh


def domain_override(config: Config, domain: str) -> str:
    """`domains."<domain>".mta_sts` (exact name, case-insensitive): policy|enforce|off."""
    d = normalize(domain)
    for name, pol in config.domains.items():
        if normalize(name) == d:
            return pol.mta_sts
    return "policy"


def txt_of(answer: DnsAnswer) -> Txt:
    if answer.dnssec_failure:
        return Txt(TxtKind.BOGUS, detail=f"{answer.qname} TXT failed DNSSEC validation: "
                   f"{answer.reason}")
    if answer.rcode.failed:
        return Txt(TxtKind.FAILED, detail=f"{answer.qname} TXT lookup failed "
                   f"({answer.rcode}): {answer.reason}")
    if answer.rcode is not Rcode.OK:
        return Txt(TxtKind.ABSENT, detail="no _mta-sts record")
    found = discover([str(r) for r in answer.records])
    if found.record is None:
        return Txt(TxtKind.ABSENT, detail=found.reason)
    return Txt(TxtKind.RECORD, found.record.id)


def _cached(row: StsRow | None) -> Cached | None:
    if row is None:
        return None
    policy = None
    if row.policy:
        parsed = parse_policy(row.policy.encode("utf-8"))
        policy = parsed if isinstance(parsed, Policy) else None
    return Cached(row.domain, row.policy_id, policy, row.fetched_at, row.expires_at,
                  row.failed_at, row.failed_id, row.failure, row.failure_type)


class _MemoryCache:
    """The cache of a process without a store (`relay check`)."""

    def __init__(self) -> None:
        self.rows: dict[str, StsRow] = {}

    async def sts_get(self, domain: str) -> StsRow | None:
        return self.rows.get(domain)

    async def sts_put(self, domain: str, *, policy_id: str, policy: str, mode: str,
                      max_age: int, now: float) -> None:
        self.rows[domain] = StsRow(domain, policy_id, policy, now, now + max_age, now, None,
                                   "", "", "")

    async def sts_fail(self, domain: str, *, policy_id: str, failure: str,
                       failure_type: str, now: float) -> None:
        old = self.rows.get(domain)
        base = old or StsRow(domain, "", "", None, None, None, None, "", "", "")
        self.rows[domain] = StsRow(base.domain, base.policy_id, base.policy, base.fetched_at,
                                   base.expires_at, now, now, policy_id, failure,
                                   failure_type)

    async def sts_checked(self, domain: str, *, now: float) -> None:
        pass


class StsSource:
    def __init__(self, resolver: Resolver, config: Config, store: Any = None, *,
                 trust: Trust | None = None, clock: Clock = time.time) -> None:
        self.resolver = resolver
        self.config = config
        self.cache = store if store is not None else _MemoryCache()
        self.clock = clock
        self._trust = trust
        self._fetching: dict[str, asyncio.Task[Fetched]] = {}
        self.background: set[asyncio.Task[Any]] = set()
        self.last_fetch: dict[str, Fetched] = {}  # the latest fetch per domain (relay check)

    @property
    def trust(self) -> Trust:
        if self._trust is None:
            self._trust = load_trust(self.config.mta_sts.ca_file)
        return self._trust

    @property
    def enabled(self) -> bool:
        return self.config.mta_sts.enabled

    async def lookup(self, domain: str, *, force: bool = False,
                     wait: bool = False) -> StsState:
        """The policy that applies now (see the module docstring). `force`: ask the
        resolver again (no cached TXT answer) and fetch even when the id is unchanged.
        `wait`: a policy near its expiry is fetched now rather than in the background."""
        d = normalize(domain)
        override = domain_override(self.config, d)
        if not self.enabled or override == "off":
            why = "mta_sts.enabled = false" if not self.enabled else \
                f"domains.\"{d}\".mta_sts = \"off\""
            return StsState("off", detail=why)
        try:
            return await self._lookup(d, override, force, wait)
        except Exception as exc:  # the store failed, the trust store is missing, a bug:
            # MTA-STS trouble is contained here and never stops delivery by itself
            event("internal_error", level="error", component="mta-sts", domain=d,
                  error=f"{type(exc).__name__}: {exc}")
            return StsState("failed", failure_type=decide.FETCH_ERROR, detail=str(exc))

    async def _lookup(self, d: str, override: str, force: bool, wait: bool) -> StsState:
        answer = await self.resolver.query(txt_name(d), "TXT", use_cache=not force)
        txt = txt_of(answer)
        now = self.clock()
        cached = _cached(await self.cache.sts_get(d))
        step = decide.cache_step(cached, txt, now, self.config.mta_sts.refresh_before)
        if (force and txt.kind is TxtKind.RECORD) or (wait and step is Step.REFRESH):
            step = Step.FETCH
        if step is Step.NONE:
            return StsState("none", detail=txt.detail)
        if step is Step.DEFER:
            return StsState("dnssec-invalid", detail=txt.detail)
        if step in (Step.USE, Step.REFRESH):
            assert cached is not None and cached.policy is not None
            if step is Step.REFRESH:
                self._spawn(self._fetch(d, txt.id, cached))
            return decide.state_of(cached.policy, cached.policy_id, "cached", override,
                                   expires_at=cached.expires_at)
        if not decide.fetch_allowed(cached, txt.id, now, self.config.mta_sts.failure_retry):
            assert cached is not None
            got = Fetched(None, cached.failure_type or decide.FETCH_ERROR,
                          f"{cached.failure} (fetch not retried before "
                          f"{self.config.mta_sts.failure_retry:g}s)")
        else:
            got = await self._fetch(d, txt.id, cached)
        if got.policy is not None:
            return decide.state_of(got.policy, txt.id, "fetched", override,
                                   expires_at=self.clock() + got.policy.max_age)
        if cached is not None and cached.valid(self.clock()):
            assert cached.policy is not None
            return decide.state_of(cached.policy, cached.policy_id, "cached", override,
                                   expires_at=cached.expires_at,
                                   failure_type=got.failure_type,
                                   detail=f"new policy (id {txt.id}) not fetched: {got.detail}")
        return StsState("failed", failure_type=got.failure_type, detail=got.detail)

    def _fetch(self, d: str, txt_id: str, cached: Cached | None) -> asyncio.Task[Fetched]:
        """One fetch per domain at a time; later callers share it."""
        task = self._fetching.get(d)
        if task is None:
            task = asyncio.ensure_future(self._fetch_and_store(d, txt_id))
            self._fetching[d] = task
            task.add_done_callback(lambda _t: self._fetching.pop(d, None))
        return task

    async def _fetch_and_store(self, d: str, txt_id: str) -> Fetched:
        got = await fetch_policy(d, self.resolver, self.config, self.trust)
        now = self.clock()
        self.last_fetch[d] = got
        if got.policy is not None:
            p = got.policy
            await self.cache.sts_put(d, policy_id=txt_id, policy=p.text, mode=p.mode.value,
                                     max_age=p.max_age, now=now)
            event("sts_fetched", domain=d, policy_id=txt_id, mode=p.mode.value,
                  max_age=p.max_age, ip=got.ip or None)
        else:
            await self.cache.sts_fail(d, policy_id=txt_id, failure=got.detail,
                                      failure_type=got.failure_type, now=now)
            event("sts_fetch_failed", level="warning", domain=d, policy_id=txt_id,
                  result_type=got.failure_type, detail=got.detail)
        return got

    def _spawn(self, aw: Any) -> None:
        task = asyncio.ensure_future(self._quiet(aw))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    @staticmethod
    async def _quiet(aw: Any) -> None:
        try:
            await aw
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a background refresh never harms delivery
            event("internal_error", level="error", component="mta-sts",
                  error=f"{type(exc).__name__}: {exc}")

    async def recheck(self, domain: str, old: StsState | None) -> StsState | None:
        """RFC 8461 §5.1: before a message is bounced for an MTA-STS failure, look for an
        updated policy. Returns the new state when it differs from `old`, else None."""
        new = await self.lookup(domain, force=True)
        if old is not None and (new.state, new.mode, new.policy_id, new.lines) == \
                (old.state, old.mode, old.policy_id, old.lines):
            return None
        return new

    async def refresh(self, domain: str) -> StsState:
        """A background look at one cached policy: TXT again, fetched when its id changed
        or it nears its expiry, marked checked otherwise."""
        d = normalize(domain)
        state = await self.lookup(d, wait=True)
        with_store = getattr(self.cache, "sts_checked", None)
        if with_store is not None:
            await with_store(d, now=self.clock())
        return state

    async def close(self) -> None:
        await cancel_and_wait([*self.background, *self._fetching.values()])


class StsRefresher:
    """Component of `relay serve`: refreshes cached policies in the background."""

    name = "mta-sts"

    def __init__(self, source: StsSource, store: Any, *, clock: Clock = time.time,
                 owner: str = "mta-sts") -> None:
        self.source = source
        self.store = store
        self.clock = clock
        self.owner = owner  # the node's lease owner: one refresher per cluster
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self.source.trust  # noqa: B018 - a missing trust store is a start-up error
        self._task = asyncio.create_task(self._run(), name="mta-sts-refresh")

    async def wait(self) -> None:
        assert self._task is not None
        await self._task
        if not self._stopping:
            raise RelayError("the MTA-STS refresher stopped")
        await asyncio.Event().wait()

    async def drain(self, deadline: float) -> None:
        self._stopping = True

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait([self._task])
        await self.source.close()

    async def tick(self) -> list[str]:
        """Refresh what is due; returns the domains looked at."""
        m = self.source.config.mta_sts
        now = self.clock()
        every = min(REFRESH_EVERY, m.refresh_interval)
        if not await self.store.singleton("mta-sts", self.owner, now=now, ttl=3 * every):
            return []  # another node of a shared queue refreshes the policies
        due = await self.store.sts_due(now=now, checked_before=now - m.refresh_interval,
                                       refresh_before=m.refresh_before)
        for domain in due:
            if self._stopping:
                break
            await self.source.refresh(domain)
        return due

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except (StoreError, Exception) as exc:  # never take the relay down
                event("internal_error", level="error", component=self.name,
                      error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(min(REFRESH_EVERY, self.source.config.mta_sts.refresh_interval))
