"""RFC 7672 DANE matching: (TLSA records, presented chain, reference names, now) -> Verdict.

Pure: no I/O, no clock. Rules (SPEC.md "DANE rules in detail"): usable records are usage
DANE-TA(2)/DANE-EE(3), selector 0/1, matching type 0/1/2 with well-formed data; all else
is ignored. Digest agility (RFC 7671 §9): per (usage, selector) only the strongest digest
published counts; Full(0) always does. DANE-EE matches the leaf with no name or date check
(RFC 7672 §3.1.1) unless `ee_check_expiry`. DANE-TA matches a certificate at depth >= 1,
or is a `2 0 0` certificate / `2 1 0` key from DNS; the path from the leaf up to it is then
validated with it as the only root: signatures, CA constraints, the leaf's names, and the
dates of every certificate below the anchor (RFC 5280 §6.1: not the anchor's own).
Depths follow OpenSSL's SSL_get0_dane_authority(): DANE-EE 0; a DANE-TA certificate its
index in the verified chain (one from DNS sits above the last certificate it issued); a
bare key from DNS the depth of the top-most certificate it signed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from relay.codes import CERT_EXPIRED, TLSA_INVALID
from relay.dane.names import extension, leaf_names, name_matches
from relay.dane.tlsa import (
    CERT,
    DANE_EE,
    DANE_TA,
    FULL,
    RecordLike,
    as_record,
    digest,
    digest_agility,
    full_key,
    label,
    spki_der,
    usable,
)
from relay.model import TlsaRecord

_MAX_STEPS = 2000  # DFS node expansions per verify() call (path building is bounded)
_MAX_PATHS = 16  # candidate paths validated per trust anchor



@dataclass(frozen=True)
class Verdict:
    """The result of matching one host's chain against its TLSA records.

    `ok` is the verdict. `code` is None when authenticated or when no record was usable
    (`usable` False: TLS is still mandatory, without authentication), else "4.7.322" or
    "4.7.323". `matched`/`depth` name the record and chain depth of the match; on a
    failure they describe the DANE-TA match whose path failed, if there was one.
    """

    ok: bool
    code: str | None
    usable: bool
    depth: int | None = None
    matched: TlsaRecord | None = None
    reason: str = ""


# --- certificates ------------------------------------------------------------------------


@dataclass(eq=False)
class _Cert:
    der: bytes
    cert: x509.Certificate
    spki: bytes

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string() or "(empty subject)"

    @cached_property
    def key(self) -> Any:
        try:
            return self.cert.public_key()
        except (ValueError, UnsupportedAlgorithm):
            return None


def _load(der: bytes) -> _Cert | None:
    try:
        return _Cert(der, x509.load_der_x509_certificate(der), spki_der(der))
    except (ValueError, TypeError):
        return None


def _matches(rec: TlsaRecord, c: _Cert) -> bool:
    return digest(rec.mtype, c.der if rec.selector == CERT else c.spki) == rec.data


def _signature_ok(cert: x509.Certificate, key: Any) -> bool:
    """Does `key` verify `cert`'s signature (RSA PKCS#1 v1.5 / PSS, ECDSA, EdDSA, DSA)?"""
    sig, tbs = cert.signature, cert.tbs_certificate_bytes
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, tbs, cert.signature_algorithm_parameters, cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, tbs, cert.signature_algorithm_parameters)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(sig, tbs)
        elif isinstance(key, dsa.DSAPublicKey):
            key.verify(sig, tbs, cert.signature_hash_algorithm)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    bc = extension(cert, x509.BasicConstraints)
    if bc is None:  # only a v1 self-issued certificate is a CA without basicConstraints
        return cert.version == x509.Version.v1 and cert.issuer == cert.subject
    return bool(bc.ca)


def _day(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d")


# --- DANE-TA path building and validation -------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Anchor:
    record: TlsaRecord
    spki: bytes
    key: Any
    cert: x509.Certificate | None  # None for a bare key from DNS
    in_chain: bool

    def depth(self, path: Sequence[_Cert]) -> int:
        return len(path) - 1 if self.cert is None else len(path)


@dataclass(frozen=True)
class _Failure:
    code: str
    reason: str
    record: TlsaRecord | None = None
    depth: int | None = None


@dataclass
class _Search:
    """Shared, bounded state of one verify() call's path building."""

    steps: int = 0
    exhausted: bool = False
    sigs: dict[tuple[int, bytes], bool] = field(default_factory=dict)

    def signed(self, c: _Cert, spki: bytes, key: Any) -> bool:
        slot = (id(c), spki)
        if slot not in self.sigs:
            self.sigs[slot] = _signature_ok(c.cert, key)
        return self.sigs[slot]


def _anchors(rec: TlsaRecord, leaf: _Cert, pool: Sequence[_Cert]) -> list[_Anchor]:
    """Trust anchors a DANE-TA record designates: matching chain certificates at depth >= 1,
    else the certificate or key carried by a Full(0) record. Never the leaf's own key."""
    found: list[_Anchor] = []
    for c in pool:
        if _matches(rec, c) and c.spki != leaf.spki and c.key is not None:
            found.append(_Anchor(rec, c.spki, c.key, c.cert, True))
    if not found and rec.mtype == FULL:
        full = full_key(rec)
        if full is not None and full[0] != leaf.spki:
            found.append(_Anchor(rec, full[0], full[1], full[2], False))
    return found


def _paths(leaf: _Cert, pool: Sequence[_Cert], anchor: _Anchor, search: _Search,
           limit: int) -> Iterator[list[_Cert]]:
    """Chains [leaf, ..., top] from the presented certificates whose top the anchor signed,
    shortest first along each branch; bounded by `limit` certificates and the step budget."""

    def issued_by_anchor(c: _Cert) -> bool:
        if anchor.cert is not None and c.cert.issuer != anchor.cert.subject:
            return False
        return search.signed(c, anchor.spki, anchor.key)

    def walk(path: list[_Cert]) -> Iterator[list[_Cert]]:
        search.steps += 1
        if search.steps > _MAX_STEPS:
            search.exhausted = True
            return
        top = path[-1]
        if issued_by_anchor(top):
            yield list(path)
        if len(path) >= limit:
            return
        for c in pool:
            if c in path or c.spki == anchor.spki or c.cert.subject != top.cert.issuer:
                continue
            if c.key is not None and search.signed(top, c.spki, c.key):
                yield from walk([*path, c])

    yield from walk([leaf])


def _check_path(path: Sequence[_Cert], anchor: _Anchor, names: Sequence[str],
                now: dt.datetime) -> _Failure | None:
    """Validate a signature path below `anchor`; None when it is good."""
    rec, depth = anchor.record, anchor.depth(path)
    where = f"({label(rec)} matched depth {depth})"

    def fail(code: str, what: str) -> _Failure:
        return _Failure(code, f"DANE-TA chain: {what} {where}", rec, depth)

    try:
        for c in path:
            if any(e.critical and isinstance(e.value, x509.UnrecognizedExtension)
                   for e in c.cert.extensions):
                return fail(TLSA_INVALID, f"unsupported critical extension in {c.subject}")
        issuers = [c.cert for c in path[1:]] + ([anchor.cert] if anchor.cert else [])
        for pos, issuer in enumerate(issuers, start=1):
            subject = issuer.subject.rfc4514_string() or "(empty subject)"
            if not _is_ca(issuer):
                return fail(TLSA_INVALID, f"issuer {subject} is not a CA")
            usage = extension(issuer, x509.KeyUsage)
            if usage is not None and not usage.key_cert_sign:
                return fail(TLSA_INVALID, f"issuer {subject} may not sign certificates")
            bc = extension(issuer, x509.BasicConstraints)
            if bc is not None and bc.path_length is not None:
                below = sum(1 for c in path[1:pos] if c.cert.issuer != c.cert.subject)
                if below > bc.path_length:
                    return fail(TLSA_INVALID, f"path length constraint of {subject} exceeded")
        presented = leaf_names(path[0].cert)
        if not names:
            return fail(TLSA_INVALID, "no reference identifier to check the leaf name against")
        if not any(name_matches(p, r) for p in presented for r in names):
            shown = ", ".join(presented[:4]) or "none"
            return fail(TLSA_INVALID,
                        f"leaf name mismatch: presented {shown}; wanted {', '.join(names)}")
        roles = ["leaf"] + [f"intermediate {c.subject}" for c in path[1:]]
        for c, role in zip(path, roles, strict=True):  # expiry first: it has its own code
            if now > c.cert.not_valid_after_utc:
                return fail(CERT_EXPIRED, f"{role} expired {_day(c.cert.not_valid_after_utc)}")
        for c, role in zip(path, roles, strict=True):
            if now < c.cert.not_valid_before_utc:
                return fail(TLSA_INVALID, f"{role} not valid before "
                            f"{_day(c.cert.not_valid_before_utc)}")
    except ValueError as exc:  # extensions that do not parse
        return fail(TLSA_INVALID, f"certificate does not parse: {exc}")
    return None


def _try_anchor(anchor: _Anchor, leaf: _Cert, pool: Sequence[_Cert], names: Sequence[str],
                now: dt.datetime, search: _Search, limit: int) -> tuple[int, str] | _Failure:
    """(depth, matched name) when some path to `anchor` validates, else the failure."""
    first: _Failure | None = None
    for n, path in enumerate(_paths(leaf, pool, anchor, search, limit)):
        failure = _check_path(path, anchor, names, now)
        if failure is None:
            refs = [r for r in names if any(name_matches(p, r) for p in leaf_names(leaf.cert))]
            return anchor.depth(path), refs[0]
        first = first or failure
        if n + 1 >= _MAX_PATHS:
            break
    if first is not None:
        return first
    what = label(anchor.record)
    if anchor.in_chain:  # a match, whose path failed
        return _Failure(TLSA_INVALID, f"{what} matched a presented certificate, but no valid "
                        "signature path leads from the leaf to it", anchor.record)
    return _Failure(TLSA_INVALID, f"{what} trust anchor from DNS signed no presented "
                    "certificate")


# --- verify ------------------------------------------------------------------------------


def verify(
    records: Iterable[RecordLike],
    chain: Sequence[bytes],
    names: Sequence[str],
    now: dt.datetime,
    *,
    ee_check_expiry: bool = False,
    max_records: int = 20,
    max_chain: int = 10,
) -> Verdict:
    """Match a presented chain (DER, leaf first) against a host's TLSA records."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("verify() needs an aware datetime for `now`")
    names = [names] if isinstance(names, str) else list(names)
    notes: list[str] = []
    raw = list(records)
    good = [r for r in (as_record(x) for x in raw) if r is not None and usable(r)]
    if not good:
        return Verdict(False, None, False,
                       reason=_note(f"no usable TLSA record among {len(raw)}", notes))
    tried = digest_agility(good)
    if len(tried) < len(good):
        notes.append(f"{len(good) - len(tried)} weaker-digest records ignored (RFC 7671 §9)")
    # DANE-EE is one digest per record: every record is checked, so the verdict never
    # depends on the (arbitrary) order of the RRset. Path building for DANE-TA is the
    # costly part: only `max_records` of those, in a fixed order, are tried.
    ta_records = sorted((r for r in tried if r.usage == DANE_TA),
                        key=lambda r: (r.selector, r.mtype, r.data))
    if len(ta_records) > max_records:
        notes.append(f"ignored {len(ta_records) - max_records} DANE-TA records beyond "
                     f"max_records={max_records}")
        ta_records = ta_records[:max_records]
    tried = [r for r in tried if r.usage == DANE_EE] + ta_records

    ders = [bytes(d) for d in chain]
    if len(ders) > max_chain:
        notes.append(f"ignored {len(ders) - max_chain} certificates beyond max_chain={max_chain}")
        ders = ders[:max_chain]
    if not ders:
        return Verdict(False, TLSA_INVALID, True, reason=_note("no certificate presented", notes))
    try:  # DANE-EE needs only the DER and its SPKI, not a certificate cryptography accepts
        leaf_spki = spki_der(ders[0])
    except ValueError:
        return Verdict(False, TLSA_INVALID, True,
                       reason=_note("the leaf certificate does not parse", notes))
    leaf = _load(ders[0])

    failures: list[_Failure] = []
    for rec in (r for r in tried if r.usage == DANE_EE):
        if digest(rec.mtype, ders[0] if rec.selector == CERT else leaf_spki) != rec.data:
            continue
        after = leaf.cert.not_valid_after_utc if leaf else None
        if after and now > after and ee_check_expiry:
            failures.append(_Failure(CERT_EXPIRED, f"{label(rec)} matched leaf, but the leaf "
                                     f"expired {_day(after)} (ee_check_expiry)", rec, 0))
            continue
        old = after is not None and now > after
        dates = f" (leaf expired {_day(after)}; DANE-EE ignores dates)" if old else ""
        return Verdict(True, None, True, 0, rec, _note(f"{label(rec)} matched leaf{dates}", notes))

    if leaf is None:
        return Verdict(False, TLSA_INVALID, True, reason=_note(
            "no DANE-EE match, and the leaf does not parse for DANE-TA", notes))
    pool: list[_Cert] = []
    for i, der in enumerate(ders[1:], start=1):
        c = _load(der)
        if c is None:
            notes.append(f"certificate #{i} does not parse")
        elif c.der != leaf.der and all(c.der != p.der for p in pool):
            pool.append(c)
    search = _Search()
    for rec in (r for r in tried if r.usage == DANE_TA):
        for anchor in _anchors(rec, leaf, pool):
            result = _try_anchor(anchor, leaf, pool, names, now, search, max_chain)
            if isinstance(result, _Failure):
                failures.append(result)
                continue
            depth, name = result
            src = "" if anchor.in_chain else " (trust anchor from DNS)"
            return Verdict(True, None, True, depth, rec, _note(
                f"{label(rec)} matched depth {depth}{src}; DANE-TA chain valid for {name}",
                notes))
    if search.exhausted:
        notes.append(f"DANE-TA path search stopped after {_MAX_STEPS} steps")
    return _failed(failures, len(tried), notes)


def _failed(failures: list[_Failure], tried: int, notes: list[str]) -> Verdict:
    """Pick the most relevant failure: an expiry first, then a match whose checks failed."""
    pick = next((f for f in failures if f.code == CERT_EXPIRED), None)
    pick = pick or next((f for f in failures if f.record is not None), None)
    if pick is None:
        plural = "record" if tried == 1 else "records"
        return Verdict(False, TLSA_INVALID, True, reason=_note(
            f"no certificate matches any of {tried} usable {plural}", notes))
    return Verdict(False, pick.code, True, pick.depth, pick.record, _note(pick.reason, notes))


def _note(reason: str, notes: list[str]) -> str:
    return "; ".join([reason, *notes])
