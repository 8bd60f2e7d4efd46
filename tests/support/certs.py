"""Generated X.509 certificates for tests: CAs, leaves, chains, in milliseconds.

ECDSA P-256 keys (fast). Every function returns `Issued` values carrying the
certificate, its key and DER/PEM forms, so tests can build TLSA data and TLS servers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UTC = dt.UTC


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def spki(self) -> bytes:
        return self.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def tlsa_data(self, selector: int, mtype: int) -> bytes:
        """Certificate association data for this certificate (RFC 6698 §2.1)."""
        raw = self.der if selector == 0 else self.spki
        if mtype == 0:
            return raw
        if mtype == 1:
            return hashlib.sha256(raw).digest()
        if mtype == 2:
            return hashlib.sha512(raw).digest()
        raise ValueError(mtype)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(
    cn: str = "Test Root CA",
    *,
    issuer: Issued | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    path_length: int | None = None,
    is_ca: bool = True,
) -> Issued:
    """A self-signed root, or an intermediate when `issuer` is given."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    nb = not_before or now - dt.timedelta(days=1)
    na = not_after or now + dt.timedelta(days=3650)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=is_ca,
                crl_sign=is_ca, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(cert, key)


def make_leaf(
    names: list[str] | tuple[str, ...] = ("mx.example.test",),
    *,
    issuer: Issued | None = None,
    cn: str | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    san: bool = True,
    server_auth: bool = True,
) -> Issued:
    """A server certificate. Self-signed when `issuer` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    nb = not_before or now - dt.timedelta(days=1)
    na = not_after or now + dt.timedelta(days=365)
    subject = _name(cn or (names[0] if names else "leaf"))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if san and names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    if server_auth:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(cert, key)


def write_pair(leaf: Issued, chain: list[Issued] | tuple[Issued, ...] = (),
               directory: Path | None = None) -> tuple[Path, Path]:
    """Write `leaf` (+ `chain`, leaf first) and its key as PEM files; returns (cert, key)."""
    d = Path(directory or tempfile.mkdtemp(prefix="relay-cert-"))
    serial = format(leaf.cert.serial_number, "x")[:12]
    cert_path = d / f"{serial}.crt"
    key_path = d / f"{serial}.key"
    cert_path.write_bytes(leaf.pem + b"".join(c.pem for c in chain))
    key_path.write_bytes(leaf.key_pem)
    return cert_path, key_path


def server_context(leaf: Issued, chain: list[Issued] | tuple[Issued, ...] = (),
                   directory: Path | None = None) -> ssl.SSLContext:
    """A server-side SSLContext presenting `leaf` followed by `chain`."""
    cert_path, key_path = write_pair(leaf, chain, directory)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx
