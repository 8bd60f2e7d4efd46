"""TLSA records for SMTP (RFC 6698, RFC 7671 §9, RFC 7672 §2.2): parsing, usability,
digest agility and certificate association data.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from relay.model import TlsaRecord

DANE_TA, DANE_EE = 2, 3
CERT, SPKI = 0, 1
FULL, SHA2_256, SHA2_512 = 0, 1, 2
_DIGEST_LEN = {SHA2_256: 32, SHA2_512: 64}
_STRENGTH = {SHA2_256: 1, SHA2_512: 2}  # digest agility order: higher is stronger

RecordLike = TlsaRecord | tuple[int, int, int, bytes]



def parse_tlsa_rdata(wire: bytes) -> TlsaRecord | None:
    """TLSA RDATA (RFC 6698 §2.1) -> record, lengths unchecked; None when shorter than 3."""
    raw = bytes(wire)
    if len(raw) < 3:
        return None
    return TlsaRecord(raw[0], raw[1], raw[2], raw[3:])


def as_record(record: RecordLike) -> TlsaRecord | None:
    """A TlsaRecord from a record or a (usage, selector, mtype, data) tuple; None if neither."""
    if isinstance(record, TlsaRecord):
        return record
    try:
        usage, selector, mtype, data = record
        if isinstance(data, bytes | bytearray | memoryview):
            return TlsaRecord(int(usage), int(selector), int(mtype), bytes(data))
    except (TypeError, ValueError):
        pass
    return None


def usable(record: RecordLike) -> bool:
    """True for a well-formed DANE-TA/DANE-EE record with known selector and matching type."""
    rec = as_record(record)
    if rec is None or rec.usage not in (DANE_TA, DANE_EE):
        return False
    if rec.selector not in (CERT, SPKI) or rec.mtype not in (FULL, SHA2_256, SHA2_512):
        return False
    if rec.mtype in _DIGEST_LEN:
        return len(rec.data) == _DIGEST_LEN[rec.mtype]
    return full_key(rec) is not None


def digest_agility(records: Iterable[TlsaRecord]) -> list[TlsaRecord]:
    """RFC 7671 §9: per (usage, selector) keep Full(0) and only the strongest digest type."""
    recs = list(records)
    best: dict[tuple[int, int], int] = {}
    for r in recs:
        if r.mtype in _STRENGTH:
            key = (r.usage, r.selector)
            best[key] = max(best.get(key, 0), _STRENGTH[r.mtype])
    return [
        r for r in recs
        if r.mtype not in _STRENGTH or _STRENGTH[r.mtype] == best[(r.usage, r.selector)]
    ]


def usable_records(records: Iterable[RecordLike]) -> list[TlsaRecord]:
    """The records verify() will try: usable ones, after digest agility, in input order."""
    recs = [as_record(r) for r in records]
    return digest_agility(r for r in recs if r is not None and usable(r))


def association_data(der: bytes, selector: int, mtype: int) -> bytes:
    """Certificate association data of a DER certificate (e.g. for `3 1 1` suggestions)."""
    return digest(mtype, der if selector == CERT else spki_der(der))


def spki_der(cert_der: bytes) -> bytes:
    """The SubjectPublicKeyInfo exactly as encoded in a DER certificate (RFC 6698 §1.1.2)."""
    _, start, _ = _tlv(cert_der, 0)  # Certificate
    _, pos, tbs_end = _tlv(cert_der, start)  # TBSCertificate
    seen = 0  # serial, signature, issuer, validity, subject, subjectPublicKeyInfo
    while pos < tbs_end:
        tag, _, end = _tlv(cert_der, pos)
        if not (seen == 0 and tag == 0xA0):  # [0] version is optional and not counted
            seen += 1
            if seen == 6:
                if tag != 0x30:
                    raise ValueError("SubjectPublicKeyInfo is not a SEQUENCE")
                return cert_der[pos:end]
        pos = end
    raise ValueError("certificate has no SubjectPublicKeyInfo")


def _tlv(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, value start, end) of the DER element at `pos`."""
    if pos + 2 > len(buf):
        raise ValueError("truncated DER")
    tag, length, start = buf[pos], buf[pos + 1], pos + 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 4 or start + n > len(buf):
            raise ValueError("bad DER length")
        length, start = int.from_bytes(buf[start:start + n], "big"), start + n
    if start + length > len(buf):
        raise ValueError("truncated DER")
    return tag, start, start + length


def digest(mtype: int, raw: bytes) -> bytes:
    if mtype == SHA2_256:
        return hashlib.sha256(raw).digest()
    if mtype == SHA2_512:
        return hashlib.sha512(raw).digest()
    return raw


def full_key(rec: TlsaRecord) -> tuple[bytes, Any, x509.Certificate | None] | None:
    """(SPKI DER, public key, certificate or None) of a Full(0) record's data, or None."""
    try:
        if rec.selector == CERT:
            cert = x509.load_der_x509_certificate(rec.data)
            return spki_der(rec.data), cert.public_key(), cert
        return rec.data, serialization.load_der_public_key(rec.data), None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None


def label(rec: TlsaRecord) -> str:
    return f"{rec.usage} {rec.selector} {rec.mtype}"


