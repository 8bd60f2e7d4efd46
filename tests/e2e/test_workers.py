"""Intake worker processes (`listener.workers = 2`, relay.workers), end to end: a real
`relay serve` with its workers, real smtplib/swaks clients over many connections, a
real aiosmtpd destination reached through a route (`tls = "none"`: the queue and the
processes are the subject, not DNS).

- Mail accepted by both workers, concurrently, is all in the queue and all delivered;
  mail accepted while the scheduler sleeps is delivered at once (a worker's commit
  wakes the main process), not at the next poll; every log line is whole JSON.
- `kill -9` of a worker under load: logged, the worker comes back, the other one goes
  on accepting, and every message answered 250 is in the queue, body for body.
- SIGTERM drains: a transaction open in a worker finishes with 250, the workers exit
  before the main process, which exits 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.dnsprocs import free_port
from tests.support.e2e import wait_for
from tests.support.pgserver import PgServer
from tests.support.relayproc import RelayProc, split_received, start_relay
from tests.support.smtpd import Destination, shared_port
from tests.support.stores import pg_server_fixture

pg_server = pg_server_fixture()

DEST_IP = "127.25.60.1"
PORT = shared_port([DEST_IP])
SENDER = "alice@senderbox.test"


def delivering(metrics: str, poll: str = "300s") -> dict[str, Any]:
    return {
        "listener": {"workers": 2},
        "metrics": {"listen": metrics},
        "dns": {"require_validating_resolver": False},
        "delivery": {"enabled": True, "port": PORT, "poll_interval": poll,
                     "connect_timeout": "2s"},
        "routes": [{"domain": "dest.test", "hosts": [f"{DEST_IP}:{PORT}"], "tls": "none"}],
    }


def worker_pids(relay: RelayProc, after: int = 0) -> dict[int, int]:
    """{worker number: pid} of the workers started (the latest start of each)."""
    return {int(e["worker"]): int(e["pid"])
            for e in relay.events("worker_started", after=after)}


def test_two_workers_accept_concurrent_mail_and_all_of_it_is_delivered(
        tmp_path: Path) -> None:
    dest = Destination(DEST_IP, PORT, starttls=False)
    dest.start()
    try:
        metrics = f"127.0.0.1:{free_port('127.0.0.1')}"
        with start_relay(tmp_path, **delivering(metrics)) as relay:
            started = relay.events("listening", service="smtp")[0]
            assert started["workers"] == 2
            assert len(worker_pids(relay)) == 2
            acked: dict[str, str] = {}
            lock = threading.Lock()
            problems: list[str] = []

            def client(index: int) -> None:
                for conn in range(4):  # several connections, several messages each
                    try:
                        with QueuedSMTP("127.0.0.1", relay.port, timeout=30,
                                        local_hostname="client.test") as s:
                            for n in range(3):
                                rcpt = f"r{index}-{conn}-{n}@dest.test"
                                body = f"Subject: {rcpt}\r\n\r\nfrom client {index}\r\n"
                                s.sendmail(SENDER, [rcpt], body.encode())  # raises unless 250
                                with lock:
                                    acked[s.last_queued] = rcpt
                    except (OSError, smtplib.SMTPException) as exc:
                        problems.append(f"client {index}: {exc!r}")

            threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
            for t in threads:
                t.start()
            swaks = relay.swaks("--from", SENDER, "--to", "swaks@dest.test")
            for t in threads:
                t.join(120)
            assert problems == []
            assert swaks.returncode == 0, swaks.stdout[-500:]
            assert len(acked) == 120
            # the log lines come through the main process: wait for them
            received = wait_for(lambda: (lambda evs: evs if len(evs) >= 121 else None)(
                relay.events("received")), 20, "every received event")
            assert len(received) == 121
            assert {e["worker"] for e in received} == {1, 2}, "both workers took mail"
            stored = relay.messages()
            assert set(acked) <= set(stored)
            got = dest.wait_messages(121, timeout=40)  # well before the first poll
            assert sorted(r for m in got for r in m.rcpt_tos) == sorted(
                [*acked.values(), "swaks@dest.test"])

            # The scheduler is idle now (poll_interval 60 s): new mail from a worker is
            # delivered at once because the worker's commit wakes the main process.
            wait_for(lambda: len(relay.events("delivered")) >= 121, 30, "all delivered")
            mark = relay.mark()
            with relay.smtp() as s:
                s.sendmail(SENDER, ["late@dest.test"], b"Subject: late\r\n\r\nhi\r\n")
            rec = relay.wait_event("received", after=mark)
            got_at = time.monotonic()
            relay.wait_event("delivered", after=mark, id=rec["id"], timeout=20)
            assert time.monotonic() - got_at < 10, "delivered promptly, not at the next poll"

            # health and metrics still see the listener and the workers' mail
            env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
            health = subprocess.run(
                [sys.executable, "-m", "relay", "health", "--json", "-c",
                 str(relay.config_path)], env=env, capture_output=True, text=True,
                timeout=60)
            assert json.loads(health.stdout)["listener"] == {
                "ok": True, "detail": f"the relay on {metrics} is listening on "
                                      f"127.0.0.1:{relay.port}"}
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
                text = r.read().decode()
            assert "relay_received_total 122.0" in text
            assert "relay_delivered_total 122.0" in text
            assert relay.stop() == 0
        # one JSON object per line, whoever wrote it
        assert relay.lines and len(relay.lines) == len(relay.events_all)
        stopped = [e["event"] for e in relay.events_all
                   if e["event"] in ("worker_exited", "stopped")]
        assert stopped == ["worker_exited", "worker_exited", "stopped"]
    finally:
        dest.stop()


class Traffic:
    """Clients sending continuously; every 250 recorded with the body's SHA-256."""

    def __init__(self, relay: RelayProc) -> None:
        self.relay = relay
        self.stop = threading.Event()
        self.lock = threading.Condition()
        self.acked: dict[str, str] = {}
        self.sent: set[str] = set()
        self.failures: list[str] = []

    def client(self, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                with QueuedSMTP("127.0.0.1", self.relay.port, timeout=10,
                                local_hostname=f"client{index}.test") as s:
                    for _ in range(3):
                        n += 1
                        body = (f"Subject: {index}-{n}\r\nX-Nonce: {os.urandom(8).hex()}"
                                f"\r\n\r\n" + "line\r\n" * (n % 50)).encode()
                        digest = hashlib.sha256(body).hexdigest()
                        with self.lock:
                            self.sent.add(digest)
                        # raises unless the message was answered 250 after DATA
                        s.sendmail(SENDER, [f"r{index}-{n}@example.com"], body)
                        qid = s.last_queued
                        with self.lock:
                            self.acked[qid] = digest
                            self.lock.notify_all()
            except (OSError, smtplib.SMTPException):
                time.sleep(0.01)

    def wait_acks(self, count: int, timeout: float = 60.0) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.acked) >= count, timeout), (
                f"only {len(self.acked)} acks, wanted {count}")


class QueuedSMTP(smtplib.SMTP):
    """smtplib.SMTP that remembers the queue id of the last `250 ... queued as ID`."""

    last_queued = ""

    def data(self, msg: Any) -> tuple[int, bytes]:
        code, reply = super().data(msg)
        if code == 250:
            self.last_queued = reply.decode().rsplit(" ", 1)[1]
        return code, reply


def test_kill_9_of_a_worker_loses_nothing_acknowledged_and_it_comes_back(
        tmp_path: Path) -> None:
    metrics = f"127.0.0.1:{free_port('127.0.0.1')}"
    with start_relay(tmp_path, listener={"workers": 2}, metrics={"listen": metrics}) as relay:
        traffic = Traffic(relay)
        threads = [threading.Thread(target=traffic.client, args=(i,), daemon=True)
                   for i in range(12)]
        try:
            for t in threads:
                t.start()
            for round_ in range(2):
                traffic.wait_acks(len(traffic.acked) + 150)
                mark = relay.mark()
                victim = worker_pids(relay)[1 + round_ % 2]
                os.kill(victim, signal.SIGKILL)
                gone = relay.wait_event("worker_exited", after=mark, pid=victim, timeout=20)
                assert gone["signal"] == "SIGKILL" and gone["level"] == "error"
                away = relay.mark()
                back = relay.wait_event("worker_started", after=mark,
                                        worker=gone["worker"], timeout=30)
                assert back["pid"] != victim
                # the other worker went on accepting while this one was away
                assert any(e.get("worker") != gone["worker"]
                           for e in relay.events("received", after=away))
            # both take mail again
            mark = relay.mark()
            traffic.wait_acks(len(traffic.acked) + 200)
            wait_for(lambda: {e.get("worker") for e in relay.events("received", after=mark)}
                     == {1, 2}, 30, "both workers accepting")
        finally:
            traffic.stop.set()
            for t in threads:
                t.join(20)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
                return str(r.read().decode())

        # the sessions cut by the kills are not counted as open for ever
        wait_for(lambda: "relay_smtp_connections 0.0" in scrape(), 20, "no session open")
        assert relay.stop() == 0
        stored = relay.messages()
        with traffic.lock:
            acked, sent = dict(traffic.acked), set(traffic.sent)
        assert len(acked) > 300
        for qid, digest in acked.items():
            assert qid in stored, f"acknowledged message {qid} is missing"
            body = stored[qid][1]
            assert body is not None
            assert hashlib.sha256(split_received(body)[1]).hexdigest() == digest, qid
        for qid, (_, body) in stored.items():  # nothing torn or invented
            assert body is not None
            assert hashlib.sha256(split_received(body)[1]).hexdigest() in sent, qid


def test_sigterm_drains_every_worker_before_the_main_process_exits(tmp_path: Path) -> None:
    with start_relay(tmp_path, listener={"workers": 2}) as relay:
        socks = []
        for i in range(6):  # open transactions on (very likely) both workers
            s = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
            f = s.makefile("rb")
            assert f.readline().startswith(b"220")
            for cmd in (b"EHLO c.test", f"MAIL FROM:<s{i}@example.org>".encode(),
                        f"RCPT TO:<r{i}@example.com>".encode(), b"DATA"):
                s.sendall(cmd + b"\r\n")
                line = f.readline()
                while line[3:4] == b"-":
                    line = f.readline()
                assert line[:1] in (b"2", b"3"), line
            s.sendall(f"Subject: drain {i}\r\n\r\nfirst half\r\n".encode())
            socks.append((s, f))
        sessions = {e["worker"] for e in relay.events("connect")}
        mark = relay.mark()
        relay.send_signal(signal.SIGTERM)
        relay.wait_event("draining", after=mark)

        def refused() -> bool:
            """A new session is refused (421 4.3.2; or reset by a worker that has
            finished draining and exits)."""
            try:
                with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as c:
                    first = c.makefile("rb").readline()
            except OSError:
                return True
            if first.startswith(b"220"):  # a worker has not had its SIGTERM yet
                return False
            return first == b"" or first.startswith(b"421 4.3.2")

        wait_for(refused, 20, "new sessions refused while draining")
        for s, f in socks:
            s.sendall(b"second half\r\n.\r\n")
            assert f.readline().startswith(b"250 2.0.0 Ok: queued as"), "finished in drain"
            s.sendall(b"QUIT\r\n")
            s.close()
        assert relay.wait_exit(40) == 0
        tail = [e for e in relay.events(after=mark)
                if e["event"] in ("worker_exited", "stopped")]
        assert [e["event"] for e in tail] == ["worker_exited", "worker_exited", "stopped"]
        assert all(e.get("code") == 0 for e in tail[:2])
        assert len(relay.messages()) == 6
        assert sessions  # the connects came from workers (every one names its worker)


def test_workers_leave_when_the_main_process_is_killed(tmp_path: Path) -> None:
    with start_relay(tmp_path, listener={"workers": 2}) as relay:
        pids = list(worker_pids(relay).values())
        with relay.smtp() as s:
            s.sendmail(SENDER, ["r@example.com"], b"Subject: x\r\n\r\nhi\r\n")
        relay.kill()  # kill -9 of the main process: the workers see their socket close
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and
                                 "Z" not in _state(pid) for pid in pids),
                 40, "the workers to exit")
        assert len(relay.messages()) == 1


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_workers_on_a_postgresql_queue_deliver_everything(
        tmp_path: Path, pg_server: PgServer) -> None:
    """Each worker has its own connections to the shared queue; the main process
    delivers what they committed, woken by them."""
    url = pg_server.create_db(f"workers_{int(time.time() * 1000) % 10**9}")
    dest = Destination(DEST_IP, PORT, starttls=False)
    dest.start()
    try:
        sections = delivering(f"127.0.0.1:{free_port('127.0.0.1')}")
        sections["queue"] = {"url": url, "node": "w"}
        with start_relay(tmp_path, **sections) as relay:
            def client(index: int) -> None:
                with relay.smtp(timeout=30) as s:
                    for n in range(5):
                        s.sendmail(SENDER, [f"pg{index}-{n}@dest.test"],
                                   b"Subject: pg\r\n\r\nx\r\n")

            threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            got = dest.wait_messages(40, timeout=40)  # poll_interval is 300 s
            assert len({r for m in got for r in m.rcpt_tos}) == 40
            received = wait_for(lambda: (lambda evs: evs if len(evs) >= 40 else None)(
                relay.events("received")), 20, "every received event")
            assert {e["worker"] for e in received} == {1, 2}
            assert relay.stop() == 0
    finally:
        dest.stop()
