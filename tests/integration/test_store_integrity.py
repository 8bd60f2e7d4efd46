"""What the store guarantees about the mail it hands back (issue 10, items 1 and 8): a
body damaged on disk is refused rather than delivered, messages from before the digest
still load, and a report about other mail (NDR, delay warning) is queued exactly once.
Real database files, damaged with ordinary file writes while no store has them open;
what does not depend on the file runs on PostgreSQL too."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path

import pytest

from relay.errors import CorruptMessage, NotFound
from relay.model import Envelope
from relay.model import RecipientStatus as S
from relay.store import JobResult, RecipientUpdate, Store
from relay.store.sqlfiles import migrations
from relay.store.sqlite import schema
from tests.support.stores import BACKENDS, open_backend, pg_server_fixture

T0 = 1_795_000_000.0
pg_server = pg_server_fixture()


def env(*rcpts: str, body: bytes, sender: str = "alice@example.org") -> Envelope:
    return Envelope(sender=sender, recipients=rcpts, body=body)


def flip_byte_of(path: Path, needle: bytes, at: int = 3) -> None:
    """Change one byte inside the first occurrence of `needle` in the database file (the
    store must be closed: its WAL checkpointed into the file)."""
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    data = path.read_bytes()
    pos = data.index(needle)
    assert data.count(needle) == 1
    with path.open("r+b") as f:
        f.seek(pos + at)
        f.write(bytes([data[pos + at] ^ 0x20]))


async def test_body_digest_is_stored_with_the_body_in_the_same_insert(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "q.db")
    body = b"Subject: x\r\n\r\nhello\r\n"
    qid = await store.enqueue(env("b@example.net", body=body), now=T0)
    await store.close()
    conn = sqlite3.connect(tmp_path / "q.db")
    try:
        (digest,) = conn.execute("SELECT body_sha256 FROM messages WHERE id = ?",
                                 (qid,)).fetchone()
    finally:
        conn.close()
    assert digest == hashlib.sha256(body).digest()


async def test_a_byte_flipped_on_disk_is_found_before_delivery(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    store = await Store.open(path)
    good = b"Subject: good\r\n\r\n" + b"fine line\r\n" * 300
    bad = b"Subject: bad\r\n\r\nPAY-TO-ACCOUNT-0123456789\r\n" + b"text\r\n" * 300
    good_id = await store.enqueue(env("b@example.net", body=good), now=T0)
    bad_id = await store.enqueue(env("c@example.net", body=bad), now=T0)
    await store.close()
    flip_byte_of(path, b"PAY-TO-ACCOUNT-0123456789", at=17)  # one digit of the account
    store = await Store.open(path)  # quick_check passes: the file is well-formed
    try:
        assert await store.load_body(good_id) == good
        with pytest.raises(CorruptMessage) as info:
            await store.load_body(bad_id)
        assert info.value.message_id == bad_id
        assert "digest mismatch" in info.value.detail
    finally:
        await store.close()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_hold_corrupt_keeps_it_visible_out_of_delivery_and_gives_the_lease_back(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_backend(kind, tmp_path, request)
    try:
        qid = await store.enqueue(env("b@example.net", body=b"Subject: x\r\n\r\nx\r\n"),
                                  now=T0)
        assert len(await store.claim(now=T0, owner="w", lease_seconds=600, limit=5)) == 1
        assert await store.hold_corrupt(qid, reason="corrupt: body digest mismatch",
                                        owner="w")
        info = await store.get_message(qid)
        assert info.held and info.held_reason == "corrupt: body digest mismatch"
        assert info.recipients[0].lease_owner is None  # no lease left to run out
        assert info.recipients[0].status is S.QUEUED  # not bounced, not delivered
        assert await store.claim(now=T0 + 1, owner="w", lease_seconds=60, limit=5) == []
        (listed,) = [m.summary_json() for m in await store.list_messages()]
        assert listed["held"] is True
        assert listed["held_reason"] == "corrupt: body digest mismatch"
        assert await store.release(qid)  # an operator's release clears the reason
        info = await store.get_message(qid)
        assert not info.held and info.held_reason == ""
        assert await store.hold(qid)  # an operator's hold: no reason, shown as "[held]"
        info = await store.get_message(qid)
        assert info.held and info.held_reason == ""
        assert (await store.list_messages())[0].summary_json()["held_reason"] is None
    finally:
        await store.close()


async def test_a_body_gone_while_recipients_wait_is_corrupt_not_silently_skipped(
        tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "q.db")
    qid = await store.enqueue(env("b@example.net", body=b"Subject: x\r\n\r\nx\r\n"), now=T0)
    await store.close()
    conn = sqlite3.connect(tmp_path / "q.db")
    conn.execute("UPDATE messages SET body = NULL WHERE id = ?", (qid,))
    conn.commit()
    conn.close()
    store = await Store.open(tmp_path / "q.db")
    try:
        with pytest.raises(CorruptMessage, match="lost its body"):
            await store.load_body(qid)
        # finished meanwhile (another worker's late result): nothing to deliver, no alarm
        (job,) = await store.claim(now=T0, owner="w", lease_seconds=60, limit=5)
        await store.record([JobResult(qid, (RecipientUpdate(
            job.recipients[0][0], S.DELIVERED, "2.0.0", "250 ok"),))], now=T0)
        with pytest.raises(NotFound, match="no recipient left"):
            await store.load_body(qid)
        with pytest.raises(NotFound):
            await store.load_body("0000000000000000")
    finally:
        await store.close()


async def test_messages_from_before_the_digest_still_load(tmp_path: Path) -> None:
    """A queue written by the previous version (schema 2, no digest column) is migrated at
    open; its messages are delivered unchecked, new ones get a digest."""
    path = tmp_path / "q.db"
    conn = await schema.connect(path, busy_timeout=1.0)
    try:
        assert await schema.migrate(conn, path, migrations()[:2]) == [1, 2]
        old_body = b"Subject: old\r\n\r\nfrom version 2\r\n"
        await conn.execute(
            "INSERT INTO messages (id, sender, received_at, size, body, headers) "
            "VALUES ('1K0OLDMESSAGE000', 'a@example.org', ?, ?, ?, x'')",
            (T0, len(old_body), old_body))
        await conn.execute(
            "INSERT INTO recipients (message_id, address, domain, next_attempt_at, updated_at)"
            " VALUES ('1K0OLDMESSAGE000', 'b@example.net', 'example.net', ?, ?)", (T0, T0))
    finally:
        await conn.close()
    store = await Store.open(path)
    try:
        assert await store.load_body("1K0OLDMESSAGE000") == old_body
        new = await store.enqueue(env("c@example.net", body=b"Subject: n\r\n\r\nn\r\n"),
                                  now=T0)
        assert await store.load_body(new) == b"Subject: n\r\n\r\nn\r\n"
        jobs = await store.claim(now=T0, owner="w", lease_seconds=60, limit=5)
        assert {j.message_id for j in jobs} == {"1K0OLDMESSAGE000", new}
    finally:
        await store.close()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_notice_is_queued_once_whoever_builds_it(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two builders of the same NDR at once (two tasks, or the sweep and a job): the
    recipients are marked and the NDR inserted in one transaction, only while pending."""
    store = await open_backend(kind, tmp_path, request)
    try:
        qids = [await store.enqueue(env(f"x{i}@example.net", body=b"Subject: s\r\n\r\nb\r\n"),
                                    now=T0) for i in range(20)]
        jobs = await store.claim(now=T0, owner="w", lease_seconds=60, limit=50)
        await store.record([JobResult(j.message_id, tuple(
            RecipientUpdate(r[0], S.BOUNCED, "5.1.1", "550 no such user", ndr_state="pending")
            for r in j.recipients)) for j in jobs], now=T0)
        assert sorted(await store.pending_ndrs()) == sorted(qids)
        rid = {j.message_id: [r[0] for r in j.recipients] for j in jobs}

        def ndr(qid: str) -> Envelope:
            return Envelope(sender="", recipients=("alice@example.org",),
                            body=b"Subject: ndr\r\n\r\n" + qid.encode() + b"\r\n",
                            extra={"kind": "ndr", "original": qid})

        results = await asyncio.gather(*(
            store.enqueue_notice(ndr(q), now=T0 + 1, kind="ndr", covers=rid[q])
            for q in qids for _ in range(3)))
        made = [r for r in results if r is not None]
        assert len(made) == len(qids)  # one per message, the others None
        assert await store.pending_ndrs() == []
        notices = [m for m in await store.list_messages() if m.sender == ""]
        assert len(notices) == len(qids)
        originals = sorted([(await store.get_message(m.id)).extra["original"]
                            for m in notices])
        assert originals == sorted(qids)
    finally:
        await store.close()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_pending_delay_warnings_are_those_not_yet_warned(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = await open_backend(kind, tmp_path, request)
    try:
        old = await store.enqueue(env("a@slow.example", body=b"S: 1\r\n\r\n1\r\n"), now=T0)
        young = await store.enqueue(env("b@slow.example", body=b"S: 2\r\n\r\n2\r\n"),
                                    now=T0 + 500)
        null = await store.enqueue(env("c@slow.example", body=b"S: 3\r\n\r\n3\r\n",
                                       sender=""), now=T0)
        jobs = await store.claim(now=T0 + 600, owner="w", lease_seconds=60, limit=10)
        await store.record([JobResult(j.message_id, tuple(
            RecipientUpdate(r[0], S.DEFERRED, "4.4.1", "refused", next_attempt_at=T0 + 900)
            for r in j.recipients)) for j in jobs], now=T0 + 600)
        assert await store.pending_delay_warnings(before=T0 + 100) == [old]
        assert null not in await store.pending_delay_warnings(before=T0 + 600)
        rid = next(j.recipients[0][0] for j in jobs if j.message_id == old)
        warning = Envelope(sender="", recipients=("alice@example.org",),
                           body=b"Subject: delayed\r\n\r\nw\r\n")
        assert await store.enqueue_notice(warning, now=T0 + 601, kind="delay",
                                          covers=[rid]) is not None
        assert await store.enqueue_notice(warning, now=T0 + 602, kind="delay",
                                          covers=[rid]) is None
        assert await store.pending_delay_warnings(before=T0 + 600) == [young]
    finally:
        await store.close()
