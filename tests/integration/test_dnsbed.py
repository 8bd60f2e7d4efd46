"""The DNSSEC test bed itself: real NSD + validating Unbound answer as the wild would."""

from __future__ import annotations

import socket
import subprocess

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.support.dnsbed import DnsBed, dnsbed_fixture, hostport, query

TLSA_OK = "3 1 1 " + "ab" * 32
BAD_DIGEST = bytes([3, 1, 1]) + b"\xcd" * 31  # 3 1 1 with 31 bytes: wrong for SHA-256


def world(bed: DnsBed) -> None:
    z = bed.zone("example.test")
    z.add("@", "MX", "10 mx.example.test.")
    z.add("mx", "A", "127.25.0.10")
    z.add("_25._tcp.mx", "TLSA", TLSA_OK)
    z.add("nodata", "A", "127.25.0.11")  # has an A, no TLSA: NSEC NODATA for TLSA
    z.add("alias", "CNAME", "mx.example.test.")
    z.add("outside", "CNAME", "mx.insecure.test.")
    z.add("bogus", "A", "127.25.0.12")
    z.add("_25._tcp.bogus", "TLSA", TLSA_OK)
    z.break_rrsig("_25._tcp.bogus", "TLSA")
    z.add("stale", "A", "127.25.0.13")
    z.expire_rrsig("stale", "A")
    z.add("mal", "A", "127.25.0.14")
    z.add_raw("_25._tcp.mal", "TLSA", BAD_DIGEST)

    bed.zone("brokenmx.test").add("@", "MX", "10 mx.example.test.")
    bed.break_rrsig("brokenmx.test", "brokenmx.test", "MX")

    n3 = bed.zone("n3.test", nsec3=True)
    n3.add("mx", "A", "127.25.0.20")
    n3.add("_25._tcp.mal", "TLSA", r"\# 34 " + BAD_DIGEST.hex())
    n3.add("stale", "A", "127.25.0.21")
    n3.expire_rrsig("stale", "A")
    bed.zone("ins.n3.test", signed=False).add("mx", "A", "127.25.0.22")

    bed.zone("insecure.test", signed=False).add("mx", "A", "127.25.0.30")
    bed.zone("insecure.test").add("_25._tcp.mx", "TLSA", TLSA_OK)

    bed.zone("bad.test").add("mx", "A", "127.25.0.40")
    bed.servfail_zone("_tcp.mx.bad.test", with_ds=True)
    bed.zone("badi.test").add("mx", "A", "127.25.0.41")
    bed.servfail_zone("_tcp.mx.badi.test", with_ds=False)


dnsbed = dnsbed_fixture(world)  # module-scoped: one bed for this module


def ad(msg: dns.message.Message) -> bool:
    return bool(msg.flags & dns.flags.AD)


def ede_codes(msg: dns.message.Message) -> list[int]:
    return [int(e.code) for e in msg.extended_errors()]


def rrset(msg: dns.message.Message, name: str, rdtype: str) -> list[str]:
    for rs in msg.answer:
        if rs.name.to_text() == name + "." and rs.rdtype == dns.rdatatype.from_text(rdtype):
            return sorted(r.to_text() for r in rs)
    return []


def test_setup_is_fast(dnsbed: DnsBed) -> None:
    assert 0 < dnsbed.setup_seconds < 10
    assert dnsbed.nameserver == hostport(dnsbed.resolver)
    assert dnsbed.nameserver.startswith("127.") and dnsbed.resolver[1] > 0


def test_secure_answers_have_ad(dnsbed: DnsBed) -> None:
    a = dnsbed.query("mx.example.test", "A")
    assert a.rcode() == dns.rcode.NOERROR and ad(a)
    assert rrset(a, "mx.example.test", "A") == ["127.25.0.10"]
    mx = dnsbed.query("example.test", "MX")
    assert ad(mx) and rrset(mx, "example.test", "MX") == ["10 mx.example.test."]
    tlsa = dnsbed.query("_25._tcp.mx.example.test", "TLSA")
    assert ad(tlsa) and rrset(tlsa, "_25._tcp.mx.example.test", "TLSA") == [TLSA_OK]
    n3 = dnsbed.query("mx.n3.test", "A")
    assert ad(n3) and rrset(n3, "mx.n3.test", "A") == ["127.25.0.20"]


def test_insecure_zone_answers_without_ad(dnsbed: DnsBed) -> None:
    for name in ("mx.insecure.test", "mx.ins.n3.test"):  # no DS proved by NSEC / NSEC3
        r = dnsbed.query(name, "A")
        assert r.rcode() == dns.rcode.NOERROR and not ad(r), name
        assert rrset(r, name, "A"), name
    tlsa = dnsbed.query("_25._tcp.mx.insecure.test", "TLSA")
    assert rrset(tlsa, "_25._tcp.mx.insecure.test", "TLSA") == [TLSA_OK] and not ad(tlsa)


@pytest.mark.parametrize(("name", "rdtype"), [
    ("_25._tcp.bogus.example.test", "TLSA"),
    ("brokenmx.test", "MX"),
])
def test_broken_rrsig_is_bogus(dnsbed: DnsBed, name: str, rdtype: str) -> None:
    r = dnsbed.query(name, rdtype)
    assert r.rcode() == dns.rcode.SERVFAIL
    assert dns.edns.EDECode.DNSSEC_BOGUS in ede_codes(r)
    cd = dnsbed.query(name, rdtype, cd=True)  # checking disabled: the data is there
    assert cd.rcode() == dns.rcode.NOERROR and rrset(cd, name, rdtype) and not ad(cd)
    assert "signature crypto failed" in dnsbed.log()


@pytest.mark.parametrize("name", ["stale.example.test", "stale.n3.test"])
def test_expired_rrsig_is_bogus(dnsbed: DnsBed, name: str) -> None:
    r = dnsbed.query(name, "A")
    assert r.rcode() == dns.rcode.SERVFAIL
    assert ede_codes(r) == [dns.edns.EDECode.SIGNATURE_EXPIRED]  # EDE 7 (Unbound 1.17.1)
    assert rrset(dnsbed.query(name, "A", cd=True), name, "A")
    assert f"<{name}. A IN>: signature expired" in dnsbed.log()


@pytest.mark.parametrize("name", ["nodata.example.test", "mx.n3.test"])
def test_nodata_for_tlsa_is_secure(dnsbed: DnsBed, name: str) -> None:
    r = dnsbed.query("_25._tcp." + name, "TLSA")  # no such name: proved NXDOMAIN
    assert r.rcode() == dns.rcode.NXDOMAIN and ad(r) and not r.answer
    plain = dnsbed.query(name, "TLSA")  # the name exists, no TLSA: NODATA proper
    assert plain.rcode() == dns.rcode.NOERROR and ad(plain) and not plain.answer
    types = {rs.rdtype for rs in plain.authority}
    assert dns.rdatatype.SOA in types
    assert types & {dns.rdatatype.NSEC, dns.rdatatype.NSEC3}


@pytest.mark.parametrize("name", ["nope.example.test", "nope.n3.test"])
def test_nxdomain_is_secure(dnsbed: DnsBed, name: str) -> None:
    r = dnsbed.query(name, "A")
    assert r.rcode() == dns.rcode.NXDOMAIN and ad(r)


@pytest.mark.parametrize("domain", ["bad.test", "badi.test"])
def test_servfail_server_fails_only_the_tlsa(dnsbed: DnsBed, domain: str) -> None:
    a = dnsbed.query(f"mx.{domain}", "A")
    assert a.rcode() == dns.rcode.NOERROR and ad(a)
    tlsa = dnsbed.query(f"_25._tcp.mx.{domain}", "TLSA")
    assert tlsa.rcode() == dns.rcode.SERVFAIL
    assert dns.edns.EDECode.DNSSEC_BOGUS not in ede_codes(tlsa)
    # A server failure, not a DNSSEC one: still SERVFAIL with checking disabled.
    cd = dnsbed.query(f"_25._tcp.mx.{domain}", "TLSA", cd=True)
    assert cd.rcode() == dns.rcode.SERVFAIL


def test_servfail_server_directly(dnsbed: DnsBed) -> None:
    q = dns.message.make_query("anything.test", "A")
    host, port = dnsbed.servfail_server
    assert dns.query.udp(q, host, port=port, timeout=2).rcode() == dns.rcode.SERVFAIL
    assert dns.query.tcp(q, host, port=port, timeout=2).rcode() == dns.rcode.SERVFAIL


def _raw_query(server: tuple[str, int], name: str, rdtype: str) -> bytes:
    q = dns.message.make_query(name, rdtype, want_dnssec=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(q.to_wire(), server)
        return s.recv(65535)


@pytest.mark.parametrize("name", ["_25._tcp.mal.example.test", "_25._tcp.mal.n3.test"])
def test_malformed_tlsa_is_served_and_validates(dnsbed: DnsBed, name: str) -> None:
    wire = _raw_query(dnsbed.resolver, name, "TLSA")
    rcode = wire[3] & 0x0F
    assert rcode == dns.rcode.NOERROR
    assert wire[3] & 0x20, "AD: the generic-form record was signed and validates"
    assert (len(BAD_DIGEST).to_bytes(2, "big") + BAD_DIGEST) in wire  # RDLENGTH + RDATA
    with pytest.raises(dns.exception.FormError):  # dnspython refuses the whole message
        dns.message.from_wire(wire)


def test_cname_chains(dnsbed: DnsBed) -> None:
    r = dnsbed.query("alias.example.test", "A")
    assert ad(r) and rrset(r, "alias.example.test", "CNAME") == ["mx.example.test."]
    assert rrset(r, "mx.example.test", "A") == ["127.25.0.10"]
    out = dnsbed.query("outside.example.test", "A")  # signed CNAME into an insecure zone
    assert out.rcode() == dns.rcode.NOERROR and not ad(out)
    assert rrset(out, "outside.example.test", "CNAME") == ["mx.insecure.test."]
    assert rrset(out, "mx.insecure.test", "A") == ["127.25.0.30"]


def test_nonvalidating_resolver_never_sets_ad(dnsbed: DnsBed) -> None:
    assert dnsbed.nonvalidating_resolver is not None
    r = dnsbed.query("mx.example.test", "A", server=dnsbed.nonvalidating_resolver)
    assert r.rcode() == dns.rcode.NOERROR and not ad(r)
    assert rrset(r, "mx.example.test", "A") == ["127.25.0.10"]
    bogus = dnsbed.query("_25._tcp.bogus.example.test", "TLSA",
                         server=dnsbed.nonvalidating_resolver)
    assert bogus.rcode() == dns.rcode.NOERROR  # it does not validate at all


def test_dead_and_silent_resolvers_time_out(dnsbed: DnsBed) -> None:
    for server in (dnsbed.dead_resolver, dnsbed.silent_resolver):
        with pytest.raises(dns.exception.Timeout):
            query(server, "mx.example.test", "A", timeout=0.3)
    q = dns.message.make_query("mx.example.test", "A")
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the dead one
        dns.query.tcp(q, dnsbed.dead_resolver[0], port=dnsbed.dead_resolver[1], timeout=1)
    with pytest.raises(dns.exception.Timeout):  # accepted, never answered
        dns.query.tcp(q, dnsbed.silent_resolver[0], port=dnsbed.silent_resolver[1],
                      timeout=0.3)


def test_dig_sees_ad_and_ede(dnsbed: DnsBed) -> None:
    host, port = dnsbed.resolver

    def dig(*args: str) -> str:
        return subprocess.run(["dig", "+dnssec", "+time=5", "+tries=1", f"@{host}", "-p",
                               str(port), *args], capture_output=True, text=True,
                              check=True).stdout

    secure = dig("mx.example.test", "A")
    assert "status: NOERROR" in secure and " ad;" in secure
    bogus = dig("_25._tcp.bogus.example.test", "TLSA")
    assert "status: SERVFAIL" in bogus and "EDE: 6 (DNSSEC Bogus)" in bogus
    insecure = dig("mx.insecure.test", "A")
    assert "status: NOERROR" in insecure and " ad;" not in insecure


def test_reload_after_start_and_stop(tmp_path: pytest.TempPathFactory) -> None:
    bed = DnsBed(tmp_path, nonvalidating=False)  # type: ignore[arg-type]
    bed.zone("one.test").add("mx", "A", "127.25.1.1")
    with bed:
        assert ad(bed.query("mx.one.test", "A"))
        assert bed.query("mx.two.test", "A").rcode() == dns.rcode.NXDOMAIN
        bed.zone("two.test").add("mx", "A", "127.25.1.2")
        bed.zone("one.test").break_rrsig("mx", "A")
        bed.reload()
        r = bed.query("mx.two.test", "A")
        assert ad(r) and rrset(r, "mx.two.test", "A") == ["127.25.1.2"]
        assert bed.query("mx.one.test", "A").rcode() == dns.rcode.SERVFAIL
        bed.zone("one.test").repair()
        bed.reload()
        assert ad(bed.query("mx.one.test", "A"))
        procs = [p for p in (bed._nsd, bed._unbound, bed._servfail) if p is not None]
        assert len(procs) == 3
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(dns.exception.Timeout):
        bed.query("mx.one.test", "A", timeout=0.3)
    with bed:  # starts again on the same addresses and ports
        assert ad(bed.query("mx.one.test", "A"))
        with pytest.raises(dns.exception.Timeout):
            query(bed.silent_resolver, "mx.one.test", "A", timeout=0.3)


def test_val_override_date_shifts_the_validator_clock(tmp_path: pytest.TempPathFactory) -> None:
    import datetime as dt

    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=45)  # signatures last 30 days
    bed = DnsBed(tmp_path, nonvalidating=False,  # type: ignore[arg-type]
                 val_override_date=later.strftime("%Y%m%d%H%M%S"))
    bed.zone("one.test").add("mx", "A", "127.25.1.1")
    with bed:
        r = bed.query("mx.one.test", "A")
        assert r.rcode() == dns.rcode.SERVFAIL
        assert dns.edns.EDECode.SIGNATURE_EXPIRED in ede_codes(r)
