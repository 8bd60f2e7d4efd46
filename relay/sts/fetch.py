"""Fetching a domain's MTA-STS policy (RFC 8461 §3.3) and the trust store it needs.

`fetch_policy` looks up `mta-sts.<domain>` through our validating resolver, GETs
`/.well-known/mta-sts.txt` from those addresses over HTTPS (PKIX with the host name,
SNI), follows no redirect, wants `200` and `text/plain`, reads at most
`mta_sts.max_policy_size` bytes within `mta_sts.fetch_timeout`, and parses the policy
(relay.sts.record). Every failure is a value with its RFC 8460 result type:
`sts-webpki-invalid` (the policy host's certificate), `sts-policy-invalid` (a malformed
policy, a wrong media type), `sts-policy-fetch-error` (everything else).
"""

from __future__ import annotations

import re
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.verification import Store

from relay.config import Config
from relay.dns.resolve import Resolver
from relay.errors import ConfigError
from relay.model import Rcode
from relay.sts import web
from relay.sts.decide import FETCH_ERROR, POLICY_INVALID, WEBPKI_INVALID
from relay.sts.record import WELL_KNOWN, Malformed, Policy, parse_policy, policy_host

MAX_ADDRESSES = 4  # addresses of the policy host tried


@dataclass(frozen=True)
class Trust:
    """The web PKI: an ssl context for the policy fetch and the same roots as a
    cryptography Store for MX certificates."""

    context: ssl.SSLContext
    roots: Store
    source: str  # the PEM file the roots came from


def _system_cafile() -> str:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return candidate
    raise ConfigError("MTA-STS needs a CA trust store: none found at the system's default "
                      "place; install ca-certificates or set mta_sts.ca_file",
                      key="mta_sts.ca_file")


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _roots(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle that parses. One odd root (system bundles carry a
    few, e.g. with a non-positive serial number) is skipped, not fatal for the others."""
    out = []
    for block in _PEM_CERT.findall(pem):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            try:
                out.append(x509.load_pem_x509_certificate(block))
            except ValueError:
                continue
    return out


def load_trust(ca_file: Path | None) -> Trust:
    """Load `mta_sts.ca_file` (or the system's store). Raises ConfigError naming it."""
    path = str(ca_file) if ca_file else _system_cafile()
    try:
        roots = _roots(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"mta_sts.ca_file {path}: cannot read: {exc}",
                          key="mta_sts.ca_file") from None
    if not roots:
        raise ConfigError(f"mta_sts.ca_file {path}: no certificate in it",
                          key="mta_sts.ca_file")
    # The policy fetch trusts exactly the roots the MX check trusts (PROTOCOL_TLS_CLIENT:
    # certificate and host name required; no system store added behind ca_file's back).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata="".join(
            c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in roots))
    except ssl.SSLError as exc:
        raise ConfigError(f"mta_sts.ca_file {path}: cannot load: {exc}",
                          key="mta_sts.ca_file") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return Trust(context, Store(roots), path)


@dataclass(frozen=True)
class Fetched:
    """The outcome of one fetch: a policy, or a failure with its RFC 8460 type."""

    policy: Policy | None
    failure_type: str = ""
    detail: str = ""
    ip: str = ""


def _media_type(head: web.Head) -> str | None:
    if head.status != 200:
        if 300 <= head.status < 400:
            where = head.header("location") or "?"
            return f"HTTP {head.status} redirect to {where[:100]} (never followed)"
        return f"HTTP {head.status} {head.reason[:60]}".rstrip()
    ctype = (head.header("content-type") or "").split(";", 1)[0].strip().lower()
    if ctype != "text/plain":
        return f"media type {ctype[:60] or '(none)'} is not text/plain"
    return None


async def policy_addresses(resolver: Resolver, host: str, cfg: Config) -> list[str] | str:
    """The policy host's addresses from our resolver, or why there are none."""
    found: list[str] = []
    why = f"{host} has no address"
    for rdtype, on in (("A", cfg.delivery.ipv4), ("AAAA", cfg.delivery.ipv6)):
        if not on:
            continue
        answer = await resolver.query(host, rdtype)
        if answer.dnssec_failure:
            return f"{host} {rdtype} failed DNSSEC validation: {answer.reason}"
        if answer.rcode is Rcode.OK:
            found += [str(r) for r in answer.records]
        elif answer.rcode.failed:
            why = f"{host} {rdtype} lookup failed ({answer.rcode}): {answer.reason}"
    return found[:MAX_ADDRESSES] if found else why


async def fetch_policy(domain: str, resolver: Resolver, cfg: Config, trust: Trust) -> Fetched:
    host = policy_host(domain)
    addrs = await policy_addresses(resolver, host, cfg)
    if isinstance(addrs, str):
        return Fetched(None, FETCH_ERROR, addrs)
    m = cfg.mta_sts
    last = Fetched(None, FETCH_ERROR, f"{host}: no address answered")
    for ip in addrs:
        try:
            resp = await web.request(host, ip, WELL_KNOWN, context=trust.context,
                                     connect_timeout=m.connect_timeout,
                                     total_timeout=m.fetch_timeout,
                                     max_body=m.max_policy_size,
                                     headers=(("Accept", "text/plain"),), check=_media_type)
        except web.HttpsError as exc:
            if exc.kind == "certificate":
                return Fetched(None, WEBPKI_INVALID, str(exc), ip)
            if exc.kind == "refused":
                wrong_type = str(exc).startswith("media type")
                return Fetched(None, POLICY_INVALID if wrong_type else FETCH_ERROR,
                               f"{host} [{ip}]: {exc}", ip)
            if exc.kind in ("too-large", "protocol"):
                return Fetched(None, POLICY_INVALID if exc.kind == "too-large" else FETCH_ERROR,
                               str(exc), ip)
            last = Fetched(None, FETCH_ERROR, str(exc), ip)
            if exc.kind in ("connect", "timeout") and "connect to" in str(exc):
                continue  # this address did not answer: try the next one
            return last
        parsed = parse_policy(resp.body)
        if isinstance(parsed, Malformed):
            return Fetched(None, POLICY_INVALID, f"{host} [{ip}]: {parsed.reason}", ip)
        return Fetched(parsed, ip=ip)
    return last
