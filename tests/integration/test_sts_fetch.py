"""MTA-STS discovery, fetch and cache against real servers on loopback: a validating
Unbound over test zones (tests/support/dnsbed.py), HTTPS policy servers on port 443 of
their own 127.x addresses with certificates from a test CA (tests/support/stsserver.py),
and a real SQLite store. Hostile policy servers end in a bounded, typed failure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.config import Config, build
from relay.dns.resolve import Resolver
from relay.store import Store
from relay.sts import decide
from relay.sts.fetch import fetch_policy, load_trust
from relay.sts.source import StsRefresher, StsSource
from tests.support.certs import make_ca
from tests.support.dnsbed import DnsBed, dnsbed_fixture
from tests.support.stsserver import PolicyServer, policy_text, sts_addr

CA = make_ca("STS Test Root")
ZONE = "sts.test"
MODES = ["ok", "404", "500", "redirect", "wrong-type", "drip", "endless", "hang", "utf8",
         "manymx", "maxage", "selfsigned", "cached", "expiry", "refresh", "share", "retry",
         "tst", "idchange"]
IP = {m: sts_addr() for m in MODES}
POLICY = policy_text("enforce", "mx.ok.sts.test", "*.sts.test", max_age=3600)


def dom(mode: str) -> str:
    return f"{mode}.{ZONE}"


def world(bed: DnsBed) -> None:
    z = bed.zone(ZONE, signed=False)
    for mode, ip in IP.items():
        z.add(f"_mta-sts.{mode}", "TXT", '"v=STSv1; id=1;"').add(f"mta-sts.{mode}", "A", ip)
    z.add("_mta-sts.noaddr", "TXT", '"v=STSv1; id=1;"')
    z.add("_mta-sts.two", "TXT", '"v=STSv1; id=1;"').add("_mta-sts.two", "TXT",
                                                          '"v=STSv1; id=2;"')
    s = bed.zone("signed-sts.test")
    s.add("_mta-sts", "TXT", '"v=STSv1; id=1;"')
    bed.break_rrsig("signed-sts.test", "_mta-sts.signed-sts.test", "TXT")


dnsbed = dnsbed_fixture(world)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, PolicyServer]]:
    d = tmp_path_factory.mktemp("sts-certs")
    raw = {"utf8": b"version: STSv1\nmode: enforce\nmx: \xff\xfe.test\nmax_age: 60\n",
           "manymx": POLICY.encode() + b"".join(b"mx: m%d.sts.test\n" % i
                                                for i in range(10_000)),
           "maxage": POLICY.replace("3600", "1" + "0" * 20).encode()}
    made = {}
    for mode in MODES:
        kind = {"utf8": "raw", "manymx": "raw", "maxage": "raw", "selfsigned": "ok",
                "cached": "ok", "expiry": "ok", "refresh": "ok", "share": "drip",
                "retry": "500", "tst": "ok", "idchange": "ok"}.get(mode, mode)
        text = POLICY.replace("enforce", "testing") if mode == "tst" else POLICY
        made[mode] = PolicyServer(IP[mode], dom(mode), ca=CA, policy=text, mode=kind,
                                  raw=raw.get(mode, b""), self_signed=mode == "selfsigned",
                                  directory=d)
    for s in made.values():
        s.start()
    try:
        yield made
    finally:
        for s in made.values():
            s.stop()


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    path.write_bytes(CA.pem)
    return path


def config(bed: DnsBed, ca_file: Path, **mta_sts: object) -> Config:
    return build({"dns": {"nameservers": [bed.nameserver], "timeout": "3s"},
                  "mta_sts": {"ca_file": str(ca_file), "fetch_timeout": "2s",
                              "connect_timeout": "2s", **mta_sts}}, source="test")


async def fetch(bed: DnsBed, ca_file: Path, mode: str):  # type: ignore[no-untyped-def]
    cfg = config(bed, ca_file)
    return await fetch_policy(dom(mode), Resolver.from_config(cfg.dns), cfg,
                              load_trust(cfg.mta_sts.ca_file))


async def test_fetch_ok_with_sni_and_path(dnsbed: DnsBed, servers: dict[str, PolicyServer],
                                          ca_file: Path) -> None:
    got = await fetch(dnsbed, ca_file, "ok")
    assert got.policy is not None and got.policy.mx == ("mx.ok.sts.test", "*.sts.test")
    assert got.ip == IP["ok"]
    srv = servers["ok"]
    assert srv.requests[-1] == "GET /.well-known/mta-sts.txt HTTP/1.1"
    assert srv.sni[-1] == "mta-sts.ok.sts.test"


@pytest.mark.parametrize("mode, rtype, words", [
    ("404", decide.FETCH_ERROR, "HTTP 404"),
    ("500", decide.FETCH_ERROR, "HTTP 500"),
    ("redirect", decide.FETCH_ERROR, "never followed"),
    ("wrong-type", decide.POLICY_INVALID, "text/html is not text/plain"),
    ("utf8", decide.POLICY_INVALID, "not UTF-8"),
    ("manymx", decide.POLICY_INVALID, "larger than 65536"),
    ("maxage", decide.POLICY_INVALID, "max_age"),
    ("selfsigned", decide.WEBPKI_INVALID, "certificate"),
    ("endless", decide.POLICY_INVALID, "larger than 65536"),
])
async def test_fetch_failures(dnsbed: DnsBed, servers: dict[str, PolicyServer], ca_file: Path,
                              mode: str, rtype: str, words: str) -> None:
    before = len(servers[mode].requests)
    started = time.monotonic()
    got = await fetch(dnsbed, ca_file, mode)
    assert got.policy is None and got.failure_type == rtype and words in got.detail, got
    assert time.monotonic() - started < 10
    if mode != "selfsigned":
        assert len(servers[mode].requests) == before + 1  # one request: no redirect followed


@pytest.mark.parametrize("mode", ["drip", "hang"])
async def test_slow_servers_end_at_the_deadline(dnsbed: DnsBed,
                                                servers: dict[str, PolicyServer],
                                                ca_file: Path, mode: str) -> None:
    started = time.monotonic()
    got = await fetch(dnsbed, ca_file, mode)
    elapsed = time.monotonic() - started
    assert got.policy is None and got.failure_type == decide.FETCH_ERROR
    assert "within 2s" in got.detail
    assert 1.5 < elapsed < 8, elapsed  # the 2 s deadline, not the drip's pace


async def test_no_address_and_dns_problems(dnsbed: DnsBed, ca_file: Path) -> None:
    cfg = config(dnsbed, ca_file)
    src = StsSource(Resolver.from_config(cfg.dns), cfg)
    failed = await src.lookup("noaddr.sts.test")
    assert failed.state == "failed" and failed.failure_type == decide.FETCH_ERROR
    assert "has no address" in failed.detail
    two = await src.lookup("two.sts.test")
    assert two.state == "none" and "2 v=STSv1 records" in two.detail
    assert (await src.lookup("nothing.sts.test")).state == "none"
    bogus = await src.lookup("signed-sts.test")
    assert bogus.state == "dnssec-invalid", bogus


async def store_source(bed: DnsBed, ca_file: Path, tmp: Path, clock: list[float] | None = None,
                       **cfg: object) -> tuple[Store, StsSource]:
    store = await Store.open(tmp / "q.db")
    c = config(bed, ca_file, **cfg)
    now = clock or [time.time()]
    return store, StsSource(Resolver.from_config(c.dns), c, store, clock=lambda: now[0])


async def test_cache_survives_a_restart(dnsbed: DnsBed, servers: dict[str, PolicyServer],
                                        ca_file: Path, tmp_path: Path) -> None:
    srv, d = servers["cached"], dom("cached")
    store, src = await store_source(dnsbed, ca_file, tmp_path)
    first = await src.lookup(d)
    assert first.state == "policy" and first.source == "fetched" and first.mode == "enforce"
    assert (await src.lookup(d)).source == "cached"
    assert len(srv.requests) == 1
    await store.close()
    store, src = await store_source(dnsbed, ca_file, tmp_path)  # a new process
    again = await src.lookup(d)
    assert again.source == "cached" and again.policy_id == "1" and len(srv.requests) == 1
    # The TXT id changes (here: the cache remembers an older one): fetched again; the
    # server now fails, so the cached policy still applies, with the failure noted.
    row = await store.sts_get(d)
    assert row is not None
    await store.sts_put(d, policy_id="0", policy=row.policy, mode="enforce", max_age=3600,
                        now=time.time())
    srv.mode = "500"
    kept = await src.lookup(d)
    assert len(srv.requests) == 2
    assert kept.state == "policy" and kept.policy_id == "0" and kept.source == "cached"
    assert kept.failure_type == decide.FETCH_ERROR and "HTTP 500" in kept.detail
    srv.mode = "ok"
    await store.sts_delete(d)
    await store.close()


async def test_expired_policy_is_fetched_again(dnsbed: DnsBed,
                                               servers: dict[str, PolicyServer],
                                               ca_file: Path, tmp_path: Path) -> None:
    srv, d = servers["expiry"], dom("expiry")
    now = [time.time()]
    store, src = await store_source(dnsbed, ca_file, tmp_path, now, refresh_before="1s")
    assert (await src.lookup(d)).source == "fetched"
    now[0] += 1800
    assert (await src.lookup(d)).source == "cached"
    now[0] += 1801  # past max_age (3600)
    srv.mode = "404"
    gone = await src.lookup(d)
    assert gone.state == "failed" and len(srv.requests) == 2  # expired: not applied
    srv.mode = "ok"
    now[0] += 301  # past failure_retry
    assert (await src.lookup(d)).source == "fetched"
    await store.close()


async def test_failed_fetch_is_not_retried_at_once(dnsbed: DnsBed,
                                                   servers: dict[str, PolicyServer],
                                                   ca_file: Path, tmp_path: Path) -> None:
    srv, d = servers["retry"], dom("retry")
    store, src = await store_source(dnsbed, ca_file, tmp_path)
    for _ in range(3):
        assert (await src.lookup(d)).state == "failed"
    assert len(srv.requests) == 1
    await store.close()


async def test_concurrent_lookups_share_one_fetch(dnsbed: DnsBed,
                                                  servers: dict[str, PolicyServer],
                                                  ca_file: Path, tmp_path: Path) -> None:
    srv = servers["share"]  # drips: every lookup waits for the same fetch
    store, src = await store_source(dnsbed, ca_file, tmp_path)
    states = await asyncio.gather(*(src.lookup(dom("share")) for _ in range(5)))
    assert {s.state for s in states} == {"failed"}
    assert len(srv.requests) == 1
    await store.close()


async def test_refresher_fetches_policies_near_expiry(dnsbed: DnsBed,
                                                      servers: dict[str, PolicyServer],
                                                      ca_file: Path, tmp_path: Path) -> None:
    srv, d = servers["refresh"], dom("refresh")
    now = [time.time()]
    store, src = await store_source(dnsbed, ca_file, tmp_path, now, refresh_before="10m")
    await src.lookup(d)
    refresher = StsRefresher(src, store, clock=lambda: now[0])
    assert await refresher.tick() == []  # fresh: nothing to do
    now[0] += 3600 - 300  # five minutes before expiry
    assert await refresher.tick() == [d]
    assert len(srv.requests) == 2
    row = await store.sts_get(d)
    assert row is not None and row.fetched_at == pytest.approx(now[0])
    await store.close()


def test_off_switches(dnsbed: DnsBed, ca_file: Path) -> None:
    cfg = build({"mta_sts": {"enabled": False}}, source="t")
    assert asyncio.run(StsSource(Resolver.from_config(cfg.dns), cfg).lookup("x.test")).state \
        == "off"
    cfg = build({"domains": {"X.test": {"mta_sts": "off"}}}, source="t")
    assert asyncio.run(StsSource(Resolver.from_config(cfg.dns), cfg).lookup("x.test")).state \
        == "off"


async def test_domain_override_enforces_a_testing_policy(dnsbed: DnsBed,
                                                          servers: dict[str, PolicyServer],
                                                          ca_file: Path) -> None:
    plain = config(dnsbed, ca_file)
    st = await StsSource(Resolver.from_config(plain.dns), plain).lookup(dom("tst"))
    assert (st.mode, st.published_mode) == ("testing", "testing")
    forced = build({"dns": {"nameservers": [dnsbed.nameserver]},
                    "mta_sts": {"ca_file": str(ca_file)},
                    "domains": {dom("tst"): {"mta_sts": "enforce"}}}, source="test")
    st = await StsSource(Resolver.from_config(forced.dns), forced).lookup(dom("tst"))
    assert (st.mode, st.published_mode) == ("enforce", "testing")


def test_trust_store_loading(tmp_path: Path) -> None:
    from relay.errors import ConfigError

    bundle = tmp_path / "bundle.pem"
    broken = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    bundle.write_bytes(broken + CA.pem)
    trust = load_trust(bundle)  # the broken entry is skipped, the CA kept
    assert trust.source == str(bundle)
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificates here\n")
    with pytest.raises(ConfigError, match=r"mta_sts\.ca_file"):
        load_trust(empty)
    with pytest.raises(ConfigError, match=r"mta_sts\.ca_file"):
        load_trust(tmp_path / "missing.pem")
    assert load_trust(None).source  # the system's store


async def test_a_new_txt_id_fetches_the_new_policy(dnsbed: DnsBed,
                                                   servers: dict[str, PolicyServer],
                                                   ca_file: Path, tmp_path: Path) -> None:
    """A real change of the published record (zone edited, NSD and Unbound reloaded)."""
    srv, d = servers["idchange"], dom("idchange")
    store, src = await store_source(dnsbed, ca_file, tmp_path)
    first = await src.lookup(d)
    assert first.policy_id == "1" and first.mode == "enforce"
    srv.policy = POLICY.replace("enforce", "testing")
    assert (await src.lookup(d)).mode == "enforce"  # same id: the cached policy
    zone = dnsbed.zone(ZONE)
    zone.remove("_mta-sts.idchange", "TXT").add("_mta-sts.idchange", "TXT",
                                                '"v=STSv1; id=2;"')
    dnsbed.reload()
    await store.close()
    store, src = await store_source(dnsbed, ca_file, tmp_path)  # no cached TXT answer
    new = await src.lookup(d)
    assert (new.policy_id, new.mode, new.source) == ("2", "testing", "fetched")
    assert len(srv.requests) == 2
    await store.close()
