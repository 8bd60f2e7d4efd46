"""`relay queue import FILE.db` as a real subprocess: the mail of a SQLite queue (a dead
node's disk) moves into the configured queue — PostgreSQL or another SQLite file — with
recipients' states, plans and trace; the source is emptied; a second run moves nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from relay.model import RecipientStatus as S
from relay.store import Store
from tests.integration.test_queuecmd import Queue, relay
from tests.support.pgserver import PgServer
from tests.support.stores import pg_server_fixture

pg_server = pg_server_fixture()


@pytest.fixture(params=["sqlite", "pg"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    """A config file naming the target queue, and how to open that queue."""
    cfg = tmp_path / "target.toml"
    if request.param == "pg":
        pg: PgServer = request.getfixturevalue("pg_server")
        url = pg.create_db(f"import_{abs(hash(request.node.name)) % 10**8}")
        cfg.write_text(f'[queue]\nurl = "{url}"\n')
        return cfg, url
    db = tmp_path / "target" / "relay.db"
    cfg.write_text(f'[queue]\npath = "{db}"\n')
    return cfg, str(db)


async def _open(where: str) -> Store:
    return await (Store.open_url(where) if where.startswith("postgresql:")
                  else Store.open(where))


def test_import_moves_the_mail_with_its_state_and_trace(
        tmp_path: Path, target: tuple[Path, str]) -> None:
    (tmp_path / "dead-node").mkdir()
    src = Queue(tmp_path / "dead-node")
    cfg, where = target
    out = json.loads(relay(cfg, "import", str(src.db), "--json").stdout)
    assert out == {"messages": 2, "recipients": 3}  # the finished message stays behind

    async def check() -> None:
        store = await _open(where)
        try:
            d = await store.get_message(src.deferred)
            assert [(r.address, r.status, r.code, r.attempts, r.next_attempt_at)
                    for r in d.recipients] == [
                ("bob@dane.example", S.DEFERRED, "4.7.323", 1, 1_795_000_000.0 + 10**9),
                ("carol@dane.example", S.DEFERRED, "4.7.323", 1, 1_795_000_000.0 + 10**9)]
            assert all(r.lease_owner is None for r in d.recipients)
            assert [h.mx for r in d.recipients for h in r.history] == ["mx.dane.example"] * 2
            assert await store.load_body(src.queued) == (
                b"Subject: t\r\n\r\n" + b"x" * 5000 + b"\r\n")
            q = await store.get_message(src.queued)
            assert [(r.status, r.attempts) for r in q.recipients] == [(S.QUEUED, 0)]
            jobs = await store.claim(now=1_795_000_010.0, owner="n", lease_seconds=60,
                                     limit=10)
            assert [j.message_id for j in jobs] == [src.queued]  # deliverable at once
        finally:
            await store.close()

    asyncio.run(check())
    # the source no longer holds the moved mail (its finished trace stays)
    left = json.loads(relay(src.cfg, "list", "--all", "--json").stdout)
    assert [m["id"] for m in left] == [src.done]
    again = json.loads(relay(cfg, "import", str(src.db), "--json").stdout)
    assert again == {"messages": 0, "recipients": 0}


def test_import_of_a_missing_file_is_a_clear_error(tmp_path: Path,
                                                   target: tuple[Path, str]) -> None:
    cfg, _ = target
    r = relay(cfg, "import", str(tmp_path / "nope.db"), check=False)
    assert r.returncode != 0 and "nope.db" in r.stderr and "does not exist" in r.stderr
