"""TLS reporting against a real SQLite store and real HTTPS servers on loopback: periods
(close, cut, late results), claims between two store handles, the send state machine
(retry with a doubling wait, give up after the lifetime, no record, DNS failure), with
time passed in, and two nodes on one queue (SQLite and PostgreSQL) sending one report.
DNS answers come from a stub resolver here; discovery against a real validating Unbound
is tested end to end (tests/e2e/test_tlsrpt.py)."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from relay import log
from relay.config import build
from relay.dns.resolve import Resolver
from relay.model import DnsAnswer, Rcode
from relay.store import Store
from relay.tlsrpt.report import SessionResult
from relay.tlsrpt.reporter import TlsReporter
from tests.support.certs import make_ca, make_leaf, server_context
from tests.support.stores import pg_server_fixture
from tests.support.tlsrpt_check import validate_report

CA = make_ca("Collector CA")
DOMAIN = "mx.example.test"
pg_server = pg_server_fixture()


class Server:
    """HTTPS on 127.0.0.1 answering POSTs with the next status of `statuses`."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.bodies: list[bytes] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                owner.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                status = owner.statuses.pop(0) if len(owner.statuses) > 1 else owner.statuses[0]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = server_context(make_leaf(["collector.test"], issuer=CA))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://collector.test:{self.httpd.server_address[1]}/r"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class StubResolver(Resolver):
    """Fixed answers (TXT at _smtp._tls.<DOMAIN>, A for collector.test)."""

    def __init__(self, txt: list[str] | Rcode) -> None:
        super().__init__([("127.0.0.1", 9)])
        self.txt = txt

    async def query(self, name: str, rdtype: str, *, use_cache: bool = True) -> DnsAnswer:
        if rdtype == "TXT":
            if isinstance(self.txt, Rcode):
                return DnsAnswer(name, rdtype, self.txt, False)
            return DnsAnswer(name, rdtype, Rcode.OK, True, tuple(self.txt))
        if name == "collector.test" and rdtype == "A":
            return DnsAnswer(name, rdtype, Rcode.OK, True, ("127.0.0.1",))
        return DnsAnswer(name, rdtype, Rcode.NODATA, True)


@pytest.fixture
def events() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    seen: list[tuple[str, dict[str, Any]]] = []

    def observe(name: str, fields: dict[str, Any]) -> None:
        seen.append((name, dict(fields)))

    log.observers.append(observe)
    yield seen
    log.observers.remove(observe)


def make(store: Store, tmp_path: Path, resolver: Resolver, **tlsrpt: Any) -> TlsReporter:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(CA.pem)
    cfg = build({"tlsrpt": {"enabled": True, "interval": "10s", "max_delay": "5s",
                            "retry_interval": "2s", "retry_lifetime": "20s",
                            "https_ca_file": str(ca), **tlsrpt}}, source="test")
    return TlsReporter(store, resolver, cfg, hostname="relay.test")


def results(ok: int = 2, bad: int = 1) -> list[SessionResult]:
    return [SessionResult(DOMAIN, "tlsa", ("3 1 1 00",), DOMAIN, count=ok),
            SessionResult(DOMAIN, "tlsa", ("3 1 1 00",), DOMAIN, "tlsa-invalid",
                          "127.0.0.1", "127.0.0.2", count=bad)]


async def test_periods_close_cut_and_late_results(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "q.db") as store:
        await store.tlsrpt_add(results(), now=1003.5, interval=10)
        await store.tlsrpt_add(results(1, 0), now=1004.0, interval=10)
        [p] = await store.tlsrpt_open()
        assert (p.begin, p.end) == (1000, 1010)
        assert sum(r.count for r in p.results if r.success) == 3
        assert await store.tlsrpt_next_wakeup() == 1010
        # Not ended yet: nothing to close.
        assert await store.tlsrpt_close_periods(now=1009.9, delay=lambda: 2.0) == []
        # A result after the end, before the period is closed, opens the next one.
        await store.tlsrpt_add(results(1, 0), now=1010.2, interval=10)
        assert await store.tlsrpt_close_periods(now=1010.5, delay=lambda: 2.0) == [p.id]
        [report] = await store.tlsrpt_reports()
        assert (report["begin"], report["end"], report["due_at"]) == (1000, 1010, 1012)
        # Cut: the open period [1010, 1020) ends at the next whole second.
        [cut] = await store.tlsrpt_close_periods(now=1013.2, delay=lambda: 2.0, cut=True)
        reports = await store.tlsrpt_reports()
        assert (reports[0]["begin"], reports[0]["end"], reports[0]["due_at"]) == \
            (1010, 1014, 1013.2)
        # A result a moment later starts where the cut ended.
        await store.tlsrpt_add(results(1, 0), now=1013.4, interval=10)
        [p2] = await store.tlsrpt_open()
        assert (p2.begin, p2.end) == (1014, 1020) and cut != p2.id


async def test_two_handles_never_claim_the_same_report(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "q.db") as a, \
            await Store.open(tmp_path / "q.db") as b:
        await a.tlsrpt_add(results(), now=1.0, interval=10)
        await a.tlsrpt_close_periods(now=11.0, delay=lambda: 0.0)
        first = await a.tlsrpt_claim(now=11.0, owner="a", lease=60)
        assert len(first) == 1
        assert await b.tlsrpt_claim(now=12.0, owner="b", lease=60) == []
        assert len(await b.tlsrpt_claim(now=72.0, owner="b", lease=60)) == 1  # lease over


async def test_https_retried_with_doubling_wait_then_sent(
        tmp_path: Path, events: list[tuple[str, dict[str, Any]]]) -> None:
    server = Server([503, 500, 201])
    try:
        async with await Store.open(tmp_path / "q.db") as store:
            rep = make(store, tmp_path, StubResolver([f"v=TLSRPTv1; rua={server.url}"]))
            await store.tlsrpt_add(results(), now=5.0, interval=10)
            assert await rep.tick(8.0) == []  # the period runs until 10
            first = await rep.tick(16.0)  # due at 10..15 (max_delay 5)
            assert [r.state for r in first] == ["pending"]
            assert "HTTP 503" in first[0].failed[0][1]
            assert await rep.tick(17.0) == []  # next try at 18
            assert [r.state for r in await rep.tick(18.0)] == ["pending"]
            assert await rep.tick(21.9) == []  # then the wait doubles: 22
            last = await rep.tick(22.0)
            assert [r.state for r in last] == ["sent"] and last[0].sent == (server.url,)
            assert (last[0].successful, last[0].failures) == (2, 1)
            reports = [json.loads(gzip.decompress(b)) for b in server.bodies]
            assert len(reports) == 3 and all(r == reports[0] for r in reports)
            validate_report(reports[0])
            [row] = await store.tlsrpt_reports()
            assert row["state"] == "sent" and row["attempts"] == 3
            assert row["report_id"] == reports[0]["report-id"]
    finally:
        server.close()
    names = [n for n, _ in events]
    assert names.count("tlsrpt_failed") == 2 and names.count("tlsrpt_sent") == 1


async def test_https_given_up_after_the_lifetime(
        tmp_path: Path, events: list[tuple[str, dict[str, Any]]]) -> None:
    server = Server([500])
    try:
        async with await Store.open(tmp_path / "q.db") as store:
            rep = make(store, tmp_path, StubResolver([f"v=TLSRPTv1; rua={server.url}"]),
                       max_delay=0)
            await store.tlsrpt_add(results(), now=5.0, interval=10)
            now, states = 10.0, []
            while len(states) < 20:
                got = await rep.tick(now)
                states += [r.state for r in got]
                if got and got[0].state == "failed":
                    break
                now += 1.0
            assert states[-1] == "failed" and set(states[:-1]) == {"pending"}
            assert now <= 10 + 20 + 16  # lifetime 20 s from the due time, waits 2, 4, 8, 16
            assert len(server.bodies) == len(states)
    finally:
        server.close()


async def test_untrusted_https_certificate_is_refused(tmp_path: Path) -> None:
    server = Server([201])
    try:
        async with await Store.open(tmp_path / "q.db") as store:
            other = tmp_path / "other"
            other.mkdir()
            rep = make(store, other, StubResolver([f"v=TLSRPTv1; rua={server.url}"]),
                       max_delay=0)
            rep.settings = replace(rep.settings, https_ca_file=None)
            rep._context = None  # the system's CAs: they do not know the test CA
            await store.tlsrpt_add(results(), now=5.0, interval=10)
            [res] = await rep.tick(10.0)
            assert res.state == "pending" and "CERTIFICATE_VERIFY_FAILED" in res.failed[0][1]
            assert server.bodies == []
    finally:
        server.close()


@pytest.mark.parametrize(("txt", "state"), [
    ([], "none"),
    (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"], "none"),
    (Rcode.NXDOMAIN, "none"),
    (Rcode.SERVFAIL, "pending"),  # a failed lookup is tried again
])
async def test_no_usable_record(tmp_path: Path, txt: list[str] | Rcode, state: str) -> None:
    async with await Store.open(tmp_path / "q.db") as store:
        rep = make(store, tmp_path, StubResolver(txt), max_delay=0)
        await store.tlsrpt_add(results(), now=5.0, interval=10)
        [res] = await rep.tick(10.0)
        assert res.state == state
        assert await store.list_messages(include_final=True) == []  # no mail either


async def test_mail_report_goes_into_the_queue(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "q.db") as store:
        rep = make(store, tmp_path, StubResolver(["v=TLSRPTv1; rua=mailto:r@x.test,"
                                                  "mailto:s@y.test"]), max_delay=0)
        await store.tlsrpt_add(results(), now=5.0, interval=10)
        [res] = await rep.tick(10.0)
        assert res.state == "sent" and res.sent == ("mailto:r@x.test", "mailto:s@y.test")
        [msg] = await store.list_messages()
        info = await store.get_message(msg.id)
        assert info.sender == "" and info.extra["kind"] == "tlsrpt"
        assert sorted(r.address for r in info.recipients) == ["r@x.test", "s@y.test"]
        body = await store.load_body(msg.id)
        assert b"TLS-Report-Domain: mx.example.test" in body
        # Sent once: a later tick does not enqueue it again.
        assert await rep.tick(30.0) == []
        assert len(await store.list_messages()) == 1


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
async def test_two_nodes_send_one_report_with_the_sum_of_their_sessions(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two relay nodes on one queue both record sessions for the same policy domain and
    both run the reporter: one report goes out, counting every session of both."""
    server = Server([201])
    if kind == "pg":
        url = request.getfixturevalue("pg_server").create_db("tlsrpt_two_nodes")
        opened = [await Store.open_url(url) for _ in range(2)]
    else:
        opened = [await Store.open(tmp_path / "q.db") for _ in range(2)]
    try:
        resolver = StubResolver([f"v=TLSRPTv1; rua={server.url}"])
        a, b = (make(s, tmp_path, resolver) for s in opened)
        a.owner, b.owner = "node-a/1", "node-b/1"
        await asyncio.gather(opened[0].tlsrpt_add(results(2, 1), now=5.0, interval=10),
                             opened[1].tlsrpt_add(results(3, 2), now=6.0, interval=10))
        got = await asyncio.gather(a.tick(16.0), b.tick(16.0))
        sent = [r for rs in got for r in rs if r.state == "sent"]
        assert len(sent) == 1 and (sent[0].successful, sent[0].failures) == (5, 3)
        assert await a.tick(30.0) == [] and await b.tick(30.0) == []
        (body,) = server.bodies
        report = json.loads(gzip.decompress(body))
        validate_report(report)
        (policy,) = report["policies"]
        assert policy["summary"] == {"total-successful-session-count": 5,
                                     "total-failure-session-count": 3}
    finally:
        for s in opened:
            await s.close()
        server.close()
