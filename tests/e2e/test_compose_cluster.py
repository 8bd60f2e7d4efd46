"""The compose file's profile `cluster`, for real (marker `compose`, scripts/compose-test):
PostgreSQL and two relay nodes sharing its queue, beside the validating resolver, brought
up and driven with the operator's commands from docs/deploy.md ("Several nodes"), word
for word, on the engine and world of tests/e2e/conftest.py (a private signed root, a DANE
destination on the Docker host, a LAN mail server in a network namespace).

In order: the database refuses to start without its password; the profile comes up with
all four containers healthy; mail from the LAN to each node's published port is
delivered with DNSSEC and DANE, and either node sees the other's mail (one queue); `relay
queue nodes` lists both nodes; a single node's SQLite queue is imported; node 1 is
killed (SIGKILL) while it holds open transactions at the destination and the other node
takes its work over and delivers everything accepted; the database backup command; the
queue across `down`/`up`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.model import Envelope
from relay.store import Store
from tests.support.compose_stack import PROJECT, ROOT, Stack, quiet_port
from tests.support.compose_world import LAN_HOST, RELAY_NAME, WORLD_IP, World
from tests.support.smtpd import ConnectionLog, Received

SENDER, RCPT, DEFER_RCPT = "app@lan.test", "user@dest.test", "user@defer.test"
NODE_IP = {"relay": "172.28.53.25", "relay-2": "172.28.53.26"}
HELD = 4  # messages node 1 holds open at the destination when it is killed
LEASE = 30.0  # delivery.lease (default): a dead node's work is taken over after it
ENV_FILE = ROOT / ".env"  # beside docker-compose.yml, where Compose reads it
ALL = ("resolver", "postgres", "relay", "relay-2")


@pytest.fixture(scope="module")
def world(compose_world: World) -> Iterator[World]:
    yield compose_world
    assert compose_world.destination is not None
    compose_world.destination.data_delay = 0
    compose_world.destination.messages.clear()  # the next scenario counts its own


@pytest.fixture(scope="module")
def cluster(world: World) -> Iterator[Stack]:
    if ENV_FILE.exists():
        pytest.fail(f"{ENV_FILE} exists: the cluster test writes its own (docs/deploy.md, "
                    "Several nodes, step 1); move yours away while it runs")
    override = world.write_override((ROOT / "config/unbound.conf").read_text(), cluster=True)
    ops = world.dir / "cluster-operator"
    ops.mkdir()
    ports = {"DANE_RELAY_2_SMTP_PORT": str(quiet_port("0.0.0.0")),
             "DANE_RELAY_2_METRICS_PORT": str(quiet_port("127.0.0.1"))}
    s = Stack(override, ops, quiet_port("0.0.0.0"), quiet_port("127.0.0.1"), cluster=True,
              env=ports)
    s.smtp_port_2 = int(ports["DANE_RELAY_2_SMTP_PORT"])  # type: ignore[attr-defined]
    s.metrics_port_2 = int(ports["DANE_RELAY_2_METRICS_PORT"])  # type: ignore[attr-defined]
    s.compose("--profile", "cluster", "down", "-v", "--remove-orphans", check=False)
    try:
        s.doc("env-password", cwd=ROOT)
        s.doc("env-url", cwd=ROOT)
        s.doc("env-chmod", cwd=ROOT)
        assert ENV_FILE.stat().st_mode & 0o777 == 0o600
        began = time.monotonic()
        s.doc("up", timeout=1800)
        s.started_in = time.monotonic() - began
        yield s
    finally:
        ENV_FILE.unlink(missing_ok=True)
        (world.dir / "cluster-transcript.txt").write_text("\n".join(s.transcript))
        for service in ALL[1:]:
            with contextlib.suppress(Exception):
                (world.dir / f"cluster-{service}.log").write_text(s.logs(service))
        s.compose("--profile", "cluster", "down", "-v", "--remove-orphans", check=False,
                  timeout=180)


def lan_send(stack: Stack, world: World, rcpt: str, port: int, command: str) -> str:
    """A documented swaks command, run by a mail server on the LAN; the queue id."""
    server = "relay.example.com:2526" if command == "send-2" else "relay.example.com:2525"
    r = stack.doc(command, tty=False, prefix=world.net.in_lan([]), subst={
        server: f"{LAN_HOST}:{port}", "you@example.com": SENDER, "someone@example.org": rcpt})
    assert f"220 {RELAY_NAME} ESMTP" in r.stdout
    m = re.search(r"250 2\.0\.0 .*queued as (\S+)", r.stdout)
    assert m, r.stdout
    return m.group(1)


def send_to_node_1(stack: Stack, world: World, rcpt: str) -> str:
    return lan_send(stack, world, rcpt, stack.smtp_port, "send-1")


def copies(dest_messages: list[Received], queue_id: str) -> int:
    """How many messages at the destination the relay accepted as `queue_id` (its
    Received: header names the id)."""
    needle = f" id {queue_id}".encode()
    return sum(1 for m in dest_messages if needle in m.body)


def _ids(listed: list[dict[str, object]]) -> list[str]:
    return sorted(str(m["id"]) for m in listed)


@pytest.mark.compose
@pytest.mark.timeout(300)
def test_postgres_refuses_to_start_without_a_password(cluster: Stack) -> None:
    r = subprocess.run(["docker", "run", "--rm", "dane-relay-postgres:15"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "DANE_RELAY_DB_PASSWORD is not set" in r.stderr
    assert "DANE_RELAY_DB_PASSWORD=<at least 12 characters" in r.stderr


@pytest.mark.compose
@pytest.mark.timeout(600)
def test_cluster_comes_up_healthy(cluster: Stack) -> None:
    cluster.wait_healthy(ALL, timeout=240)
    ps = cluster.doc("ps").stdout
    assert ps.count("(healthy)") == 4, ps
    for service in ("relay", "relay-2"):
        health = cluster.relay("health", service=service).stdout
        assert re.search(r"^database +ok +postgresql://relay@postgres/relay", health, re.M), \
            health
        assert cluster.events("fatal", service) == []
        started = cluster.events("starting", service)
        assert len(started) == 1, started  # no restart: node 1 waited for the database
    # relay-2 started once postgres was healthy; relay (node 1) at once, and waited
    waits = cluster.events("queue_wait", "relay")
    assert all("postgresql://relay@postgres/relay" in w["error"] for w in waits), waits
    assert all(PASSWORD_HINT not in json.dumps(w) for w in waits)
    print(f"\n`up -d --build` took {cluster.started_in:.0f} s; node 1 logged {len(waits)} "
          "queue_wait event(s) before PostgreSQL answered")


PASSWORD_HINT = "DANE_RELAY_DB_PASSWORD="  # never echoed by a node


@pytest.mark.compose
@pytest.mark.timeout(600)
def test_mail_to_each_node_is_delivered(cluster: Stack, world: World) -> None:
    assert world.destination is not None
    world.destination.messages.clear()
    one = send_to_node_1(cluster, world, RCPT)
    two = lan_send(cluster, world, RCPT, cluster.smtp_port_2, "send-2")  # type: ignore[attr-defined]
    # one queue: each node shows the other's message, delivered with DNSSEC and DANE
    for qid, other in ((one, "relay-2"), (two, "relay")):
        rcpt = cluster.wait_status(qid, RCPT, "delivered", timeout=120, service=other)
        h = rcpt["history"][-1]
        assert h["dnssec"] == "secure" and h["dane"].startswith("authenticated"), h
        assert h["mx"] == "mx.dest.test" and h["ip"] == WORLD_IP, h
    assert cluster.wait_event("received", lambda e: e.get("id") == one, service="relay")
    assert cluster.wait_event("received", lambda e: e.get("id") == two, service="relay-2")
    got = world.destination.wait_messages(2, timeout=60)
    assert all(m.tls and m.rcpt_tos == [RCPT] for m in got)
    listed = cluster.doc("list-2").stdout
    assert one in listed and two in listed, listed
    deferred = lan_send(cluster, world, DEFER_RCPT, cluster.smtp_port_2, "send-2")  # type: ignore[attr-defined]
    cluster.wait_status(deferred, DEFER_RCPT, "deferred", timeout=120, service="relay")
    cluster.deferred_id, cluster.delivered_id = deferred, one


@pytest.mark.compose
@pytest.mark.timeout(300)
def test_queue_nodes_lists_both_nodes(cluster: Stack) -> None:
    deadline = time.monotonic() + 90
    while True:  # each node reports every 10 s once its scheduler runs
        out = cluster.doc("nodes").stdout
        alive = re.findall(r"^ +(relay-[12])/\S+ +started \S+ +alive$", out, re.M)
        if sorted(alive) == ["relay-1", "relay-2"]:
            break
        assert time.monotonic() < deadline, out
        time.sleep(3)
    assert "queue backend: postgresql" in out
    assert re.search(r"^ +purge +held by relay-[12]/", out, re.M), out  # once per cluster


@pytest.mark.compose
@pytest.mark.timeout(300)
def test_a_single_node_s_sqlite_queue_is_imported(cluster: Stack, tmp_path: Path) -> None:
    """Step 6: mail left in the SQLite queue of `relay` when it ran alone (made here with
    the relay's own store, then put where that queue lives) moves into the shared queue
    and is delivered."""
    db = tmp_path / "relay.db"

    async def single_node_queue() -> str:
        store = await Store.open(db)
        try:
            return await store.enqueue(Envelope(
                sender=SENDER, recipients=(RCPT,), client_ip="10.253.53.2",
                client_helo="mx1.lan.test",
                body=b"From: <app@lan.test>\r\nTo: <user@dest.test>\r\n"
                     b"Subject: left in the SQLite queue\r\n\r\nhello\r\n"), now=time.time())
        finally:
            await store.close()

    qid = asyncio.run(single_node_queue())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relay.db"]  # no WAL left
    with open(db, "rb") as data:  # written by the relay's user, into its own volume
        subprocess.run(["docker", "exec", "-i", cluster.container("relay"), "sh", "-c",
                        "cat > /var/spool/dane-relay/relay.db"], stdin=data, check=True,
                       capture_output=True, timeout=60)
    out = cluster.doc("import").stdout
    assert "moved 1 message(s) with 1 recipient(s) from /var/spool/dane-relay/relay.db" \
        in out, out
    rcpt = cluster.wait_status(qid, RCPT, "delivered", timeout=120, service="relay-2")
    assert rcpt["history"][-1]["dane"].startswith("authenticated"), rcpt


@pytest.mark.compose
@pytest.mark.timeout(600)
def test_a_killed_node_s_work_is_delivered_by_the_other(cluster: Stack, world: World) -> None:
    dest = world.destination
    assert dest is not None
    dest.messages.clear()
    dest.data_delay = 120.0  # transactions held open: node 1 holds work when it dies
    mark = len(dest.connections)
    accepted = [send_to_node_1(cluster, world, RCPT) for _ in range(HELD)]
    node_1 = NODE_IP["relay"]

    def in_data() -> list[ConnectionLog]:
        """Node 1's transactions of this test that reached DATA (none can finish: the
        destination holds its reply to the final dot)."""
        return [c for c in list(dest.connections)[mark:] if c.peer[0] == node_1
                and "DATA" in c.verbs()]

    deadline = time.monotonic() + 90
    while not in_data():
        assert time.monotonic() < deadline, [(c.peer, c.verbs()) for c in dest.connections]
        time.sleep(0.2)
    leases = [(r.get("lease") or {}).get("owner", "")
              for qid in accepted for r in cluster.show(qid, "relay-2")["recipients"]]
    assert any(owner.startswith("relay-1/") for owner in leases), leases
    before = len(cluster.events("takeover", "relay-2"))
    cluster.doc("kill")  # SIGKILL: no drain, no lease given back
    killed = time.monotonic()
    open_at_kill = in_data()
    dest.data_delay = 0.0
    assert cluster.state("relay")["ExitCode"] == 137
    took = cluster.wait_event("takeover", lambda e: e["previous"].startswith("relay-1/"),
                              timeout=LEASE + 60, service="relay-2")
    taken_after = time.monotonic() - killed
    assert took["owner"].startswith("relay-2/")
    for qid in accepted:
        cluster.wait_status(qid, RCPT, "delivered", timeout=120, service="relay-2")
    # everything accepted reached the destination; twice at most what node 1 had open
    got = list(dest.messages)
    counts = {qid: copies(got, qid) for qid in accepted}
    assert all(n >= 1 for n in counts.values()), counts
    assert sum(n - 1 for n in counts.values()) <= len(open_at_kill), (counts, open_at_kill)
    takeovers = cluster.events("takeover", "relay-2")[before:]
    url = f"http://127.0.0.1:{cluster.metrics_port_2}/metrics"  # type: ignore[attr-defined]
    with urllib.request.urlopen(url, timeout=30) as resp:
        metrics = resp.read().decode()
    assert _metric(metrics, "relay_takeovers_total") >= len(takeovers) >= 1
    cluster.taken_after = taken_after  # type: ignore[attr-defined]
    print(f"\ntakeover {taken_after:.1f} s after the SIGKILL (lease {LEASE:g} s); "
          f"{len(open_at_kill)} transaction(s) open at the kill; copies {counts}")
    # node 1 comes back with the documented command and rejoins
    cluster.doc("start")
    cluster.wait_running("relay")
    cluster.wait_event("listening", lambda e: e.get("service") == "smtp", timeout=180)


@pytest.mark.compose
@pytest.mark.timeout(300)
def test_database_backup_as_documented(cluster: Stack) -> None:
    cluster.doc("dump")
    dump = cluster.workdir / "relay-queue.dump"
    assert dump.read_bytes()[:5] == b"PGDMP", dump.read_bytes()[:64]
    listing = subprocess.run(["/usr/lib/postgresql/15/bin/pg_restore", "--list", str(dump)],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert re.search(r"TABLE DATA public messages ", listing.stdout), listing.stdout[-2000:]


@pytest.mark.compose
@pytest.mark.timeout(600)
def test_queue_survives_down_and_up(cluster: Stack) -> None:
    before = json.loads(cluster.relay("queue", "list", "--all", "--json",
                                      service="relay-2").stdout)
    assert cluster.deferred_id in _ids(before)
    for service in ALL[1:]:  # the logs of the first containers, before `down` drops them
        (cluster.workdir.parent / f"cluster-{service}.first.log").write_text(
            cluster.logs(service))
    dangling = _dangling_volumes()
    cluster.doc("down")
    volumes = subprocess.run(["docker", "volume", "ls", "-q"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert f"{PROJECT}_pgdata" in volumes
    running = subprocess.run(["docker", "ps", "-q", "--filter", f"name={PROJECT}_"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert running == []  # the profile's services too
    cluster.doc("start")
    cluster.wait_healthy(("postgres",), timeout=120)
    cluster.wait_running("relay-2")
    cluster.wait_event("listening", lambda e: e.get("service") == "smtp", timeout=180,
                       service="relay-2")
    after = json.loads(cluster.relay("queue", "list", "--all", "--json").stdout)
    assert _ids(after) == _ids(before)
    assert _dangling_volumes() == dangling  # nothing left behind by the containers gone
    shown = cluster.show(cluster.delivered_id, "relay-2")
    assert shown["recipients"][0]["history"][-1]["dnssec"] == "secure"
    assert cluster.show(cluster.deferred_id)["recipients"][0]["status"] == "deferred"


def _dangling_volumes() -> set[str]:
    r = subprocess.run(["docker", "volume", "ls", "-q", "--filter", "dangling=true"],
                       capture_output=True, text=True, check=True, timeout=60)
    return set(r.stdout.split())


def _metric(text: str, name: str) -> float:
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.split()[-1])
            seen = True
    assert seen, f"{name} not in /metrics"
    return total
