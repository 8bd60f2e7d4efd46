"""plan_destination against a REAL validating Unbound: SPEC.md's DANE rules end to end
(DNS side; the TLS side is the delivery's)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay.config import Config, build
from relay.dane.policy import DANE_REQUIRED, DNSSEC_INVALID, DomainPlan, HostPlan, PlanAction
from relay.delivery.destination import plan_destination, plan_dict
from relay.dns.resolve import Resolver, check_validating
from relay.model import DaneMode, Rcode, TlsaRecord
from relay.model import TlsRequirement as TR
from tests.support.dnsbed import Addr, DnsBed, dnsbed_fixture

DIGEST = bytes.fromhex("ab" * 32)
TLSA_OK = "3 1 1 " + DIGEST.hex()
TLSA_PKIX = "1 1 1 " + DIGEST.hex()
BAD_DIGEST = bytes([3, 1, 1]) + b"\xcd" * 31


def simple(bed: DnsBed, zone: str, *, signed: bool = True, nsec3: bool = False,
           tlsa: str | None = TLSA_OK, addr: str = "127.25.3.1") -> Any:
    z = bed.zone(zone, signed=signed, nsec3=nsec3)
    z.add("@", "MX", f"10 mx.{zone}.").add("mx", "A", addr)
    if tlsa:
        z.add("_25._tcp.mx", "TLSA", tlsa)
    return z


def world(bed: DnsBed) -> None:
    simple(bed, "dane.test").add("_2525._tcp.mx", "TLSA", TLSA_OK)
    simple(bed, "unsigned.test", signed=False)                  # TLSA present but insecure
    simple(bed, "notlsa.test", tlsa=None)                        # NSEC denial
    simple(bed, "notlsa3.test", tlsa=None, nsec3=True)           # NSEC3 denial
    simple(bed, "pkix.test", tlsa=TLSA_PKIX)                     # only usage 1
    simple(bed, "badlen.test", tlsa=None).add_raw("_25._tcp.mx", "TLSA", BAD_DIGEST)
    simple(bed, "badtlsa.test").break_rrsig("_25._tcp.mx", "TLSA")
    simple(bed, "badmx.test").break_rrsig("@", "MX")
    simple(bed, "stalea.test").expire_rrsig("mx", "A")
    simple(bed, "sftlsa.test", tlsa=None)
    bed.servfail_zone("_tcp.mx.sftlsa.test", with_ds=True)
    # Insecure host addresses whose TLSA would SERVFAIL if anyone asked.
    bed.zone("insaddr.test").add("@", "MX", "10 mx.plain.test.")
    bed.zone("plain.test", signed=False).add("mx", "A", "127.25.3.2")
    bed.servfail_zone("_tcp.mx.plain.test")
    # CNAME'd MX hosts.
    prov = bed.zone("prov.test")
    prov.add("host", "A", "127.25.3.3").add("_25._tcp.host", "TLSA", TLSA_OK)
    prov.add("host2", "A", "127.25.3.4")  # no TLSA at the expanded name
    cn = bed.zone("cname.test")
    cn.add("@", "MX", "10 mx.cname.test.").add("@", "MX", "20 mx2.cname.test.")
    cn.add("mx", "CNAME", "host.prov.test.")
    cn.add("mx2", "CNAME", "host2.prov.test.").add("_25._tcp.mx2", "TLSA", TLSA_OK)
    out = bed.zone("cnout.test")
    out.add("@", "MX", "10 mx.cnout.test.").add("mx", "CNAME", "mx.plain.test.")
    out.add("_25._tcp.mx", "TLSA", TLSA_OK)
    # Null MX, no MX, two hosts one broken.
    bed.zone("nullmx.test").add("@", "MX", "0 .")
    bed.zone("nomx.test").add("@", "A", "127.25.3.5").add("_25._tcp", "TLSA", TLSA_OK)
    two = bed.zone("two.test")
    two.add("@", "MX", "10 mx1.two.test.").add("@", "MX", "20 mx2.two.test.")
    two.add("mx1", "A", "127.25.3.6").add("_25._tcp.mx1", "TLSA", TLSA_OK)
    two.break_rrsig("_25._tcp.mx1", "TLSA")
    two.add("mx2", "A", "127.25.3.7").add("_25._tcp.mx2", "TLSA", TLSA_OK)


dnsbed = dnsbed_fixture(world)


def cfg(bed: DnsBed | None = None, server: Addr | None = None, **sections: Any) -> Config:
    data: dict[str, Any] = {k: v for k, v in sections.items()}
    dns = dict(data.pop("dns", {}))
    if server is not None:
        dns["nameservers"] = [f"{server[0]}:{server[1]}"]
    elif bed is not None:
        dns["nameservers"] = [bed.nameserver]
    data["dns"] = dns
    return build(data, source="test")


async def plan(bed: DnsBed, domain: str, config: Config | None = None
               ) -> tuple[DomainPlan, list[tuple[str, str, bool]]]:
    """Plan `domain` with a fresh resolver; also returns every wire query it sent."""
    config = config or cfg(bed)
    sent: list[tuple[str, str, bool]] = []
    resolver = Resolver.from_config(config.dns, on_query=lambda *q: sent.append(q))
    return await plan_destination(domain, resolver, config), sent


def only(p: DomainPlan) -> HostPlan:
    assert len(p.hosts) == 1, p
    return p.hosts[0]


async def test_secure_mx_a_tlsa_is_dane(dnsbed: DnsBed) -> None:
    p, sent = await plan(dnsbed, "dane.test")
    assert p.action is PlanAction.DELIVER and p.code is None and p.mx_secure
    h = only(p)
    assert (h.name, h.requirement, h.tlsa_base, h.sni) == ("mx.dane.test", TR.DANE,
                                                          "mx.dane.test", "mx.dane.test")
    assert h.usable_tlsa == (TlsaRecord(3, 1, 1, DIGEST),) and h.dnssec == "secure"
    assert [a.ip for a in h.addresses] == ["127.25.3.1"] and h.addresses[0].secure
    assert h.reference_names == ("mx.dane.test", "dane.test")
    assert ("_25._tcp.mx.dane.test", "TLSA", False) in sent


async def test_insecure_zone_is_opportunistic_without_tlsa_lookup(dnsbed: DnsBed) -> None:
    p, sent = await plan(dnsbed, "unsigned.test")
    h = only(p)
    assert p.action is PlanAction.DELIVER and not p.mx_secure
    assert h.requirement is TR.MAY and h.tlsa_bases == () and h.dnssec == "insecure"
    assert not [q for q in sent if q[1] == "TLSA"]


@pytest.mark.parametrize("domain", ["notlsa.test", "notlsa3.test"])
async def test_signed_zone_without_tlsa(dnsbed: DnsBed, domain: str) -> None:
    p, _ = await plan(dnsbed, domain)
    h = only(p)
    assert p.action is PlanAction.DELIVER and h.requirement is TR.MAY
    assert h.addresses_secure and "authenticated denial" in h.reason
    tlsa = [a for a in h.lookups if a.rdtype == "TLSA"]
    assert tlsa and tlsa[0].secure and tlsa[0].rcode is Rcode.NXDOMAIN


async def test_only_pkix_usages_means_tls_without_authentication(dnsbed: DnsBed) -> None:
    h = only((await plan(dnsbed, "pkix.test"))[0])
    assert h.requirement is TR.ENCRYPT and h.usable_tlsa == () and len(h.tlsa) == 1


async def test_malformed_tlsa_is_unusable_not_a_dns_failure(dnsbed: DnsBed) -> None:
    p, _ = await plan(dnsbed, "badlen.test")
    h = only(p)
    assert p.action is PlanAction.DELIVER
    assert h.requirement is TR.ENCRYPT and h.tlsa == (TlsaRecord(3, 1, 1, BAD_DIGEST[3:]),)


async def test_bogus_tlsa_defers_4_7_324(dnsbed: DnsBed) -> None:
    p, _ = await plan(dnsbed, "badtlsa.test")
    assert p.action is PlanAction.DEFER and p.code == "4.7.324"
    assert p.failure_type == DNSSEC_INVALID and only(p).dnssec == "bogus"


async def test_bogus_mx_defers_4_7_324_via_ede(dnsbed: DnsBed) -> None:
    p, sent = await plan(dnsbed, "badmx.test")
    assert p.action is PlanAction.DEFER and p.code == "4.7.324" and p.hosts == ()
    assert p.mx_answer is not None and any(e.dnssec for e in p.mx_answer.ede)
    assert [q for q in sent if q[:2] != ("", "DNSKEY")] == [("badmx.test", "MX", False)]


async def test_expired_signature_on_host_address_defers_4_7_324(dnsbed: DnsBed) -> None:
    p, _ = await plan(dnsbed, "stalea.test")
    assert p.code == "4.7.324" and "Signature Expired" in only(p).reason


async def test_servfail_on_tlsa_defers_4_7_324(dnsbed: DnsBed) -> None:
    p, _ = await plan(dnsbed, "sftlsa.test")
    assert p.action is PlanAction.DEFER and p.code == "4.7.324"
    assert "SERVFAIL" in only(p).reason


async def test_insecure_host_addresses_tlsa_never_queried(dnsbed: DnsBed) -> None:
    p, sent = await plan(dnsbed, "insaddr.test")
    h = only(p)
    assert p.action is PlanAction.DELIVER and p.mx_secure
    assert h.requirement is TR.MAY and not h.addresses_secure
    assert not [q for q in sent if q[1] == "TLSA"]  # its TLSA zone would SERVFAIL


async def test_cname_mx_host_with_secure_chain(dnsbed: DnsBed) -> None:
    p, sent = await plan(dnsbed, "cname.test")
    h1, h2 = p.hosts
    # mx → host.prov.test (secure): the expanded name's TLSA wins.
    assert h1.canonical_name == "host.prov.test" and h1.requirement is TR.DANE
    assert h1.tlsa_bases == ("host.prov.test", "mx.cname.test")
    assert h1.tlsa_base == h1.sni == "host.prov.test"
    assert h1.reference_names == ("host.prov.test", "mx.cname.test", "cname.test")
    # mx2 → host2.prov.test has no TLSA: the original name's TLSA is used.
    assert h2.requirement is TR.DANE and h2.tlsa_base == "mx2.cname.test"
    tlsa_q = [q[0] for q in sent if q[1] == "TLSA"]
    assert tlsa_q.index("_25._tcp.host2.prov.test") < tlsa_q.index("_25._tcp.mx2.cname.test")


async def test_cname_mx_host_into_insecure_zone(dnsbed: DnsBed) -> None:
    p, sent = await plan(dnsbed, "cnout.test")
    h = only(p)
    assert not h.addresses_secure and h.canonical_name == "mx.plain.test"
    assert h.tlsa_bases == ("mx.cnout.test",)  # only the first (secure) link's owner
    assert h.requirement is TR.DANE and h.sni == "mx.cnout.test"
    assert "_25._tcp.mx.plain.test" not in [q[0] for q in sent]


async def test_null_mx_bounces_5_1_10(dnsbed: DnsBed) -> None:
    p, sent = await plan(dnsbed, "nullmx.test")
    assert p.action is PlanAction.BOUNCE and p.code == "5.1.10" and p.hosts == ()
    assert not [q for q in sent if q[1] in ("A", "AAAA", "TLSA")]


async def test_nxdomain_bounces_5_1_2(dnsbed: DnsBed) -> None:
    p, _ = await plan(dnsbed, "nosuch.dane.test")
    assert p.action is PlanAction.BOUNCE and p.code == "5.1.2"


async def test_no_mx_uses_the_domain_itself(dnsbed: DnsBed) -> None:
    p, _ = await plan(dnsbed, "nomx.test")
    h = only(p)
    assert p.implicit_mx and p.mx_secure and (h.name, h.preference) == ("nomx.test", 0)
    assert h.requirement is TR.DANE and h.tlsa_base == "nomx.test"


async def test_one_broken_host_another_good(dnsbed: DnsBed) -> None:
    p, _ = await plan(dnsbed, "two.test")
    assert p.action is PlanAction.DELIVER
    assert [(h.name, h.usable, h.unusable_code) for h in p.hosts] == [
        ("mx1.two.test", False, "4.7.324"), ("mx2.two.test", True, None)]


async def test_resolver_down_defers_4_4_312(dnsbed: DnsBed) -> None:
    lax = cfg(server=dnsbed.dead_resolver, dns={"require_validating_resolver": False,
                                                "timeout": "1s"})
    p, _ = await plan(dnsbed, "dane.test", lax)
    assert p.action is PlanAction.DEFER and p.code == "4.4.312" and "no answer" in p.reason
    strict = cfg(server=dnsbed.silent_resolver, dns={"timeout": "0.5s"})
    p, _ = await plan(dnsbed, "dane.test", strict)
    assert p.action is PlanAction.DEFER and p.code == "4.4.312"


async def test_non_validating_resolver(dnsbed: DnsBed) -> None:
    nv = dnsbed.nonvalidating_resolver
    assert nv is not None
    probe = await check_validating(Resolver([nv], timeout=2))
    assert not probe.validating
    p, sent = await plan(dnsbed, "dane.test", cfg(server=nv))
    assert p.action is PlanAction.DEFER and p.code == "4.4.312"
    assert "does not validate" in p.reason and sent == [("", "DNSKEY", False)]
    # An operator who allows it gets opportunistic TLS only: DANE silently off.
    lax = cfg(server=nv, dns={"require_validating_resolver": False})
    p, _ = await plan(dnsbed, "dane.test", lax)
    assert p.action is PlanAction.DELIVER and only(p).requirement is TR.MAY


async def test_mandatory_and_off_modes(dnsbed: DnsBed) -> None:
    modes = cfg(dnsbed, domains={"notlsa.test": {"dane": "mandatory"},
                                 "dane.test": {"dane": "mandatory"},
                                 "pkix.test": {"dane": "off"}})
    p, _ = await plan(dnsbed, "notlsa.test", modes)
    assert p.action is PlanAction.DEFER and p.code == "4.7.323"
    assert p.failure_type == DANE_REQUIRED and p.dane_mode is DaneMode.MANDATORY
    p, _ = await plan(dnsbed, "dane.test", modes)
    assert p.action is PlanAction.DELIVER and only(p).requirement is TR.DANE
    p, sent = await plan(dnsbed, "pkix.test", modes)
    assert only(p).requirement is TR.MAY and not [q for q in sent if q[1] == "TLSA"]
    p, _ = await plan(dnsbed, "unsigned.test", cfg(dnsbed, domains={
        "unsigned.test": {"dane": "mandatory"}}))
    assert p.code == "4.7.323" and p.hosts == ()  # insecure MX


async def test_route_with_its_own_port_gets_dane(dnsbed: DnsBed) -> None:
    routed = cfg(dnsbed, routes=[{"domain": "corp.example", "hosts": ["mx.dane.test:2525"],
                                  "tls": "may"}])
    p, sent = await plan(dnsbed, "corp.example", routed)
    h = only(p)
    assert p.route == "corp.example" and (h.name, h.port) == ("mx.dane.test", 2525)
    assert h.requirement is TR.DANE and h.reference_names == ("mx.dane.test",)
    assert ("_2525._tcp.mx.dane.test", "TLSA", False) in sent
    assert ("corp.example", "MX", False) not in sent


async def test_ipv4_only(dnsbed: DnsBed) -> None:
    p, sent = await plan(dnsbed, "dane.test", cfg(dnsbed, delivery={"ipv6": False}))
    assert p.action is PlanAction.DELIVER
    assert not [q for q in sent if q[1] == "AAAA"]


async def test_plan_as_json(dnsbed: DnsBed) -> None:
    p, _ = await plan(dnsbed, "cname.test")
    data = json.loads(json.dumps(plan_dict(p)))
    assert data["action"] == "deliver" and data["code"] is None and data["mx_secure"] is True
    assert data["mx"]["records"] == ["10 mx.cname.test", "20 mx2.cname.test"]
    h = data["hosts"][0]
    assert h["name"] == "mx.cname.test" and h["requirement"] == "dane"
    assert h["tlsa"] == [f"3 1 1 {DIGEST.hex()}"] and h["sni"] == "host.prov.test"
    assert h["addresses"] == [{"ip": "127.25.3.3", "secure": True}]
    assert h["lookups"][0]["chain"] == [{"owner": "mx.cname.test", "target": "host.prov.test",
                                         "secure": True}]
    nullmx = plan_dict((await plan(dnsbed, "nullmx.test"))[0])
    assert (nullmx["action"], nullmx["code"], nullmx["mx"]["records"]) == ("bounce", "5.1.10",
                                                                          ["0 ."])
