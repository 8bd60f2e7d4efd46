"""`kill -9` at random moments never loses a message that was answered 250.

20 client threads send messages continuously (several per connection, random sizes,
dot-stuffed lines included) and record every `queued as` ID with the SHA-256 of the
body they sent. The relay is killed with SIGKILL in the middle of this traffic, five
times, and restarted on the same queue. After every restart, each recorded ID must be
in the queue with a stored body that is exactly one Received: field (the relay's) plus
the bytes the client sent, hash for hash. Every stored message must also be one a
client really sent (no torn or mixed bodies), acknowledged or not.
"""

from __future__ import annotations

import hashlib
import random
import smtplib
import threading
import time
from pathlib import Path

from tests.support.relayproc import RelayProc, split_received, start_relay

CLIENTS = 20
ROUNDS = 5


class Traffic:
    def __init__(self, relay: RelayProc) -> None:
        self.relay = relay
        self.up = threading.Event()
        self.stop = threading.Event()
        self.lock = threading.Condition()
        self.acked: dict[str, str] = {}  # queue id -> sha256 of the body sent
        self.sent: set[str] = set()  # every body hash a client tried to send
        self.errors = 0
        self.failures: list[str] = []

    def body(self, rng: random.Random, n: int) -> bytes:
        nonce = rng.randbytes(12).hex().encode()
        lines = [f"Subject: crash test {n}".encode(), b"X-Nonce: " + nonce, b""]
        for _ in range(rng.randint(1, 200)):
            line = rng.randbytes(rng.randint(0, 60)).hex().encode()
            lines.append(b"." + line if rng.random() < 0.05 else line)
        return b"\r\n".join(lines) + b"\r\n"

    def client(self, index: int) -> None:
        rng = random.Random(index)
        n = 0
        while not self.stop.is_set():
            if not self.up.wait(0.5):
                continue
            try:
                with smtplib.SMTP("127.0.0.1", self.relay.port, timeout=10,
                                  local_hostname=f"client{index}.test") as s:
                    s.ehlo()
                    for _ in range(rng.randint(1, 5)):
                        n += 1
                        body = self.body(rng, n)
                        digest = hashlib.sha256(body).hexdigest()
                        with self.lock:
                            self.sent.add(digest)
                        if s.mail(f"c{index}@example.org")[0] != 250:
                            raise smtplib.SMTPException("MAIL refused")
                        if s.rcpt(f"r{index}-{n}@example.com")[0] != 250:
                            raise smtplib.SMTPException("RCPT refused")
                        code, msg = s.data(body)
                        if code != 250:
                            self.failures.append(f"DATA answered {code} {msg!r}")
                            continue
                        qid = msg.decode().rsplit(" ", 1)[1]
                        with self.lock:
                            self.acked[qid] = digest
                            self.lock.notify_all()
            except (OSError, smtplib.SMTPException):
                with self.lock:
                    self.errors += 1

    def wait_acks(self, count: int, timeout: float = 30.0) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.acked) >= count, timeout), (
                f"only {len(self.acked)} acks, wanted {count}; failures {self.failures[:3]}")


def verify(relay: RelayProc, traffic: Traffic) -> int:
    with traffic.lock:
        acked = dict(traffic.acked)
    stored = relay.messages()
    with traffic.lock:  # after the read: the clients go on meanwhile, and what they have
        sent = set(traffic.sent)  # sent and the relay stored is in this later snapshot
    for qid, digest in acked.items():
        assert qid in stored, f"acknowledged message {qid} is missing after a crash"
        body = stored[qid][1]
        assert body is not None, qid
        _, original = split_received(body)
        assert hashlib.sha256(original).hexdigest() == digest, f"{qid}: body differs"
    for qid, (_, body) in stored.items():  # nothing torn or invented, acked or not
        assert body is not None
        _, original = split_received(body)
        assert hashlib.sha256(original).hexdigest() in sent, f"{qid}: unknown body"
    return len(acked)


def test_kill_9_never_loses_an_acknowledged_message(tmp_path: Path) -> None:
    started = time.monotonic()
    rng = random.Random()
    with start_relay(tmp_path) as relay:
        traffic = Traffic(relay)
        threads = [threading.Thread(target=traffic.client, args=(i,), daemon=True)
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        traffic.up.set()
        kills_with_traffic = 0
        try:
            for _ in range(ROUNDS):
                traffic.wait_acks(len(traffic.acked) + rng.randint(50, 400))
                time.sleep(rng.uniform(0, 0.03))  # a random point inside the traffic
                errors_before = traffic.errors
                relay.kill()
                traffic.up.clear()
                relay.restart()
                traffic.up.set()
                kills_with_traffic += traffic.errors > errors_before
                verify(relay, traffic)
            traffic.wait_acks(len(traffic.acked) + 20)
        finally:
            traffic.stop.set()
            traffic.up.set()
            for t in threads:
                t.join(15)
        assert relay.stop() == 0
        total = verify(relay, traffic)
        listed = {m["id"] for m in relay.queue_list()}
        assert set(traffic.acked) <= listed
    assert traffic.failures == []
    assert kills_with_traffic >= ROUNDS - 1, "the kills should interrupt live sessions"
    assert total > ROUNDS * 30
    assert time.monotonic() - started < 90
