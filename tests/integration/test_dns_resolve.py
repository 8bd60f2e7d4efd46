"""relay.dns.resolve against a REAL validating Unbound (tests/support/dnsbed.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.config import build
from relay.dns.resolve import Resolver, check_validating
from relay.model import CnameLink, MxRecord, Rcode, TlsaRecord
from tests.support.dnsbed import Addr, DnsBed, dnsbed_fixture

DIGEST = bytes.fromhex("ab" * 32)
TLSA_OK = "3 1 1 " + DIGEST.hex()
BAD_DIGEST = bytes([3, 1, 1]) + b"\xcd" * 31  # SHA-256 matching type with 31 octets


def world(bed: DnsBed) -> None:
    z = bed.zone("sec.test")
    z.add("@", "MX", "10 mx.sec.test.")
    z.add("mx", "A", "127.25.1.10")
    z.add("_25._tcp.mx", "TLSA", TLSA_OK)
    z.add("_25._tcp.nodata", "TXT", "\"not a TLSA\"")  # TLSA name exists: NODATA
    z.add("alias", "CNAME", "mx.sec.test.")
    z.add("outside", "CNAME", "host.ins.test.")
    z.add("bogus", "A", "127.25.1.11")
    z.add("_25._tcp.bogus", "TLSA", TLSA_OK)
    z.break_rrsig("_25._tcp.bogus", "TLSA")
    z.add("stale", "A", "127.25.1.12")
    z.expire_rrsig("stale", "A")
    z.add_raw("_25._tcp.mal", "TLSA", BAD_DIGEST)
    z.add("_25._tcp.mal", "TLSA", TLSA_OK)
    for i in range(1, 121):  # too big for 1232 octets of UDP: TC, then TCP
        z.add("big", "A", f"127.25.2.{i}")
    bed.zone("badmx.test").add("@", "MX", "10 mx.sec.test.")
    bed.break_rrsig("badmx.test", "badmx.test", "MX")
    n3 = bed.zone("n3.test", nsec3=True)
    n3.add("mx", "A", "127.25.1.20")
    n3.add("_25._tcp.nodata", "TXT", "\"x\"")
    bed.zone("ins.test", signed=False).add("host", "A", "127.25.1.30")
    bed.zone("ins.test").add("_25._tcp.host", "TLSA", TLSA_OK)
    bed.zone("sf.test").add("mx", "A", "127.25.1.40")
    bed.servfail_zone("_tcp.mx.sf.test", with_ds=True)


dnsbed = dnsbed_fixture(world)


class NoEdeBed(DnsBed):
    """The same world behind a validating Unbound that sends no Extended DNS Errors."""

    def _unbound_conf(self, addr: Addr, validating: bool, tag: str) -> Path:
        conf = super()._unbound_conf(addr, validating, tag)
        conf.write_text(conf.read_text().replace("  ede: yes\n", "  ede: no\n"))
        return conf


@pytest.fixture(scope="module")
def noede(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsBed]:
    bed = NoEdeBed(tmp_path_factory.mktemp("noede"), nonvalidating=False)
    world(bed)
    bed.start()
    try:
        yield bed
    finally:
        bed.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(server: Addr, **kw: object) -> tuple[Resolver, list[tuple[str, str, bool]]]:
    sent: list[tuple[str, str, bool]] = []
    r = Resolver([server], on_query=lambda *q: sent.append(q), **kw)  # type: ignore[arg-type]
    return r, sent


async def test_secure_mx_a_tlsa(dnsbed: DnsBed) -> None:
    r, _ = make(dnsbed.resolver)
    mx = await r.query("sec.test", "MX")
    assert (mx.rcode, mx.secure, mx.records) == (Rcode.OK, True, (MxRecord(10, "mx.sec.test"),))
    a = await r.query("mx.sec.test", "A")
    assert (a.rcode, a.secure, a.records) == (Rcode.OK, True, ("127.25.1.10",))
    t = await r.tlsa("mx.sec.test", 25)
    assert t.qname == "_25._tcp.mx.sec.test" and t.secure
    assert t.records == (TlsaRecord(3, 1, 1, DIGEST),)


async def test_insecure_zone(dnsbed: DnsBed) -> None:
    r, _ = make(dnsbed.resolver)
    a = await r.query("host.ins.test", "A")
    assert a.rcode is Rcode.OK and not a.secure and a.security == "insecure"
    t = await r.query("_25._tcp.host.ins.test", "TLSA")
    assert t.rcode is Rcode.OK and not t.secure  # present but worthless: not signed


@pytest.mark.parametrize("zone", ["sec.test", "n3.test"])  # NSEC and NSEC3 denial
async def test_authenticated_denial(dnsbed: DnsBed, zone: str) -> None:
    r, _ = make(dnsbed.resolver)
    nx = await r.tlsa(f"mx.{zone}", 587)
    assert (nx.rcode, nx.secure) == (Rcode.NXDOMAIN, True)
    nodata = await r.tlsa(f"nodata.{zone}", 25)
    assert (nodata.rcode, nodata.secure, nodata.records) == (Rcode.NODATA, True, ())


async def test_bogus_tlsa_is_a_dnssec_failure_via_ede(dnsbed: DnsBed) -> None:
    r, sent = make(dnsbed.resolver)
    t = await r.tlsa("bogus.sec.test", 25)
    assert t.rcode is Rcode.SERVFAIL and t.dnssec_failure and t.security == "bogus"
    assert any(e.dnssec for e in t.ede) and "EDE" in t.reason
    assert not any(cd for _, _, cd in sent)  # the EDE said why: no CD re-query


async def test_expired_signature_reported(dnsbed: DnsBed) -> None:
    r, _ = make(dnsbed.resolver)
    a = await r.query("stale.sec.test", "A")
    assert a.dnssec_failure and any(e.code == 7 for e in a.ede)  # Signature Expired


async def test_bogus_mx(dnsbed: DnsBed) -> None:
    r, _ = make(dnsbed.resolver)
    mx = await r.query("badmx.test", "MX")
    assert mx.rcode is Rcode.SERVFAIL and mx.dnssec_failure


async def test_without_ede_a_cd_requery_diagnoses_dnssec(noede: DnsBed) -> None:
    r, sent = make(noede.resolver)
    mx = await r.query("badmx.test", "MX")
    assert mx.rcode is Rcode.SERVFAIL and mx.ede == () and mx.dnssec_failure
    assert ("badmx.test", "MX", True) in sent and "checking disabled" in mx.reason
    t = await r.tlsa("bogus.sec.test", 25)
    assert t.dnssec_failure and t.ede == ()
    # A server failure that is not DNSSEC: the CD query fails too.
    sf = await r.tlsa("mx.sf.test", 25)
    assert sf.rcode is Rcode.SERVFAIL and not sf.dnssec_failure
    assert ("_25._tcp.mx.sf.test", "TLSA", True) in sent


async def test_servfail_zone(dnsbed: DnsBed) -> None:
    r, _ = make(dnsbed.resolver)
    t = await r.tlsa("mx.sf.test", 25)
    assert t.rcode is Rcode.SERVFAIL and not t.secure


async def test_cname_links_keep_their_security(dnsbed: DnsBed) -> None:
    r, sent = make(dnsbed.resolver)
    a = await r.query("alias.sec.test", "A")
    assert a.secure and a.canonical_name == "mx.sec.test"
    assert a.chain == (CnameLink("alias.sec.test", "mx.sec.test", True),)
    assert len(sent) == 1  # AD covered the whole chain
    b = await r.query("outside.sec.test", "A")
    assert not b.secure and b.records == ("127.25.1.30",)
    assert b.chain == (CnameLink("outside.sec.test", "host.ins.test", True),)
    assert ("outside.sec.test", "CNAME", False) in sent


async def test_malformed_tlsa_is_a_record_not_a_failure(dnsbed: DnsBed) -> None:
    r, _ = make(dnsbed.resolver)
    t = await r.tlsa("mal.sec.test", 25)
    assert t.rcode is Rcode.OK and t.secure and not t.dnssec_failure
    assert set(t.records) == {TlsaRecord(3, 1, 1, BAD_DIGEST[3:]), TlsaRecord(3, 1, 1, DIGEST)}


async def test_truncated_answer_retried_over_tcp_and_bounded(dnsbed: DnsBed) -> None:
    r, sent = make(dnsbed.resolver, max_records=500)
    a = await r.query("big.sec.test", "A")  # 120 A records: only TCP carries them all
    assert a.rcode is Rcode.OK and a.secure and len(a.records) == 120 and len(sent) == 1
    small, _ = make(dnsbed.resolver, max_records=10)
    b = await small.query("big.sec.test", "A")
    assert len(b.records) == 10 and "only the first 10" in b.reason
    assert b.records == tuple(sorted(a.records))[:10]


async def test_validation_probe(dnsbed: DnsBed) -> None:
    good, _ = make(dnsbed.resolver)
    probe = await check_validating(good)
    assert probe.validating and probe.reachable and good.last_probe == probe
    assert dnsbed.nonvalidating_resolver is not None
    nv, _ = make(dnsbed.nonvalidating_resolver)
    probe = await check_validating(nv)
    assert not probe.validating and probe.reachable and "WITHOUT the AD bit" in probe.detail
    # The non-validating resolver's answers are never secure.
    assert not (await nv.query("mx.sec.test", "A")).secure
    dead, _ = make(dnsbed.dead_resolver, timeout=1.0)
    probe = await check_validating(dead)
    assert not probe.validating and not probe.reachable


async def test_resolver_down_and_silent_resolver_time_out(dnsbed: DnsBed) -> None:
    dead, _ = make(dnsbed.dead_resolver, timeout=2.0)
    a = await dead.query("sec.test", "MX")
    assert a.rcode is Rcode.TIMEOUT and "refused" in a.reason.lower()
    silent, _ = make(dnsbed.silent_resolver, timeout=0.6)
    began = time.monotonic()
    b = await silent.query("sec.test", "MX")
    took = time.monotonic() - began
    assert b.rcode is Rcode.TIMEOUT and "timed out" in b.reason
    assert 0.5 <= took < 1.5


async def test_next_nameserver_after_a_dead_one(dnsbed: DnsBed) -> None:
    r = Resolver([dnsbed.silent_resolver, dnsbed.resolver], timeout=2.0)
    a = await r.query("mx.sec.test", "A")
    assert a.rcode is Rcode.OK and a.secure


async def test_from_config(dnsbed: DnsBed) -> None:
    cfg = build({"dns": {"nameservers": [dnsbed.nameserver], "timeout": "3s",
                         "max_records_per_rrset": 5}}, source="test")
    r = Resolver.from_config(cfg.dns)
    assert r.nameservers == (dnsbed.resolver,) and r.timeout == 3.0 and r.max_records == 5
    assert (await r.query("mx.sec.test", "A")).secure


async def test_cache_honours_ttl_caps_with_injected_clock(dnsbed: DnsBed) -> None:
    clock = Clock()
    r, sent = make(dnsbed.resolver, clock=clock, cache_max_ttl=30.0, tlsa_cache_max_ttl=10.0,
                   failure_cache_ttl=2.0)
    await r.query("mx.sec.test", "A")
    await r.tlsa("mx.sec.test", 25)
    await r.tlsa("bogus.sec.test", 25)
    assert len(sent) == 3
    await r.query("MX.sec.test.", "a")  # same key, any case
    await r.tlsa("mx.sec.test", 25)
    await r.tlsa("bogus.sec.test", 25)
    assert len(sent) == 3  # all from the cache
    clock.now += 2.5  # failure cap passed
    assert (await r.tlsa("bogus.sec.test", 25)).dnssec_failure
    assert len(sent) == 4
    clock.now += 8.0  # 10.5 s: TLSA cap passed, A (zone TTL 60, cap 30) still fresh
    await r.tlsa("mx.sec.test", 25)
    await r.query("mx.sec.test", "A")
    assert sent[4:] == [("_25._tcp.mx.sec.test", "TLSA", False)]
    clock.now += 20.0  # 30.5 s: the A record's cap passed too
    await r.query("mx.sec.test", "A")
    assert sent[-1] == ("mx.sec.test", "A", False) and len(sent) == 6
    r.clear_cache()
    await r.query("mx.sec.test", "A")
    assert len(sent) == 7


async def test_negative_answer_cached_for_soa_minimum(dnsbed: DnsBed) -> None:
    clock = Clock()
    r, sent = make(dnsbed.resolver, clock=clock)
    nx = await r.tlsa("mx.sec.test", 465)
    assert nx.rcode is Rcode.NXDOMAIN
    await r.tlsa("mx.sec.test", 465)
    assert len(sent) == 1
    clock.now += 6  # the test zones' SOA minimum is 5 s
    await r.tlsa("mx.sec.test", 465)
    assert len(sent) == 2


async def test_concurrent_identical_queries_share_one_lookup(dnsbed: DnsBed) -> None:
    r, sent = make(dnsbed.resolver)
    answers = await asyncio.gather(*(r.query("sec.test", "MX") for _ in range(5)))
    assert len(sent) == 1 and len({a.records for a in answers}) == 1


async def test_cached_probe_refreshes(dnsbed: DnsBed) -> None:
    clock = Clock()
    r, sent = make(dnsbed.resolver, clock=clock, failure_cache_ttl=5.0, cache_max_ttl=60.0)
    assert (await r.validation()).validating
    await r.validation()
    assert sent.count(("", "DNSKEY", False)) == 1
    clock.now += 61
    await r.validation()
    assert sent.count(("", "DNSKEY", False)) == 2


async def test_cache_size_is_bounded(dnsbed: DnsBed) -> None:
    r, sent = make(dnsbed.resolver, max_cache_entries=2)
    for name in ("mx.sec.test", "host.ins.test", "stale.sec.test", "mx.sec.test"):
        await r.query(name, "A")
    assert len(sent) == 4  # the first entry was evicted by the third
    await r.query("stale.sec.test", "A")
    assert len(sent) == 4


async def test_probe_asks_every_configured_nameserver(dnsbed: DnsBed) -> None:
    """A lookup that times out on the first nameserver is answered by the next: every one
    of them must validate, or DANE would silently be off for those answers."""
    assert dnsbed.nonvalidating_resolver is not None
    mixed = Resolver([dnsbed.resolver, dnsbed.nonvalidating_resolver], timeout=2.0)
    probe = await check_validating(mixed)
    nv = f"{dnsbed.nonvalidating_resolver[0]}:{dnsbed.nonvalidating_resolver[1]}"
    assert not probe.validating and nv in probe.detail and "WITHOUT the AD" in probe.detail
    with_dead = Resolver([dnsbed.resolver, dnsbed.dead_resolver], timeout=1.0)
    probe = await check_validating(with_dead)
    assert probe.validating and "not answering" in probe.detail
