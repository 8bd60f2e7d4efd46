"""DNS responses as values: one response on the wire → `Reply` (pure, no I/O).

dnspython 2.9 refuses a TLSA record whose digest length does not fit its matching type
and then fails the WHOLE message; here the message is parsed leniently and such a record
survives as a TlsaRecord with its raw data (relay.dane finds it unusable, never a DNS
failure). Used by relay.dns.resolve, which owns the transport, the cache and the probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.wire

from relay import dane
from relay.model import Ede, MxRecord, Rcode, TlsaRecord


def name_text(name: dns.name.Name) -> str:
    """Absolute name → lower-case text without the final dot; the root is ""."""
    if name == dns.name.root:
        return ""
    return name.to_text(omit_final_dot=True).lower()


def parse_tlsa_rdata(wire: bytes) -> TlsaRecord:
    """TLSA rdata → TlsaRecord, whatever its content (relay.dane.parse_tlsa_rdata).

    Never refuses: a digest of the wrong length is kept as published (relay.dane calls
    it unusable); rdata too short to hold the three parameter octets becomes a record
    with the private-use values 255/255/255, which no DANE client can use either, so
    that the RRset still exists (and TLS stays mandatory).
    """
    return dane.parse_tlsa_rdata(wire) or TlsaRecord(255, 255, 255, bytes(wire))


def extract_ede(msg: dns.message.Message) -> tuple[Ede, ...]:
    """The Extended DNS Errors (RFC 8914) carried in the response's OPT record."""
    return tuple(Ede(int(o.code), o.text or "") for o in msg.extended_errors())


@dataclass(frozen=True)
class RawRR:
    owner: dns.name.Name
    rdtype: int
    rdclass: int
    ttl: int
    rdata: bytes


def raw_answer_rrs(wire: bytes) -> list[RawRR]:
    """The answer section's records as raw rdata (no rdata parsing, names decompressed)."""
    p = dns.wire.Parser(wire)
    _id, _flags, qd, an, _ns, _ar = p.get_struct("!HHHHHH")
    for _ in range(qd):
        p.get_name(decompress=True)
        p.get_struct("!HH")
    out: list[RawRR] = []
    for _ in range(an):
        owner = p.get_name(decompress=True)
        rdtype, rdclass, ttl, rdlen = p.get_struct("!HHIH")
        out.append(RawRR(owner, rdtype, rdclass, ttl, p.get_bytes(rdlen)))
    return out


@dataclass(frozen=True)
class Reply:
    """One response reduced to what the relay needs (before CNAME link checks)."""

    rcode: Rcode
    ad: bool
    links: tuple[tuple[str, str], ...] = ()  # CNAMEs from qname on: (owner, target)
    final_name: str = ""
    records: tuple[object, ...] = ()
    ttl: float = 0.0  # how long this reply may be cached (before caps)
    ede: tuple[Ede, ...] = ()
    reason: str = ""


def _convert(rdtype: int, rdata: dns.rdata.Rdata) -> object:
    if rdtype == dns.rdatatype.MX:
        return MxRecord(rdata.preference, name_text(rdata.exchange))  # type: ignore[attr-defined]
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return rdata.address  # type: ignore[attr-defined]
    if rdtype == dns.rdatatype.TXT:  # its strings joined without spaces (RFC 8460 §3)
        return b"".join(rdata.strings).decode("utf-8", "replace")  # type: ignore[attr-defined]
    return rdata.to_text()


def _sort_key(rec: object) -> tuple[object, ...]:
    if isinstance(rec, MxRecord):
        return (rec.preference, rec.exchange)
    if isinstance(rec, TlsaRecord):
        return (rec.usage, rec.selector, rec.mtype, rec.data)
    return (str(rec),)


def _negative_ttl(msg: dns.message.Message, default: float) -> float:
    for rrset in msg.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))  # type: ignore[attr-defined]
    return default


def _rrset(msg: dns.message.Message, name: dns.name.Name, rdtype: int) -> object:
    return msg.get_rrset(msg.answer, name, dns.rdataclass.IN, rdtype)


def parse_reply(wire: bytes, qname: str, rdtype: str, *, max_records: int = 100,
                max_chain: int = 8, negative_default_ttl: float = 5.0) -> Reply:
    """Parse one response to (qname, rdtype). Pure; never raises on a bad message."""
    qtype = dns.rdatatype.from_text(rdtype)
    try:
        msg = dns.message.from_wire(wire, continue_on_error=True, ignore_trailing=True)
        raw = raw_answer_rrs(wire) if qtype == dns.rdatatype.TLSA else []
    except Exception as exc:  # any parse failure is a malformed response
        return Reply(Rcode.SERVFAIL, False, reason=f"malformed response: {exc!r}")
    # A TLSA record dnspython refuses is an error we tolerate; any other one is not.
    refused = 0
    for rr in raw:
        if rr.rdtype == qtype:
            try:
                dns.rdata.from_wire(rr.rdclass, rr.rdtype, rr.rdata, 0, len(rr.rdata))
            except Exception:  # refused by dnspython, kept by us
                refused += 1
    if len(msg.errors) > refused:
        return Reply(Rcode.SERVFAIL, False,
                     reason=f"malformed response: {msg.errors[0].exception!r}")
    ede = extract_ede(msg)
    ad = bool(msg.flags & dns.flags.AD)
    rc = msg.rcode()
    if rc not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        cls = Rcode.REFUSED if rc == dns.rcode.REFUSED else Rcode.SERVFAIL
        return Reply(cls, False, ede=ede, reason=f"rcode {dns.rcode.to_text(rc)}")

    # Follow the CNAME chain inside the answer section.
    current = dns.name.from_text(qname)
    links: list[tuple[str, str]] = []
    ttls: list[float] = []
    seen = {current}
    while qtype != dns.rdatatype.CNAME:
        cname = _rrset(msg, current, dns.rdatatype.CNAME)
        if cname is None or not len(cname):  # type: ignore[arg-type]
            break
        target = cname[0].target  # type: ignore[index]
        links.append((name_text(current), name_text(target)))
        ttls.append(cname.ttl)  # type: ignore[attr-defined]
        if target in seen or len(links) > max_chain:
            why = "CNAME loop" if target in seen else f"CNAME chain longer than {max_chain}"
            return Reply(Rcode.SERVFAIL, False, ede=ede, reason=why)
        seen.add(target)
        current = target
    records: list[object] = []
    if qtype == dns.rdatatype.TLSA:
        for rr in raw:
            if rr.owner == current and rr.rdtype == qtype and rr.rdclass == dns.rdataclass.IN:
                ttls.append(rr.ttl)
                records.append(parse_tlsa_rdata(rr.rdata))
    else:
        rrset = _rrset(msg, current, qtype)
        if rrset is not None and len(rrset):  # type: ignore[arg-type]
            ttls.append(rrset.ttl)  # type: ignore[attr-defined]
            records = [_convert(qtype, rd) for rd in rrset]  # type: ignore[attr-defined]
    records = sorted(set(records), key=_sort_key)
    reason = ""
    if len(records) > max_records:
        reason = f"{len(records)} records, only the first {max_records} kept"
        records = records[:max_records]
    if rc == dns.rcode.NXDOMAIN:
        cls = Rcode.NXDOMAIN
    else:
        cls = Rcode.OK if records else Rcode.NODATA
    if cls is Rcode.OK:
        ttl = float(min(ttls))
    else:
        ttl = _negative_ttl(msg, negative_default_ttl)
        if ttls:
            ttl = min(ttl, float(min(ttls)))
    return Reply(cls, ad, tuple(links), name_text(current), tuple(records), ttl, ede, reason)


# --- the resolver ---------------------------------------------------------------------------
