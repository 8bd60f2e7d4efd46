"""Storage failures: a full disk answers 452 4.3.1, a locked database 451 4.3.0, never 250,
and intake resumes by itself (no restart) once the problem is gone.

The full disk is real: the queue lives on a 4 MiB tmpfs mounted for the test (root is
needed to mount; the project's CI runs as root), filled to the last byte by a filler
file. The lock is real too: another process holds SQLite's write lock past the
relay's busy timeout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import smtplib
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.relayproc import RelayProc, start_relay


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "smallfs"
    mnt.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                             str(mnt)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"this test needs root to mount a small tmpfs: {result.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> int:
    """Write `path` until the filesystem is full; returns the bytes written."""
    written = 0
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk) or 0
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    return written


def big_body(n: int, size: int = 300_000) -> bytes:
    line = (b"%06d " % n) + b"z" * 90 + b"\r\n"
    return b"Subject: big %d\r\n\r\n" % n + line * (size // len(line))


def try_send(relay: RelayProc, client: smtplib.SMTP, n: int) -> tuple[int, bytes]:
    assert client.mail("a@example.org")[0] == 250
    assert client.rcpt(f"r{n}@example.com")[0] == 250
    return client.data(big_body(n))


def test_full_disk_answers_4xx_and_intake_resumes(tmp_path: Path, small_fs: Path) -> None:
    with start_relay(tmp_path / "relay", queue={"path": str(small_fs / "relay.db")}) as relay:
        with relay.smtp() as c:
            c.ehlo()
            code, msg = try_send(relay, c, 0)
            assert code == 250, msg
            filler = small_fs / "filler"
            assert fill(filler) > 0
            mark = relay.mark()
            codes = []
            for n in range(1, 6):
                code, msg = try_send(relay, c, n)
                codes.append((code, msg[:5]))
            assert set(codes) == {(452, b"4.3.1")}, codes  # never 250
            assert relay.wait_event("storage_error", after=mark)["kind"] == "full"
            # free the space: the same session goes on, no restart
            filler.unlink()
            resumed = []
            for n in range(6, 9):
                code, msg = try_send(relay, c, n)
                assert code == 250, msg
                resumed.append(msg.decode().rsplit(" ", 1)[1])
            relay.wait_event("storage_recovered", after=mark)
            relay.wait_event("received", id=resumed[-1])  # logged after the rejections
            rejected = relay.events("rejected", after=mark, command="DATA")
            assert [e["reply"][:9] for e in rejected] == ["452 4.3.1"] * 5
        stored = relay.messages()
        assert set(resumed) <= set(stored)
        assert len(stored) == 4  # the first message and the three after; none of the refused
        for qid in resumed:
            assert b"Subject: big" in (stored[qid][1] or b"")
        assert relay.stop() == 0


def test_locked_database_answers_451_and_intake_resumes(tmp_path: Path) -> None:
    with start_relay(tmp_path) as relay:
        with relay.smtp() as c:
            c.ehlo()
            code, _ = try_send(relay, c, 0)
            assert code == 250
            locker = sqlite3.connect(relay.db_path, timeout=1, isolation_level=None)
            try:
                locker.execute("BEGIN EXCLUSIVE")
                mark = relay.mark()
                code, msg = try_send(relay, c, 1)  # waits for the busy timeout, then fails
                assert (code, msg[:5]) == (451, b"4.3.0"), msg
                assert relay.wait_event("storage_error", after=mark)["kind"] == "unavailable"
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            code, msg = try_send(relay, c, 2)
            assert code == 250, msg
        assert len(relay.messages()) == 2
