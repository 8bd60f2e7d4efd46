"""SMTP TLS reporting (RFC 8460): what one attempt adds to a report, the `_smtp._tls`
record, periods, and the aggregate report itself.

Pure: values in, values out; no I/O, no clock (times are passed in). The I/O around it
(recording in the store, discovery, sending) lives in relay.tlsrpt.reporter.

Which domain a result is reported to (RFC 8460 §1.3 "Policy Domain", §3): for DANE the
policy domain is the TLSA base domain of the receiving host (RFC 7672 §2.2.3), normally
the MX host name, not the recipient domain; its TLSRPT record is looked up at
`_smtp._tls.<TLSA base domain>`. A host without a DANE policy ("no-policy-found") is
reported to the recipient domain, where an MTA-STS policy would have been defined.
Under an MTA-STS policy (RFC 8461) the policy domain is the recipient domain, the policy
type `sts`, the policy strings the policy's lines and `mx-host` its mx patterns; a host
that DANE decided (usable TLSA beside the policy) stays a `tlsa` result. A policy that
could not be fetched adds one `sts-policy-fetch-error` / `sts-policy-invalid` /
`sts-webpki-invalid` result per attempt.

One result per host tried (the attempt's trace):
- a session that negotiated TLS (DANE-authenticated, or TLS where no authentication
  was due) is a success;
- a host with a known RFC 8460 result type is a failure of that type (a DANE mismatch,
  STARTTLS missing where TLSA demands it, bogus TLSA, a cleartext fall-back of
  opportunistic TLS, ...), also when no connection was made (dnssec-invalid);
- anything else (connection refused, a 4xx greeting, a dropped connection) says nothing
  about TLS and is not counted; neither is cleartext by configuration (route tls "none"),
  nor a route's next hop without TLSA (it is not the recipient domain's server).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from relay.model import KIND_TLSRPT, SessionResult, TlsRequirement

if TYPE_CHECKING:  # types only: relay.delivery.attempt does I/O
    from relay.dane.policy import DomainPlan, HostPlan
    from relay.delivery.trace import HostAttempt

KIND = KIND_TLSRPT  # Envelope.extra["kind"] of report mail: DANE relaxed, never counted
POLICY_TLSA = "tlsa"
POLICY_STS = "sts"
STS_FETCH_TYPES = ("sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")
NO_POLICY = "no-policy-found"
RESULT_TYPES = frozenset({
    # negotiation failures (§4.3.1), DANE policy failures (§4.3.2), general (§4.3.3)
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure",
    "tlsa-invalid", "dnssec-invalid", "dane-required",
    "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
})
MAX_DETAIL = 200  # characters of failure-reason-code
MEDIA_TYPE_GZIP = "application/tlsrpt+gzip"
MEDIA_TYPE_JSON = "application/tlsrpt+json"


# --- what one attempt adds ------------------------------------------------------------


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _failed_tlsa_base(host: HostPlan) -> str:
    """The TLSA base whose lookup failed: the name of the last TLSA query, else the host."""
    for answer in reversed(host.lookups):
        if answer.rdtype == "TLSA":
            labels = answer.qname.rstrip(".").split(".", 2)
            if len(labels) == 3 and labels[0].startswith("_") and labels[1] == "_tcp":
                return _norm(labels[2])
    return _norm(host.name)


def _policy(domain: str, host: HostPlan, failure_type: str | None, plan: DomainPlan
            ) -> tuple[str, str, tuple[str, ...]]:
    """(policy type, policy domain, policy strings) of a host tried."""
    if host.sts in ("enforce", "testing", "mismatch") and plan.sts is not None:
        return POLICY_STS, _norm(domain), plan.sts.lines
    if host.tlsa_base:
        return POLICY_TLSA, _norm(host.tlsa_base), tuple(str(r) for r in host.tlsa)
    if failure_type == "dnssec-invalid":
        return POLICY_TLSA, _failed_tlsa_base(host), ()
    if failure_type == "dane-required":
        return NO_POLICY, _norm(host.name), ()
    return NO_POLICY, _norm(domain), ()


def _detail(h: HostAttempt) -> str:
    text = h.dane[len("failed: "):] if h.dane.startswith("failed: ") else h.reply
    text = " ".join(text.split())
    return text[:MAX_DETAIL]


def session_results(domain: str, plan: DomainPlan, hosts: Iterable[HostAttempt]
                    ) -> list[SessionResult]:
    """The results one delivery attempt adds (see the module doc for what counts)."""
    by_name = {h.name: h for h in plan.hosts}
    out: list[SessionResult] = []
    st = plan.sts
    if st is not None and st.failure_type in STS_FETCH_TYPES:
        out.append(SessionResult(policy_domain=_norm(domain), policy_type=POLICY_STS,
                                 policy_strings=st.lines if st.state == "policy" else (),
                                 mx_host="", result_type=st.failure_type or "",
                                 detail=" ".join(st.detail.split())[:MAX_DETAIL]))
    for h in hosts:
        host = by_name.get(h.mx)
        if host is None or host.requirement is TlsRequirement.NONE:
            continue
        ftype = h.failure_type if h.failure_type in RESULT_TYPES else None
        if ftype is None and host.sts == "mismatch" and h.security in ("tls", "plain"):
            ftype = "validation-failure"  # testing: delivered, but not in the policy
            h = replace(h, reply=f"MX host {host.name} not in the MTA-STS policy",
                        dane="")
        if ftype is None and h.security not in ("dane-authenticated", "sts-authenticated",
                                                "tls"):
            continue  # not a TLS result (connection refused, a loop, a dropped session)
        ptype, pdomain, strings = _policy(domain, host, ftype, plan)
        if plan.route and ptype != POLICY_TLSA:
            continue  # a configured next hop without DANE: not the domain's own server
        out.append(SessionResult(
            policy_domain=pdomain, policy_type=ptype, policy_strings=strings,
            mx_host=_norm(h.mx), result_type=ftype or "",
            sending_ip=h.local_ip if ftype else "",
            receiving_ip=h.ip if ftype else "",
            detail=_detail(h) if ftype else ""))
    return out


# --- the _smtp._tls record (§3) ---------------------------------------------------------

_VERSION = re.compile(r"^v=TLSRPTv1[ \t]*;")
_EXT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_EXT_VALUE = re.compile(r"^[\x21-\x3a\x3c\x3e-\x7e]+$")
_ADDRESS = re.compile(r"^[^@\s<>]+@[A-Za-z0-9.-]+$")


@dataclass(frozen=True)
class ReportingPolicy:
    """A parsed `v=TLSRPTv1` record: where reports go."""

    record: str
    mailto: tuple[str, ...]  # addresses
    https: tuple[str, ...]  # URLs
    ignored: tuple[str, ...] = ()  # URIs of other schemes

    @property
    def destinations(self) -> tuple[str, ...]:
        return tuple(f"mailto:{a}" for a in self.mailto) + self.https


@dataclass(frozen=True)
class Discovery:
    """The outcome of looking for a policy domain's record: a policy, or why there is none."""

    policy: ReportingPolicy | None
    reason: str = ""


def _split_fields(rest: str) -> list[str] | None:
    parts = rest.split(";")
    if parts and not parts[-1].strip(" \t"):
        parts = parts[:-1]  # one trailing delimiter is allowed
    fields = [p.strip(" \t") for p in parts]
    return None if not fields or any(not f for f in fields) else fields


def parse_record(text: str) -> ReportingPolicy | str:
    """Parse one TXT record (strings already joined) per the ABNF of RFC 8460 §3.
    Returns the policy, or the reason it is malformed."""
    m = _VERSION.match(text)
    if not m:
        return "does not start with v=TLSRPTv1;"
    fields = _split_fields(text[m.end():])
    if fields is None:
        return "empty field (stray \";\")"
    rua: str | None = None
    for f in fields:
        name, eq, value = f.partition("=")
        if not eq or not _EXT_NAME.match(name):
            return f"malformed field {f[:40]!r}"
        if name == "rua":
            if rua is not None:
                return "rua= given twice"
            rua = value
        elif not _EXT_VALUE.match(value):
            return f"malformed value of {name}="
    if rua is None:
        return "no rua= field"
    mailto: list[str] = []
    https: list[str] = []
    ignored: list[str] = []
    for uri in (u.strip(" \t") for u in rua.split(",")):
        if not uri:
            return "empty URI in rua="
        scheme, _, rest = uri.partition(":")
        scheme = scheme.lower()
        if scheme == "mailto":
            addr = unquote(rest.split("?", 1)[0])
            if not _ADDRESS.match(addr):
                return f"bad mailto address in {uri[:60]!r}"
            mailto.append(addr)
        elif scheme == "https":
            parts = urlsplit(uri)
            try:
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                return f"bad https URI {uri[:60]!r}"
            if not parts.hostname or " " in uri:
                return f"bad https URI {uri[:60]!r}"
            https.append(uri)
        else:
            ignored.append(uri)
    if not mailto and not https:
        return "no mailto: or https: URI in rua="
    return ReportingPolicy(text, tuple(mailto), tuple(https), tuple(ignored))


def discover(txts: Sequence[str]) -> Discovery:
    """From every TXT string at `_smtp._tls.<domain>`: records not starting with
    "v=TLSRPTv1;" are discarded; exactly one must remain (§3), and parse."""
    records = [t for t in txts if _VERSION.match(t)]
    if not records:
        return Discovery(None, "no TLSRPT record")
    if len(records) > 1:
        return Discovery(None, f"{len(records)} TLSRPT records (exactly one is needed)")
    parsed = parse_record(records[0])
    if isinstance(parsed, str):
        return Discovery(None, f"malformed TLSRPT record: {parsed}")
    return Discovery(parsed)


def record_name(policy_domain: str) -> str:
    return f"_smtp._tls.{_norm(policy_domain)}"


# --- the report (§4) --------------------------------------------------------------------


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def report_id(policy_domain: str, begin: float, end: float, submitter: str) -> str:
    """Unique per submitter, period and policy domain; in msg-id form (id-left@id-right)
    so that it fits the Subject of §5.3."""
    return f"{int(begin)}.{int(end)}.{_norm(policy_domain)}@{_norm(submitter)}"


def filename(submitter: str, policy_domain: str, begin: float, end: float) -> str:
    """§5.1: sender "!" policy-domain "!" begin-timestamp "!" end-timestamp ".json.gz"."""
    return f"{_norm(submitter)}!{_norm(policy_domain)}!{int(begin)}!{int(end)}.json.gz"


def subject(policy_domain: str, submitter: str, rid: str) -> str:
    """§5.3: Report Domain: <policy-domain> Submitter: <submitter> Report-ID: <<id>>."""
    return f"Report Domain: {_norm(policy_domain)} Submitter: {_norm(submitter)} " \
           f"Report-ID: <{rid}>"


def _policy_object(ptype: str, domain: str, strings: tuple[str, ...], mx: str
                   ) -> dict[str, Any]:
    obj: dict[str, Any] = {"policy-type": ptype}
    if strings:
        obj["policy-string"] = list(strings)
    obj["policy-domain"] = domain
    if ptype == POLICY_STS:  # the policy's mx patterns (RFC 8460 §4.4)
        patterns = [s.partition(":")[2].strip() for s in strings if s.startswith("mx:")]
        if patterns:
            obj["mx-host"] = patterns
    elif mx:
        obj["mx-host"] = [mx]
    return obj


def build_report(*, policy_domain: str, results: Iterable[SessionResult], begin: float,
                 end: float, organization: str, contact: str, rid: str) -> dict[str, Any]:
    """The report of one policy domain for one period, as a JSON-ready dict (§4.4).

    One `policies` entry per distinct (policy type, policy strings, MX host): a TLSA
    rollover or a second MX host of the same base is its own entry; an MTA-STS policy is
    one entry whatever the MX host (its failure details name the hosts). The date range is
    [begin, end): a day is 00:00:00Z to the next day's 00:00:00Z (§4.1 "00:00-24:00").
    """
    domain = _norm(policy_domain)
    groups: dict[tuple[str, tuple[str, ...], str], list[SessionResult]] = {}
    for r in results:
        if _norm(r.policy_domain) != domain:
            raise ValueError(f"result for {r.policy_domain} in the report of {domain}")
        mx = "" if r.policy_type == POLICY_STS else r.mx_host  # one entry per STS policy
        groups.setdefault((r.policy_type, tuple(r.policy_strings), mx), []).append(r)
    policies = []
    for (ptype, strings, mx), rows in sorted(groups.items()):
        ok = sum(r.count for r in rows if r.success)
        failed = [r for r in rows if not r.success]
        details: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        for r in failed:
            key = (r.result_type, r.sending_ip, r.mx_host, r.receiving_ip)
            d = details.get(key)
            if d is None:
                d = {"result-type": r.result_type}
                if r.sending_ip:
                    d["sending-mta-ip"] = r.sending_ip
                if r.mx_host:
                    d["receiving-mx-hostname"] = r.mx_host
                if r.receiving_ip:
                    d["receiving-ip"] = r.receiving_ip
                d["failed-session-count"] = 0
                details[key] = d
            d["failed-session-count"] += r.count
            if r.detail and "failure-reason-code" not in d:
                d["failure-reason-code"] = r.detail
        entry: dict[str, Any] = {
            "policy": _policy_object(ptype, domain, strings, mx),
            "summary": {"total-successful-session-count": ok,
                        "total-failure-session-count": sum(r.count for r in failed)},
        }
        if details:
            entry["failure-details"] = [details[k] for k in sorted(details)]
        policies.append(entry)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": rfc3339(begin), "end-datetime": rfc3339(end)},
        "contact-info": contact,
        "report-id": rid,
        "policies": policies,
    }


def encode(report: dict[str, Any]) -> bytes:
    """UTF-8 JSON of a report."""
    return json.dumps(report, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def compress(data: bytes, *, mtime: float) -> bytes:
    """gzip (§5.2) with a fixed mtime, so the same report gives the same bytes."""
    return gzip.compress(data, mtime=int(mtime))


def totals(report: dict[str, Any]) -> tuple[int, int]:
    """(successful, failed) sessions of a report, over all its policies."""
    ok = sum(p["summary"]["total-successful-session-count"] for p in report["policies"])
    bad = sum(p["summary"]["total-failure-session-count"] for p in report["policies"])
    return ok, bad
