"""End to end: TLS reporting (RFC 8460) with `relay serve` as a subprocess, a real
validating Unbound over signed zones that publish `_smtp._tls` records, real aiosmtpd
destinations, and loopback HTTPS collectors with a test CA.

Periods are 3 s, sent at once when they end (max_delay 0). The test makes a known set of
sessions (DANE successes, a TLSA mismatch, STARTTLS missing where TLSA demands it, bogus
TLSA, cleartext where TLS was only opportunistic, opportunistic TLS), ends the open period
with `relay tlsrpt send --now`, and checks that the reports received — by mail through
the relay's own queue (to a domain whose DANE is broken) and by HTTPS POST — validate
against the RFC 8460 §4 schema and count exactly those sessions, per policy domain.
"""

from __future__ import annotations

import base64
import email
import email.policy
import gzip
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.config import DnsConfig
from relay.dns.resolve import Resolver
from relay.tlsrpt.reporter import TlsReporter
from tests.support.certs import Issued, make_ca, make_leaf, server_context
from tests.support.dnsbed import DnsBed
from tests.support.e2e import delivering_relay, submit
from tests.support.relayproc import RelayProc
from tests.support.smtpd import Destination, shared_port
from tests.support.tlsrpt_check import validate_report

IP = {name: f"127.25.84.{i}" for i, name in enumerate(
    ["ok", "mismatch", "notls", "bogus", "plain", "nopol", "reports", "collector",
     "untrusted", "senderbox"], start=1)}
PORT = shared_port([IP[n] for n in IP if n not in ("collector", "untrusted")])
SUBMITTER = "relay.test"
RUA = "rpt@reports.test"

CA = make_ca("TLSRPT E2E Root")
INTER = make_ca("TLSRPT E2E Intermediate", issuer=CA)
CERTS = {n: make_leaf([f"mx.{n}.test"], issuer=INTER) for n in IP}
OTHER = make_leaf(["someone.else.test"])
WEB_CA = make_ca("TLSRPT Collector CA")
ROGUE_CA = make_ca("Not Trusted CA")

# What the test sends, and what each policy domain's reports must count:
# (policy domain, policy type) -> {"": successes, result type: failures}
SENDS = {"ok.test": 3, "mismatch.test": 2, "notls.test": 1, "bogus.test": 1, "plain.test": 2,
         "nopol.test": 2}
EXPECTED = {
    "mx.ok.test": ("tlsa", {"": 3}),
    "mx.mismatch.test": ("tlsa", {"tlsa-invalid": 2}),
    "mx.notls.test": ("tlsa", {"starttls-not-supported": 1}),
    "mx.bogus.test": ("tlsa", {"dnssec-invalid": 1}),
    "plain.test": ("no-policy-found", {"starttls-not-supported": 2}),
    "nopol.test": ("no-policy-found", {"": 2}),
}


def tlsa311(cert: Issued) -> str:
    return "3 1 1 " + cert.tlsa_data(1, 1).hex()


# --- HTTPS collectors ---------------------------------------------------------------------


@dataclass
class Collector:
    """A loopback HTTPS server that keeps every POST (path, headers, body)."""

    ip: str
    leaf: Issued
    chain: list[Issued]
    posts: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> Collector:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with owner.cond:
                    owner.posts.append((self.path, dict(self.headers.items()), body))
                    owner.cond.notify_all()
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((self.ip, 0), Handler)
        ctx = server_context(self.leaf, self.chain)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture(scope="module")
def collectors() -> Iterator[dict[str, Collector]]:
    made = {
        "collector": Collector(IP["collector"], make_leaf(["collector.test"], issuer=WEB_CA),
                               []).start(),
        "untrusted": Collector(IP["untrusted"],
                               make_leaf(["untrusted.test"], issuer=ROGUE_CA), []).start(),
    }
    yield made
    for c in made.values():
        c.stop()


# --- the world ------------------------------------------------------------------------------


def host(bed: DnsBed, zone: str, ip: str, *, tlsa: str | None = None,
         rpt_at_mx: str | None = None, rpt_at_domain: str | None = None) -> None:
    z = bed.zone(zone)
    z.add("@", "MX", f"10 mx.{zone}.").add("mx", "A", ip)
    if tlsa:
        z.add(f"_{PORT}._tcp.mx", "TLSA", tlsa)
    if rpt_at_mx:
        z.add("_smtp._tls.mx", "TXT", f'"{rpt_at_mx}"')
    if rpt_at_domain:
        z.add("_smtp._tls", "TXT", f'"{rpt_at_domain}"')


def world(bed: DnsBed, c: dict[str, Collector]) -> None:
    https = f"https://collector.test:{c['collector'].port}/v1/tlsrpt"
    rogue = f"https://untrusted.test:{c['untrusted'].port}/tlsrpt"
    mail = f"v=TLSRPTv1; rua=mailto:{RUA}"
    host(bed, "ok.test", IP["ok"], tlsa=tlsa311(CERTS["ok"]),
         rpt_at_mx=f"v=TLSRPTv1; rua=mailto:{RUA},{https},{rogue}",
         rpt_at_domain="v=TLSRPTv1; rua=mailto:wrong-domain@reports.test")
    host(bed, "mismatch.test", IP["mismatch"], tlsa=tlsa311(OTHER), rpt_at_mx=mail)
    host(bed, "notls.test", IP["notls"], tlsa=tlsa311(CERTS["notls"]), rpt_at_mx=mail)
    host(bed, "bogus.test", IP["bogus"], tlsa=tlsa311(CERTS["bogus"]), rpt_at_mx=mail)
    bed.zone("bogus.test").break_rrsig(f"_{PORT}._tcp.mx", "TLSA")
    host(bed, "plain.test", IP["plain"], rpt_at_domain=f"v=TLSRPTv1;rua={https}")
    host(bed, "nopol.test", IP["nopol"], rpt_at_domain=mail)
    # Where mail reports go: its own DANE is broken (the TLSA names another key), and it
    # asks for reports too; its sessions with report mail must never be counted.
    host(bed, "reports.test", IP["reports"], tlsa=tlsa311(OTHER), rpt_at_mx=mail)
    host(bed, "senderbox.test", IP["senderbox"])
    bed.zone("collector.test").add("@", "A", IP["collector"])
    bed.zone("untrusted.test").add("@", "A", IP["untrusted"])
    d = bed.zone("disc.test")
    one = "v=TLSRPTv1; rua=mailto:one@disc.test"
    d.add("_smtp._tls.one", "TXT", f'"{one}"')
    d.add("_smtp._tls.two", "TXT", f'"{one}"').add("_smtp._tls.two", "TXT",
                                                   '"v=TLSRPTv1; rua=mailto:two@disc.test"')
    d.add("_smtp._tls.bad", "TXT", '"v=TLSRPTv1; rua=ftp://disc.test/r"')
    d.add("_smtp._tls.other", "TXT", '"v=spf1 -all"').add("_smtp._tls.other", "TXT",
                                                          f'"{one}"')
    d.add("_smtp._tls.split", "TXT", '"v=TLSRPTv1; rua=mail" "to:split@disc.test"')
    d.add("_smtp._tls.broken", "TXT", f'"{one}"')
    d.break_rrsig("_smtp._tls.broken", "TXT")


@pytest.fixture(scope="module")
def dnsbed(collectors: dict[str, Collector],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsBed]:
    bed = DnsBed(tmp_path_factory.mktemp("dnsbed"), nonvalidating=False)
    world(bed, collectors)
    bed.start()
    try:
        yield bed
    finally:
        bed.stop()


@pytest.fixture(scope="module")
def dests() -> Iterator[dict[str, Destination]]:
    chain = [INTER]
    made = {
        "ok": Destination(IP["ok"], PORT, tls=(CERTS["ok"], chain)),
        "mismatch": Destination(IP["mismatch"], PORT, tls=(CERTS["mismatch"], chain)),
        "notls": Destination(IP["notls"], PORT, starttls=False),
        "bogus": Destination(IP["bogus"], PORT, tls=(CERTS["bogus"], chain)),
        "plain": Destination(IP["plain"], PORT),  # no certificate: no STARTTLS
        "nopol": Destination(IP["nopol"], PORT, tls=(CERTS["nopol"], chain)),
        "reports": Destination(IP["reports"], PORT, tls=(CERTS["reports"], chain)),
        "senderbox": Destination(IP["senderbox"], PORT),
    }
    for d in made.values():
        d.start()
    yield made
    for d in made.values():
        d.stop()


@dataclass(frozen=True)
class Dkim:
    key_file: Path
    record: bytes

    def dns(self, name: bytes, timeout: int = 5) -> bytes:
        assert name == b"rpt._domainkey.relay.test.", name
        return self.record


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> Dkim:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("dkim") / "rpt.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return Dkim(path, b"v=DKIM1; k=rsa; s=tlsrpt; p=" + base64.b64encode(pub))


@pytest.fixture(scope="module")
def relay(dnsbed: DnsBed, dests: dict[str, Destination], dkim_key: Dkim,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProc]:
    work = tmp_path_factory.mktemp("relay-tlsrpt")
    ca_file = work / "collector-ca.pem"
    ca_file.write_bytes(WEB_CA.pem)
    with delivering_relay(
        work, dnsbed.nameserver, PORT, listener={"port": PORT},
        delivery={"retry_schedule": ["1h"], "max_lifetime": "2h"},
        tlsrpt={"enabled": True, "interval": "3s", "max_delay": 0,
                "retry_interval": "1s", "retry_lifetime": "3s", "https_timeout": "5s",
                "https_ca_file": str(ca_file), "organization_name": "Relay Test Org",
                "dkim_key_file": str(dkim_key.key_file), "dkim_selector": "rpt"},
    ) as proc:
        yield proc


# --- helpers --------------------------------------------------------------------------------


def first_outcome(relay: RelayProc, qid: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in ("delivered", "deferred", "bounced"):
            found = relay.events(name, id=qid)
            if found:
                return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no outcome for {qid}:\n" + "\n".join(relay.lines[-30:]))


@dataclass(frozen=True)
class MailReport:
    message: Any
    raw: bytes
    report: dict[str, Any]


def mail_reports(dests: dict[str, Destination]) -> list[MailReport]:
    out = []
    for m in list(dests["reports"].messages):
        msg = email.message_from_bytes(m.body, policy=email.policy.default)
        part = next(p for p in msg.walk()
                    if p.get_content_type() == "application/tlsrpt+gzip")
        out.append(MailReport(msg, m.body, json.loads(gzip.decompress(part.get_content()))))
    return out


def https_reports(c: Collector) -> list[dict[str, Any]]:
    with c.cond:
        posts = list(c.posts)
    return [json.loads(gzip.decompress(body)) for _, _, body in posts]


def counts(reports: list[dict[str, Any]]) -> dict[str, tuple[str, dict[str, int]]]:
    """{policy domain: (policy type, {"": successes, result type: failures})} summed."""
    out: dict[str, tuple[str, dict[str, int]]] = {}
    for rep in reports:
        for pol in rep["policies"]:
            domain = pol["policy"]["policy-domain"]
            ptype, tally = out.setdefault(domain, (pol["policy"]["policy-type"], {}))
            assert ptype == pol["policy"]["policy-type"]
            ok = pol["summary"]["total-successful-session-count"]
            if ok:
                tally[""] = tally.get("", 0) + ok
            failed = 0
            for d in pol.get("failure-details", []):
                tally[d["result-type"]] = tally.get(d["result-type"], 0) + \
                    d["failed-session-count"]
                failed += d["failed-session-count"]
            assert failed == pol["summary"]["total-failure-session-count"]
    return out


def wait_for(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


# --- the tests ------------------------------------------------------------------------------


def test_reports_count_exactly_the_sessions_made(
        relay: RelayProc, dests: dict[str, Destination],
        collectors: dict[str, Collector], dkim_key: Dkim) -> None:
    qids = {}
    for domain, n in SENDS.items():
        for i in range(n):
            qids[f"{domain}#{i}"] = submit(relay, [f"bob{i}@{domain}"])
    for key, qid in qids.items():
        ev = first_outcome(relay, qid)
        assert ev["event"] == ("delivered" if key.startswith(("ok.", "nopol.", "plain."))
                               else "deferred"), (key, ev)

    # The sessions the relay itself logged agree with what the test meant to make.
    attempts = [e for e in relay.events("attempt") if e.get("id") in qids.values()]
    assert len(attempts) == sum(SENDS.values())

    r = relay.cli("tlsrpt", "send", "--now", "--json", check=False)
    assert r.returncode in (0, 1), r.stderr
    mail_domains = {d for d in EXPECTED if d != "plain.test"}

    def complete() -> bool:
        got = counts([m.report for m in mail_reports(dests)])
        web = counts(https_reports(collectors["collector"]))
        return ({d: got.get(d) for d in mail_domains} == {d: EXPECTED[d] for d in mail_domains}
                and web.get("plain.test") == EXPECTED["plain.test"]
                and web.get("mx.ok.test") == EXPECTED["mx.ok.test"])

    assert wait_for(complete), (
        f"mail: {counts([m.report for m in mail_reports(dests)])}\n"
        f"https: {counts(https_reports(collectors['collector']))}\n"
        + "\n".join(relay.lines[-40:]))

    mails = mail_reports(dests)
    web = https_reports(collectors["collector"])
    for rep in [m.report for m in mails] + web:
        validate_report(rep)
        assert rep["organization-name"] == "Relay Test Org"
        assert rep["contact-info"] == "postmaster@relay.test"
    # No session was counted twice, and report mail was never counted at all.
    all_counts = counts([m.report for m in mails])
    assert "mx.reports.test" not in all_counts and "reports.test" not in all_counts
    assert "ok.test" not in all_counts  # DANE results go to the TLSA base, not the domain
    assert set(all_counts) == mail_domains
    # The HTTPS copy of mx.ok.test's reports is the same report as the mail copy.
    ok_ids = {m.report["report-id"] for m in mails
              if m.report["policies"][0]["policy"]["policy-domain"] == "mx.ok.test"}
    assert ok_ids == {w["report-id"] for w in web
                      if w["policies"][0]["policy"]["policy-domain"] == "mx.ok.test"}
    # Details carry the addresses of both ends.
    for rep in [m.report for m in mails]:
        for pol in rep["policies"]:
            for d in pol.get("failure-details", []):
                if d["result-type"] != "dnssec-invalid":
                    assert d["sending-mta-ip"] == "127.0.0.1"
                    assert d["receiving-ip"] == IP[pol["policy"]["policy-domain"]
                                                   .split(".")[-2]]
            if pol["policy"]["policy-type"] == "tlsa" and \
                    pol["policy"]["policy-domain"] != "mx.bogus.test":
                assert pol["policy"]["policy-string"][0].startswith("3 1 1 ")


def test_mail_report_message(relay: RelayProc, dests: dict[str, Destination],
                             dkim_key: Dkim) -> None:
    mails = mail_reports(dests)
    assert mails
    for m in mails:
        msg, rep = m.message, m.report
        domain = rep["policies"][0]["policy"]["policy-domain"]
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "tlsrpt"
        assert msg["TLS-Report-Domain"] == domain
        assert msg["TLS-Report-Submitter"] == SUBMITTER
        assert str(msg["Subject"]) == (f"Report Domain: {domain} Submitter: {SUBMITTER} "
                                       f"Report-ID: <{rep['report-id']}>")
        part = next(p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip")
        begin, end = (int(time.mktime(time.strptime(rep["date-range"][k],
                                                    "%Y-%m-%dT%H:%M:%SZ")) - time.timezone)
                      for k in ("start-datetime", "end-datetime"))
        assert part.get_filename() == f"{SUBMITTER}!{domain}!{begin}!{end}.json.gz"
        assert 0 < end - begin <= 3
        assert dkim.verify(m.raw, dnsfunc=dkim_key.dns, tlsrpt="strict"), domain
    received = dests["reports"].messages
    assert all(r.mail_from == "" and r.rcpt_tos == [RUA] for r in received)
    assert all(r.tls for r in received)  # DANE relaxed, TLS still used


def test_report_mail_is_delivered_despite_broken_dane(relay: RelayProc) -> None:
    reports = [m for m in relay.queue_list(all=True)
               if m["sender"] == "" and [r["address"] for r in m["recipients"]] == [RUA]]
    assert reports
    info = json.loads(relay.cli("queue", "show", reports[0]["id"], "--json").stdout)
    rcpt = info["recipients"][0]
    assert rcpt["status"] == "delivered" and rcpt["attempts"] == 1
    hist = rcpt["history"][-1]
    assert hist["mx"] == "mx.reports.test"
    assert "ignored for a TLS report" in hist["dane"]  # the TLSA mismatch was seen
    # The same domain's normal mail would be refused: DANE is not relaxed for it.
    qid = submit(relay, ["someone@reports.test"])
    ev = first_outcome(relay, qid)
    assert ev["event"] == "deferred" and ev["code"] == "4.7.323"


def test_https_reports(relay: RelayProc, collectors: dict[str, Collector]) -> None:
    c = collectors["collector"]
    with c.cond:
        posts = list(c.posts)
    assert posts
    for path, headers, body in posts:
        assert path == "/v1/tlsrpt"
        assert headers["Content-Type"] == "application/tlsrpt+gzip"
        validate_report(json.loads(gzip.decompress(body)))
    # The endpoint whose certificate our CA file does not vouch for got nothing.
    assert not collectors["untrusted"].posts
    relay.wait_event("tlsrpt_failed", via="https", timeout=15)  # the relay's retry
    failed = relay.events("tlsrpt_failed", via="https")
    assert failed and all("untrusted.test" in e["url"] for e in failed)
    assert any("CERTIFICATE_VERIFY_FAILED" in e["detail"] for e in failed)


def test_report_mail_sessions_are_never_counted(relay: RelayProc,
                                                 dests: dict[str, Destination]) -> None:
    """Report mail went to mx.reports.test (successfully, DANE relaxed) before the one
    normal message of the test above (refused: tlsa-invalid). When the report on that
    normal message arrives, every earlier session there has been reported too: the only
    session counted for mx.reports.test must be the normal one."""
    expected = {"mx.reports.test": ("tlsa", {"tlsa-invalid": 1})}

    def seen() -> dict[str, Any]:
        got = counts([m.report for m in mail_reports(dests)])
        return {k: v for k, v in got.items() if k == "mx.reports.test"}

    assert wait_for(lambda: seen() == expected, timeout=20), seen()


def test_show_after_sending(relay: RelayProc) -> None:
    data = json.loads(relay.cli("tlsrpt", "show", "--json").stdout)
    assert data["enabled"] is True and data["submitter"] == SUBMITTER
    for p in data["open_periods"]:
        for rep in p["reports"]:
            validate_report(rep)

    def states() -> set[tuple[str, str]]:
        data = json.loads(relay.cli("tlsrpt", "show", "--json").stdout)
        return {(r["policy_domain"], r["state"]) for r in data["recent_reports"]}

    # mx.ok.test's report is "sent" once the untrusted endpoint has been given up.
    assert wait_for(lambda: {("mx.ok.test", "sent"), ("plain.test", "sent")} <= states(),
                    timeout=20), states()
    assert not any(s == "failed" for _, s in states())
    text = relay.cli("tlsrpt", "show").stdout
    assert "TLS reporting enabled" in text


async def test_discovery_against_signed_zones(dnsbed: DnsBed, tmp_path: Path) -> None:
    from relay.config import build
    from relay.store import Store

    cfg = build({"queue": {"path": str(tmp_path / "q.db")},
                 "tlsrpt": {"enabled": True}}, source="test")
    resolver = Resolver.from_config(DnsConfig(nameservers=(dnsbed.nameserver,)))
    async with await Store.open(tmp_path / "q.db") as store:
        reporter = TlsReporter(store, resolver, cfg, hostname="relay.test")
        one = await reporter.discover("one.disc.test")
        assert one is not None and one.policy is not None
        assert one.policy.mailto == ("one@disc.test",)
        none = await reporter.discover("none.disc.test")
        assert none is not None and none.policy is None and none.reason == "no TLSRPT record"
        two = await reporter.discover("two.disc.test")
        assert two is not None and two.policy is None and "2 TLSRPT records" in two.reason
        bad = await reporter.discover("bad.disc.test")
        assert bad is not None and bad.policy is None and "malformed" in bad.reason
        other = await reporter.discover("other.disc.test")  # the SPF record is discarded
        assert other is not None and other.policy is not None
        split = await reporter.discover("split.disc.test")  # strings joined, no space
        assert split is not None and split.policy is not None
        assert split.policy.mailto == ("split@disc.test",)
        assert await reporter.discover("broken.disc.test") is None  # bogus: try later
