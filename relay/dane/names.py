"""Certificate names against reference identifiers (RFC 7672 §3.2.3, RFC 6125 §6.4):
the name check of DANE-TA, and of web-PKI checks.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID


def extension(cert: x509.Certificate, cls: type[Any]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _norm(name: str) -> str:
    name = name.strip().lower()
    name = name[:-1] if name.endswith(".") else name
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return ""
    return "" if "" in name.split(".") else name


def name_matches(presented: str, reference: str) -> bool:
    """A certificate DNS name against a reference identifier; `*` only as the whole
    left-most label, matching exactly one label (never `f*.x`, never the bare parent)."""
    p, r = _norm(presented), _norm(reference)
    if not p or not r or "*" in r:
        return False
    if "*" not in p:
        return p == r
    plabels, rlabels = p.split("."), r.split(".")
    return (
        plabels[0] == "*"
        and "*" not in p[1:]
        and len(plabels) >= 3  # "*.com" never matches
        and rlabels[1:] == plabels[1:]  # exactly one label in place of the "*"
    )


def leaf_names(cert: x509.Certificate) -> list[str]:
    """SAN dNSNames; the subject CNs only when the certificate has no DNS name in a SAN."""
    san = extension(cert, x509.SubjectAlternativeName)
    dns = san.get_values_for_type(x509.DNSName) if san is not None else []
    if dns:
        return list(dns)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return [a.value for a in cns if isinstance(a.value, str)]

