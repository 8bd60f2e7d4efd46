"""The status-code table of SPEC.md: enhanced code, contract text, RFC 8460 result type.

Pure. The text after each code is part of the contract: operators search for it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CodeInfo:
    detail: str  # the x.y part after the class digit, e.g. "7.321"
    text: str  # contract text
    tlsrpt: str | None  # RFC 8460 result type, when the code is a TLS/DANE result
    sender_advice: str  # what the sender should do (NDR, README)
    admin_advice: str  # what the destination's administrator should fix


_TABLE: dict[str, CodeInfo] = {
    "7.321": CodeInfo(
        "7.321",
        "starttls-not-supported: Destination mail server must support TLS to receive mail.",
        "starttls-not-supported",
        "Ask the recipient's mail administrator to enable STARTTLS on their mail servers.",
        "The domain publishes TLSA records, so TLS is mandatory: make every MX host offer "
        "STARTTLS and complete a TLS 1.2+ handshake.",
    ),
    "7.322": CodeInfo(
        "7.322",
        "certificate-expired: Destination mail server's certificate is expired.",
        "certificate-expired",
        "Ask the recipient's mail administrator to renew their mail server's certificate.",
        "A certificate on the DANE-TA path (or, if configured, the DANE-EE leaf) is past its "
        "notAfter date: renew it, and update the TLSA records if the key changes.",
    ),
    "7.323": CodeInfo(
        "7.323",
        "tlsa-invalid: The domain failed DANE validation.",
        "tlsa-invalid",
        "Tell the recipient's mail administrator that their DANE (TLSA) records do not match "
        "their mail server's certificate; the message cannot be delivered securely until fixed.",
        "No certificate presented by the MX hosts matches a usable TLSA record (or a DANE-TA "
        "chain does not validate or match the names). Publish TLSA records for the current "
        "key before deploying a new one (3 1 1 recommended).",
    ),
    "7.324": CodeInfo(
        "7.324",
        "dnssec-invalid: Destination domain returned invalid DNSSEC records.",
        "dnssec-invalid",
        "Tell the recipient's mail administrator that their domain's DNSSEC is broken.",
        "A signed record (MX, A/AAAA or TLSA) failed validation, or the TLSA query failed "
        "with SERVFAIL: fix the signatures (expired RRSIG, wrong DS) or the name servers "
        "that cannot answer TLSA queries.",
    ),
    "4.312": CodeInfo(
        "4.312",
        "DNS query failed",
        None,
        "Nothing yet; the relay keeps retrying. If it persists, tell the recipient's mail "
        "administrator.",
        "The domain's name servers time out or fail (SERVFAIL) on MX/A/AAAA queries.",
    ),
    # MTA-STS (RFC 8461): the relay's own codes; the text says "MTA-STS" and what failed.
    "7.341": CodeInfo(
        "7.341",
        "sts-starttls-not-supported: Destination mail server must support TLS to receive "
        "mail (MTA-STS).",
        "starttls-not-supported",
        "Ask the recipient's mail administrator to enable STARTTLS on their mail servers: "
        "their MTA-STS policy (mode enforce) requires it.",
        "The domain's MTA-STS policy is in enforce mode, so TLS is mandatory: make every MX "
        "host offer STARTTLS and complete a TLS 1.2+ handshake.",
    ),
    "7.342": CodeInfo(
        "7.342",
        "sts-certificate-invalid: Destination mail server's certificate failed MTA-STS "
        "(web PKI) validation.",
        None,  # the RFC 8460 type names what failed: host mismatch, expired, not trusted
        "Tell the recipient's mail administrator that their mail server's certificate is "
        "not valid for its MTA-STS policy; the message cannot be delivered securely until "
        "fixed.",
        "The domain's MTA-STS policy is in enforce mode: every MX host must present a "
        "certificate from a publicly trusted CA, within its validity dates, whose "
        "subjectAltName covers the MX host name.",
    ),
    "7.343": CodeInfo(
        "7.343",
        "sts-mx-mismatch: No MX host of the domain matches its MTA-STS policy.",
        "validation-failure",
        "Tell the recipient's mail administrator that their MX records do not match their "
        "MTA-STS policy.",
        "The MX host names are not covered by any mx: pattern of the MTA-STS policy (mode "
        "enforce): add them to the policy (and change the id of the _mta-sts TXT record), "
        "or fix the MX records.",
    ),
    # REQUIRETLS (RFC 8689)
    "7.30": CodeInfo(
        "7.30",
        "REQUIRETLS support required",
        None,
        "The message was sent with REQUIRETLS, and no mail server of the recipient's domain "
        "supports REQUIRETLS; send it without REQUIRETLS if that is acceptable.",
        "Offer REQUIRETLS (RFC 8689) on the domain's mail servers.",
    ),
    "7.10": CodeInfo(
        "7.10",
        "Encryption Needed: REQUIRETLS needs a destination authenticated by DANE or MTA-STS",
        None,
        "The message was sent with REQUIRETLS, but the recipient's domain publishes neither "
        "DANE (TLSA) records nor an MTA-STS policy, so it cannot be delivered securely.",
        "Publish TLSA records (DANE) or an MTA-STS policy for the domain's mail servers.",
    ),
    "1.2": CodeInfo(
        "1.2",
        "Recipient domain does not exist",
        None,
        "Check the recipient's address for typing errors.",
        "The domain does not exist in DNS (NXDOMAIN).",
    ),
    "1.10": CodeInfo(
        "1.10",
        "Recipient domain does not accept mail (null MX)",
        None,
        "The recipient's domain has declared that it accepts no mail; use another address.",
        "The domain publishes a null MX (RFC 7505).",
    ),
    "4.6": CodeInfo(
        "4.6",
        "Mail loops back to this relay",
        None,
        "Tell your mail administrator: the destination's MX points at this relay.",
        "The MX (or route) points at the relay's own listener.",
    ),
    "4.7": CodeInfo(
        "4.7",
        "Message expired: delivery time exceeded",
        None,
        "The message could not be delivered in time; see the last error.",
        "See the last error in the trace.",
    ),
    "6.7": CodeInfo(
        "6.7",
        "Destination does not support SMTPUTF8",
        None,
        "The recipient's server cannot receive internationalized addresses; use an ASCII "
        "address.",
        "Enable SMTPUTF8 on the destination's mail servers.",
    ),
}


def info(code: str) -> CodeInfo | None:
    """Look up a full enhanced code (`"4.7.323"` or `"5.7.323"`)."""
    cls, _, detail = code.partition(".")
    if cls not in ("2", "4", "5"):
        return None
    return _TABLE.get(detail)


def text(code: str) -> str:
    """The contract text for a code, or an empty string when it has none."""
    entry = info(code)
    return entry.text if entry else ""


def tlsrpt_result_type(code: str) -> str | None:
    entry = info(code)
    return entry.tlsrpt if entry else None


def permanent(code: str) -> str:
    """The 5.x.x form of a code (used when a deferred recipient expires)."""
    cls, _, detail = code.partition(".")
    return f"5.{detail}" if cls in ("4", "5") else code


def temporary(code: str) -> str:
    cls, _, detail = code.partition(".")
    return f"4.{detail}" if cls in ("4", "5") else code


def with_text(code: str) -> str:
    """`"4.7.323 tlsa-invalid: …"`: the code followed by its contract text."""
    t = text(code)
    return f"{code} {t}" if t else code


# Well-known codes used across modules.
STARTTLS_NOT_SUPPORTED = "4.7.321"
CERT_EXPIRED = "4.7.322"
TLSA_INVALID = "4.7.323"
DNSSEC_INVALID = "4.7.324"
DNS_FAILED = "4.4.312"
NO_SUCH_DOMAIN = "5.1.2"
NULL_MX = "5.1.10"
LOOP = "5.4.6"
NO_SMTPUTF8 = "5.6.7"
STS_STARTTLS = "4.7.341"
STS_CERTIFICATE = "4.7.342"
STS_MX_MISMATCH = "4.7.343"
REQUIRETLS_UNSUPPORTED = "5.7.30"
REQUIRETLS_UNAUTHENTICATED = "5.7.10"
