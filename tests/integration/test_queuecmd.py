"""`relay queue …` run as a real subprocess against a real queue database."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.model import Envelope
from relay.model import RecipientStatus as S
from relay.store import AttemptTrace, JobResult, RecipientUpdate, Store

T0 = 1_795_000_000.0
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
ROOT = Path(__file__).resolve().parents[2]


def relay(cfg: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    proc = subprocess.run([sys.executable, "-m", "relay", "queue", *args, "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def env(*rcpts: str, sender: str = "alice@example.org") -> Envelope:
    return Envelope(sender=sender, recipients=rcpts,
                    body=b"Subject: t\r\n\r\n" + b"x" * 5000 + b"\r\n")


class Queue:
    """A config file and a queue database with three messages in known states."""

    def __init__(self, tmp: Path) -> None:
        self.db = tmp / "spool" / "relay.db"
        self.cfg = tmp / "relay.toml"
        self.cfg.write_text(f'[queue]\npath = "{self.db}"\n')
        self.deferred, self.queued, self.done = asyncio.run(self._fill())

    async def _fill(self) -> tuple[str, str, str]:
        store = await Store.open(self.db)
        try:
            deferred = await store.enqueue(env("bob@dane.example", "carol@dane.example"),
                                           now=T0)
            queued = await store.enqueue(env("dave@plain.example", sender="s2@org.example"),
                                         now=T0 + 1)
            done = await store.enqueue(env("erin@ok.example"), now=T0 + 2)
            jobs = {j.message_id: j for j in await store.claim(
                now=T0 + 3, owner="t", lease_seconds=60, limit=10)}
            await store.record([
                JobResult(deferred, tuple(
                    RecipientUpdate(r[0], S.DEFERRED, "4.7.323",
                                    "tlsa-invalid: The domain failed DANE validation.",
                                    next_attempt_at=T0 + 10**9) for r in jobs[deferred].recipients),
                    tuple(AttemptTrace(r[0], T0 + 3, mx="mx.dane.example", ip="192.0.2.25",
                                       dnssec="secure", tlsa="3 1 1 ab", tls="TLSv1.3",
                                       dane="no match", code="4.7.323", reply="tlsa-invalid")
                          for r in jobs[deferred].recipients)),
                JobResult(done, (RecipientUpdate(jobs[done].recipients[0][0], S.DELIVERED,
                                                 "2.0.0", "250 2.0.0 Ok"),)),
            ], now=T0 + 3)
            await store.unlease("t")
        finally:
            await store.close()
        return deferred, queued, done

    def recipients(self, message_id: str) -> list[tuple[str, float]]:
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute("SELECT status, next_attempt_at FROM recipients "
                                "WHERE message_id = ? ORDER BY id", (message_id,)).fetchall()
        finally:
            conn.close()


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    return Queue(tmp_path)


def test_list_json_shape_and_all(queue: Queue) -> None:
    listed = json.loads(relay(queue.cfg, "list", "--json").stdout)
    assert [m["id"] for m in listed] == [queue.deferred, queue.queued]
    first = listed[0]
    assert set(first) >= {"id", "sender", "received_at", "size", "recipients", "held"}
    assert first["sender"] == "alice@example.org" and first["size"] == 5016
    assert ISO.match(first["received_at"]) and first["held"] is False
    assert first["recipients"] == [
        {"address": "bob@dane.example", "status": "deferred", "code": "4.7.323"},
        {"address": "carol@dane.example", "status": "deferred", "code": "4.7.323"},
    ]
    assert listed[1]["recipients"] == [
        {"address": "dave@plain.example", "status": "queued", "code": None}]
    everything = json.loads(relay(queue.cfg, "list", "--all", "--json").stdout)
    assert [m["id"] for m in everything] == [queue.deferred, queue.queued, queue.done]


def test_list_filters(queue: Queue) -> None:
    def ids(*flags: str) -> list[str]:
        return [m["id"] for m in json.loads(relay(queue.cfg, "list", "--json", *flags).stdout)]

    assert ids("--status", "deferred") == [queue.deferred]
    assert ids("--code", "4.7.323") == [queue.deferred]
    assert ids("--domain", "PLAIN.example") == [queue.queued]
    assert ids("--sender", "s2@org.example") == [queue.queued]
    assert ids("--recipient", "carol@dane.example") == [queue.deferred]
    assert ids("--all", "--status", "delivered") == [queue.done]


def test_list_json_is_one_array_streamed_as_json_dumps_writes_it(queue: Queue) -> None:
    out = relay(queue.cfg, "list", "--all", "--json").stdout
    assert out == json.dumps(json.loads(out), indent=2, ensure_ascii=False) + "\n"
    empty = relay(queue.cfg, "list", "--json", "--domain", "nowhere.example").stdout
    assert empty == "[]\n"


def test_list_pages_with_limit_and_after(queue: Queue) -> None:
    first = relay(queue.cfg, "list", "--all", "--json", "--limit", "2")
    assert [m["id"] for m in json.loads(first.stdout)] == [queue.deferred, queue.queued]
    # the note for the next page is on stderr: stdout stays one JSON array
    assert f"--after {queue.queued}" in first.stderr and "2 message(s) shown of 3" in \
        first.stderr
    rest = relay(queue.cfg, "list", "--all", "--json", "--limit", "2", "--after", queue.queued)
    assert [m["id"] for m in json.loads(rest.stdout)] == [queue.done]
    assert rest.stderr == ""  # nothing more
    exact = relay(queue.cfg, "list", "--json", "--limit", "2")  # 2 with work left: all
    assert len(json.loads(exact.stdout)) == 2 and exact.stderr == ""
    filtered = relay(queue.cfg, "list", "--json", "--limit", "1", "--domain", "dane.example")
    assert [m["id"] for m in json.loads(filtered.stdout)] == [queue.deferred]
    text = relay(queue.cfg, "list", "--limit", "1").stdout.splitlines()
    assert text[-1] == (f"-- 1 message(s), 4.9K, 2 recipient(s) shown of 2; more: "
                        f"relay queue list --after {queue.deferred}")
    assert relay(queue.cfg, "list", "--after", queue.queued).stdout == "No more messages.\n"
    for bad in (["--limit", "0"], ["--after", "not-an-id!"]):
        proc = relay(queue.cfg, "list", *bad, check=False)
        assert proc.returncode == 1 and proc.stderr.startswith("relay: ")


def test_list_human_table(queue: Queue) -> None:
    out = relay(queue.cfg, "list").stdout
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "AGE", "SIZE"]
    assert any(line.startswith(queue.deferred) and "<alice@example.org>" in line
               for line in lines)
    assert any("bob@dane.example" in line and "deferred" in line and "4.7.323" in line
               for line in lines)
    assert "2 message(s)" in lines[-1]
    assert queue.done not in out


def test_show_json_shape(queue: Queue) -> None:
    shown = json.loads(relay(queue.cfg, "show", queue.deferred, "--json").stdout)
    assert shown["id"] == queue.deferred and shown["size"] == 5016
    assert set(shown) >= {"id", "sender", "received_at", "size", "recipients", "held"}
    bob = shown["recipients"][0]
    assert set(bob) >= {"address", "status", "attempts", "next_attempt_at", "code", "reply",
                        "history"}
    assert (bob["status"], bob["attempts"], bob["code"]) == ("deferred", 1, "4.7.323")
    assert ISO.match(bob["next_attempt_at"])
    (h,) = bob["history"]
    assert h == {"at": "2026-11-18T11:06:43Z", "mx": "mx.dane.example", "ip": "192.0.2.25",
                 "dnssec": "secure", "tlsa": "3 1 1 ab", "tls": "TLSv1.3", "dane": "no match",
                 "code": "4.7.323", "reply": "tlsa-invalid", "policy": ""}
    done = json.loads(relay(queue.cfg, "show", queue.done, "--json").stdout)
    assert done["recipients"][0]["status"] == "delivered"
    assert done["recipients"][0]["next_attempt_at"] is None


def test_show_human_trace(queue: Queue) -> None:
    out = relay(queue.cfg, "show", queue.deferred).stdout
    assert f"Message {queue.deferred}" in out
    assert "Recipient bob@dane.example: deferred 4.7.323" in out
    assert "mx.dane.example [192.0.2.25]" in out and "dane=no match" in out


def test_unknown_id_is_an_error(queue: Queue) -> None:
    for args in (("show", "0000000000000000"), ("show", "nope", "--json"),
                 ("retry", "nope"), ("delete", "nope"), ("hold", "nope"),
                 ("release", "nope")):
        proc = relay(queue.cfg, *args, check=False)
        assert proc.returncode == 1, args
        assert "no message with queue id" in proc.stderr, args
        assert proc.stdout == ""


def test_retry_hold_release_delete(queue: Queue) -> None:
    far = T0 + 10**9
    assert [t for _, t in queue.recipients(queue.deferred)] == [far, far]
    out = relay(queue.cfg, "retry", queue.deferred).stdout
    assert "2 recipient(s) due now" in out
    assert all(t < far for _, t in queue.recipients(queue.deferred))
    assert "recipient(s) due now" in relay(queue.cfg, "retry", "--all").stdout

    relay(queue.cfg, "hold", queue.queued)
    assert json.loads(relay(queue.cfg, "show", queue.queued, "--json").stdout)["held"] is True
    assert "[held]" in relay(queue.cfg, "list").stdout
    relay(queue.cfg, "release", queue.queued)
    assert json.loads(relay(queue.cfg, "show", queue.queued, "--json").stdout)["held"] is False

    assert "deleted" in relay(queue.cfg, "delete", queue.queued).stdout
    assert relay(queue.cfg, "show", queue.queued, check=False).returncode == 1
    assert queue.recipients(queue.queued) == []


def test_stats_and_backup(queue: Queue, tmp_path: Path) -> None:
    st = json.loads(relay(queue.cfg, "stats", "--json").stdout)
    assert st["messages"] == 2 and st["finished"] == 1
    assert st["recipients"] == {"queued": 1, "deferred": 2, "delivered": 1, "bounced": 0}
    assert {"code": "4.7.323", "status": "deferred", "count": 2} in st["by_code"]
    assert st["top_deferred_domains"] == [{"domain": "dane.example", "deferred": 2}]
    assert "deferred 2" in relay(queue.cfg, "stats").stdout

    dest = tmp_path / "copy.db"
    relay(queue.cfg, "backup", str(dest))
    conn = sqlite3.connect(dest)
    try:
        assert conn.execute("PRAGMA quick_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (3,)
    finally:
        conn.close()


def test_missing_database_is_reported_not_created(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    db = tmp_path / "nowhere" / "relay.db"
    cfg.write_text(f'[queue]\npath = "{db}"\n')
    proc = relay(cfg, "list", check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    assert not db.exists() and not db.parent.exists()


HOLDER = """
import asyncio, sys, time
from relay.model import Envelope
from relay.store import Store

async def main():
    store = await Store.open(sys.argv[1])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)
    sent = failed = 0
    print("ready", flush=True)
    while not stop.is_set():
        env = Envelope("held@example.org", ("x@busy.example",), b"Subject: h\\r\\n\\r\\nhi\\r\\n")
        try:
            await asyncio.gather(*(store.enqueue(env, now=time.time()) for _ in range(20)))
            sent += 20
        except Exception as exc:
            failed += 1
            print("error", exc, file=sys.stderr, flush=True)
        await asyncio.sleep(0.005)
    await store.close()
    print("done", sent, failed, flush=True)

asyncio.run(main())
"""


@pytest.fixture
def holder(queue: Queue) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the store open and writing, as `relay serve` does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(queue.db)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_commands_work_while_another_process_writes(queue: Queue, holder: subprocess.Popen[str]
                                                     ) -> None:
    listed = json.loads(relay(queue.cfg, "list", "--json").stdout)
    assert {queue.deferred, queue.queued} <= {m["id"] for m in listed}
    relay(queue.cfg, "hold", queue.queued)
    relay(queue.cfg, "retry", "--all")
    relay(queue.cfg, "delete", queue.deferred)
    assert json.loads(relay(queue.cfg, "show", queue.queued, "--json").stdout)["held"] is True
    st = json.loads(relay(queue.cfg, "stats", "--json").stdout)
    assert st["messages"] >= 1
    # the writer kept writing the whole time, without a single failed batch
    out, err = holder.communicate("stop\n", timeout=30)
    assert holder.returncode == 0, err
    done = out.split()
    assert done[0] == "done" and int(done[1]) > 0 and done[2] == "0", (out, err)
    later = json.loads(relay(queue.cfg, "list", "--json").stdout)
    assert len([m for m in later if m["sender"] == "held@example.org"]) == int(done[1])
    assert queue.deferred not in {m["id"] for m in later}


def test_malformed_ids_are_refused_before_the_database(tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(f'[queue]\npath = "{tmp_path / "none.db"}"\n')
    for bad in ("1 OR 1=1", "a" * 65, "x/../y", "\u00e9t\u00e9"):
        r = subprocess.run([sys.executable, "-m", "relay", "queue", "show", bad, "-c",
                            str(cfg)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "not a queue id" in r.stderr, r.stderr
    assert not (tmp_path / "none.db").exists()
