"""MTA-STS pure parts: the TXT record, the policy file, MX patterns, the web-PKI check,
the cache decisions and what a policy makes of each MX host (relay.sts)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest
from cryptography.x509.verification import Store

from relay import codes
from relay.dane.policy import HostAddress, HostPlan
from relay.model import StsState, TlsaRecord, TlsRequirement
from relay.sts import decide, webpki
from relay.sts.record import (
    MAX_AGE_CAP,
    Malformed,
    Mode,
    Policy,
    discover,
    mx_matches,
    parse_policy,
    parse_txt,
)
from tests.support.certs import make_ca, make_leaf

NOW = dt.datetime.now(dt.UTC)

# --- TXT record (§3.1) ----------------------------------------------------------------


def test_txt_record_with_id() -> None:
    rec = parse_txt("v=STSv1; id=20160831085700Z;")
    assert not isinstance(rec, Malformed) and rec.id == "20160831085700Z"
    assert parse_txt("v=STSv1;id=abc").id == "abc"  # type: ignore[union-attr]
    assert parse_txt("v=STSv1; ext=x; id=1; id=2").id == "1"  # type: ignore[union-attr]


@pytest.mark.parametrize("text", [
    "v=STSv1", "v=STSv1;", "v=STSv1; id=", "v=STSv1; id=a-b", "v=STSv1; id=" + "a" * 33,
    "v=STSv2; id=1", "v=STSv1; ;id=1", "v=STSv1; foo; id=1", "v=STSv1; ext=a b; id=1",
    "V=STSv1; id=1",
])
def test_malformed_txt_records(text: str) -> None:
    assert isinstance(parse_txt(text), Malformed)


def test_discovery_needs_exactly_one_sts_record() -> None:
    assert discover(["v=spf1 -all", "v=STSv1; id=1"]).record is not None
    assert discover(["v=spf1 -all"]).record is None
    two = discover(["v=STSv1; id=1", "v=STSv1; id=2"])
    assert two.record is None and "2 v=STSv1 records" in two.reason
    assert "malformed" in discover(["v=STSv1; id="]).reason


# --- policy file (§3.2) ------------------------------------------------------------------

GOOD = b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n" \
       b"max_age: 604800\r\n"


def test_policy_parses() -> None:
    p = parse_policy(GOOD)
    assert isinstance(p, Policy)
    assert p.mode is Mode.ENFORCE and p.max_age == 604800
    assert p.mx == ("mail.example.com", "*.example.net")
    assert p.lines == ("version: STSv1", "mode: enforce", "mx: mail.example.com",
                       "mx: *.example.net", "max_age: 604800")


def test_policy_lf_unknown_keys_and_first_duplicate() -> None:
    p = parse_policy(b"version: STSv1\nmode: testing\nmode: enforce\nfoo_bar: baz\n"
                     b"mx: MX.Example.COM.\nmax_age:86400")
    assert isinstance(p, Policy) and p.mode is Mode.TESTING and p.mx == ("mx.example.com",)


def test_max_age_is_capped_and_bounded() -> None:
    p = parse_policy(GOOD.replace(b"604800", b"9999999999"))
    assert isinstance(p, Policy) and p.max_age == MAX_AGE_CAP
    huge = parse_policy(GOOD.replace(b"604800", b"1" + b"0" * 20))  # 10^20
    assert isinstance(huge, Malformed) and "max_age" in huge.reason


def test_mode_none_needs_no_mx() -> None:
    p = parse_policy(b"version: STSv1\nmode: none\nmax_age: 100\n")
    assert isinstance(p, Policy) and p.mode is Mode.NONE


@pytest.mark.parametrize("body, why", [
    (GOOD.replace(b"STSv1", b"STSv2"), "version"),
    (GOOD.replace(b"enforce", b"Enforce"), "mode"),
    (GOOD.replace(b"max_age: 604800\r\n", b""), "max_age"),
    (b"version: STSv1\nmode: enforce\nmax_age: 5\n", "no mx"),
    (GOOD.replace(b"mail.example.com", b"*.*.example.com"), "mx"),
    (GOOD.replace(b"mail.example.com", b"example"), "mx"),
    (GOOD + b"\xff\xfe\n", "UTF-8"),
    (GOOD + "mx: b\u00fccher.example\n".encode(), "non-ASCII"),
    (GOOD + b"garbage line\n", "key: value"),
    (GOOD.replace(b"\r\n", b"\r"), "bare CR"),
    (b"<html><body>hi</body></html>", "key: value"),
    (GOOD + b"x: " + b"a" * 70000 + b"\n", "larger"),
])
def test_malformed_policies(body: bytes, why: str) -> None:
    got = parse_policy(body)
    assert isinstance(got, Malformed) and why in got.reason, got


def test_ten_thousand_mx_lines_are_refused() -> None:
    body = GOOD + b"".join(b"mx: m%d.example.com\n" % i for i in range(10_000))
    got = parse_policy(body)
    assert isinstance(got, Malformed)
    small = GOOD + b"".join(b"mx: m%d.e.co\n" % i for i in range(1001))
    assert len(small) < 65536
    got = parse_policy(small)
    assert isinstance(got, Malformed) and "mx patterns" in got.reason


@pytest.mark.parametrize("pattern, host, ok", [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.example.com.", True),
    ("*.example.com", "mail.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "mailexample.com", False),
    ("mail.example.com", "other.example.com", False),
])
def test_mx_patterns(pattern: str, host: str, ok: bool) -> None:
    assert mx_matches(pattern, host) is ok


# --- web PKI (§4.2) --------------------------------------------------------------------

CA = make_ca("STS Root")
INTER = make_ca("STS Intermediate", issuer=CA)
ROOTS = Store([CA.cert])


def test_webpki_valid_chain() -> None:
    leaf = make_leaf(["mx.a.test"], issuer=INTER)
    v = webpki.verify([leaf.der, INTER.der], "mx.a.test", ROOTS, NOW)
    assert v.ok, v.reason
    wild = make_leaf(["*.a.test"], issuer=CA)
    assert webpki.verify([wild.der], "mx.a.test", ROOTS, NOW).ok
    assert not webpki.verify([wild.der], "x.mx.a.test", ROOTS, NOW).ok


@pytest.mark.parametrize("case, rtype", [
    ("self-signed", webpki.NOT_TRUSTED), ("wrong-name", webpki.HOST_MISMATCH),
    ("cn-only", webpki.HOST_MISMATCH), ("expired", webpki.EXPIRED),
    ("missing-intermediate", webpki.NOT_TRUSTED), ("future", webpki.VALIDATION_FAILURE),
])
def test_webpki_failures(case: str, rtype: str) -> None:
    chain = [INTER.der]
    if case == "self-signed":
        leaf = make_leaf(["mx.a.test"])
    elif case == "wrong-name":
        leaf = make_leaf(["mx.b.test"], issuer=INTER)
    elif case == "cn-only":
        leaf = make_leaf(["mx.a.test"], issuer=INTER, san=False)
    elif case == "expired":
        leaf = make_leaf(["mx.a.test"], issuer=INTER, not_before=NOW - dt.timedelta(days=9),
                         not_after=NOW - dt.timedelta(days=1))
    elif case == "future":
        leaf = make_leaf(["mx.a.test"], issuer=INTER, not_before=NOW + dt.timedelta(days=1))
    else:
        leaf, chain = make_leaf(["mx.a.test"], issuer=INTER), []
    v = webpki.verify([leaf.der, *chain], "mx.a.test", ROOTS, NOW)
    assert not v.ok and v.result_type == rtype, v


# --- cache decisions (§5.1) --------------------------------------------------------------

POLICY = parse_policy(GOOD)
assert isinstance(POLICY, Policy)
T = 1_000_000.0


def cached(pid: str = "1", expires: float = T + 1000, **kw: object) -> decide.Cached:
    return decide.Cached("example.com", pid, POLICY, T - 10, expires, **kw)  # type: ignore[arg-type]


REC = decide.Txt(decide.TxtKind.RECORD, "1")


@pytest.mark.parametrize("entry, txt, step", [
    (None, REC, decide.Step.FETCH),
    (cached(), REC, decide.Step.USE),
    (cached(expires=T + 10), REC, decide.Step.REFRESH),  # near expiry
    (cached(expires=T + 99), REC, decide.Step.REFRESH),
    (cached(pid="0"), REC, decide.Step.FETCH),  # id changed
    (cached(expires=T - 1), REC, decide.Step.FETCH),  # expired
    (cached(), decide.Txt(decide.TxtKind.ABSENT), decide.Step.USE),  # TXT hidden: cache
    (cached(), decide.Txt(decide.TxtKind.FAILED), decide.Step.USE),
    (cached(), decide.Txt(decide.TxtKind.BOGUS), decide.Step.USE),
    (cached(expires=T - 1), decide.Txt(decide.TxtKind.ABSENT), decide.Step.NONE),
    (None, decide.Txt(decide.TxtKind.FAILED), decide.Step.NONE),
    (None, decide.Txt(decide.TxtKind.BOGUS), decide.Step.DEFER),
])
def test_cache_steps(entry: decide.Cached | None, txt: decide.Txt, step: decide.Step) -> None:
    assert decide.cache_step(entry, txt, T, refresh_before=100) is step


def test_failed_fetch_is_not_repeated_at_once() -> None:
    failed = cached(failed_at=T - 10, failed_id="2")
    assert not decide.fetch_allowed(failed, "2", T, retry=300)
    assert decide.fetch_allowed(failed, "2", T + 300, retry=300)
    assert decide.fetch_allowed(failed, "3", T, retry=300)  # a new id: fetch at once
    assert decide.fetch_allowed(None, "2", T, retry=300)


# --- what a policy does to a host (§4, §5, §2) -----------------------------------------


def host(name: str, req: TlsRequirement = TlsRequirement.MAY) -> HostPlan:
    tlsa = (TlsaRecord(3, 1, 1, b"\x00" * 32),) if req is TlsRequirement.DANE else ()
    return HostPlan(name, 10, 25, (HostAddress("127.0.0.1", False),), False, name, (), None,
                    tlsa, tlsa, req, None, "no TLSA", (name,))


def state(mode: str, override: str = "policy") -> StsState:
    p = replace(POLICY, mode=Mode(mode))  # type: ignore[type-var]
    return decide.state_of(p, "1", "fetched", override)


def test_enforce_requires_webpki_on_matching_hosts() -> None:
    h = decide.apply_host(host("mail.example.com"), state("enforce"))
    assert h.requirement is TlsRequirement.STS and h.sts == "enforce"
    enc = decide.apply_host(host("mx.example.net", TlsRequirement.ENCRYPT), state("enforce"))
    assert enc.requirement is TlsRequirement.STS


def test_enforce_drops_hosts_outside_the_patterns() -> None:
    h = decide.apply_host(host("evil.example.org"), state("enforce"))
    assert not h.usable and h.unusable_code == codes.STS_MX_MISMATCH and h.sts == "mismatch"
    assert "evil.example.org" in h.reason


def test_dane_wins_but_mx_filtering_still_applies() -> None:
    h = decide.apply_host(host("mail.example.com", TlsRequirement.DANE), state("enforce"))
    assert h.requirement is TlsRequirement.DANE and h.sts == "dane"
    out = decide.apply_host(host("evil.example.org", TlsRequirement.DANE), state("enforce"))
    assert not out.usable and out.unusable_code == codes.STS_MX_MISMATCH


def test_testing_and_none_change_nothing_but_the_mark() -> None:
    h = decide.apply_host(host("mail.example.com"), state("testing"))
    assert h.requirement is TlsRequirement.MAY and h.sts == "testing"
    m = decide.apply_host(host("evil.example.org"), state("testing"))
    assert m.usable and m.sts == "mismatch"
    assert decide.apply_host(host("mail.example.com"), state("none")).sts == ""


def test_override_enforces_a_testing_policy() -> None:
    st = state("testing", override="enforce")
    assert st.mode == "enforce" and st.published_mode == "testing"
    assert decide.apply_host(host("mail.example.com"), st).requirement is TlsRequirement.STS
    assert state("none", override="enforce").mode == "none"
