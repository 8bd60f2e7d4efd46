"""Hostile clients against `relay serve` (issue 10 items 4-7): each may cost itself,
never the others. Real sockets and smtplib on loopback; waits are event-driven."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import certs
from tests.support.dnsprocs import free_port
from tests.support.e2e import wait_for
from tests.support.relayproc import Dialog, RelayProc, start_relay


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(scope="module")
def tls_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProc]:
    work = tmp_path_factory.mktemp("hostile-tls")
    cert, key = certs.write_pair(certs.make_leaf(["relay.test"]), directory=work)
    with start_relay(work, listener={"tls_cert": str(cert), "tls_key": str(key),
                                     "max_connections_per_ip": 50}) as relay:
        yield relay


def test_starttls_garbage_and_close_frees_the_slot_at_once(tls_relay: RelayProc) -> None:
    """Item 4: STARTTLS + ~20 KB of garbage + close, 50 times from one address (the
    per-IP limit): every slot is free again at once, not after the 60 s handshake
    timeout, and a normal client from that address gets its 220."""
    relay, ip = tls_relay, "127.0.0.5"
    mark = relay.mark()
    ports = []
    began = time.monotonic()
    for _ in range(50):
        s = socket.create_connection((relay.host, relay.port), timeout=10,
                                     source_address=(ip, 0))
        ports.append(s.getsockname()[1])
        assert _read_reply(s).startswith(b"220")
        s.sendall(b"EHLO hostile.test\r\n")
        assert b"STARTTLS" in _read_reply(s)
        s.sendall(b"STARTTLS\r\n" + bytes(range(256)) * 80)  # 20 KB, no TLS ClientHello
        s.close()
    for port in ports:
        sid = relay.wait_event("connect", after=mark, client_port=port)["session"]
        relay.wait_event("disconnect", after=mark, session=sid, timeout=15)
    freed = time.monotonic() - began
    with Dialog(relay.host, relay.port, source=ip) as d:
        assert d.greeting[0] == 220
        assert d.cmd("EHLO client.test")[0] == 250
    assert freed < 20, freed  # the handshake timeout is 60 s
    connects = relay.events("connect", after=mark, client_ip=ip)
    disconnects = relay.events("disconnect", after=mark, client_ip=ip)
    assert len(connects) == 51 and len(disconnects) >= 50  # slot count back to 0
    assert not relay.events("internal_error", after=mark)


# --- item 5: slowloris ---------------------------------------------------------------------


class Drip:
    """A slowloris connection: its greeting read, then a command line that never ends."""

    def __init__(self, relay: RelayProc, source: str) -> None:
        self.sock = socket.create_connection((relay.host, relay.port), timeout=10,
                                             source_address=(source, 0))
        self.greeting = _read_reply(self.sock)

    def drip(self, data: bytes = b"E") -> None:
        self.sock.sendall(data)

    def closed_with(self, timeout: float) -> bytes | None:
        """The relay's last words if it closes the connection within `timeout`."""
        self.sock.settimeout(timeout)
        got = b""
        try:
            while chunk := self.sock.recv(4096):
                got += chunk
        except TimeoutError:
            return None
        except OSError:
            pass
        return got

    def close(self) -> None:
        self.sock.close()


def test_slowloris_cannot_take_the_reserved_slots(tmp_path: Path) -> None:
    """Item 5: dripping clients from outside allowed_networks fill their share of the
    connections; an allowed client still gets its 220 at once and delivers."""
    with start_relay(tmp_path, listener={
            "max_connections": 30, "max_connections_per_ip": 10, "reserved_connections": 5,
            # long timeouts: this test is about the slots, not about cutting the drips
            "line_timeout": "5m", "stress_command_timeout": "5m"}) as relay:
        drips = [Drip(relay, f"127.0.{1 + i // 10}.1") for i in range(40)]
        try:
            greeted = [d for d in drips if d.greeting.startswith(b"220")]
            refused = [d for d in drips if d.greeting.startswith(b"421 4.7.0")]
            assert (len(greeted), len(refused)) == (25, 15)
            for d in greeted:
                d.drip(b"EHLO slow")
            for _ in range(3):  # the reserve: an allowed client, several times over
                began = time.monotonic()
                with relay.smtp() as client:
                    assert time.monotonic() - began < 5
                    assert client.sendmail("a@example.org", ["b@example.com"],
                                           b"Subject: legit\r\n\r\nhi\r\n") == {}
            # each 250 came after its COMMIT; the log line may come a moment later
            wait_for(lambda: len(relay.events("received")) >= 3, 10, "three received")
            assert len(relay.events("received")) == 3
            ev = relay.wait_event("connection_limit", limit="untrusted")
            assert ev["level"] == "warning" and ev["untrusted"] == 25
        finally:
            for d in drips:
                d.close()


def test_a_partial_command_line_times_out_long_before_the_command_timeout(
        tmp_path: Path) -> None:
    with start_relay(tmp_path, listener={"line_timeout": "1s"}) as relay:
        idle = Drip(relay, "127.0.0.2")  # says nothing: command_timeout (5 min) applies
        drip = Drip(relay, "127.0.0.2")
        began = time.monotonic()
        for _ in range(3):
            drip.drip(b"N")
            time.sleep(0.3)
        last_words = drip.closed_with(10)
        assert last_words is not None and last_words.startswith(b"421 4.4.2"), last_words
        assert time.monotonic() - began < 6
        assert idle.closed_with(0.5) is None  # still open
        # a complete line restarts the wait: a slow typist is fine line by line
        idle.drip(b"NOOP\r\n")
        assert _read_reply(idle.sock) == b"250 2.0.0 Ok\r\n"
        idle.close()
        drip.close()


def test_under_stress_idle_untrusted_sessions_are_cut_sooner(tmp_path: Path) -> None:
    with start_relay(tmp_path, listener={
            "max_connections": 10, "max_connections_per_ip": 10, "reserved_connections": 2,
            "stress_command_timeout": "1s"}) as relay:
        trusted = Drip(relay, "127.0.0.1")  # an allowed client, idle
        idle = [Drip(relay, "127.0.0.3") for _ in range(7)]  # the untrusted share but one
        assert all(d.greeting.startswith(b"220") for d in idle)
        time.sleep(1.5)  # not yet stressed: nobody is cut
        assert all(d.closed_with(0.01) is None for d in idle)
        idle.append(Drip(relay, "127.0.0.3"))  # the share is full: stress
        assert idle[-1].greeting.startswith(b"220")
        refused = Drip(relay, "127.0.0.4")
        assert refused.greeting.startswith(b"421 4.7.0")
        for d in idle:
            last_words = d.closed_with(10)
            assert last_words is not None and last_words.startswith(b"421 4.4.2")
        assert trusted.closed_with(1.5) is None  # trusted sessions keep their timeout
        newcomer = Drip(relay, "127.0.0.4")
        assert newcomer.greeting.startswith(b"220")
        for d in (trusted, refused, newcomer, *idle):
            d.close()


# --- item 6: AUTH brute force --------------------------------------------------------------


def _ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def _tls_client(relay: RelayProc, source: str) -> smtplib.SMTP:
    c = relay.smtp(source=source, timeout=30)
    c.starttls(context=_ctx())
    c.ehlo()
    return c


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_auth_brute_force_is_throttled_per_address(tmp_path: Path) -> None:
    """Item 6: failed AUTH from one address, over several sessions at once, is answered
    ever later, then the address is locked out (421 4.7.0) for a while; a user at
    another address logs in without delay meanwhile; log and metrics count it."""
    cert, key = certs.write_pair(certs.make_leaf(["relay.test"]), directory=tmp_path)
    line = subprocess.run([sys.executable, "-m", "relay", "passwd", "alice"],
                          input="right\n", capture_output=True, text=True, check=True).stdout
    (tmp_path / "users").write_text(line)
    mport = free_port("127.0.0.1")
    with start_relay(tmp_path, listener={
            "tls_cert": str(cert), "tls_key": str(key), "users_file": str(tmp_path / "users"),
            "auth_failure_delay": "0.25s", "auth_failure_limit": 4,
            "auth_lockout": "3s"}, metrics={"listen": f"127.0.0.1:{mport}"}) as relay:
        attacker, user = "127.0.0.6", "127.0.0.7"
        wrong = _plain("alice", "guess")
        a = _tls_client(relay, attacker)
        times = []
        for _ in range(2):
            began = time.monotonic()
            assert a.docmd("AUTH", f"PLAIN {wrong}")[0] == 535
            times.append(time.monotonic() - began)
        assert times[0] >= 0.25 and times[1] >= 0.5  # a growing delay
        # a second session from the same address at the same time waits its turn
        b = _tls_client(relay, attacker)
        results: dict[str, float] = {}

        def third() -> None:
            t0 = time.monotonic()
            results["code"] = b.docmd("AUTH", f"PLAIN {wrong}")[0]
            results["took"] = time.monotonic() - t0

        thread = threading.Thread(target=third)
        thread.start()
        began = time.monotonic()
        assert a.docmd("AUTH", f"PLAIN {wrong}")[0] == 535
        thread.join(30)
        assert results["code"] == 535
        # the 3rd and 4th failures: 1 s + 2 s, one after the other, not side by side
        assert max(results["took"], time.monotonic() - began) >= 2.9
        # the 4th failure (whichever session it came from) locked the address: that
        # session is told 421 and closed, the other one at its next AUTH
        lock = relay.wait_event("auth_lockout", client_ip=attacker)
        assert lock["level"] == "warning" and lock["failures"] == 4
        locked, other = (a, b) if lock["session"] == relay.session_for(a) else (b, a)
        assert lock["session"] == relay.session_for(locked)
        assert locked.getreply()[0] == 421
        assert other.docmd("AUTH", f"PLAIN {wrong}")[0] == 421
        # locked out (and not an allowed network): turned away at connect, unchecked
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            relay.smtp(source=attacker)
        code, text = refused.value.smtp_code, refused.value.smtp_error
        assert code == 421 and text.startswith(b"4.7.0") and b"too many failed" in text
        # ...but not another address
        began = time.monotonic()
        with _tls_client(relay, user) as ok:
            assert ok.login("alice", "right")[0] == 235
            assert time.monotonic() - began < 2
        relay.wait_event("auth", client_ip=user, success=True)
        failures = relay.events("auth", client_ip=attacker, success=False)
        assert [e["delay"] for e in failures] == [0.25, 0.5, 1.0, 2.0]
        assert _metric(mport, 'relay_auth_attempts_total{result="failure"}') == 4
        assert _metric(mport, 'relay_auth_attempts_total{result="success"}') == 1
        assert _metric(mport, "relay_auth_lockouts_total") == 1
        assert _metric(mport, "relay_auth_refused_total") >= 2
        # the lockout ends
        time.sleep(3.2)
        with _tls_client(relay, attacker) as again:
            assert again.login("alice", "right")[0] == 235
        for client in (a, b):
            client.close()


# --- item 7: memory for messages in flight -------------------------------------------------


def _body(size: int) -> bytes:
    line = b"z" * 98 + b"\r\n"
    return b"Subject: big\r\n\r\n" + line * (size // len(line))


def test_messages_in_flight_share_a_memory_budget(tmp_path: Path) -> None:
    """Item 7: past `data_memory_limit`, DATA waits for room (and gets its 354 when
    another message is committed), and a message that outgrows the budget is read to
    its end and refused with 451 4.3.1, never buffered."""
    # room for 300,000 octets of messages (each counted twice its size)
    with start_relay(tmp_path, listener={"max_message_size": 200_000,
                                         "data_memory_limit": 600_000}) as relay:
        first = Dialog(relay.host, relay.port)
        first.cmd("EHLO a.test")
        assert first.cmd("MAIL FROM:<a@example.org> SIZE=200000")[0] == 250
        first.cmd("RCPT TO:<b@example.com>")
        assert first.cmd("DATA")[0] == 354  # holds 200,000 of the 300,000 octets
        body = _body(190_000)
        first.send(body[:100_000])
        second = Dialog(relay.host, relay.port)
        second.cmd("EHLO b.test")
        assert second.cmd("MAIL FROM:<a@example.org> SIZE=150000")[0] == 250
        second.cmd("RCPT TO:<c@example.com>")
        second.send(b"DATA\r\n")
        second.sock.settimeout(1.0)
        with pytest.raises(TimeoutError):  # no room for 150,000 more: DATA waits
            second.reply()
        second.sock.settimeout(10)
        first.send(body[100_000:] + b".\r\n")
        assert first.reply()[0] == 250  # committed: its 200,000 octets are free again
        assert second.reply()[0] == 354  # ...and the waiting DATA goes on
        # a third message, declared small, grows past what is left: refused at its end
        with Dialog(relay.host, relay.port) as third:
            third.cmd("EHLO c.test")
            assert third.cmd("MAIL FROM:<a@example.org>")[0] == 250  # no SIZE=
            third.cmd("RCPT TO:<d@example.com>")
            assert third.cmd("DATA")[0] == 354
            code, text = third.cmd(_body(180_000) + b".")
            assert code == 451 and text[0].startswith("4.3.1"), text
            assert third.cmd("NOOP")[0] == 250  # the session goes on
        code, _ = second.cmd(_body(140_000) + b".")
        assert code == 250
        first.close()
        second.close()
        # the log is read by another thread: wait for the second event, not just look
        deadline = time.monotonic() + 10
        while len(relay.events("received")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(relay.events("received")) == 2
        assert not relay.events("internal_error")
