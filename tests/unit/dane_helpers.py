"""Certificate builders for the DANE matcher tests, on top of tests/support/certs.py.

tests/support/certs.py makes ECDSA P-256 CAs and leaves; this adds what the DANE tests need
besides: a fixed clock, other key types (RSA PKCS#1 v1.5, RSA-PSS, Ed25519), certificates
without basicConstraints or with keyUsage lacking keyCertSign, cross-signed copies, and
TLSA record helpers.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from relay.model import TlsaRecord
from tests.support.certs import Issued, make_ca, make_leaf

UTC = dt.UTC
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DAY = dt.timedelta(days=1)
VALID = {"not_before": NOW - 30 * DAY, "not_after": NOW + 365 * DAY}
HOST = "mx.example.test"


def ca(cn: str = "Test Root CA", **kw: Any) -> Issued:
    """A CA from certs.make_ca with validity around NOW unless given."""
    return make_ca(cn, **{**VALID, **kw})


def leaf(names: tuple[str, ...] = (HOST,), **kw: Any) -> Issued:
    """A server certificate from certs.make_leaf with validity around NOW unless given."""
    return make_leaf(names, **{**VALID, **kw})


def chain(*certs: Issued) -> list[bytes]:
    return [c.der for c in certs]


def rec(usage: int, selector: int, mtype: int, cert: Issued) -> TlsaRecord:
    return TlsaRecord(usage, selector, mtype, cert.tlsa_data(selector, mtype))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]) if cn else x509.Name([])


def new_key(kind: str) -> Any:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind in ("rsa", "pss"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def build(
    cn: str,
    *,
    issuer: Issued | None = None,
    key: Any = None,
    kind: str = "ec",
    signer_kind: str | None = None,
    ca: bool | None = False,
    path_length: int | None = None,
    key_cert_sign: bool | None = None,
    names: tuple[str, ...] = (),
    not_before: dt.datetime = VALID["not_before"],
    not_after: dt.datetime = VALID["not_after"],
    critical_unknown: bool = False,
) -> Issued:
    """Any certificate: `ca=None` omits basicConstraints, `key_cert_sign=None` omits keyUsage,
    `kind`/`signer_kind` pick key types ("ec", "rsa", "pss", "ed25519")."""
    key = key or new_key(kind)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
    if key_cert_sign is not None:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    if critical_unknown:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"),
            critical=True)
    signer = issuer.key if issuer else key
    kind = signer_kind or kind
    if kind == "ed25519":
        cert = builder.sign(signer, None)
    elif kind == "pss":
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        cert = builder.sign(signer, hashes.SHA256(), rsa_padding=pss)
    else:
        cert = builder.sign(signer, hashes.SHA256())
    return Issued(cert, key)


def reissue(cert: Issued, issuer: Issued, *, not_before: dt.datetime | None = None,
            not_after: dt.datetime | None = None) -> Issued:
    """The same subject, key and extensions as `cert`, issued (again) by `issuer`, optionally
    with other dates: a cross-certificate, or a stale copy of an intermediate."""
    c = cert.cert
    builder = (
        x509.CertificateBuilder()
        .subject_name(c.subject)
        .issuer_name(issuer.cert.subject)
        .public_key(c.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or c.not_valid_before_utc)
        .not_valid_after(not_after or c.not_valid_after_utc)
    )
    for ext in c.extensions:
        if not isinstance(ext.value, x509.AuthorityKeyIdentifier):
            builder = builder.add_extension(ext.value, critical=ext.critical)
    return Issued(builder.sign(issuer.key, hashes.SHA256()), cert.key)


def cross_sign(cert: Issued, issuer: Issued) -> Issued:
    return reissue(cert, issuer)
