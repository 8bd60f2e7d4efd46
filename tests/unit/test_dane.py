"""relay.dane: the RFC 7672 matcher, against the shared conformance vectors and generated
chains for every branch the vectors miss."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from relay import dane
from relay.dane import Verdict, parse_tlsa_rdata, usable, usable_records, verify
from relay.model import TlsaRecord
from tests.support.certs import Issued
from tests.unit.dane_helpers import DAY, HOST, NOW, build, ca, chain, cross_sign, leaf, rec, reissue

# A copy of ../shared/conformance/dane/dane-tlsa-vectors.json (provenance: tests/data/README.md)
VECTORS = Path(__file__).resolve().parents[1] / "data/dane-tlsa-vectors.json"
SHARED = Path(__file__).resolve().parents[3] / "shared/conformance/dane/dane-tlsa-vectors.json"
EXPIRED, INVALID = "4.7.322", "4.7.323"


# --- the conformance vectors ---------------------------------------------------------------


def _cases() -> list[dict[str, Any]]:
    return json.loads(VECTORS.read_text())["cases"]


def _der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(Encoding.DER)


def test_vector_file_is_the_shared_one() -> None:
    data = json.loads(VECTORS.read_text())
    assert data["format"] == "dane-tlsa-conformance-vectors"
    assert data["case_count"] == len(data["cases"]) == 69
    # beside the steering checkout the copy must not drift from the shared file
    copies = [SHARED] if SHARED.exists() else []
    assert all(c.read_bytes() == VECTORS.read_bytes() for c in copies)


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["id"])
def test_conformance_vector(case: dict[str, Any]) -> None:
    want = case["rfc7672"]
    records = [(r["usage"], r["selector"], r["mtype"], bytes.fromhex(r["data_hex"]))
               for r in case["tlsa"]]
    names = [case["reference_hostname"]] if case["reference_hostname"] else []
    now = dt.datetime.fromisoformat(case["validation_time"].replace("Z", "+00:00"))
    v = verify(records, [_der(p) for p in case["chain_pem"]], names, now)
    if want["outcome"] == "authenticated":
        assert (v.ok, v.code, v.usable) == (True, None, True), v.reason
        assert v.depth == want["depth"], v.reason
        assert v.matched is not None and v.matched.usage in (2, 3)
    elif want["outcome"] == "fail":
        # None of the vectors' failures is an expiry (README: none gives certificate-expired).
        assert (v.ok, v.code, v.usable) == (False, INVALID, True), v.reason
    else:
        assert (v.ok, v.code, v.usable) == (False, None, False), v.reason


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_spki_extraction_agrees_with_cryptography_on_every_vector_certificate() -> None:
    seen = 0
    for case in _cases():
        for pem in case["chain_pem"]:
            cert = x509.load_pem_x509_certificate(pem.encode())
            want = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            assert dane.spki_der(cert.public_bytes(Encoding.DER)) == want
            seen += 1
    assert seen > 100


# --- DANE-EE(3) ------------------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "mtype"), [(s, m) for s in (0, 1) for m in (0, 1, 2)])
def test_dane_ee_matches_the_leaf(selector: int, mtype: int) -> None:
    server = leaf(names=("other.example",))  # names are never checked for DANE-EE
    record = rec(3, selector, mtype, server)
    v = verify([record], chain(server), [HOST], NOW)
    assert (v.ok, v.code, v.usable, v.depth, v.matched) == (True, None, True, 0, record)
    assert v.reason == f"3 {selector} {mtype} matched leaf"


@pytest.mark.parametrize(("selector", "mtype"), [(s, m) for s in (0, 1) for m in (0, 1, 2)])
def test_dane_ee_mismatch(selector: int, mtype: int) -> None:
    server, other = leaf(), leaf()
    v = verify([rec(3, selector, mtype, other)], chain(server), [HOST], NOW)
    assert (v.ok, v.code, v.usable, v.depth, v.matched) == (False, INVALID, True, None, None)
    assert v.reason == "no certificate matches any of 1 usable record"


def test_dane_ee_only_matches_depth_0() -> None:
    root = ca()
    server = leaf(issuer=root)
    v = verify([rec(3, 1, 1, root)], chain(server, root), [HOST], NOW)
    assert (v.ok, v.code) == (False, INVALID)


def test_dane_ee_self_signed_leaf_without_names() -> None:
    server = build("", ca=None)  # empty subject, no extensions at all
    v = verify([rec(3, 1, 1, server)], chain(server), [], NOW)
    assert v.ok and v.depth == 0


@pytest.mark.parametrize("when", ["expired", "not_yet_valid"])
def test_dane_ee_ignores_dates_by_default(when: str) -> None:
    dates = ({"not_before": NOW - 400 * DAY, "not_after": NOW - DAY} if when == "expired"
             else {"not_before": NOW + DAY, "not_after": NOW + 400 * DAY})
    server = leaf(**dates)
    v = verify([rec(3, 1, 1, server)], chain(server), [HOST], NOW)
    assert (v.ok, v.code, v.depth) == (True, None, 0)
    if when == "expired":
        assert "leaf expired" in v.reason and "DANE-EE ignores dates" in v.reason
    # ee_check_expiry looks at expiry only: a not-yet-valid leaf still authenticates.
    v2 = verify([rec(3, 1, 1, server)], chain(server), [HOST], NOW, ee_check_expiry=True)
    if when == "expired":
        assert (v2.ok, v2.code, v2.usable, v2.depth) == (False, EXPIRED, True, 0)
        assert v2.matched == rec(3, 1, 1, server)
        assert "expired" in v2.reason and "ee_check_expiry" in v2.reason
    else:
        assert v2.ok


def test_ee_check_expiry_does_not_affect_valid_or_unmatched_leaves() -> None:
    server = leaf()
    assert verify([rec(3, 0, 1, server)], chain(server), [HOST], NOW, ee_check_expiry=True).ok
    old = leaf(not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    v = verify([rec(3, 0, 1, server)], chain(old), [HOST], NOW, ee_check_expiry=True)
    assert (v.ok, v.code) == (False, INVALID)  # no match at all: not an expiry


def test_ee_expired_with_check_but_dane_ta_also_published() -> None:
    # The leaf's expiry fails the DANE-TA path as well, so the verdict is 4.7.322.
    root = ca()
    server = leaf(issuer=root, not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    records = [rec(3, 1, 1, server), rec(2, 0, 1, root)]
    v = verify(records, chain(server, root), [HOST], NOW, ee_check_expiry=True)
    assert (v.ok, v.code) == (False, EXPIRED)
    assert verify(records, chain(server, root), [HOST], NOW).ok


# --- DANE-TA(2): where the anchor is --------------------------------------------------------


@pytest.fixture
def pki() -> dict[str, Issued]:
    root = ca("Test Root CA")
    inter = ca("Test Issuing CA", issuer=root)
    return {"root": root, "inter": inter, "leaf": leaf(issuer=inter)}


@pytest.mark.parametrize(("which", "depth"), [("inter", 1), ("root", 2)])
@pytest.mark.parametrize(("selector", "mtype"), [(s, m) for s in (0, 1) for m in (0, 1, 2)])
def test_dane_ta_matches_a_presented_issuer(pki: dict[str, Issued], which: str, depth: int,
                                            selector: int, mtype: int) -> None:
    record = rec(2, selector, mtype, pki[which])
    v = verify([record], chain(pki["leaf"], pki["inter"], pki["root"]), [HOST], NOW)
    assert (v.ok, v.code, v.depth, v.matched) == (True, None, depth, record), v.reason
    assert v.reason == f"2 {selector} {mtype} matched depth {depth}; DANE-TA chain valid for {HOST}"


def test_dane_ta_full_certificate_from_dns(pki: dict[str, Issued]) -> None:
    v = verify([rec(2, 0, 0, pki["root"])], chain(pki["leaf"], pki["inter"]), [HOST], NOW)
    assert (v.ok, v.depth) == (True, 2)
    assert "trust anchor from DNS" in v.reason
    v = verify([rec(2, 0, 0, pki["inter"])], chain(pki["leaf"]), [HOST], NOW)
    assert (v.ok, v.depth) == (True, 1)


def test_dane_ta_bare_key_from_dns(pki: dict[str, Issued]) -> None:
    # A bare key sits at the depth of the top-most certificate it signed.
    v = verify([rec(2, 1, 0, pki["root"])], chain(pki["leaf"], pki["inter"]), [HOST], NOW)
    assert (v.ok, v.depth) == (True, 1)
    v = verify([rec(2, 1, 0, pki["inter"])], chain(pki["leaf"]), [HOST], NOW)
    assert (v.ok, v.depth) == (True, 0)
    # When the chain carries the key's certificate, that certificate is the match.
    v = verify([rec(2, 1, 0, pki["root"])], chain(pki["leaf"], pki["inter"], pki["root"]),
               [HOST], NOW)
    assert (v.ok, v.depth) == (True, 2)


@pytest.mark.parametrize(("selector", "mtype"), [(0, 1), (1, 1), (0, 2), (1, 2)])
def test_dane_ta_digest_of_an_absent_anchor_cannot_match(pki: dict[str, Issued], selector: int,
                                                        mtype: int) -> None:
    v = verify([rec(2, selector, mtype, pki["root"])], chain(pki["leaf"], pki["inter"]),
               [HOST], NOW)
    assert (v.ok, v.code, v.usable, v.matched) == (False, INVALID, True, None)
    assert v.reason == "no certificate matches any of 1 usable record"


def test_dane_ta_anchor_from_dns_that_signed_nothing(pki: dict[str, Issued]) -> None:
    stranger = ca("Stranger CA")
    for record in (rec(2, 0, 0, stranger), rec(2, 1, 0, stranger)):
        v = verify([record], chain(pki["leaf"], pki["inter"]), [HOST], NOW)
        assert (v.ok, v.code, v.matched) == (False, INVALID, None)


def test_dane_ta_never_matches_the_leaf() -> None:
    # A self-signed leaf named by a DANE-TA record is not a trust anchor (that is DANE-EE).
    server = leaf()
    for selector, mtype in ((0, 0), (1, 0), (0, 1), (1, 1)):
        v = verify([rec(2, selector, mtype, server)], chain(server), [HOST], NOW)
        assert (v.ok, v.code) == (False, INVALID)


def test_dane_ta_reorders_and_skips_presented_certificates(pki: dict[str, Issued]) -> None:
    junk = ca("Unrelated CA")
    presented = chain(pki["leaf"], junk, pki["root"], leaf(), pki["inter"], pki["inter"])
    v = verify([rec(2, 0, 1, pki["root"])], presented, [HOST], NOW)
    assert (v.ok, v.depth) == (True, 2)  # index in the verified chain, as OpenSSL reports it


def test_dane_ta_cross_signed_root() -> None:
    root = ca("Cross Test Root")
    other = ca("Other Root")
    root_x = cross_sign(root, other)  # same subject and key, issued by Other Root
    inter = ca("Cross Test Issuing", issuer=root)
    server = leaf(issuer=inter)
    presented = chain(server, inter, root_x, other)
    for record in (rec(2, 0, 0, root), rec(2, 1, 1, root), rec(2, 0, 1, root_x)):
        v = verify([record], presented, [HOST], NOW)
        assert (v.ok, v.depth) == (True, 2), (record, v.reason)


def test_dane_ta_tries_another_path_when_one_fails() -> None:
    # Two copies of the intermediate (same subject and key): an expired one first.
    root = ca()
    inter = ca("Twin CA", issuer=root)
    stale = reissue(inter, root, not_after=NOW - DAY)
    server = leaf(issuer=inter)
    v = verify([rec(2, 0, 1, root)], chain(server, stale, inter, root), [HOST], NOW)
    assert (v.ok, v.depth) == (True, 2), v.reason
    v = verify([rec(2, 0, 1, root)], chain(server, stale, root), [HOST], NOW)
    assert (v.ok, v.code) == (False, EXPIRED)


# --- DANE-TA(2): dates ------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["leaf", "intermediate"])
def test_dane_ta_expired_certificate_is_4_7_322(role: str) -> None:
    root = ca()
    old = {"not_before": NOW - 400 * DAY, "not_after": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)}
    inter = ca("Issuing CA", issuer=root, **(old if role == "intermediate" else {}))
    server = leaf(issuer=inter, **(old if role == "leaf" else {}))
    v = verify([rec(2, 0, 1, root)], chain(server, inter, root), [HOST], NOW)
    assert (v.ok, v.code, v.usable, v.depth) == (False, EXPIRED, True, 2)
    assert v.matched == rec(2, 0, 1, root)
    assert v.reason.startswith(f"DANE-TA chain: {role}")
    assert "expired 2026-01-01" in v.reason


@pytest.mark.parametrize("role", ["leaf", "intermediate"])
def test_dane_ta_not_yet_valid_certificate_is_4_7_323(role: str) -> None:
    root = ca()
    future = {"not_before": dt.datetime(2027, 3, 1, tzinfo=dt.UTC), "not_after": NOW + 900 * DAY}
    inter = ca("Issuing CA", issuer=root, **(future if role == "intermediate" else {}))
    server = leaf(issuer=inter, **(future if role == "leaf" else {}))
    v = verify([rec(2, 1, 1, root)], chain(server, inter, root), [HOST], NOW)
    assert (v.ok, v.code, v.usable) == (False, INVALID, True)
    assert v.reason.startswith(f"DANE-TA chain: {role}")
    assert "not valid before 2027-03-01" in v.reason


def test_dane_ta_validity_bounds_are_inclusive() -> None:
    root = ca()
    server = leaf(issuer=root, not_before=NOW, not_after=NOW)
    assert verify([rec(2, 0, 1, root)], chain(server, root), [HOST], NOW).ok
    later = verify([rec(2, 0, 1, root)], chain(server, root), [HOST], NOW + dt.timedelta(seconds=1))
    assert later.code == EXPIRED


def test_dane_ta_anchor_dates_are_not_checked() -> None:
    # RFC 5280 §6.1: the trust anchor is a name and a key; only certificates below it count.
    root = ca(not_before=NOW - 900 * DAY, not_after=NOW - DAY)
    server = leaf(issuer=root)
    assert verify([rec(2, 0, 1, root)], chain(server, root), [HOST], NOW).ok
    assert verify([rec(2, 0, 0, root)], chain(server), [HOST], NOW).ok


def test_now_must_be_aware() -> None:
    server = leaf()
    with pytest.raises(ValueError):
        verify([rec(3, 1, 1, server)], chain(server), [HOST], NOW.replace(tzinfo=None))


def test_now_in_another_timezone() -> None:
    root = ca()
    server = leaf(issuer=root, not_after=NOW + dt.timedelta(hours=1))
    plus2 = dt.timezone(dt.timedelta(hours=2))
    now = (NOW + dt.timedelta(minutes=30)).astimezone(plus2)  # still before notAfter
    assert verify([rec(2, 0, 1, root)], chain(server, root), [HOST], now).ok


# --- DANE-TA(2): CA constraints and signatures ------------------------------------------------


def test_leaf_signed_by_a_non_ca_issuer() -> None:
    root = ca()
    fake = ca("Not A CA", issuer=root, is_ca=False)
    server = leaf(issuer=fake)
    v = verify([rec(2, 0, 1, root)], chain(server, fake, root), [HOST], NOW)
    assert (v.ok, v.code) == (False, INVALID)
    assert "issuer CN=Not A CA is not a CA" in v.reason
    # Named as the anchor itself, a non-CA certificate does not issue either.
    v = verify([rec(2, 0, 1, fake)], chain(server, fake, root), [HOST], NOW)
    assert (v.ok, v.code) == (False, INVALID)
    assert "is not a CA" in v.reason


def test_issuer_without_basic_constraints_is_not_a_ca() -> None:
    root = ca()
    inter = build("No BC CA", issuer=root, ca=None)
    server = leaf(issuer=inter)
    v = verify([rec(2, 0, 1, root)], chain(server, inter, root), [HOST], NOW)
    assert (v.ok, "is not a CA" in v.reason) == (False, True)


def test_issuer_key_usage_must_allow_certificate_signing() -> None:
    root = ca()
    inter = build("KU CA", issuer=root, ca=True, key_cert_sign=False)
    server = leaf(issuer=inter)
    v = verify([rec(2, 0, 1, root)], chain(server, inter, root), [HOST], NOW)
    assert (v.ok, v.code) == (False, INVALID)
    assert "may not sign certificates" in v.reason
    good = build("KU CA", issuer=root, ca=True, key_cert_sign=True)
    server = leaf(issuer=good)
    assert verify([rec(2, 0, 1, root)], chain(server, good, root), [HOST], NOW).ok


def test_path_length_constraint() -> None:
    root = ca(path_length=0)
    inter = ca("Issuing CA", issuer=root)
    server = leaf(issuer=inter)
    v = verify([rec(2, 0, 1, root)], chain(server, inter, root), [HOST], NOW)
    assert (v.ok, v.code) == (False, INVALID)
    assert "path length constraint of CN=Test Root CA exceeded" in v.reason
    # With the intermediate as the anchor, the root is not on the path.
    assert verify([rec(2, 0, 1, inter)], chain(server, inter, root), [HOST], NOW).ok
    # pathLen 0 allows a leaf directly below.
    direct = leaf(issuer=root)
    assert verify([rec(2, 0, 1, root)], chain(direct, root), [HOST], NOW).ok
    # pathLen 1 allows one intermediate.
    root1 = ca("Root One", path_length=1)
    inter1 = ca("Issuing One", issuer=root1)
    assert verify([rec(2, 0, 1, root1)], chain(leaf(issuer=inter1), inter1, root1), [HOST], NOW).ok


def test_unknown_critical_extension_fails_the_path() -> None:
    root = ca()
    inter = build("Odd CA", issuer=root, ca=True, critical_unknown=True)
    server = leaf(issuer=inter)
    v = verify([rec(2, 0, 1, root)], chain(server, inter, root), [HOST], NOW)
    assert (v.ok, v.code) == (False, INVALID)
    assert "unsupported critical extension" in v.reason


def test_bad_signature_breaks_the_path() -> None:
    root = ca()
    inter = ca("Issuing CA", issuer=root)
    impostor = ca("Issuing CA", issuer=root)  # same name, other key
    server = leaf(issuer=impostor)
    v = verify([rec(2, 0, 1, root)], chain(server, inter, root), [HOST], NOW)
    assert (v.ok, v.code, v.depth) == (False, INVALID, None)
    assert v.matched == rec(2, 0, 1, root)
    assert "no valid signature path" in v.reason
    # The leaf claims the root as issuer, but the root did not sign it.
    forged = leaf(issuer=ca("Test Root CA"))
    v = verify([rec(2, 0, 0, root)], chain(forged), [HOST], NOW)
    assert (v.ok, v.code) == (False, INVALID)


@pytest.mark.parametrize("kind", ["rsa", "pss", "ed25519", "ec"])
def test_signature_algorithms(kind: str) -> None:
    root = build("Algo Root", kind=kind, ca=True)
    inter = build("Algo Issuing", issuer=root, kind="ec", signer_kind=kind, ca=True)
    server = build("leaf", issuer=inter, kind=kind, signer_kind="ec", names=(HOST,))
    for record, presented in ((rec(2, 0, 1, root), chain(server, inter, root)),
                              (rec(2, 1, 2, root), chain(server, inter, root)),
                              (rec(2, 1, 0, root), chain(server, inter)),
                              (rec(2, 0, 0, root), chain(server, inter))):
        v = verify([record], presented, [HOST], NOW)
        assert v.ok, (kind, record, v.reason)
    v = verify([rec(3, 1, 2, server)], chain(server), [HOST], NOW)
    assert v.ok
    # A key of the same type that did not sign fails.
    stranger = build("Algo Root", kind=kind, ca=True)
    v = verify([rec(2, 1, 0, stranger)], chain(server, inter), [HOST], NOW)
    assert (v.ok, v.code) == (False, INVALID)


# --- DANE-TA(2): names --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("presented", "reference", "ok"),
    [
        ("mx.example.test", "mx.example.test", True),
        ("MX.Example.TEST", "mx.example.test", True),
        ("mx.example.test.", "MX.EXAMPLE.TEST.", True),
        ("*.example.test", "a.example.test", True),
        ("*.example.test", "A.Example.Test.", True),
        ("*.example.test", "example.test", False),
        ("*.example.test", "a.b.example.test", False),
        ("*.example.test", ".example.test", False),
        ("f*.example.test", "foo.example.test", False),
        ("*o.example.test", "foo.example.test", False),
        ("a.*.example.test", "a.b.example.test", False),
        ("*.test", "example.test", False),
        ("mx.example.test", "mx.example.test.evil", False),
        ("mx.example.test", "*.example.test", False),
        ("mx.example.test", "", False),
    ],
)
def test_name_matching(presented: str, reference: str, ok: bool) -> None:
    assert dane.name_matches(presented, reference) is ok
    root = ca()
    server = leaf(names=(presented,), issuer=root)
    v = verify([rec(2, 0, 1, root)], chain(server, root), [reference], NOW)
    assert v.ok is ok, v.reason
    if not ok:
        assert (v.code, "leaf name mismatch" in v.reason) == (INVALID, True)


def test_any_reference_identifier_may_match() -> None:
    root = ca()
    server = leaf(names=("mail.example.net", "mx.example.test"), issuer=root)
    v = verify([rec(2, 0, 1, root)], chain(server, root), ["example.test", "mx.example.test"], NOW)
    assert v.ok and v.reason.endswith("valid for mx.example.test")


def test_cn_only_leaf() -> None:
    root = ca()
    server = leaf(names=(HOST,), issuer=root, san=False)  # CN=mx.example.test, no SAN
    assert verify([rec(2, 0, 1, root)], chain(server, root), [HOST], NOW).ok
    assert not verify([rec(2, 0, 1, root)], chain(server, root), ["other.test"], NOW).ok


def test_cn_is_ignored_when_the_san_has_dns_names() -> None:
    root = ca()
    server = leaf(names=("other.example.test",), cn=HOST, issuer=root)
    v = verify([rec(2, 0, 1, root)], chain(server, root), [HOST], NOW)
    assert (v.ok, v.code) == (False, INVALID)
    assert "presented other.example.test" in v.reason


def test_dane_ta_without_reference_names_fails() -> None:
    root = ca()
    server = leaf(issuer=root)
    v = verify([rec(2, 0, 1, root)], chain(server, root), [], NOW)
    assert (v.ok, v.code) == (False, INVALID)
    assert "no reference identifier" in v.reason


def test_dane_ee_ignores_names_even_without_references() -> None:
    server = leaf(names=("unrelated.example",))
    assert verify([rec(3, 0, 1, server)], chain(server), [], NOW).ok


# --- several records ------------------------------------------------------------------------


def test_any_usable_record_may_authenticate(pki: dict[str, Issued]) -> None:
    full = chain(pki["leaf"], pki["inter"], pki["root"])
    stranger = leaf()
    # EE mismatch, TA match.
    v = verify([rec(3, 1, 1, stranger), rec(2, 0, 1, pki["root"])], full, [HOST], NOW)
    assert (v.ok, v.depth, v.matched) == (True, 2, rec(2, 0, 1, pki["root"]))
    # EE match wins over a TA record that would fail on the name; depth 0.
    v = verify([rec(2, 0, 1, pki["root"]), rec(3, 1, 1, pki["leaf"])], full, ["x.test"], NOW)
    assert (v.ok, v.depth, v.matched) == (True, 0, rec(3, 1, 1, pki["leaf"]))


def test_expiry_is_the_most_relevant_failure() -> None:
    root = ca()
    inter = ca("Issuing CA", issuer=root, not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    server = leaf(issuer=inter)
    absent = ca("Absent Root")
    records = [rec(3, 1, 1, leaf()), rec(2, 1, 1, absent), rec(2, 0, 1, root)]
    v = verify(records, chain(server, inter, root), [HOST], NOW)
    assert (v.ok, v.code, v.matched, v.depth) == (False, EXPIRED, rec(2, 0, 1, root), 2)
    assert v.reason.startswith("DANE-TA chain: intermediate CN=Issuing CA expired")


def test_a_failed_match_is_reported_over_no_match(pki: dict[str, Issued]) -> None:
    records = [rec(3, 1, 1, leaf()), rec(2, 0, 1, pki["root"])]
    v = verify(records, chain(pki["leaf"], pki["inter"], pki["root"]), ["wrong.test"], NOW)
    assert (v.ok, v.code, v.matched) == (False, INVALID, rec(2, 0, 1, pki["root"]))
    assert "leaf name mismatch" in v.reason


def test_no_match_reason_counts_usable_records() -> None:
    server, other = leaf(), leaf()
    records = [rec(3, 1, 1, other), rec(3, 0, 1, other), rec(1, 1, 1, server)]
    v = verify(records, chain(server), [HOST], NOW)
    assert v.reason == "no certificate matches any of 2 usable records"


# --- digest agility (RFC 7671 §9) ----------------------------------------------------------


def _wrong(record: TlsaRecord) -> TlsaRecord:
    return dataclasses.replace(record, data=bytes(len(record.data)))


@pytest.mark.parametrize("usage", [2, 3])
def test_sha512_supersedes_sha256(pki: dict[str, Issued], usage: int) -> None:
    target = pki["leaf"] if usage == 3 else pki["inter"]
    full = chain(pki["leaf"], pki["inter"])
    s256, s512 = rec(usage, 1, 1, target), rec(usage, 1, 2, target)
    # Only the SHA-256 record matches: ignored, the host fails.
    v = verify([s256, _wrong(s512)], full, [HOST], NOW)
    assert (v.ok, v.code, v.usable) == (False, INVALID, True)
    assert "1 weaker-digest records ignored" in v.reason
    # Only the SHA-512 record matches: authenticated by it.
    v = verify([_wrong(s256), s512], full, [HOST], NOW)
    assert (v.ok, v.matched) == (True, s512)
    # Both match.
    assert verify([s256, s512], full, [HOST], NOW).matched == s512


def test_agility_is_per_usage_and_selector(pki: dict[str, Issued]) -> None:
    full = chain(pki["leaf"], pki["inter"])
    ee256 = rec(3, 1, 1, pki["leaf"])
    # A SHA-512 record for another selector or usage leaves the SHA-256 record in play.
    for other in (_wrong(rec(3, 0, 2, pki["leaf"])), _wrong(rec(2, 1, 2, pki["inter"]))):
        v = verify([other, ee256], full, [HOST], NOW)
        assert (v.ok, v.matched) == (True, ee256)


def test_full_records_are_not_digests(pki: dict[str, Issued]) -> None:
    full = chain(pki["leaf"], pki["inter"])
    ee_full = rec(3, 1, 0, pki["leaf"])
    v = verify([_wrong(rec(3, 1, 2, pki["leaf"])), ee_full], full, [HOST], NOW)
    assert (v.ok, v.matched) == (True, ee_full)
    recs = [ee_full, rec(3, 1, 1, pki["leaf"]), rec(3, 1, 2, pki["leaf"])]
    assert dane.digest_agility(recs) == [recs[0], recs[2]]


def test_malformed_stronger_digest_does_not_suppress(pki: dict[str, Issued]) -> None:
    ee256 = rec(3, 1, 1, pki["leaf"])
    short512 = TlsaRecord(3, 1, 2, b"\x01" * 32)  # wrong length for SHA-512: unusable
    unknown = TlsaRecord(3, 1, 3, b"\x01" * 64)  # unknown matching type: unusable
    v = verify([short512, unknown, ee256], chain(pki["leaf"]), [HOST], NOW)
    assert (v.ok, v.matched) == (True, ee256)
    assert usable_records([short512, unknown, ee256]) == [ee256]


def test_usable_records_applies_agility_in_order(pki: dict[str, Issued]) -> None:
    a = rec(3, 1, 1, pki["leaf"])
    b = rec(2, 0, 1, pki["root"])
    c = rec(3, 1, 2, pki["leaf"])
    d = (0, 0, 1, b"\x00" * 32)
    assert usable_records([a, b, d, c]) == [b, c]
    assert usable_records([(3, 1, 1, a.data)]) == [a]


# --- usability of records ---------------------------------------------------------------------


def _unusable(server: Issued) -> list[tuple[str, Any]]:
    cert, spki = server.der, server.spki
    return [
        ("pkix-ta", (0, 1, 1, server.tlsa_data(1, 1))),
        ("pkix-ee", (1, 1, 1, server.tlsa_data(1, 1))),
        ("usage 4", (4, 1, 1, server.tlsa_data(1, 1))),
        ("usage 255", (255, 1, 1, server.tlsa_data(1, 1))),
        ("selector 2", (3, 2, 1, server.tlsa_data(1, 1))),
        ("mtype 3", (3, 1, 3, server.tlsa_data(1, 1))),
        ("sha256 31 bytes", (3, 1, 1, server.tlsa_data(1, 1)[:31])),
        ("sha256 33 bytes", (3, 1, 1, server.tlsa_data(1, 1) + b"\x00")),
        ("sha256 64 bytes", (3, 1, 1, server.tlsa_data(1, 2))),
        ("sha512 32 bytes", (3, 1, 2, server.tlsa_data(1, 1))),
        ("sha512 empty", (3, 0, 2, b"")),
        ("full empty", (3, 0, 0, b"")),
        ("full cert garbage", (3, 0, 0, b"\x30\x03\x02\x01\x01")),
        ("full cert truncated", (3, 0, 0, cert[:-1])),
        ("full cert is an spki", (2, 0, 0, spki)),
        ("full spki garbage", (3, 1, 0, b"not a key at all")),
        ("full spki is a cert", (2, 1, 0, cert)),
        ("data not bytes", (3, 1, 1, server.tlsa_data(1, 1).hex())),
        ("not a record", "3 1 1 00"),
        ("too short tuple", (3, 1, 1)),
    ]


def test_unusable_records() -> None:
    server = leaf()
    cases = _unusable(server)
    for label, record in cases:
        assert usable(record) is False, label
        v = verify([record], chain(server), [HOST], NOW)
        assert (v.ok, v.code, v.usable, v.depth, v.matched) == (False, None, False, None, None)
        assert v.reason == "no usable TLSA record among 1"
    v = verify([r for _, r in cases], chain(server), [HOST], NOW)
    assert (v.usable, v.code) == (False, None)
    assert verify([], chain(server), [HOST], NOW).usable is False


def test_usable_records_of_every_kind() -> None:
    server = leaf()
    for usage in (2, 3):
        for selector in (0, 1):
            for mtype in (0, 1, 2):
                assert usable(rec(usage, selector, mtype, server))
                assert usable((usage, selector, mtype, server.tlsa_data(selector, mtype)))


def test_unusable_records_do_not_hide_a_mismatch() -> None:
    server = leaf()
    v = verify([(1, 1, 1, server.tlsa_data(1, 1)), rec(3, 1, 1, leaf())], chain(server),
               [HOST], NOW)
    assert (v.ok, v.code, v.usable) == (False, INVALID, True)


# --- parse_tlsa_rdata ---------------------------------------------------------------------------


@pytest.mark.parametrize("wire", [b"", b"\x03", b"\x03\x01", bytearray(b"\x02\x00")])
def test_parse_tlsa_rdata_too_short(wire: bytes) -> None:
    assert parse_tlsa_rdata(wire) is None


def test_parse_tlsa_rdata_keeps_what_dnspython_refuses() -> None:
    assert parse_tlsa_rdata(b"\x03\x01\x01") == TlsaRecord(3, 1, 1, b"")
    bad = parse_tlsa_rdata(b"\x03\x01\x01" + b"\xaa" * 31)
    assert bad == TlsaRecord(3, 1, 1, b"\xaa" * 31) and not usable(bad)
    odd = parse_tlsa_rdata(memoryview(b"\xff\xfe\xfd garbage"))
    assert odd == TlsaRecord(255, 254, 253, b" garbage") and not usable(odd)


def test_parse_tlsa_rdata_round_trips_dnspython_wire() -> None:
    server = leaf()
    for selector, mtype in ((1, 1), (0, 2), (1, 0)):
        data = server.tlsa_data(selector, mtype)
        rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TLSA,
                                 f"3 {selector} {mtype} {data.hex()}")
        parsed = parse_tlsa_rdata(rd.to_wire())
        assert parsed == TlsaRecord(3, selector, mtype, data)
        assert verify([parsed], chain(server), [HOST], NOW).ok


# --- bounds ------------------------------------------------------------------------------------


def test_every_dane_ee_record_is_checked_whatever_the_order() -> None:
    """DANE-EE is one digest per record: no bound applies, so the verdict never depends
    on the order of the RRset (DNS order is arbitrary and resolvers rotate it)."""
    server = leaf()
    noise = [rec(3, 1, 1, leaf()) for _ in range(24)]
    for records in ([*noise, rec(3, 1, 1, server)], [rec(3, 1, 1, server), *noise]):
        v = verify(records, chain(server), [HOST], NOW, max_records=3)
        assert v.ok and v.depth == 0


def test_max_records_bounds_dane_ta_path_building_in_a_fixed_order() -> None:
    import itertools

    root = ca("Bound root")
    inter = ca("Bound intermediate", issuer=root)
    server = leaf(issuer=inter)
    match = rec(2, 0, 1, inter)
    others: list[TlsaRecord] = []
    while len(others) < 3:  # records that sort before the matching one
        other = rec(2, 0, 1, ca(f"Other {len(others)}"))
        if other.data < match.data:
            others.append(other)
    records = [*others, match]
    verdicts = {(v.ok, v.code) for v in (
        verify(list(order), chain(server, inter), [HOST], NOW, max_records=3)
        for order in itertools.permutations(records))}
    assert verdicts == {(False, INVALID)}  # the same answer for every order of the RRset
    v = verify(records, chain(server, inter), [HOST], NOW, max_records=3)
    assert "ignored 1 DANE-TA records beyond max_records=3" in v.reason
    assert verify(records, chain(server, inter), [HOST], NOW, max_records=4).ok


def test_max_chain() -> None:
    cas = [ca("Level 0")]
    for n in range(1, 12):
        cas.append(ca(f"Level {n}", issuer=cas[-1]))
    server = leaf(issuer=cas[-1])
    presented = chain(server, *reversed(cas))  # 13 certificates, the root last
    record = rec(2, 0, 1, cas[0])
    v = verify([record], presented, [HOST], NOW)
    assert (v.ok, v.code) == (False, INVALID)
    assert "ignored 3 certificates beyond max_chain=10" in v.reason
    v = verify([record], presented, [HOST], NOW, max_chain=13)
    assert (v.ok, v.depth) == (True, 12)
    # An anchor within the bound still works.
    assert verify([rec(2, 0, 1, cas[4])], presented, [HOST], NOW).depth == 8


def test_path_search_is_bounded() -> None:
    # Many certificates with the leaf issuer's name and key, none of them signed by the anchor:
    # the search gives up in bounded time.
    root = ca()
    twin = ca("Twin", issuer=root)
    server = leaf(issuer=twin)
    stale = [reissue(twin, twin) for _ in range(8)]  # self-issued copies: loops of equal names
    presented = chain(server, *stale)
    start = time.perf_counter()
    v = verify([rec(2, 0, 0, ca("Absent"))], presented, [HOST], NOW, max_chain=10)
    elapsed = time.perf_counter() - start
    assert (v.ok, v.code) == (False, INVALID)
    assert "path search stopped after" in v.reason
    assert elapsed < 5, elapsed


# --- odds and ends -------------------------------------------------------------------------


def test_empty_chain_and_garbage_leaf() -> None:
    server = leaf()
    v = verify([rec(3, 1, 1, server)], [], [HOST], NOW)
    assert (v.ok, v.code, v.usable) == (False, INVALID, True)
    assert v.reason == "no certificate presented"
    v = verify([rec(3, 1, 1, server)], [b"\x30\x82garbage"], [HOST], NOW)
    assert (v.ok, v.code, v.usable) == (False, INVALID, True)


def test_garbage_intermediates_are_skipped(pki: dict[str, Issued]) -> None:
    presented = [pki["leaf"].der, b"junk", pki["inter"].der, pki["root"].der]
    v = verify([rec(2, 0, 1, pki["root"])], presented, [HOST], NOW)
    assert (v.ok, v.depth) == (True, 2)
    assert "certificate #1 does not parse" in v.reason


def test_records_as_objects_or_tuples(pki: dict[str, Issued]) -> None:
    r = rec(2, 1, 1, pki["inter"])
    full = chain(pki["leaf"], pki["inter"])
    a = verify([r], full, [HOST], NOW)
    b = verify([(r.usage, r.selector, r.mtype, r.data)], full, (HOST,), NOW)
    assert a == b and a.matched == r


def test_verdict_is_frozen() -> None:
    server = leaf()
    v = verify([rec(3, 1, 1, server)], chain(server), [HOST], NOW)
    assert isinstance(v, Verdict)
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.ok = False  # type: ignore[misc]


def test_association_data() -> None:
    server = leaf()
    for selector in (0, 1):
        for mtype in (0, 1, 2):
            assert dane.association_data(server.der, selector, mtype) == \
                server.tlsa_data(selector, mtype)


def test_dane_ta_never_uses_the_leaf_key_as_anchor() -> None:
    # A CA certificate for the self-signed leaf's own key and name at depth 1 does not make
    # that key a trust anchor (the leaf is authenticated by DANE-EE records, not DANE-TA).
    server = leaf()
    copy = build(HOST, key=server.key, ca=True)
    for record in (rec(2, 1, 1, server), rec(2, 0, 1, copy)):
        v = verify([record], chain(server, copy), [HOST], NOW)
        assert (v.ok, v.code) == (False, INVALID), record


def test_anchor_beyond_max_chain_is_ignored_even_on_a_short_path() -> None:
    root = ca()
    inter = ca("Issuing CA", issuer=root)
    server = leaf(issuer=inter)
    junk = [ca(f"Junk {n}").der for n in range(9)]
    presented = [server.der, *junk, inter.der]  # the intermediate is certificate #10
    v = verify([rec(2, 0, 1, inter)], presented, [HOST], NOW)
    assert (v.ok, v.code) == (False, INVALID)
    assert "ignored 1 certificates beyond max_chain=10" in v.reason
    assert verify([rec(2, 0, 1, inter)], presented, [HOST], NOW, max_chain=11).depth == 1


def test_expiry_wins_over_an_earlier_failed_match() -> None:
    root = ca()
    inter = ca("Issuing CA", issuer=root, not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    server = leaf(issuer=inter)
    stray = ca("Stray CA")  # presented and matched, but it signed nothing on the path
    records = [rec(2, 0, 1, stray), rec(2, 0, 1, root)]
    v = verify(records, chain(server, stray, inter, root), [HOST], NOW)
    assert (v.ok, v.code, v.matched) == (False, EXPIRED, rec(2, 0, 1, root))
    v = verify(records[:1], chain(server, stray, inter, root), [HOST], NOW)
    assert (v.code, v.matched) == (INVALID, rec(2, 0, 1, stray))
    assert "no valid signature path" in v.reason


def test_issuer_names_must_chain_to_a_certificate_anchor() -> None:
    root = ca()
    renamed = build("Renamed Root", key=root.key, ca=True)  # the root's key, another name
    server = leaf(issuer=renamed)  # issuer name "Renamed Root", signed by the root's key
    v = verify([rec(2, 0, 1, root)], chain(server, root), [HOST], NOW)
    assert (v.ok, v.code) == (False, INVALID)
    # A bare key from DNS has no name: its signature is what counts.
    assert verify([rec(2, 1, 0, root)], chain(server), [HOST], NOW).ok
