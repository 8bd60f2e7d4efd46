"""Zone data for the DNSSEC test bed: records, keys, signing and post-signing damage.

A `ZoneSpec` holds the records a test declares. `render_zone` turns it into the text of a
zone file (absolute names, one RR a line) that NSD serves as it is:

- signed NSEC zones are signed with dnspython (`dns.dnssec.sign_zone`, ECDSA P-256, one
  combined key with the SEP flag);
- signed NSEC3 zones are signed with `ldns-signzone -n` (dnspython cannot sign NSEC3), same key
  written in BIND private-key format, NSEC3 SHA-1, 0 iterations, empty salt (RFC 9276);
- unsigned zones are written as they are.

Bogus cases are edits of the signed text AFTER signing (`Damage`): flip bytes of the RRSIG
covering one RRset, or replace it with a signature whose validity window is in the past.

Records dnspython refuses to parse (a TLSA whose data length does not fit its matching type)
are written in RFC 3597 generic form (`TYPE52 \\# <len> <hex>`) through `ZoneSpec.add_raw` or
`ZoneSpec.add(name, "TLSA", r"\\# 34 0301...")`; dnspython signs them as generic rdata and
NSD serves them.
"""

from __future__ import annotations

import base64
import datetime as dt
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import dns.dnssec
import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY
import dns.rrset
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec

IN = dns.rdataclass.IN
ALGORITHM = dns.dnssec.Algorithm.ECDSAP256SHA256
DEFAULT_TTL = 60
NEGATIVE_TTL = 5  # SOA minimum: keeps negative answers short-lived in Unbound's cache
NS_NAME = dns.name.from_text("ns.nic.test.")  # the NSD server, in zone "test."
SERVFAIL_NS_NAME = dns.name.from_text("sf.nic.test.")  # the SERVFAIL server


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class ZoneKey:
    """One combined signing key (flags 257, SEP) for a zone."""

    private: ec.EllipticCurvePrivateKey
    dnskey: dns.rdtypes.ANY.DNSKEY.DNSKEY

    @classmethod
    def generate(cls) -> ZoneKey:
        private = ec.generate_private_key(ec.SECP256R1())
        dnskey = dns.dnssec.make_dnskey(private.public_key(), ALGORITHM, flags=257)
        return cls(private, dnskey)

    def ds(self, owner: dns.name.Name) -> dns.rdata.Rdata:
        return dns.dnssec.make_ds(owner, self.dnskey, "SHA256")

    @property
    def key_tag(self) -> int:
        return dns.dnssec.key_id(self.dnskey)

    def write_bind_private(self, base: Path) -> None:
        """Write `<base>.private` in BIND format (what ldns-signzone reads)."""
        scalar = self.private.private_numbers().private_value.to_bytes(32, "big")
        base.with_name(base.name + ".private").write_text(
            "Private-key-format: v1.2\n"
            "Algorithm: 13 (ECDSAP256SHA256)\n"
            f"PrivateKey: {base64.b64encode(scalar).decode()}\n"
        )


@dataclass(frozen=True)
class Damage:
    """A post-signing edit: 'break' (flip signature bytes) or 'expire' (past validity)."""

    kind: str
    owner: dns.name.Name
    rdtype: dns.rdatatype.RdataType


def to_name(text: str | dns.name.Name, origin: dns.name.Name) -> dns.name.Name:
    """Name inside `origin`: '@' is the apex; a name ending in '.' is absolute; a name
    equal to the origin or ending in '.<origin>' (without the final dot) is taken as
    absolute too; anything else is relative to the origin."""
    if isinstance(text, dns.name.Name):
        return text if text.is_absolute() else text.derelativize(origin)
    if text in ("@", ""):
        return origin
    if text.endswith("."):
        return dns.name.from_text(text)
    absolute = dns.name.from_text(text + ".")
    if origin != dns.name.root and absolute.is_subdomain(origin):
        return absolute
    return dns.name.from_text(text, origin)


def make_rdata(
    rdtype: dns.rdatatype.RdataType, data: str, origin: dns.name.Name
) -> dns.rdata.Rdata:
    """Parse presentation data; RFC 3597 generic data (`\\# len hex`) that dnspython refuses
    for the type (e.g. a TLSA with a wrong digest length) is kept as generic rdata."""
    try:
        return dns.rdata.from_text(IN, rdtype, data, origin=origin, relativize=False)
    except dns.exception.SyntaxError:
        if not data.lstrip().startswith("\\#"):
            raise
    parts = data.split()
    wire = bytes.fromhex("".join(parts[2:]))
    if len(wire) != int(parts[1]):
        raise ValueError(f"generic rdata length {parts[1]} does not match {len(wire)} bytes")
    return dns.rdata.GenericRdata(IN, rdtype, wire)


@dataclass
class ZoneSpec:
    """A zone a test declares. Records are (owner, ttl, rdata)."""

    origin: dns.name.Name
    signed: bool = True
    nsec3: bool = False
    servfail: bool = False  # served by the SERVFAIL server (no zone file)
    key: ZoneKey | None = None
    records: list[tuple[dns.name.Name, int, dns.rdata.Rdata]] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.origin.to_text()

    def name_of(self, text: str | dns.name.Name) -> dns.name.Name:
        name = to_name(text, self.origin)
        if not name.is_subdomain(self.origin):
            raise ValueError(f"{name} is not inside zone {self.origin}")
        return name

    def add(self, name: str, rdtype: str | int, data: str, ttl: int = DEFAULT_TTL) -> ZoneSpec:
        """Add one record, e.g. add("mx", "A", "127.25.0.10"). Returns self (chainable)."""
        owner = self.name_of(name)
        rdata = make_rdata(dns.rdatatype.RdataType.make(rdtype), data, self.origin)
        self.records.append((owner, ttl, rdata))
        return self

    def add_raw(
        self, name: str, rdtype: str | int, wire: bytes, ttl: int = DEFAULT_TTL
    ) -> ZoneSpec:
        """Add a record from raw rdata bytes, unchecked (served in RFC 3597 generic form)."""
        owner = self.name_of(name)
        rdata = dns.rdata.GenericRdata(IN, dns.rdatatype.RdataType.make(rdtype), wire)
        self.records.append((owner, ttl, rdata))
        return self

    def remove(self, name: str, rdtype: str | int | None = None) -> ZoneSpec:
        """Remove every record of `name` (of `rdtype` if given)."""
        owner = self.name_of(name)
        want = None if rdtype is None else dns.rdatatype.RdataType.make(rdtype)
        self.records = [
            r for r in self.records if not (r[0] == owner and want in (None, r[2].rdtype))
        ]
        return self

    def break_rrsig(self, name: str, rdtype: str | int) -> ZoneSpec:
        """After signing, flip bytes in the RRSIG(s) covering (name, rdtype): bogus."""
        self._add_damage("break", name, rdtype)
        return self

    def expire_rrsig(self, name: str, rdtype: str | int) -> ZoneSpec:
        """After signing, replace the RRSIG covering (name, rdtype) by one that expired
        (validity 20 days ago to 10 days ago): bogus, signature expired."""
        self._add_damage("expire", name, rdtype)
        return self

    def repair(self) -> ZoneSpec:
        """Forget every break_rrsig/expire_rrsig (takes effect at the next start/reload)."""
        self.damage.clear()
        return self

    def _add_damage(self, kind: str, name: str, rdtype: str | int) -> None:
        if not self.signed:
            raise ValueError(f"zone {self.origin} is unsigned: no RRSIG to damage")
        owner = self.name_of(name)
        self.damage.append(Damage(kind, owner, dns.rdatatype.RdataType.make(rdtype)))


def soa_text(serial: int) -> str:
    return f"{NS_NAME} hostmaster.nic.test. {serial} 3600 600 86400 {NEGATIVE_TTL}"


def build_zone(records: list[tuple[dns.name.Name, int, dns.rdata.Rdata]], origin: dns.name.Name
               ) -> dns.zone.Zone:
    zone = dns.zone.Zone(origin, relativize=False)
    with zone.writer() as txn:
        for owner, ttl, rdata in records:
            txn.add(owner, ttl, rdata)
    return zone


def render_zone(spec: ZoneSpec, records: list[tuple[dns.name.Name, int, dns.rdata.Rdata]],
                workdir: Path) -> str:
    """Zone-file text of `spec` with the full record list (apex SOA/NS, delegations, glue
    and the test's records), signed and damaged as the spec says."""
    zone = build_zone(records, spec.origin)
    if not spec.signed:
        return zone.to_text(relativize=False)
    assert spec.key is not None
    now = _utcnow()
    inception = now - dt.timedelta(hours=1)
    expiration = now + dt.timedelta(days=30)
    if spec.nsec3:
        text = _sign_ldns(zone, spec, workdir, inception, expiration)
    else:
        dns.dnssec.sign_zone(
            zone, keys=[(spec.key.private, spec.key.dnskey)], dnskey_ttl=DEFAULT_TTL,
            inception=inception, expiration=expiration,
        )
        text = zone.to_text(relativize=False)
    for damage in spec.damage:
        text = _apply_damage(text, spec, damage)
    return text


def _sign_ldns(zone: dns.zone.Zone, spec: ZoneSpec, workdir: Path,
               inception: dt.datetime, expiration: dt.datetime) -> str:
    assert spec.key is not None
    label = spec.origin.to_text().rstrip(".") or "root"
    unsigned = workdir / f"{label}.unsigned"
    signed = workdir / f"{label}.nsec3"
    with zone.writer() as txn:
        txn.add(spec.origin, DEFAULT_TTL, spec.key.dnskey)
    unsigned.write_text(zone.to_text(relativize=False))
    base = workdir / f"K{label}.+013+{spec.key.key_tag:05d}"
    spec.key.write_bind_private(base)
    fmt = "%Y%m%d%H%M%S"
    subprocess.run(
        ["ldns-signzone", "-n", "-t", "0",
         "-i", inception.strftime(fmt), "-e", expiration.strftime(fmt),
         "-o", spec.origin.to_text(), "-f", str(signed), str(unsigned), str(base)],
        check=True, capture_output=True, text=True,
    )
    return signed.read_text()


def _split(line: str) -> list[str] | None:
    """(owner, ttl, class, type, rdata) of one RR line, or None for comments/blank."""
    stripped = line.strip()
    if not stripped or stripped.startswith((";", "$")):
        return None
    parts = stripped.split(None, 4)
    return parts if len(parts) == 5 else None


def _apply_damage(text: str, spec: ZoneSpec, damage: Damage) -> str:
    assert spec.key is not None
    lines = text.splitlines()
    sig_lines: list[int] = []
    rrset_rdatas: list[dns.rdata.Rdata] = []
    ttl = DEFAULT_TTL
    for i, line in enumerate(lines):
        parts = _split(line)
        if parts is None or dns.name.from_text(parts[0]) != damage.owner:
            continue
        rdtype = dns.rdatatype.from_text(parts[3])
        if rdtype == dns.rdatatype.RRSIG and parts[4].split()[0].upper() == \
                dns.rdatatype.to_text(damage.rdtype):
            sig_lines.append(i)
        elif rdtype == damage.rdtype:
            ttl = int(parts[1])
            rrset_rdatas.append(make_rdata(rdtype, parts[4], spec.origin))
    if not sig_lines:
        raise ValueError(f"no RRSIG covering {damage.owner} {damage.rdtype.name} "
                         f"in zone {spec.origin}")
    if damage.kind == "break":
        for i in sig_lines:
            parts = _split(lines[i])
            assert parts is not None
            rrsig = dns.rdata.from_text(IN, dns.rdatatype.RRSIG, parts[4])
            sig = bytearray(rrsig.signature)
            for j in range(8, 16):
                sig[j] ^= 0x5A
            broken = rrsig.replace(signature=bytes(sig))
            lines[i] = f"{parts[0]} {parts[1]} IN RRSIG {broken.to_text()}"
        return "\n".join(lines) + "\n"
    now = _utcnow()
    rrset = dns.rrset.from_rdata_list(damage.owner, ttl, rrset_rdatas)
    expired = dns.dnssec.sign(
        rrset, spec.key.private, signer=spec.origin, dnskey=spec.key.dnskey,
        inception=now - dt.timedelta(days=20), expiration=now - dt.timedelta(days=10),
    )
    first = sig_lines[0]
    lines[first] = f"{damage.owner} {ttl} IN RRSIG {expired.to_text()}"
    for i in reversed(sig_lines[1:]):
        del lines[i]
    return "\n".join(lines) + "\n"
