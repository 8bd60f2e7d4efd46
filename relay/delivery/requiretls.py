"""REQUIRETLS (RFC 8689), pure: which hosts a REQUIRETLS message may go to, the
`TLS-Required: No` header field, and the outcome when the next hop lacks the extension.

A REQUIRETLS message goes only over TLS that DANE or MTA-STS authenticated (an MTA-STS
policy in testing mode counts as enforce for it, RFC 8689 §4.2.1), and only to a next hop
that advertises REQUIRETLS (the parameter is passed on). Otherwise it bounces: 5.7.10
when the destination authenticates with neither, 5.7.30 when no next hop offers the
extension. Never retried in the clear.
"""

from __future__ import annotations

import re
from dataclasses import replace

from relay import codes
from relay.dane.policy import HostPlan
from relay.delivery import classify
from relay.model import Outcome, TlsRequirement

_TLS_REQUIRED = re.compile(rb"^tls-required[ \t]*:[ \t]*no[ \t]*$", re.IGNORECASE | re.MULTILINE)
AUTHENTICATED = (TlsRequirement.DANE, TlsRequirement.STS)


def tls_required_no(body: bytes) -> bool:
    """Does the header section carry `TLS-Required: No` (RFC 8689 §5)?"""
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[:end + 2]
    return bool(_TLS_REQUIRED.search(head.replace(b"\r\n", b"\n")))


def host(plan: HostPlan) -> HostPlan:
    """A host a REQUIRETLS message may not use becomes unusable with 5.7.10."""
    if not plan.usable or plan.requirement in AUTHENTICATED:
        return plan
    return replace(plan, requirement=None, unusable_code=codes.REQUIRETLS_UNAUTHENTICATED,
                   reason=f"REQUIRETLS: {plan.name} is authenticated by neither DANE (usable "
                   "TLSA records) nor an MTA-STS policy")


def missing(name: str, ip: str) -> Outcome:
    """The next hop does not advertise REQUIRETLS: 5.7.30 (this host; others are tried)."""
    return classify.local(codes.REQUIRETLS_UNSUPPORTED,
                          f"{name} [{ip}] does not offer REQUIRETLS")
