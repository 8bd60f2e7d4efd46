"""End to end, the queue under load and faults (issue 10, items 1, 2 and 8): a real
`relay serve`, real destinations on loopback, the real queue file.

- Hundreds of messages expire in the same second: every one gets exactly one NDR, at
  once, with no `internal_error` and no stray trace rows.
- A retry wave of thousands of due recipients while new mail arrives: every new message
  is attempted promptly (never left claimed until its lease runs out).
- A byte of a body flipped on disk while the relay is stopped: that message is held
  (visible, with its reason, an alert event and metric), never sent; the others go.
  Mail queued by the previous schema version (no digest) is still delivered.

Routes to IP addresses with `tls = "none"`: no DNS is involved, the queue is the subject.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import statistics
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from relay.store.sqlfiles import migrations, statements
from tests.support.e2e import running, wait_for
from tests.support.relayproc import RelayProc, start_relay
from tests.support.smtpd import Destination, shared_port

SENDER_IP, FAIL_IP, NEW_IP = "127.25.10.1", "127.25.10.2", "127.25.10.3"
PORT = shared_port([SENDER_IP, FAIL_IP, NEW_IP])
SENDER = "alice@senderbox.test"


def routes() -> list[dict[str, Any]]:
    # FAIL_IP: nothing listens there, every attempt is refused at once (a failing
    # destination); the other two are real servers.
    return [
        {"domain": "senderbox.test", "hosts": [f"{SENDER_IP}:{PORT}"], "tls": "none"},
        {"domain": ".fail.test", "hosts": [f"{FAIL_IP}:{PORT}"], "tls": "none"},
        {"domain": ".new.test", "hosts": [f"{NEW_IP}:{PORT}"], "tls": "none"},
    ]


@pytest.fixture
def dests() -> Iterator[dict[str, Destination]]:
    made = {"senderbox": Destination(SENDER_IP, PORT, starttls=False),
            "new": Destination(NEW_IP, PORT, starttls=False)}
    with running(made):
        yield made


def relay_sections(**delivery: Any) -> dict[str, Any]:
    return {
        "dns": {"require_validating_resolver": False},
        "delivery": {"enabled": True, "port": PORT, "poll_interval": "0.2s",
                     "connect_timeout": "2s", **delivery},
        "routes": routes(),
    }


def submit_many(relay: RelayProc, rcpts: list[str], per_session: int = 25) -> list[str]:
    """Send one message per recipient (several per SMTP session); their queue ids."""
    mark = relay.mark()
    for start in range(0, len(rcpts), per_session):
        with relay.smtp(timeout=30) as client:
            for rcpt in rcpts[start:start + per_session]:
                client.sendmail(SENDER, [rcpt], f"Subject: to {rcpt}\r\n\r\nhi\r\n".encode())
    wait_for(lambda: len(relay.events("received", after=mark)) >= len(rcpts), 60,
             "every message received")
    return [str(e["id"]) for e in relay.events("received", after=mark)]


def db_rows(relay: RelayProc, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    with contextlib.closing(relay.db()) as conn:
        return conn.execute(sql, params).fetchall()


def active_recipients(relay: RelayProc) -> int:
    try:
        return int(db_rows(relay, "SELECT count(*) FROM recipients "
                                  "WHERE status IN ('queued', 'deferred')")[0][0])
    except sqlite3.OperationalError:  # busy for a moment: ask again
        return -1


# --- item 1 -----------------------------------------------------------------------------


def test_hundreds_expiring_at_once_each_get_exactly_one_ndr(
        tmp_path: Path, dests: dict[str, Destination]) -> None:
    n = 300
    rcpts = [f"u{i}@d{i % 60}.fail.test" for i in range(n)]
    with start_relay(tmp_path, **relay_sections(
            enabled=False, max_connections=n, max_lifetime="1s")) as relay:
        ids = submit_many(relay, rcpts)
        relay.stop()
        time.sleep(1.5)  # every message is now past its lifetime: the first attempt expires
        relay.write_config(delivery={"enabled": True})
        mark = relay.mark()
        relay.start()
        wait_for(lambda: len(relay.events("expired", after=mark)) >= n, 120,
                 "every recipient to expire")
        # The NDRs are new mail to senderbox.test, queued just after the expiries are
        # recorded; wait until they are queued and the queue is idle.
        wait_for(lambda: len(relay.events("ndr_sent", after=mark)) >= n
                 and active_recipients(relay) == 0, 120, "the NDRs queued and delivered")
        ndrs = dests["senderbox"].messages
        internal = relay.events("internal_error", after=mark)
        expired = relay.events("expired", after=mark)
        sent = relay.events("ndr_sent", after=mark)
        stray = db_rows(relay, "SELECT count(*) FROM attempts WHERE code = '4.3.0'")[0][0]
        pending = db_rows(relay, "SELECT count(*) FROM recipients "
                                 "WHERE ndr_state = 'pending'")[0][0]
    assert internal == []
    assert sorted(e["id"] for e in expired) == sorted(ids)  # one `expired` per recipient
    assert sorted(e["id"] for e in sent) == sorted(ids)  # one NDR per message, at once
    assert pending == 0 and stray == 0
    originals = sorted(next(i for i in ids if i.encode() in m.body) for m in ndrs)
    assert originals == sorted(ids)  # delivered: exactly one NDR for each message
    assert all(m.mail_from == "" and m.rcpt_tos == [SENDER] for m in ndrs)


# --- item 2 -----------------------------------------------------------------------------


def make_deferred_backlog(db: Path, count: int) -> None:
    """Turn the queued backlog into deferred work that already had its delay warning and
    is due in an hour (what a long outage of one destination leaves behind)."""
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        conn.execute("UPDATE recipients SET status = 'deferred', attempts = 1, "
                     "code = '4.4.1', reply = 'connection refused', "
                     "next_attempt_at = next_attempt_at + 3600, warned_at = updated_at "
                     "WHERE domain LIKE '%.fail.test'")
        conn.commit()
        (n,) = conn.execute("SELECT count(*) FROM recipients "
                            "WHERE status = 'deferred'").fetchone()
    assert n == count


def test_new_mail_is_attempted_promptly_during_a_retry_wave(
        tmp_path: Path, dests: dict[str, Destination]) -> None:
    backlog, fresh = 3000, 150
    # delay_warning on: every deferral reads the message (a snapshot read), as in the
    # run that found the fault; the lease is long, so mail left claimed would stay put.
    sections = relay_sections(enabled=False, max_lifetime="1d", retry_schedule=["1h"],
                              lease="10m")
    sections["ndr"] = {"delay_warning": "1s"}
    with start_relay(tmp_path, **sections) as relay:
        old_rcpts = [f"o{i}@d{i % 200}.fail.test" for i in range(backlog)]
        submit_many(relay, old_rcpts, per_session=100)
        relay.stop()
        make_deferred_backlog(relay.db_path, backlog)
        relay.write_config(delivery={"enabled": True})
        relay.start()
        mark = relay.mark()
        relay.cli("queue", "retry", "--all")  # the wave: every deferred recipient due now
        wait_for(lambda: len(relay.events("deferred", after=mark)) >= 200, 60,
                 "the wave to start")
        new_ids: list[str] = []
        for i in range(fresh):  # new mail while the wave runs
            with relay.smtp(timeout=30) as client:
                client.sendmail(SENDER, [f"n{i}@new.test"], b"Subject: new\r\n\r\nhi\r\n")
        wait_for(lambda: len(relay.events("received", after=mark)) >= fresh, 60,
                 "the new mail to be received")
        received = {e["id"]: e for e in relay.events("received", after=mark)}
        new_ids = list(received)
        # Every new message must be delivered well before any lease (10 minutes) runs out.
        wait_for(lambda: len({e["id"] for e in relay.events("delivered", after=mark)}
                             & set(new_ids)) == fresh, 60,
                 "every new message to be delivered")
        wait_for(lambda: len(relay.events("deferred", after=mark)) >= backlog, 120,
                 "the wave to end")
        delivered = {e["id"]: e for e in relay.events("delivered", after=mark)
                     if e["id"] in received}
        wave = [_ts(e) for e in relay.events("deferred", after=mark)]
        released = relay.events("job_released", after=mark)
        internal = relay.events("internal_error", after=mark)
    lag = [_ts(delivered[i]) - _ts(received[i]) for i in new_ids]
    arrivals = sorted(_ts(received[i]) for i in new_ids)
    during = sum(1 for t in arrivals if t < max(wave))
    print(f"\nnew mail during a wave of {backlog} deferred recipients "
          f"({max(wave) - min(wave):.1f}s; {during} of {fresh} new messages arrived "
          f"before it ended): received -> delivered median {statistics.median(lag):.3f}s, "
          f"max {max(lag):.3f}s")
    assert during >= fresh // 4  # the test did race new mail against the wave
    assert len(dests["new"].messages) == fresh
    assert released == [] and internal == []  # no body read failed, nothing contained


def _ts(ev: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(ev["ts"]).replace("Z", "+00:00")).timestamp()


# --- item 8 -----------------------------------------------------------------------------


def flip_byte_on_disk(db: Path, needle: bytes, at: int) -> None:
    """Change one byte inside `needle` in the stopped relay's database file (what a bad
    disk or a careless copy does); the file stays well-formed for SQLite."""
    wal = Path(f"{db}-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed at a clean stop
    data = db.read_bytes()
    assert data.count(needle) == 1
    pos = data.index(needle) + at
    with db.open("r+b") as f:
        f.seek(pos)
        f.write(bytes([data[pos] ^ 0x01]))


# the recipe of docs/deploy.md ("Damaged bodies"), as run by an operator's sqlite3
RESTORE_BODY = """ATTACH 'BACKUP' AS b;
  UPDATE messages SET body = (SELECT body FROM b.messages WHERE id = 'ID')
  WHERE id = 'ID' AND body_sha256 = (SELECT body_sha256 FROM b.messages WHERE id = 'ID');"""


def http_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return str(resp.read().decode())


def test_a_body_damaged_on_disk_is_held_never_sent(
        tmp_path: Path, dests: dict[str, Destination]) -> None:
    marker = b"WIRE-TRANSFER-TO-IBAN-DE89370400440532013000"
    bodies = {f"n{i}@new.test": f"Subject: intact {i}\r\n\r\nline {i}\r\n".encode()
              for i in range(8)}
    bodies["victim@new.test"] = b"Subject: invoice\r\n\r\n" + marker + b"\r\nthanks\r\n"
    sections = relay_sections(enabled=False)
    sections["metrics"] = {"listen": "127.0.0.1:0"}
    with start_relay(tmp_path, **sections) as relay:
        mark = relay.mark()
        with relay.smtp() as client:
            for rcpt, body in bodies.items():
                client.sendmail(SENDER, [rcpt], body)
        wait_for(lambda: len(relay.events("received", after=mark)) == len(bodies), 30,
                 "the messages to be received")
        backup = tmp_path / "backup" / "relay.db"
        relay.cli("queue", "backup", str(backup))  # while running
        relay.stop()
        flip_byte_on_disk(relay.db_path, marker, at=30)  # one digit of the account
        relay.write_config(delivery={"enabled": True})
        mark = relay.mark()
        relay.start()
        ev = relay.wait_event("corrupt_body", after=mark, timeout=30)
        victim = ev["id"]
        dests["new"].wait_messages(len(bodies) - 1, timeout=30)
        listed = {m["id"]: m for m in relay.queue_list(all=False)}
        text = relay.cli("queue", "list").stdout
        shown = json.loads(relay.cli("queue", "show", victim, "--json").stdout)
        port = int(relay.wait_event("listening", after=mark, service="metrics")["port"])
        metrics = http_get(port, "/metrics")
        relay.stop()
        # restarted, it is still held: never claimed, never sent (new mail meanwhile
        # shows the scheduler has been working)
        relay.start()
        mark = relay.mark()
        with relay.smtp() as client:
            client.sendmail(SENDER, ["late@new.test"], b"Subject: late\r\n\r\nlate\r\n")
        relay.wait_event("delivered", after=mark, recipient="late@new.test", timeout=30)
        again = relay.queue_list(all=False)
        # docs/deploy.md: put the body back from the backup, release, delivered intact
        with contextlib.closing(sqlite3.connect(relay.db_path, timeout=30)) as conn:
            conn.executescript(RESTORE_BODY.replace("ID", victim).replace("BACKUP",
                                                                          str(backup)))
        relay.cli("queue", "release", victim)
        relay.wait_event("delivered", after=mark, id=victim, timeout=30)
    received = [m for m in dests["new"].messages if m.rcpt_tos != ["late@new.test"]]
    assert len(received) == len(bodies)
    assert all(m.body.endswith(bodies[m.rcpt_tos[0]]) for m in received)  # all intact
    # the damaged copy never went out: the victim's only delivery is the restored one,
    # and it came after the others
    assert [m.rcpt_tos for m in received].index(["victim@new.test"]) == len(bodies) - 1
    assert "digest mismatch" in ev["detail"] and ev["level"] == "error"
    assert list(listed) == [victim] and listed[victim]["held"] is True
    assert listed[victim]["held_reason"].startswith("corrupt: body digest mismatch")
    assert "[held: corrupt: body digest mismatch" in text
    assert shown["held"] is True and shown["recipients"][0]["status"] == "queued"
    assert shown["recipients"][0]["attempts"] == 0  # not bounced, not tried
    assert "relay_corrupt_bodies_total 1.0" in metrics
    assert "relay_queue_held_messages 1.0" in metrics
    assert [m["id"] for m in again] == [victim]
    assert dests["senderbox"].messages == []  # no NDR either


def test_mail_queued_before_the_digest_existed_is_still_delivered(
        tmp_path: Path, dests: dict[str, Destination]) -> None:
    """A queue written by the previous version (schema 2: no digest) is migrated at
    start-up, and its mail is delivered unchecked."""
    db = tmp_path / "queue" / "relay.db"
    db.parent.mkdir(parents=True)
    body = b"Subject: from v2\r\n\r\nqueued before the upgrade\r\n"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for mig in migrations()[:2]:
            for stmt in statements(mig.sql):
                conn.execute(stmt)
        conn.execute("PRAGMA user_version = 2")
        now = time.time()
        conn.execute("INSERT INTO messages (id, sender, received_at, size, body, headers) "
                     "VALUES ('1K0OLDMESSAGE000', ?, ?, ?, ?, x'')",
                     (SENDER, now, len(body), body))
        conn.execute("INSERT INTO recipients (message_id, address, domain, next_attempt_at,"
                     " updated_at) VALUES ('1K0OLDMESSAGE000', 'old@new.test', 'new.test', "
                     "?, ?)", (now, now))
        conn.commit()
    with start_relay(tmp_path, **relay_sections()) as relay:
        relay.wait_event("delivered", id="1K0OLDMESSAGE000", timeout=30)
        with contextlib.closing(relay.db()) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations()[-1].version
    (msg,) = dests["new"].messages
    assert msg.body.endswith(body)
