"""The trace of one delivery attempt, as values: each address tried (HostAttempt) and
what the attempt decided (AttemptReport). The scheduler stores it, TLS reporting counts
it, metrics and the log show it.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.dane.policy import DomainPlan, HostPlan
from relay.model import Outcome
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


@dataclass(frozen=True)
class AttemptReport:
    """What one attempt decided for every recipient, and the hosts it tried."""

    outcomes: dict[str, Outcome]
    hosts: tuple[HostAttempt, ...]
    plan: DomainPlan
    delivered_by: HostAttempt | None = None



def tlsa_summary(host: HostPlan) -> str:
    if host.tlsa_base is None:
        if not host.addresses_secure:
            return "not looked up (insecure addresses)"
        return "none (authenticated denial or insecure)"
    usable = len(host.usable_tlsa)
    return (f"{host.tlsa_base}: {len(host.tlsa)} record(s), {usable} usable"
            + ("" if usable else " (TLS required, no authentication)"))
