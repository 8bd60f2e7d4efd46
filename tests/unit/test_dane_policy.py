"""relay.dane.policy: every row of SPEC.md's "DANE rules in detail", on hand-made DNS answers.

The real-resolver counterpart is tests/integration/test_destination.py.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import pytest

from relay import codes
from relay.config import build
from relay.dane.policy import (
    DANE_REQUIRED,
    DNSSEC_INVALID,
    HostPlan,
    HostTarget,
    MxDecision,
    PlanAction,
    PolicyOptions,
    TlsaNext,
    domain_mode,
    find_route,
    finish,
    host_step,
    mx_step,
    options_for,
    resolver_step,
    route_step,
    shuffle_equal_preference,
    tlsa_step,
)
from relay.delivery.destination import plan_destination
from relay.dns.resolve import ValidationProbe
from relay.model import CnameLink, DaneMode, DnsAnswer, MxRecord, Rcode, TlsaRecord
from relay.model import TlsRequirement as TR

D = "example.org"
OPTS = PolicyOptions()
GOOD = TlsaRecord(3, 1, 1, hashlib.sha256(b"key").digest())
PKIX = TlsaRecord(1, 1, 1, hashlib.sha256(b"key").digest())
SHORT = TlsaRecord(3, 1, 1, b"\x12\x34")  # wrong digest length: malformed, unusable


def ans(qname: str, rdtype: str, rcode: Rcode = Rcode.OK, *, secure: bool = True,
        records: Sequence[object] = (), chain: Sequence[CnameLink] = (),
        canonical: str = "", bogus: bool = False, reason: str = "") -> DnsAnswer:
    return DnsAnswer(qname, rdtype, rcode, secure and not bogus, tuple(records),
                     canonical or qname, tuple(chain), dnssec_failure=bogus, reason=reason)


def mx_ans(*pairs: tuple[int, str], secure: bool = True, domain: str = D) -> DnsAnswer:
    return ans(domain, "MX", secure=secure, records=[MxRecord(p, x) for p, x in pairs])


def a_ans(name: str, *ips: str, secure: bool = True, **kw: object) -> DnsAnswer:
    return ans(name, "A", secure=secure, records=ips, **kw)  # type: ignore[arg-type]


def tlsa_ans(base: str, *recs: TlsaRecord, secure: bool = True, rcode: Rcode = Rcode.OK,
             bogus: bool = False) -> DnsAnswer:
    if rcode is Rcode.OK and not recs:
        rcode = Rcode.NODATA
    return ans(f"_25._tcp.{base}", "TLSA", rcode, secure=secure, records=recs, bogus=bogus)


def mxd(mx_secure: bool = True, opts: PolicyOptions = OPTS, domain: str = D) -> MxDecision:
    return MxDecision(domain, None, (), mx_secure=mx_secure, opts=opts)


def run_host(name: str, addr_answers: Sequence[DnsAnswer], tlsa: dict[str, DnsAnswer],
             mx: MxDecision | None = None, target: HostTarget | None = None
             ) -> tuple[HostPlan, list[str]]:
    """Drive host_step/tlsa_step like relay.delivery.destination; returns the plan and
    TLSA qnames."""
    mx = mx or mxd()
    target = target or HostTarget(name, 10, mx.opts.port)
    prog = host_step(target, addr_answers, mx)
    asked: list[str] = []
    if prog.plan is not None:
        return prog.plan, asked
    assert prog.pending is not None
    got: list[DnsAnswer] = []
    while True:
        step = tlsa_step(prog.pending, got)
        if isinstance(step, HostPlan):
            return step, asked
        asked.append(step.qname)
        got.append(tlsa[step.qname])


# --- MX -------------------------------------------------------------------------------------


def test_mx_sorted_by_preference_then_name_and_security_never_reorders() -> None:
    for secure in (True, False):
        d = mx_step(D, mx_ans((20, "c.example.org"), (10, "b.example.org"),
                              (10, "a.example.org"), secure=secure), OPTS)
        assert d.plan is None
        assert [(t.name, t.preference) for t in d.targets] == [
            ("a.example.org", 10), ("b.example.org", 10), ("c.example.org", 20)]
        assert d.mx_secure is secure


def test_mx_duplicates_keep_lowest_preference_and_host_bound_applies() -> None:
    opts = PolicyOptions(max_mx_hosts=2)
    d = mx_step(D, mx_ans((30, "A.example.org."), (5, "a.example.org"), (10, "b.example.org"),
                          (20, "c.example.org")), opts)
    assert [(t.name, t.preference) for t in d.targets] == [("a.example.org", 5),
                                                           ("b.example.org", 10)]


def test_mx_secure_only_if_every_link_is_secure() -> None:
    # The first CNAME link is signed, the MX RRset it leads to is not: the whole is insecure.
    chain = (CnameLink(D, "mail.other.org", True),)
    d = mx_step(D, ans(D, "MX", secure=False, records=[MxRecord(10, "mx.other.org")],
                       chain=chain, canonical="mail.other.org"), OPTS)
    assert d.mx_secure is False
    plan, _ = run_host("mx.other.org", [a_ans("mx.other.org", "192.0.2.1")],
                       {"_25._tcp.mx.other.org": tlsa_ans("mx.other.org", GOOD)}, mx=d)
    # Still DANE for the host (its own records are signed), but the recipient domain is
    # not a reference identifier when the MX lookup was insecure.
    assert plan.requirement is TR.DANE
    assert plan.reference_names == ("mx.other.org",)


def test_reference_names_include_domain_when_mx_secure() -> None:
    d = mx_step(D, mx_ans((10, "mx.example.net")), OPTS)
    plan, _ = run_host("mx.example.net", [a_ans("mx.example.net", "192.0.2.1")],
                       {"_25._tcp.mx.example.net": tlsa_ans("mx.example.net", GOOD)}, mx=d)
    assert plan.reference_names == ("mx.example.net", D)


@pytest.mark.parametrize("secure", [True, False])
def test_null_mx_bounces_5_1_10(secure: bool) -> None:
    d = mx_step(D, mx_ans((0, ""), secure=secure), OPTS)
    assert d.plan is not None and d.plan.action is PlanAction.BOUNCE
    assert d.plan.code == codes.NULL_MX == "5.1.10"
    assert d.targets == ()


def test_null_mx_among_real_ones_is_ignored() -> None:
    d = mx_step(D, mx_ans((0, ""), (10, "mx.example.org")), OPTS)
    assert d.plan is None and [t.name for t in d.targets] == ["mx.example.org"]


@pytest.mark.parametrize("secure", [True, False])
def test_nxdomain_bounces_5_1_2(secure: bool) -> None:
    d = mx_step(D, ans(D, "MX", Rcode.NXDOMAIN, secure=secure), OPTS)
    assert d.plan is not None and d.plan.action is PlanAction.BOUNCE
    assert d.plan.code == codes.NO_SUCH_DOMAIN == "5.1.2"


@pytest.mark.parametrize("secure", [True, False])
def test_no_mx_is_implicit_mx(secure: bool) -> None:
    d = mx_step(D, ans(D, "MX", Rcode.NODATA, secure=secure), OPTS)
    assert d.plan is None and d.implicit and d.mx_secure is secure
    assert [(t.name, t.preference, t.port) for t in d.targets] == [(D, 0, 25)]
    plan, _ = run_host(D, [a_ans(D, "192.0.2.7")], {f"_25._tcp.{D}": tlsa_ans(D, GOOD)}, mx=d)
    assert plan.requirement is TR.DANE
    assert plan.reference_names == (D,)


@pytest.mark.parametrize(("rcode", "bogus", "code"), [
    (Rcode.SERVFAIL, False, "4.4.312"),
    (Rcode.TIMEOUT, False, "4.4.312"),
    (Rcode.REFUSED, False, "4.4.312"),
    (Rcode.SERVFAIL, True, "4.7.324"),
])
def test_mx_lookup_error_defers_whole_domain(rcode: Rcode, bogus: bool, code: str) -> None:
    d = mx_step(D, ans(D, "MX", rcode, secure=False, bogus=bogus, reason="why"), OPTS)
    assert d.plan is not None and d.plan.action is PlanAction.DEFER
    assert d.plan.code == code and d.plan.hosts == ()
    assert d.plan.failure_type == (DNSSEC_INVALID if bogus else None)


# --- host addresses -------------------------------------------------------------------------


def test_insecure_addresses_no_tlsa_lookup_opportunistic() -> None:
    plan, asked = run_host("mx.example.org", [a_ans("mx.example.org", "192.0.2.1",
                                                    secure=False)], {})
    assert asked == []
    assert plan.requirement is TR.MAY and plan.tlsa_bases == () and plan.tlsa_base is None
    assert plan.dnssec == "insecure" and plan.sni == "mx.example.org"


def test_secure_addresses_tlsa_at_host_name() -> None:
    plan, asked = run_host("mx.example.org", [a_ans("mx.example.org", "192.0.2.1")],
                           {"_25._tcp.mx.example.org": tlsa_ans("mx.example.org", GOOD)})
    assert asked == ["_25._tcp.mx.example.org"]
    assert plan.requirement is TR.DANE and plan.usable_tlsa == (GOOD,)
    assert plan.tlsa_base == plan.sni == "mx.example.org"


def test_secure_cname_chain_expanded_name_first() -> None:
    chain = (CnameLink("mx.example.org", "host.provider.net", True),)
    addr = a_ans("mx.example.org", "192.0.2.1", chain=chain, canonical="host.provider.net")
    plan, asked = run_host("mx.example.org", [addr], {
        "_25._tcp.host.provider.net": tlsa_ans("host.provider.net", GOOD)})
    assert asked == ["_25._tcp.host.provider.net"]
    assert plan.tlsa_bases == ("host.provider.net", "mx.example.org")
    assert plan.tlsa_base == plan.sni == "host.provider.net"
    assert plan.reference_names == ("host.provider.net", "mx.example.org", D)


@pytest.mark.parametrize("expanded_secure", [True, False])
def test_secure_cname_chain_falls_back_to_original_name(expanded_secure: bool) -> None:
    chain = (CnameLink("mx.example.org", "host.provider.net", True),)
    addr = a_ans("mx.example.org", "192.0.2.1", chain=chain, canonical="host.provider.net")
    plan, asked = run_host("mx.example.org", [addr], {
        "_25._tcp.host.provider.net": tlsa_ans("host.provider.net", secure=expanded_secure,
                                               rcode=Rcode.NXDOMAIN),
        "_25._tcp.mx.example.org": tlsa_ans("mx.example.org", GOOD)})
    assert asked == ["_25._tcp.host.provider.net", "_25._tcp.mx.example.org"]
    assert plan.requirement is TR.DANE and plan.tlsa_base == "mx.example.org"


def test_secure_cname_chain_no_tlsa_anywhere_is_opportunistic() -> None:
    chain = (CnameLink("mx.example.org", "host.provider.net", True),)
    addr = a_ans("mx.example.org", "192.0.2.1", chain=chain, canonical="host.provider.net")
    plan, asked = run_host("mx.example.org", [addr], {
        "_25._tcp.host.provider.net": tlsa_ans("host.provider.net"),
        "_25._tcp.mx.example.org": tlsa_ans("mx.example.org")})
    assert len(asked) == 2 and plan.requirement is TR.MAY and plan.tlsa_base is None


def test_cname_only_first_link_secure_uses_original_name_only() -> None:
    chain = (CnameLink("mx.example.org", "host.insecure.net", True),)
    addr = a_ans("mx.example.org", "192.0.2.1", secure=False, chain=chain,
                 canonical="host.insecure.net")
    plan, asked = run_host("mx.example.org", [addr], {
        "_25._tcp.mx.example.org": tlsa_ans("mx.example.org", GOOD)})
    assert asked == ["_25._tcp.mx.example.org"]
    assert plan.tlsa_bases == ("mx.example.org",)
    assert plan.requirement is TR.DANE and plan.sni == "mx.example.org"
    assert plan.addresses_secure is False


def test_cname_first_link_insecure_no_tlsa() -> None:
    chain = (CnameLink("mx.example.org", "host.provider.net", False),)
    addr = a_ans("mx.example.org", "192.0.2.1", secure=False, chain=chain,
                 canonical="host.provider.net")
    plan, asked = run_host("mx.example.org", [addr], {})
    assert asked == [] and plan.requirement is TR.MAY


@pytest.mark.parametrize(("rcode", "bogus", "code"), [
    (Rcode.SERVFAIL, True, "4.7.324"),
    (Rcode.SERVFAIL, False, "4.4.312"),
    (Rcode.TIMEOUT, False, "4.4.312"),
    (Rcode.REFUSED, False, "4.4.312"),
])
def test_address_lookup_failure_makes_host_unusable(rcode: Rcode, bogus: bool,
                                                    code: str) -> None:
    bad = ans("mx.example.org", "A", rcode, secure=False, bogus=bogus)
    plan, asked = run_host("mx.example.org", [bad], {})
    assert asked == [] and not plan.usable and plan.unusable_code == code
    if bogus:
        assert plan.dnssec == "bogus" and plan.failure_type == DNSSEC_INVALID


def test_bogus_family_poisons_host_even_if_other_family_answers() -> None:
    good = a_ans("mx.example.org", "192.0.2.1")
    bad = ans("mx.example.org", "AAAA", Rcode.SERVFAIL, secure=False, bogus=True)
    plan, _ = run_host("mx.example.org", [good, bad], {})
    assert plan.unusable_code == "4.7.324"


def test_one_family_timing_out_uses_the_other() -> None:
    good = a_ans("mx.example.org", "192.0.2.1")
    slow = ans("mx.example.org", "AAAA", Rcode.TIMEOUT, secure=False)
    plan, _ = run_host("mx.example.org", [good, slow],
                       {"_25._tcp.mx.example.org": tlsa_ans("mx.example.org", GOOD)})
    assert plan.requirement is TR.DANE and [a.ip for a in plan.addresses] == ["192.0.2.1"]
    assert "AAAA lookup failed" in plan.reason


def test_host_without_addresses_is_unusable() -> None:
    plan, _ = run_host("mx.example.org", [ans("mx.example.org", "A", Rcode.NODATA),
                                          ans("mx.example.org", "AAAA", Rcode.NXDOMAIN)], {})
    assert plan.unusable_code == "4.4.312" and "no address records" in plan.reason


def test_addresses_bounded_interleaved_and_deterministic() -> None:
    opts = PolicyOptions(max_addresses_per_host=3)
    v4 = a_ans("mx.example.org", "192.0.2.9", "192.0.2.1", "192.0.2.5")
    v6 = ans("mx.example.org", "AAAA", records=["2001:db8::2", "2001:db8::1"])
    plan, _ = run_host("mx.example.org", [v4, v6],
                       {"_25._tcp.mx.example.org": tlsa_ans("mx.example.org", GOOD)},
                       mx=mxd(opts=opts))
    assert [a.ip for a in plan.addresses] == ["192.0.2.1", "2001:db8::1", "192.0.2.5"]
    assert all(a.secure for a in plan.addresses)
    assert {a.family for a in plan.addresses} == {4, 6}


# --- TLSA -----------------------------------------------------------------------------------


def _tlsa_case(answer: DnsAnswer, mx: MxDecision | None = None) -> HostPlan:
    plan, _ = run_host("mx.example.org", [a_ans("mx.example.org", "192.0.2.1")],
                       {"_25._tcp.mx.example.org": answer}, mx=mx)
    return plan


def test_secure_usable_tlsa_requires_dane() -> None:
    plan = _tlsa_case(tlsa_ans("mx.example.org", GOOD, PKIX))
    assert plan.requirement is TR.DANE
    assert set(plan.tlsa) == {GOOD, PKIX}
    assert plan.usable_tlsa == (GOOD,)


@pytest.mark.parametrize("records", [(PKIX,), (SHORT,), (PKIX, SHORT),
                                     (TlsaRecord(3, 1, 9, b"x" * 32),)])
def test_secure_tlsa_none_usable_requires_tls_without_authentication(
        records: tuple[TlsaRecord, ...]) -> None:
    plan = _tlsa_case(tlsa_ans("mx.example.org", *records))
    assert plan.requirement is TR.ENCRYPT and plan.usable_tlsa == ()
    assert plan.unusable_code is None and plan.tlsa_base == "mx.example.org"


def test_insecure_tlsa_is_opportunistic() -> None:
    plan = _tlsa_case(tlsa_ans("mx.example.org", GOOD, secure=False))
    assert plan.requirement is TR.MAY and plan.tlsa == () and plan.tlsa_base is None


@pytest.mark.parametrize("rcode", [Rcode.NODATA, Rcode.NXDOMAIN])
def test_authenticated_denial_is_opportunistic(rcode: Rcode) -> None:
    plan = _tlsa_case(tlsa_ans("mx.example.org", rcode=rcode))
    assert plan.requirement is TR.MAY and "authenticated denial" in plan.reason


@pytest.mark.parametrize(("rcode", "bogus", "code"), [
    (Rcode.SERVFAIL, False, "4.7.324"),  # SERVFAIL on TLSA: never an absence
    (Rcode.SERVFAIL, True, "4.7.324"),   # bogus
    (Rcode.OK, True, "4.7.324"),         # bogus data served (EDE) without SERVFAIL
    (Rcode.TIMEOUT, False, "4.4.312"),
    (Rcode.REFUSED, False, "4.4.312"),
])
def test_tlsa_lookup_error_makes_host_unusable(rcode: Rcode, bogus: bool, code: str) -> None:
    recs = (GOOD,) if rcode is Rcode.OK else ()
    plan = _tlsa_case(tlsa_ans("mx.example.org", *recs, rcode=rcode, secure=False,
                               bogus=bogus))
    assert not plan.usable and plan.unusable_code == code
    assert plan.failure_type == (DNSSEC_INVALID if code == "4.7.324" else None)


# --- per-domain modes -----------------------------------------------------------------------


MANDATORY = PolicyOptions(dane_mode=DaneMode.MANDATORY)
OFF = PolicyOptions(dane_mode=DaneMode.OFF)


def test_mandatory_accepts_only_dane_hosts() -> None:
    ok = _tlsa_case(tlsa_ans("mx.example.org", GOOD), mx=mxd(opts=MANDATORY))
    assert ok.requirement is TR.DANE
    for answer in (tlsa_ans("mx.example.org", PKIX), tlsa_ans("mx.example.org"),
                   tlsa_ans("mx.example.org", GOOD, secure=False)):
        plan = _tlsa_case(answer, mx=mxd(opts=MANDATORY))
        assert plan.unusable_code == "4.7.323" and plan.failure_type == DANE_REQUIRED
    insecure, asked = run_host("mx.example.org", [a_ans("mx.example.org", "192.0.2.1",
                                                        secure=False)], {},
                               mx=mxd(opts=MANDATORY))
    assert asked == [] and insecure.unusable_code == "4.7.323"


def test_mandatory_needs_a_secure_mx() -> None:
    d = mx_step(D, mx_ans((10, "mx.example.org"), secure=False), MANDATORY)
    assert d.plan is not None and d.plan.code == "4.7.323"
    assert d.plan.failure_type == DANE_REQUIRED
    assert mx_step(D, mx_ans((10, "mx.example.org")), MANDATORY).plan is None


def test_off_ignores_tlsa() -> None:
    d = mx_step(D, mx_ans((10, "mx.example.org")), OFF)
    plan, asked = run_host("mx.example.org", [a_ans("mx.example.org", "192.0.2.1")], {},
                           mx=d, target=d.targets[0])
    assert asked == [] and plan.requirement is TR.MAY


def test_domain_mode_and_options_from_config() -> None:
    cfg = build({"domains": {"Strict.Example": {"dane": "mandatory"},
                             "lax.example": {"dane": "off"}},
                 "delivery": {"port": 2525, "ipv6": False},
                 "dns": {"max_mx_hosts": 3}}, source="test")
    assert domain_mode(cfg, "strict.example.") is DaneMode.MANDATORY
    assert domain_mode(cfg, "lax.example") is DaneMode.OFF
    assert domain_mode(cfg, "other.example") is DaneMode.OPPORTUNISTIC
    o = options_for(cfg, "strict.example")
    assert (o.dane_mode, o.port, o.ipv6, o.max_mx_hosts) == (DaneMode.MANDATORY, 2525, False, 3)
    assert options_for(cfg, "x.example", port=26).port == 26


# --- domain verdict -------------------------------------------------------------------------


def _unusable(name: str, code: str, pref: int = 10) -> HostPlan:
    return HostPlan(name, pref, 25, (), False, name, (), None, (), (), None, code, "broken", ())


def test_finish_delivers_when_one_host_usable() -> None:
    good, _ = run_host("b.example.org", [a_ans("b.example.org", "192.0.2.2", secure=False)],
                       {})
    plan = finish(mxd(), [_unusable("a.example.org", "4.7.324"), good])
    assert plan.action is PlanAction.DELIVER and plan.code is None
    assert [h.name for h in plan.usable_hosts] == ["b.example.org"]
    assert [h.name for h in plan.hosts] == ["a.example.org", "b.example.org"]


@pytest.mark.parametrize(("found", "expected"), [
    (("4.4.312", "4.7.324"), "4.7.324"),
    (("4.7.323", "4.4.312"), "4.7.323"),
    (("4.7.323", "4.7.324", "4.4.312"), "4.7.324"),
    (("4.4.312",), "4.4.312"),
])
def test_finish_defers_with_most_specific_code(found: tuple[str, ...], expected: str) -> None:
    hosts = [_unusable(f"h{i}.example.org", c) for i, c in enumerate(found)]
    plan = finish(mxd(), hosts)
    assert plan.action is PlanAction.DEFER and plan.code == expected
    assert all(h.name in plan.reason for h in hosts)


def test_resolver_gate() -> None:
    plan = resolver_step(D, False, "no AD on . DNSKEY", OPTS)
    assert plan is not None and plan.action is PlanAction.DEFER and plan.code == "4.4.312"
    assert "does not validate" in plan.reason and "require_validating_resolver" in plan.reason
    assert resolver_step(D, True, "", OPTS) is None
    assert resolver_step(D, None, "", OPTS) is None
    assert resolver_step(D, False, "", PolicyOptions(require_validating_resolver=False)) is None
    assert resolver_step(D, False, "", OFF) is None


def test_shuffle_equal_preference_only_within_groups() -> None:
    hosts = [_unusable(f"h{i}", "4.4.312", pref) for i, pref in
             enumerate([10, 10, 10, 10, 20, 30, 30])]
    seen = set()
    for seed in range(30):
        out = shuffle_equal_preference(hosts, random.Random(seed))
        assert [h.preference for h in out] == [10, 10, 10, 10, 20, 30, 30]
        seen.add(tuple(h.name for h in out[:4]))
    assert len(seen) > 1  # really shuffled
    assert shuffle_equal_preference(hosts, random.Random(7)) == \
        shuffle_equal_preference(hosts, random.Random(7))


# --- routes ---------------------------------------------------------------------------------


def _cfg_routes() -> object:
    return build({"routes": [
        {"domain": "corp.example", "hosts": ["gw.corp.example:2525", "192.0.2.50"],
         "tls": "encrypt"},
        {"domain": ".example", "hosts": ["relay.example"], "tls": "none"},
        {"domain": ".sub.example", "hosts": ["sub-relay.example"]},
    ]}, source="test")


def test_find_route_exact_then_longest_suffix() -> None:
    cfg = _cfg_routes()
    assert find_route(cfg, "corp.example").hosts[0] == "gw.corp.example:2525"  # type: ignore
    assert find_route(cfg, "a.sub.example").domain == ".sub.example"  # type: ignore
    assert find_route(cfg, "sub.example").domain == ".sub.example"  # type: ignore
    assert find_route(cfg, "x.example").domain == ".example"  # type: ignore
    assert find_route(cfg, "example.org") is None  # type: ignore


def test_route_hops_with_ports_floor_and_dane() -> None:
    cfg = _cfg_routes()
    route = find_route(cfg, "corp.example")  # type: ignore[arg-type]
    assert route is not None
    d = route_step("corp.example", route, PolicyOptions())
    assert [(t.name, t.port, t.floor) for t in d.targets] == [
        ("gw.corp.example", 2525, TR.ENCRYPT), ("192.0.2.50", 25, TR.ENCRYPT)]
    # The hop has secure TLSA at its own port: DANE.
    plan, asked = run_host("gw.corp.example", [a_ans("gw.corp.example", "192.0.2.49")], {
        "_2525._tcp.gw.corp.example": ans("_2525._tcp.gw.corp.example", "TLSA",
                                          records=[GOOD])}, mx=d, target=d.targets[0])
    assert asked == ["_2525._tcp.gw.corp.example"] and plan.requirement is TR.DANE
    assert plan.reference_names == ("gw.corp.example",)
    # No TLSA: the route's own level (encrypt), not opportunistic.
    plan, _ = run_host("gw.corp.example", [a_ans("gw.corp.example", "192.0.2.49")], {
        "_2525._tcp.gw.corp.example": ans("_2525._tcp.gw.corp.example", "TLSA",
                                          Rcode.NODATA)}, mx=d, target=d.targets[0])
    assert plan.requirement is TR.ENCRYPT
    # An IP literal hop: no DNS at all.
    ip_plan, asked = run_host("192.0.2.50", [], {}, mx=d, target=d.targets[1])
    assert asked == [] and ip_plan.requirement is TR.ENCRYPT
    assert [a.ip for a in ip_plan.addresses] == ["192.0.2.50"]


def test_route_tls_none_never_looks_up_tlsa() -> None:
    route = find_route(_cfg_routes(), "x.example")  # type: ignore[arg-type]
    assert route is not None
    d = route_step("x.example", route, PolicyOptions())
    plan, asked = run_host("relay.example", [a_ans("relay.example", "192.0.2.60")], {},
                           mx=d, target=d.targets[0])
    assert asked == [] and plan.requirement is TR.NONE


def test_tlsa_next_names_the_query() -> None:
    prog = host_step(HostTarget("mx.example.org", 10, 587),
                     [a_ans("mx.example.org", "192.0.2.1")], mxd())
    assert prog.pending is not None
    assert tlsa_step(prog.pending, []) == TlsaNext("mx.example.org",
                                                   "_587._tcp.mx.example.org")


# --- orchestration over a dict-based fake resolver --------------------------------------------


class FakeResolver:
    """Answers from a dict; records every question (the real thing: tests/integration)."""

    def __init__(self, answers: dict[tuple[str, str], DnsAnswer], validating: bool = True):
        self.answers = answers
        self.asked: list[tuple[str, str]] = []
        self.probe = ValidationProbe(validating, "fake")

    async def query(self, name: str, rdtype: str, *, use_cache: bool = True) -> DnsAnswer:
        self.asked.append((name, rdtype))
        return self.answers.get((name, rdtype)) or ans(name, rdtype, Rcode.NXDOMAIN)

    async def validation(self) -> ValidationProbe:
        return self.probe


async def test_plan_destination_asks_only_what_policy_needs() -> None:
    fake = FakeResolver({
        (D, "MX"): mx_ans((10, "secure.example.org"), (20, "plain.example.net")),
        ("secure.example.org", "A"): a_ans("secure.example.org", "192.0.2.1"),
        ("secure.example.org", "AAAA"): ans("secure.example.org", "AAAA", Rcode.NODATA),
        ("_25._tcp.secure.example.org", "TLSA"): tlsa_ans("secure.example.org", GOOD),
        ("plain.example.net", "A"): a_ans("plain.example.net", "192.0.2.2", secure=False),
        ("plain.example.net", "AAAA"): ans("plain.example.net", "AAAA", Rcode.NODATA,
                                           secure=False),
    })
    plan = await plan_destination(D, fake, build({}, source="t"))  # type: ignore[arg-type]
    assert plan.action is PlanAction.DELIVER
    assert [(h.name, h.requirement) for h in plan.hosts] == [
        ("secure.example.org", TR.DANE), ("plain.example.net", TR.MAY)]
    assert ("_25._tcp.plain.example.net", "TLSA") not in fake.asked
    assert sorted(fake.asked) == sorted([
        (D, "MX"), ("secure.example.org", "A"), ("secure.example.org", "AAAA"),
        ("_25._tcp.secure.example.org", "TLSA"), ("plain.example.net", "A"),
        ("plain.example.net", "AAAA")])


async def test_plan_destination_respects_address_families_and_gate() -> None:
    fake = FakeResolver({(D, "MX"): mx_ans((10, "mx.example.org")),
                         ("mx.example.org", "A"): a_ans("mx.example.org", "192.0.2.1",
                                                        secure=False)})
    cfg = build({"delivery": {"ipv6": False}}, source="t")
    plan = await plan_destination(D, fake, cfg)  # type: ignore[arg-type]
    assert ("mx.example.org", "AAAA") not in fake.asked and plan.action is PlanAction.DELIVER
    fake.probe = ValidationProbe(False, "no AD")
    gated = await plan_destination(D, fake, cfg)  # type: ignore[arg-type]
    assert gated.action is PlanAction.DEFER and gated.code == "4.4.312"
    lax = build({"delivery": {"ipv6": False},
                 "dns": {"require_validating_resolver": False}}, source="t")
    assert (await plan_destination(D, fake, lax)).action is PlanAction.DELIVER  # type: ignore


def test_mx_exchange_that_looks_like_an_address_is_still_a_name() -> None:
    d = mx_step(D, mx_ans((10, "192.0.2.1")), OPTS)
    plan, _ = run_host("192.0.2.1", [ans("192.0.2.1", "A", Rcode.NXDOMAIN)], {}, mx=d,
                       target=d.targets[0])
    assert not plan.usable and plan.unusable_code == "4.4.312"
