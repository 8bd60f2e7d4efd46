"""RFC 8460 pure parts: the _smtp._tls record, what an attempt adds, periods, the report
JSON (validated against a schema written from §4), the report message (parsed back)."""

from __future__ import annotations

import base64
import email
import email.policy
import gzip
import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.dane.policy import DomainPlan, HostAddress, HostPlan, PlanAction
from relay.delivery.attempt import relaxed_plan
from relay.delivery.trace import HostAttempt
from relay.model import DnsAnswer, Rcode, TlsaRecord, TlsRequirement
from relay.store import periods
from relay.tlsrpt import report as rpt
from relay.tlsrpt.mail import build_mail
from relay.tlsrpt.reporter import DkimSigner
from tests.support.tlsrpt_check import validate_report

# --- the record ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "mailto", "https"), [
    ("v=TLSRPTv1; rua=mailto:tls@example.com", ("tls@example.com",), ()),
    ("v=TLSRPTv1;rua=https://r.example.com/v1", (), ("https://r.example.com/v1",)),
    ("v=TLSRPTv1 ; rua=mailto:a@x.example , https://r.example/p?q=1 ;",
     ("a@x.example",), ("https://r.example/p?q=1",)),
    ("v=TLSRPTv1; rua=mailto:a@x.example,mailto:b@y.example", ("a@x.example", "b@y.example"),
     ()),
    ("v=TLSRPTv1; ext.1=yes; rua=mailto:a@x.example", ("a@x.example",), ()),  # unknown field
    ("v=TLSRPTv1; rua=mailto:odd%2Cname@x.example", ("odd,name@x.example",), ()),
    ("v=TLSRPTv1; rua=mailto:a@x.example,ftp://x.example/r", ("a@x.example",), ()),
])
def test_valid_records(text: str, mailto: tuple[str, ...], https: tuple[str, ...]) -> None:
    got = rpt.parse_record(text)
    assert isinstance(got, rpt.ReportingPolicy), got
    assert got.mailto == mailto and got.https == https


@pytest.mark.parametrize(("text", "why"), [
    ("v=TLSRPTv2; rua=mailto:a@x.example", "does not start"),
    ("v=tlsrptv1; rua=mailto:a@x.example", "does not start"),  # %s: case-sensitive
    ("v=TLSRPTv1 rua=mailto:a@x.example", "does not start"),
    ("v=TLSRPTv1;", "empty field"),
    ("v=TLSRPTv1;; rua=mailto:a@x.example", "empty field"),
    ("v=TLSRPTv1; ruf=mailto:a@x.example", "no rua"),
    ("v=TLSRPTv1; rua=mailto:a@x.example; rua=mailto:b@x.example", "twice"),
    ("v=TLSRPTv1; rua=mailto:not-an-address", "bad mailto"),
    ("v=TLSRPTv1; rua=https:///nohost", "bad https"),
    ("v=TLSRPTv1; rua=ftp://x.example/r", "no mailto: or https:"),
    ("v=TLSRPTv1; rua=mailto:a@x.example,", "empty URI"),
    ("v=TLSRPTv1; bad field; rua=mailto:a@x.example", "malformed field"),
])
def test_malformed_records(text: str, why: str) -> None:
    got = rpt.parse_record(text)
    assert isinstance(got, str) and why in got


def test_discovery_needs_exactly_one_tlsrpt_record() -> None:
    one = "v=TLSRPTv1; rua=mailto:a@x.example"
    assert rpt.discover([]).reason == "no TLSRPT record"
    assert rpt.discover(["v=spf1 -all"]).reason == "no TLSRPT record"
    found = rpt.discover(["v=spf1 -all", one])  # others are discarded
    assert found.policy is not None and found.policy.destinations == ("mailto:a@x.example",)
    two = rpt.discover([one, "v=TLSRPTv1; rua=mailto:b@x.example"])
    assert two.policy is None and "2 TLSRPT records" in two.reason
    bad = rpt.discover(["v=TLSRPTv1; rua=gopher://x"])
    assert bad.policy is None and bad.reason.startswith("malformed TLSRPT record")
    assert rpt.record_name("MX.Example.COM.") == "_smtp._tls.mx.example.com"


# --- what an attempt adds -----------------------------------------------------------------

REC = TlsaRecord(3, 1, 1, bytes(32))


def host(name: str, *, base: str | None = None, req: TlsRequirement | None = TlsRequirement.DANE,
         code: str | None = None, ftype: str | None = None,
         lookups: tuple[DnsAnswer, ...] = ()) -> HostPlan:
    tlsa = (REC,) if base else ()
    return HostPlan(name, 10, 25, (HostAddress("192.0.2.1", True),), True, name,
                    (base or name,), base, tlsa, tlsa, req, code, "why", (name,), ftype, lookups)


def attempt(mx: str, security: str, ftype: str | None = None, **kw: str) -> HostAttempt:
    return HostAttempt(mx=mx, ip=kw.pop("ip", "192.0.2.1"), dnssec="secure", tlsa="",
                       security=security, failure_type=ftype, local_ip="198.51.100.7", **kw)


def plan(*hosts: HostPlan, route: str | None = None) -> DomainPlan:
    return DomainPlan("example.com", PlanAction.DELIVER, None, "", hosts, route=route)


def test_dane_results_go_to_the_tlsa_base_domain() -> None:
    mx = host("mx.example.com", base="mx.example.com")
    got = rpt.session_results("example.com", plan(mx), [
        attempt("mx.example.com", "dane-authenticated"),
        attempt("mx.example.com", "failed", "tlsa-invalid", dane="failed: no record matches"),
    ])
    assert [(r.policy_domain, r.policy_type, r.result_type) for r in got] == [
        ("mx.example.com", "tlsa", ""), ("mx.example.com", "tlsa", "tlsa-invalid")]
    assert got[0].policy_strings == (str(REC),)
    assert got[1].sending_ip == "198.51.100.7" and got[1].receiving_ip == "192.0.2.1"
    assert got[1].detail == "no record matches"


def test_cname_expanded_base_is_the_policy_domain() -> None:
    mx = host("mx.example.com", base="real.hoster.example")
    got = rpt.session_results("example.com", plan(mx), [attempt("mx.example.com", "tls")])
    assert got[0].policy_domain == "real.hoster.example" and got[0].mx_host == "mx.example.com"


def test_bogus_tlsa_is_dnssec_invalid_at_the_base_that_failed() -> None:
    failed = DnsAnswer("_25._tcp.mx.example.com", "TLSA", Rcode.SERVFAIL, False,
                       dnssec_failure=True)
    mx = host("mx.example.com", req=None, code="4.7.324", ftype="dnssec-invalid",
              lookups=(failed,))
    got = rpt.session_results("example.com", plan(mx), [
        attempt("mx.example.com", "failed", "dnssec-invalid", ip="", reply="why")])
    assert got == [rpt.SessionResult("mx.example.com", "tlsa", (), "mx.example.com",
                                     "dnssec-invalid", "198.51.100.7", "", "why")]


def test_no_policy_results_go_to_the_recipient_domain() -> None:
    mx = host("mx.hoster.example", req=TlsRequirement.MAY)
    got = rpt.session_results("Example.COM", plan(mx), [
        attempt("mx.hoster.example", "tls"),
        attempt("mx.hoster.example", "plain", "starttls-not-supported"),
        attempt("mx.hoster.example", "failed", None),  # connection refused: not TLS
        attempt("unknown.example", "tls"),  # not in the plan
    ])
    assert [(r.policy_domain, r.policy_type, r.result_type) for r in got] == [
        ("example.com", "no-policy-found", ""),
        ("example.com", "no-policy-found", "starttls-not-supported")]


def test_dane_required_and_cleartext_routes() -> None:
    mandatory = host("mx.example.com", req=None, code="4.7.323", ftype="dane-required")
    got = rpt.session_results("example.com", plan(mandatory), [
        attempt("mx.example.com", "failed", "dane-required", ip="")])
    assert got[0].policy_type == "no-policy-found" and got[0].policy_domain == "mx.example.com"
    clear = host("hop.example.net", req=TlsRequirement.NONE)
    assert rpt.session_results("example.com", plan(clear, route="example.com"),
                               [attempt("hop.example.net", "plain")]) == []
    may = host("hop.example.net", req=TlsRequirement.MAY)  # a route without TLSA
    assert rpt.session_results("example.com", plan(may, route="example.com"),
                               [attempt("hop.example.net", "tls")]) == []
    dane_hop = host("hop.example.net", base="hop.example.net")
    assert len(rpt.session_results("example.com", plan(dane_hop, route="example.com"),
                                   [attempt("hop.example.net", "tls")])) == 1


def test_relaxed_plan_for_report_mail() -> None:
    bogus = host("mx1.example.com", req=None, code="4.7.324", ftype="dnssec-invalid")
    dane_host = host("mx2.example.com", base="mx2.example.com")
    deferred = DomainPlan("example.com", PlanAction.DEFER, "4.7.324", "no usable host",
                          (bogus,))
    relaxed = relaxed_plan(deferred)
    assert relaxed.action is PlanAction.DELIVER and relaxed.hosts[0].requirement \
        is TlsRequirement.MAY
    same = relaxed_plan(plan(dane_host))
    assert same.hosts[0].requirement is TlsRequirement.DANE  # DANE is still tried first
    no_addr = HostPlan("mx.example.com", 10, 25, (), False, "", (), None, (), (), None,
                       "4.7.324", "bogus A", (), "dnssec-invalid")
    mx_bogus = DomainPlan("example.com", PlanAction.DEFER, "4.7.324", "bogus", (no_addr,))
    assert relaxed_plan(mx_bogus).action is PlanAction.DEFER  # nothing to connect to


# --- periods ---------------------------------------------------------------------------


def test_periods_are_aligned_and_follow_each_other() -> None:
    day = 86400.0
    t = datetime(2026, 3, 5, 13, 7, tzinfo=UTC).timestamp()
    begin, end = periods.new_period(t, day, None)
    assert rpt.rfc3339(begin) == "2026-03-05T00:00:00Z" and end - begin == day
    assert periods.new_period(t, day, t - 100) == (t - 100, begin + day)  # after a cut
    assert periods.new_period(t, day, begin - day) == (begin, begin + day)
    assert periods.new_period(10.5, 3.0, None) == (9.0, 12.0)
    assert periods.cut_end(10.2) == 11.0 and periods.cut_end(10.0) == 10.0


# --- the report ----------------------------------------------------------------------------


def results() -> list[rpt.SessionResult]:
    d = "mx.example.com"
    s = (str(REC),)
    return [
        rpt.SessionResult(d, "tlsa", s, d, count=7),
        rpt.SessionResult(d, "tlsa", s, d, "tlsa-invalid", "198.51.100.7", "192.0.2.1",
                          "no match", count=2),
        rpt.SessionResult(d, "tlsa", s, d, "tlsa-invalid", "198.51.100.7", "192.0.2.2",
                          count=1),
        rpt.SessionResult(d, "tlsa", s, d, "starttls-not-supported", "198.51.100.7",
                          "192.0.2.1", count=3),
        rpt.SessionResult(d, "tlsa", (), "mx2.example.com", "dnssec-invalid", count=1),
    ]


def test_report_counts_and_shape() -> None:
    rid = rpt.report_id("mx.example.com", 1000, 87400, "relay.example.org")
    report = rpt.build_report(policy_domain="MX.example.com.", results=results(), begin=1000,
                              end=87400, organization="Example Org",
                              contact="postmaster@relay.example.org", rid=rid)
    validate_report(report)
    assert report["report-id"] == "1000.87400.mx.example.com@relay.example.org"
    assert report["date-range"] == {"start-datetime": "1970-01-01T00:16:40Z",
                                    "end-datetime": "1970-01-02T00:16:40Z"}
    assert rpt.totals(report) == (7, 7)
    first, second = report["policies"]
    assert first["policy"] == {"policy-type": "tlsa", "policy-domain": "mx.example.com",
                               "mx-host": ["mx2.example.com"]}
    assert first["summary"] == {"total-successful-session-count": 0,
                                "total-failure-session-count": 1}
    assert second["policy"]["policy-string"] == [str(REC)]
    assert second["summary"]["total-failure-session-count"] == 6
    details = {(d["result-type"], d["receiving-ip"]): d for d in second["failure-details"]}
    assert details[("tlsa-invalid", "192.0.2.1")]["failed-session-count"] == 2
    assert details[("tlsa-invalid", "192.0.2.1")]["failure-reason-code"] == "no match"
    assert details[("starttls-not-supported", "192.0.2.1")]["sending-mta-ip"] == \
        "198.51.100.7"
    data = rpt.compress(rpt.encode(report), mtime=87400)
    assert data == rpt.compress(rpt.encode(report), mtime=87400)  # reproducible
    assert json.loads(gzip.decompress(data)) == report


def test_a_result_of_another_domain_is_refused() -> None:
    with pytest.raises(ValueError):
        rpt.build_report(policy_domain="other.example", results=results(), begin=0, end=1,
                         organization="o", contact="c", rid="r@x")


def test_schema_catches_a_bad_report() -> None:
    report = rpt.build_report(policy_domain="mx.example.com", results=results(), begin=0,
                              end=86400, organization="o", contact="c", rid="r@x")
    report["policies"][0]["summary"]["total-successful-session-count"] = -1
    del report["report-id"]
    with pytest.raises(AssertionError, match="report-id"):
        validate_report(report)


def test_filename_and_subject() -> None:
    assert rpt.filename("Relay.Example.org", "mx.example.com", 1000, 87400) == \
        "relay.example.org!mx.example.com!1000!87400.json.gz"
    rid = rpt.report_id("mx.example.com", 0, 86400, "relay.example.org")
    subject = rpt.subject("mx.example.com", "relay.example.org", rid)
    # §5.3 ABNF: "Report" FWS "Domain:" FWS domain FWS "Submitter:" FWS domain FWS
    #            "Report-ID:" FWS "<" id-left "@" id-right ">"
    assert re.fullmatch(r"Report Domain: \S+ Submitter: \S+ Report-ID: <[^@<> ]+@[^@<> ]+>",
                        subject)


# --- the message ---------------------------------------------------------------------------


def rsa_key(tmp_path: Path) -> tuple[Path, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "dkim.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, b"v=DKIM1; k=rsa; s=tlsrpt; p=" + base64.b64encode(pub)


def test_report_message_parses_back_and_dkim_verifies(tmp_path: Path) -> None:
    report = rpt.build_report(policy_domain="mx.example.com", results=results(), begin=0,
                              end=86400, organization="o", contact="c",
                              rid=rpt.report_id("mx.example.com", 0, 86400, "relay.test"))
    gz = rpt.compress(rpt.encode(report), mtime=86400)
    raw = build_mail(report=report, report_gz=gz, policy_domain="mx.example.com",
                     submitter="relay.test", from_address="tlsrpt-noreply@relay.test",
                     to=["a@reports.example", "b@reports.example"], begin=0, end=86400,
                     now=datetime(2026, 1, 2, 0, 30, tzinfo=UTC))
    assert all(len(line) <= 998 for line in raw.split(b"\r\n")) and raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "mx.example.com"
    assert msg["TLS-Report-Submitter"] == "relay.test"
    assert str(msg["Subject"]) == ("Report Domain: mx.example.com Submitter: relay.test "
                                   "Report-ID: <0.86400.mx.example.com@relay.test>")
    text, attachment = list(msg.iter_parts())
    assert text.get_content_type() == "text/plain"
    assert "7 successful and 7 failed" in " ".join(text.get_content().split())
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_filename() == "relay.test!mx.example.com!0!86400.json.gz"
    assert json.loads(gzip.decompress(attachment.get_content())) == report

    key_file, record = rsa_key(tmp_path)
    signed = DkimSigner(key_file, "rpt", "relay.test").sign(raw)
    assert signed.startswith(b"DKIM-Signature:") and signed.endswith(raw)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"rpt._domainkey.relay.test."
        return record

    assert dkim.verify(signed, dnsfunc=dns, tlsrpt="strict")
    tampered = signed.replace(b"TLS-Report-Domain: mx.example.com",
                              b"TLS-Report-Domain: mx.evil.example")
    assert not dkim.verify(tampered, dnsfunc=dns, tlsrpt="strict")
    sig = signed.split(b"\r\n\r\n", 1)[0].decode()
    assert "tls-report-domain" in sig.lower() and " l=" not in sig


def test_pure_modules_import_no_io() -> None:
    code = ("import sys; import relay.tlsrpt.report, relay.tlsrpt.mail; "
            "bad = {'socket', 'ssl', 'asyncio', 'aiosqlite'} & set(sys.modules); "
            "print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# --- MTA-STS results (RFC 8460 policy type "sts") ------------------------------------------


def _sts_plan(mode: str, failure_type: str | None = None, detail: str = "") -> DomainPlan:
    from relay.model import StsState

    lines = ("version: STSv1", f"mode: {mode}", "mx: *.sts.example", "max_age: 86400")
    st = StsState("policy", mode, "42", ("*.sts.example",), lines, "cached", 86400, None,
                  failure_type, detail, mode)

    def host(name: str, sts: str, req: TlsRequirement | None) -> HostPlan:
        return HostPlan(name, 10, 25, (HostAddress("192.0.2.1", False),), False, name, (),
                        None, (), (), req, None if req else "4.7.343", "", (name,),
                        None if req else "validation-failure", (), sts)

    return DomainPlan("sts.example", PlanAction.DELIVER, None, "", hosts=(
        host("mx1.sts.example", "enforce", TlsRequirement.STS),
        host("mx.other.example", "mismatch", None)), sts=st)


def test_sts_sessions_are_reported_under_the_policy() -> None:
    plan = _sts_plan("enforce", "sts-policy-fetch-error", "mta-sts.sts.example: HTTP 500")
    hosts = [
        HostAttempt("mx.other.example", "", "insecure", "", code="4.7.343",
                    security="failed", failure_type="validation-failure",
                    reply="not in the policy"),
        HostAttempt("mx1.sts.example", "192.0.2.1", "insecure", "", security="failed",
                    failure_type="certificate-host-mismatch", local_ip="192.0.2.9",
                    dane="failed: names do not match", code="4.7.342"),
        HostAttempt("mx1.sts.example", "192.0.2.1", "insecure", "",
                    security="sts-authenticated"),
    ]
    results = rpt.session_results("STS.example", plan, hosts)
    assert [r.policy_type for r in results] == ["sts"] * 4
    assert {r.policy_domain for r in results} == {"sts.example"}
    assert results[0].result_type == "sts-policy-fetch-error" and results[0].mx_host == ""
    assert [r.result_type for r in results[1:]] == [
        "validation-failure", "certificate-host-mismatch", ""]
    assert results[1].policy_strings[1] == "mode: enforce"
    report = rpt.build_report(policy_domain="sts.example", results=results, begin=0,
                              end=86400, organization="o", contact="c", rid="r@x")
    validate_report(report)
    (pol,) = report["policies"]  # one entry for the policy, whatever the MX host
    assert pol["policy"]["policy-type"] == "sts"
    assert pol["policy"]["mx-host"] == ["*.sts.example"]
    assert pol["policy"]["policy-string"][0] == "version: STSv1"
    assert pol["summary"] == {"total-successful-session-count": 1,
                              "total-failure-session-count": 3}
    types = {d["result-type"] for d in pol["failure-details"]}
    assert types == {"sts-policy-fetch-error", "validation-failure",
                     "certificate-host-mismatch"}


def test_sts_testing_reports_a_delivered_mismatch_and_dane_hosts_stay_tlsa() -> None:
    plan = _sts_plan("testing")
    mism = replace_host(plan, "mx.other.example", sts="mismatch",
                        requirement=TlsRequirement.MAY, unusable_code=None)
    hosts = [HostAttempt("mx.other.example", "192.0.2.1", "insecure", "", security="tls")]
    (r,) = rpt.session_results("sts.example", mism, hosts)
    assert r.policy_type == "sts" and r.result_type == "validation-failure"
    assert "not in the MTA-STS policy" in r.detail
    dane_host = replace_host(plan, "mx1.sts.example", sts="dane",
                             requirement=TlsRequirement.DANE, tlsa_base="mx1.sts.example",
                             tlsa=(TlsaRecord(3, 1, 1, b"\x01" * 32),))
    (d,) = rpt.session_results("sts.example", dane_host, [HostAttempt(
        "mx1.sts.example", "192.0.2.1", "secure", "", security="dane-authenticated")])
    assert d.policy_type == "tlsa" and d.policy_domain == "mx1.sts.example"


def replace_host(plan: DomainPlan, name: str, **kw: object) -> DomainPlan:
    from dataclasses import replace

    return replace(plan, hosts=tuple(replace(h, **kw) if h.name == name else h  # type: ignore[arg-type]
                                     for h in plan.hosts))
