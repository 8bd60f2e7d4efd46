"""relay.dns.wire.parse_reply and friends on hand-built wire responses (no sockets)."""

from __future__ import annotations

import hashlib

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from relay.dns.resolve import Resolver
from relay.dns.wire import extract_ede, parse_reply, parse_tlsa_rdata, raw_answer_rrs
from relay.model import Ede, MxRecord, Rcode, TlsaRecord

IN = dns.rdataclass.IN
DIGEST = hashlib.sha256(b"spki").digest()


def response(qname: str, rdtype: str, *, rcode: int = dns.rcode.NOERROR, ad: bool = False,
             answer: list[tuple[str, str, int, list[object]]] = (),  # type: ignore[assignment]
             soa: tuple[int, int] | None = None, ede: list[dns.edns.EDEOption] | None = None
             ) -> dns.message.Message:
    q = dns.message.make_query(qname, rdtype, want_dnssec=True, use_edns=0)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if ad:
        r.flags |= dns.flags.AD
    for owner, rtype, ttl, rdatas in answer:
        rrset = dns.rrset.RRset(dns.name.from_text(owner), IN, dns.rdatatype.from_text(rtype))
        for rd in rdatas:
            if isinstance(rd, str):
                rd = dns.rdata.from_text(IN, rrset.rdtype, rd)
            rrset.add(rd, ttl)  # type: ignore[arg-type]
        r.answer.append(rrset)
    if soa is not None:
        ttl, minimum = soa
        r.authority.append(dns.rrset.from_text(
            qname, ttl, "IN", "SOA", f"ns.example. host.example. 1 3600 600 86400 {minimum}"))
    if ede:
        r.use_edns(0, dns.flags.DO, 1232, options=ede)
    return r


def wire(msg: dns.message.Message) -> bytes:
    return msg.to_wire()


def test_mx_answer_secure_sorted() -> None:
    msg = response("example.org.", "MX", ad=True, answer=[
        ("example.org.", "MX", 300, ["20 b.example.org.", "10 A.Example.org."])])
    r = parse_reply(wire(msg), "example.org.", "MX")
    assert r.rcode is Rcode.OK and r.ad
    assert r.records == (MxRecord(10, "a.example.org"), MxRecord(20, "b.example.org"))
    assert r.ttl == 300 and r.final_name == "example.org" and r.links == ()


def test_null_mx_exchange_is_empty_string() -> None:
    msg = response("example.org.", "MX", answer=[("example.org.", "MX", 60, ["0 ."])])
    assert parse_reply(wire(msg), "example.org.", "MX").records == (MxRecord(0, ""),)


def test_cname_chain_followed_and_ttl_is_minimum() -> None:
    msg = response("mx.example.org.", "A", ad=True, answer=[
        ("mx.example.org.", "CNAME", 100, ["host.provider.net."]),
        ("host.provider.net.", "CNAME", 50, ["real.provider.net."]),
        ("real.provider.net.", "A", 300, ["192.0.2.1"]),
    ])
    r = parse_reply(wire(msg), "mx.example.org.", "A")
    assert r.links == (("mx.example.org", "host.provider.net"),
                       ("host.provider.net", "real.provider.net"))
    assert r.final_name == "real.provider.net" and r.records == ("192.0.2.1",)
    assert r.ttl == 50


def test_cname_chain_bound_and_loop() -> None:
    chain = [(f"h{i}.example.", "CNAME", 60, [f"h{i + 1}.example."]) for i in range(5)]
    msg = response("h0.example.", "A", answer=chain)
    r = parse_reply(wire(msg), "h0.example.", "A", max_chain=3)
    assert r.rcode is Rcode.SERVFAIL and "longer than 3" in r.reason
    loop = response("a.example.", "A", answer=[("a.example.", "CNAME", 60, ["b.example."]),
                                               ("b.example.", "CNAME", 60, ["a.example."])])
    assert parse_reply(wire(loop), "a.example.", "A").reason == "CNAME loop"


def test_nodata_and_nxdomain_use_soa_negative_ttl() -> None:
    nodata = response("mx.example.org.", "AAAA", ad=True, soa=(3600, 30))
    r = parse_reply(wire(nodata), "mx.example.org.", "AAAA")
    assert (r.rcode, r.ad, r.ttl, r.records) == (Rcode.NODATA, True, 30, ())
    nx = response("nx.example.org.", "A", rcode=dns.rcode.NXDOMAIN, soa=(20, 900))
    r = parse_reply(wire(nx), "nx.example.org.", "A")
    assert (r.rcode, r.ttl) == (Rcode.NXDOMAIN, 20)
    bare = response("x.example.org.", "A")
    assert parse_reply(wire(bare), "x.example.org.", "A", negative_default_ttl=4).ttl == 4


@pytest.mark.parametrize(("rcode", "cls"), [
    (dns.rcode.SERVFAIL, Rcode.SERVFAIL), (dns.rcode.REFUSED, Rcode.REFUSED),
    (dns.rcode.FORMERR, Rcode.SERVFAIL), (dns.rcode.NOTIMP, Rcode.SERVFAIL)])
def test_error_rcodes(rcode: int, cls: Rcode) -> None:
    r = parse_reply(wire(response("x.example.", "A", rcode=rcode)), "x.example.", "A")
    assert r.rcode is cls and not r.ad and dns.rcode.to_text(rcode) in r.reason


def test_ede_extracted_from_opt_record() -> None:
    msg = response("_25._tcp.mx.example.", "TLSA", rcode=dns.rcode.SERVFAIL, ede=[
        dns.edns.EDEOption(dns.edns.EDECode.SIGNATURE_EXPIRED, "expired <x. TLSA>"),
        dns.edns.EDEOption(dns.edns.EDECode.NETWORK_ERROR)])
    parsed = dns.message.from_wire(wire(msg))
    assert extract_ede(parsed) == (Ede(7, "expired <x. TLSA>"), Ede(23, ""))
    r = parse_reply(wire(msg), "_25._tcp.mx.example.", "TLSA")
    assert r.rcode is Rcode.SERVFAIL and r.ede[0].dnssec and not r.ede[1].dnssec


def test_no_ede_without_opt() -> None:
    msg = dns.message.make_response(dns.message.make_query("x.example.", "A"))
    assert extract_ede(dns.message.from_wire(msg.to_wire())) == ()


def _tlsa_generic(data: bytes) -> dns.rdata.GenericRdata:
    return dns.rdata.GenericRdata(IN, dns.rdatatype.TLSA, data)


def test_malformed_tlsa_survives_while_dnspython_refuses_it() -> None:
    bad = b"\x03\x01\x01" + b"\x12\x34"  # SHA-256 type with a 2-octet digest
    good = b"\x03\x01\x01" + DIGEST
    msg = response("_25._tcp.mx.example.", "TLSA", ad=True, answer=[
        ("_25._tcp.mx.example.", "TLSA", 120, [_tlsa_generic(bad), _tlsa_generic(good)])])
    data = wire(msg)
    with pytest.raises(dns.exception.FormError):  # the premise: dnspython fails the message
        dns.message.from_wire(data)
    r = parse_reply(data, "_25._tcp.mx.example.", "TLSA")
    assert r.rcode is Rcode.OK and r.ad and r.ttl == 120
    assert set(r.records) == {TlsaRecord(3, 1, 1, b"\x12\x34"), TlsaRecord(3, 1, 1, DIGEST)}


def test_only_malformed_tlsa_is_still_an_rrset() -> None:
    msg = response("_25._tcp.mx.example.", "TLSA", ad=True, answer=[
        ("_25._tcp.mx.example.", "TLSA", 60, [_tlsa_generic(b"\x03\x01\x02" + DIGEST),
                                              _tlsa_generic(b"\x03")])])
    r = parse_reply(wire(msg), "_25._tcp.mx.example.", "TLSA")
    assert r.rcode is Rcode.OK
    assert set(r.records) == {TlsaRecord(3, 1, 2, DIGEST), TlsaRecord(255, 255, 255, b"\x03")}


def test_tlsa_rdata_parser() -> None:
    assert parse_tlsa_rdata(b"\x02\x00\x00abc") == TlsaRecord(2, 0, 0, b"abc")
    assert parse_tlsa_rdata(b"") == TlsaRecord(255, 255, 255, b"")


def test_garbage_other_than_tlsa_is_a_malformed_response() -> None:
    # An A record with 3 octets of rdata is not something we forgive.
    msg = response("x.example.", "A", answer=[
        ("x.example.", "A", 60, [dns.rdata.GenericRdata(IN, dns.rdatatype.A, b"\x01\x02\x03")])])
    r = parse_reply(wire(msg), "x.example.", "A")
    assert r.rcode is Rcode.SERVFAIL and "malformed" in r.reason
    assert parse_reply(b"\x00\x01", "x.example.", "A").rcode is Rcode.SERVFAIL


def test_records_per_rrset_bound_is_deterministic() -> None:
    ips = [f"192.0.2.{i}" for i in (9, 3, 7, 1, 5)]
    msg = response("x.example.", "A", answer=[("x.example.", "A", 60, ips)])
    r = parse_reply(wire(msg), "x.example.", "A", max_records=3)
    assert r.records == ("192.0.2.1", "192.0.2.3", "192.0.2.5") and "only the first 3" in r.reason


def test_raw_answer_rrs_decompresses_owner_names() -> None:
    msg = response("a.example.", "A", answer=[("a.example.", "A", 60, ["192.0.2.1"])])
    rrs = raw_answer_rrs(wire(msg))
    assert [(rr.owner.to_text(), rr.rdtype, rr.rdata) for rr in rrs] == [
        ("a.example.", dns.rdatatype.A, bytes([192, 0, 2, 1]))]


def test_response_matcher_checks_id_qr_and_question() -> None:
    q = dns.message.make_query("Mx.Example.", "MX", want_dnssec=True, use_edns=0)
    qwire = q.to_wire()
    qlen = len(dns.name.from_text("Mx.Example.").to_wire()) + 4  # type: ignore[arg-type]
    accept = Resolver._matches(qwire, qlen)
    good = dns.message.make_response(q)
    assert accept(good.to_wire())
    assert not accept(qwire)  # QR bit clear
    other = dns.message.make_response(q)
    other.id = (q.id + 1) % 65536
    assert not accept(other.to_wire())
    wrong_q = dns.message.make_response(dns.message.make_query("mx.example.", "A"))
    wrong_q.id = q.id
    assert not accept(wrong_q.to_wire())
