"""`relay serve` at start-up, as a process: deployment mistakes become one log line.

- A queue folder (or database file) the relay's user cannot write: one `fatal` event that
  names the folder, the uid and what to chown — not a crash loop of tracebacks. As root,
  the relay is started without capabilities (`setpriv`), so the file modes bind it as
  they bind the container's uid 10025.
- allowed_networks covering the default gateway: a `gateway_allowed` warning, and the
  relay runs.
- Deliveries wait at start-up for a validating resolver (relay.app.AfterResolver).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from relay import app as app_module
from relay import log
from relay.app import AfterResolver
from relay.errors import ConfigError
from relay.ops.preflight import default_gateways
from tests.support.relayproc import RelayProc, deep_merge, default_config, start_relay

OTHER_UID = 65534  # nobody


def _without_privileges(argv: list[str]) -> list[str]:
    """As root: the same uid with no capabilities, so file modes apply."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to start the relay without capabilities"
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all", *argv]


def _foreign(path: Path, mode: int) -> None:
    """Make `path` someone else's (as root) or unwritable (otherwise)."""
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)
    else:
        mode &= ~stat.S_IWUSR
    path.chmod(mode)


def _serve(tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    relay = RelayProc(tmp_path, default_config(tmp_path))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    r = subprocess.run(_without_privileges(relay.command()), cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return r, [json.loads(line) for line in r.stdout.splitlines()]


def test_unwritable_queue_folder_is_one_fatal_event(tmp_path: Path) -> None:
    folder = tmp_path / "queue"
    folder.mkdir()
    _foreign(folder, 0o755)
    r, events = _serve(tmp_path)
    assert r.returncode == 1 and r.stderr == "", r.stderr
    assert [e["event"] for e in events] == ["starting", "fatal"]
    fatal = events[-1]
    uid = os.geteuid()
    assert fatal["path"] == str(folder) and fatal["uid"] == uid and fatal["mode"] == (
        "0755" if uid == 0 else "0555")
    assert f"queue folder {folder} is not writable by uid {uid}" in fatal["error"]
    assert f"chown -R {uid}:{os.getegid()}" in fatal["error"]
    assert list(folder.iterdir()) == []  # nothing left behind


def test_unwritable_queue_database_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "queue"
    folder.mkdir()
    db = folder / "relay.db"
    db.write_bytes(b"")
    _foreign(db, 0o644)
    r, events = _serve(tmp_path)
    assert r.returncode == 1 and r.stderr == "", r.stderr
    fatal = events[-1]
    assert fatal["event"] == "fatal" and fatal["path"] == str(db)
    assert f"queue database file {db} cannot be written" in fatal["error"]


def test_queue_folder_that_cannot_be_created_is_named(tmp_path: Path) -> None:
    parent = tmp_path / "spool"
    parent.mkdir()
    _foreign(parent, 0o755)
    relay = RelayProc(tmp_path, deep_merge(default_config(tmp_path),
                                           {"queue": {"path": str(parent / "q" / "relay.db")}}))
    r = subprocess.run(_without_privileges(relay.command()), cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    fatal = json.loads(r.stdout.splitlines()[-1])
    assert r.returncode == 1 and fatal["event"] == "fatal"
    assert f"queue folder {parent / 'q'} does not exist and cannot be created" in fatal["error"]


def test_allowing_the_default_gateway_is_warned_about(tmp_path: Path) -> None:
    gateways = [g for g in default_gateways() if g.version == 4]
    assert gateways, "this machine has no IPv4 default route (/proc/net/route)"
    gw = gateways[0]
    cover = str(ipaddress.ip_network(f"{gw}/24", strict=False))
    with start_relay(tmp_path, listener={"allowed_networks": ["127.0.0.1/32", cover]}) as relay:
        [warning] = relay.events("gateway_allowed")
        assert warning["level"] == "warning"
        assert (warning["network"], warning["gateway"]) == (cover, str(gw))
        assert relay.stop() == 0  # a warning, not an error: the relay ran
    with start_relay(tmp_path / "b") as relay:  # 127.0.0.1/32 only: no warning
        assert relay.events("gateway_allowed") == []


def test_fatal_carries_a_traceback_only_for_a_bug() -> None:
    out = io.StringIO()
    old = log.log
    log.configure(stream=out)
    try:
        try:
            raise ValueError("unexpected")
        except ValueError as exc:
            assert app_module.fatal(exc) == 1
        assert app_module.fatal(ConfigError("bad key", source="f.toml", key="a.b")) == 2
    finally:
        log.log = old
    bug, config = (json.loads(line) for line in out.getvalue().splitlines())
    assert bug["event"] == "fatal" and bug["error"] == "ValueError: unexpected"
    assert 'raise ValueError("unexpected")' in bug["traceback"]
    assert config["error"] == "bad key" and config["key"] == "a.b" and config["exit"] == 2
    assert "traceback" not in config


# --- deliveries wait for the resolver at start-up ------------------------------------------


class _Inner:
    name = "scheduler"

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def start(self) -> None:
        self.calls.append("start")

    async def wait(self) -> None:
        await asyncio.Event().wait()

    async def drain(self, deadline: float) -> None:
        self.calls.append("drain")

    async def stop(self) -> None:
        self.calls.append("stop")


class _Probe:
    def __init__(self) -> None:
        self.validated = asyncio.Event()


async def test_deliveries_start_once_the_resolver_validates() -> None:
    inner, probe = _Inner(), _Probe()
    gate = AfterResolver(inner, probe, limit=30)  # type: ignore[arg-type]
    await gate.start()
    await asyncio.sleep(0.05)
    assert inner.calls == []  # the resolver has not validated yet
    probe.validated.set()
    for _ in range(100):
        if inner.calls:
            break
        await asyncio.sleep(0.01)
    assert inner.calls == ["start"]
    await gate.drain(0)
    await gate.stop()
    assert inner.calls == ["start", "drain", "stop"]


async def test_deliveries_start_anyway_after_the_limit() -> None:
    inner = _Inner()
    gate = AfterResolver(inner, _Probe(), limit=0.1)  # type: ignore[arg-type]
    await gate.start()
    waiter = asyncio.create_task(gate.wait())
    await asyncio.sleep(0.5)
    assert inner.calls == ["start"] and not waiter.done()
    waiter.cancel()
    await gate.stop()


async def test_a_stop_before_the_resolver_validates_never_starts_deliveries() -> None:
    inner = _Inner()
    gate = AfterResolver(inner, _Probe(), limit=30)  # type: ignore[arg-type]
    await gate.start()
    await gate.drain(0)
    await gate.stop()
    await asyncio.sleep(0.05)
    assert inner.calls == []


@pytest.fixture(autouse=True)
def _no_stray_relay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)


# --- a shared queue (PostgreSQL) that is not up yet -----------------------------------------


def test_serve_waits_for_a_shared_queue_that_starts_after_it(tmp_path: Path) -> None:
    """Compose starts a relay node and its PostgreSQL at once (and a rebooted Docker host
    restarts every container in no order): the node waits for the database instead of
    exiting, and serves once it answers."""
    from tests.support.pgserver import PgServer, available

    why = available()
    assert why is None, why
    root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
    root.chmod(0o755)  # the server runs as the postgres user
    pg = PgServer(root)
    pg.start()
    try:
        url = pg.create_db("later")
        pg.stop()  # the queue's database exists; its server is not up when the relay starts
        relay = RelayProc(tmp_path / "node", deep_merge(default_config(tmp_path / "node"), {
            "queue": {"url": url, "node": "n1"}}))
        relay.start(wait=False)
        try:
            first = relay.wait_event("queue_wait", timeout=30)
            assert first["level"] == "warning" and "is unreachable" in first["error"]
            assert first["retry_in"] == app_module.QUEUE_RETRY
            assert 0 < first["gives_up_in"] <= app_module.QUEUE_WAIT
            pg.start()
            relay.port = int(relay.wait_event("listening", timeout=60, service="smtp")["port"])
            assert relay.running and relay.events("fatal") == []
            with relay.smtp() as client:  # the queue takes mail
                client.sendmail("a@sender.test", ["b@dest.test"], b"Subject: x\r\n\r\nhi\r\n")
            assert [m["sender"] for m in relay.queue_list()] == ["a@sender.test"]
        finally:
            assert relay.stop() == 0
    finally:
        pg.destroy()
        shutil.rmtree(root, ignore_errors=True)


async def test_serve_gives_up_on_a_shared_queue_that_never_answers() -> None:
    from relay.config import QueueConfig
    from relay.errors import StorageUnavailable
    from tests.support.dnsprocs import free_port

    out = io.StringIO()
    old = log.log
    log.configure(stream=out)
    url = f"postgresql://relay@127.0.0.1:{free_port('127.0.0.1')}/relay"  # nothing listens
    try:
        with pytest.raises(StorageUnavailable, match="is unreachable"):
            await app_module.open_queue(QueueConfig(url=url), wait=0.5, every=0.2)
    finally:
        log.log = old
    waits = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {e["event"] for e in waits} == {"queue_wait"}
    assert 2 <= len(waits) <= 4, waits  # tried every 0.2 s for 0.5 s, then the error itself
    assert all("127.0.0.1" in e["error"] and "relay@" in e["error"] for e in waits)
