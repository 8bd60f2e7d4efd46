"""The trace of one delivery attempt, as values: each address tried (HostAttempt) and
what the attempt decided (AttemptReport). The scheduler stores it, TLS reporting counts
it, metrics and the log show it.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.dane.policy import DomainPlan, HostPlan
from relay.model import Outcome, TlsRequirement
from relay.smtp.protocol import TlsInfo


@dataclass(frozen=True)
class HostAttempt:
    """The trace of one address tried (or one host that could not be used)."""

    mx: str
    ip: str
    dnssec: str
    tlsa: str
    tls: str = ""
    dane: str = ""
    code: str = ""
    reply: str = ""
    security: str = ""  # dane-authenticated | tls | plain | failed (metrics, TLS-RPT)
    failure_type: str | None = None  # RFC 8460 result type of a failure (also of a
    # cleartext fall-back of opportunistic TLS: the mail went, the TLS session did not)
    tls_info: TlsInfo | None = None
    local_ip: str = ""  # our end of the connection (TLS-RPT sending-mta-ip)
    policy: str = ""  # the TLS policy applied (policy_text)
    phase: str = ""  # where a failed session ended: "connect", "greeting", "ehlo", "tls", ...


@dataclass(frozen=True)
class AttemptReport:
    """What one attempt decided for every recipient, and the hosts it tried."""

    outcomes: dict[str, Outcome]
    hosts: tuple[HostAttempt, ...]
    plan: DomainPlan
    delivered_by: HostAttempt | None = None



def policy_text(plan: DomainPlan, host: HostPlan | None) -> str:
    """The TLS policy an attempt applied to a host, for the trace: "dane", "mta-sts
    enforce id=… (cached)", "dane (mta-sts enforce id=…: DANE takes precedence)",
    "mta-sts testing id=…", "opportunistic", …"""
    st = plan.sts
    sts = st.summary() if st is not None and st.applies else ""
    if host is None:
        return sts
    req = host.requirement
    if host.sts == "dane" or (req is TlsRequirement.DANE and sts):
        return f"dane ({sts}: DANE takes precedence)"
    if req is TlsRequirement.DANE:
        return "dane"
    if host.sts == "mismatch":
        return f"{sts}: MX host not in the policy"
    if host.sts in ("enforce", "testing"):
        return sts
    base = {TlsRequirement.ENCRYPT: "encrypt (TLSA, none usable)",
            TlsRequirement.MAY: "opportunistic", TlsRequirement.NONE: "cleartext (route)"}
    text = base.get(req, "unusable") if req is not None else "unusable"
    if st is not None and st.state not in ("policy", "none", "off", "route"):
        text += f"; mta-sts {st.state}: {st.detail}"[:300]
    return text


def tlsa_summary(host: HostPlan) -> str:
    if host.tlsa_base is None:
        if not host.addresses_secure:
            return "not looked up (insecure addresses)"
        return "none (authenticated denial or insecure)"
    usable = len(host.usable_tlsa)
    return (f"{host.tlsa_base}: {len(host.tlsa)} record(s), {usable} usable"
            + ("" if usable else " (TLS required, no authentication)"))
