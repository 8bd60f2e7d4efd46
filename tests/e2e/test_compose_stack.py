"""The compose stack, twice.

Natively (in the normal suite): config/unbound.conf in a real Unbound, and a relay with
the container's config (config/relay.docker.toml, paths and addresses overridden through
RELAY_ environment variables as an operator would), against signed test zones. Only what
cannot work outside a container is changed in the resolver config: the listen address
and port, the unprivileged user, the working folder, and the trust anchor (the private
test root's instead of the Internet root's, which unbound-anchor keeps in the container).
Every validation setting is the shipped file's own.

For real (marker `compose`, run by scripts/compose-test, not by the normal suite): a
Docker engine (tests/support/docker_engine.py: dockerd started if needed, containers
fenced off the outside, local stand-ins for base images no registry serves), the two
images built from the project's Dockerfiles, the compose file brought up with the
operator's commands from docs/deploy.md, word for word, plus an override that points the
resolver at a private signed root on the Docker host (tests/support/compose_world.py).
Then, in order: both containers healthy; mail from a LAN mail server to the published
port delivered with DNSSEC and DANE to a destination on the host; the trace in `relay
queue list/show`; `/metrics`; clients arriving through the Docker gateway refused; health
checks that leave no SMTP sessions in the log; intake while the resolver is down; the
documented backup and restore; `docker-compose stop` draining an open transaction (held
longer than Docker's default 10 s) with exit 0; the queue across `down`/`up`; and, with
the built image, the gateway warning and a root-owned bind mount as one `fatal` event.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.compose_stack import PROJECT, Stack, quiet_port
from tests.support.compose_world import (
    LAN_CLIENT,
    LAN_HOST,
    RELAY_NAME,
    WORLD_IP,
    World,
)
from tests.support.dnsbed import DnsBed, dnsbed_fixture
from tests.support.dnsprocs import free_port
from tests.support.relayproc import RelayProc

ROOT = Path(__file__).resolve().parents[2]
RESOLVER_IP = "127.53.77.53"


def world(bed: DnsBed) -> None:
    bed.zone("signed.test").add("@", "MX", "10 mx.signed.test.").add("mx", "A", "127.25.8.1")


dnsbed = dnsbed_fixture(world)


def shipped_conf_for(bed: DnsBed, workdir: Path, port: int) -> Path:
    text = (ROOT / "config/unbound.conf").read_text()
    swaps = {
        r"interface: 0\.0\.0\.0": f"interface: {RESOLVER_IP}@{port}",
        r"port: 53\b": f"port: {port}",
        r'username: "unbound"': 'username: ""',
        r'directory: "/etc/unbound"': f'directory: "{workdir}"',
        r'auto-trust-anchor-file: "/var/lib/unbound/root.key"':
            f'trust-anchor-file: "{bed.dir}/root.anchor"',
    }
    for pattern, new in swaps.items():
        text, n = re.subn(pattern, new, text)
        assert n == 1, f"config/unbound.conf no longer has {pattern!r}"
    # The test world: a private root served on loopback (stub zones, as the bed's own).
    extra = ["    do-not-query-localhost: no", '    local-zone: "test." nodefault',
             f'    pidfile: "{workdir}/unbound.pid"']
    text = text.replace("server:\n", "server:\n" + "\n".join(extra) + "\n", 1)
    for spec in bed.zones.values():
        ns = bed.nsd_server
        text += f'\nstub-zone:\n    name: "{spec.origin}"\n    stub-addr: {ns[0]}@{ns[1]}\n'
    conf = workdir / "unbound.conf"
    conf.write_text(text)
    return conf


@pytest.fixture(scope="module")
def shipped_resolver(dnsbed: DnsBed, tmp_path_factory: pytest.TempPathFactory,
                     ) -> Iterator[tuple[str, int]]:
    work = tmp_path_factory.mktemp("unbound-shipped")
    port = free_port(RESOLVER_IP)
    conf = shipped_conf_for(dnsbed, work, port)
    check = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([shutil.which("unbound") or "unbound", "-d", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=open(work / "err.txt", "wb"))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((RESOLVER_IP, port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None, (work / "err.txt").read_text()
                assert time.monotonic() < deadline, "the shipped Unbound did not start"
                time.sleep(0.05)
        yield RESOLVER_IP, port
    finally:
        proc.terminate()
        proc.wait(10)


def test_container_config_relay_sees_a_validating_resolver(
        shipped_resolver: tuple[str, int], tmp_path: Path) -> None:
    ip, port = shipped_resolver
    docker = tomllib.loads((ROOT / "config/relay.docker.toml").read_text())
    smtp_port, metrics_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    env = {
        "RELAY_LISTENER__HOST": "127.0.0.1",
        "RELAY_LISTENER__PORT": str(smtp_port),
        "RELAY_QUEUE__PATH": str(tmp_path / "spool" / "relay.db"),
        "RELAY_DNS__NAMESERVERS": f'["{ip}:{port}"]',
        "RELAY_METRICS__LISTEN": f"127.0.0.1:{metrics_port}",
        "RELAY_LISTENER__HOSTNAME": "relay.test",  # no reverse lookup of this machine
    }
    relay = RelayProc(tmp_path, docker, env=env)
    relay.start()
    try:
        ev = relay.wait_event("resolver_check", timeout=15)
        assert ev["validating"] is True, ev
        # The container's HEALTHCHECK command, with the same config and overrides.
        health = subprocess.run(
            [sys.executable, "-m", "relay", "health", "--json", "-c", str(relay.config_path)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={**_clean_env(), **env})
        result = json.loads(health.stdout)
        assert health.returncode == 0, health.stdout + health.stderr
        assert result["resolver"]["ok"] and result["listener"]["ok"]
        assert result["database"]["ok"]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz",
                                    timeout=10) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["ok"] is True
    finally:
        relay.stop()


def test_health_fails_when_the_relay_is_down(shipped_resolver: tuple[str, int],
                                              tmp_path: Path) -> None:
    ip, port = shipped_resolver
    env = {"RELAY_LISTENER__PORT": str(free_port("127.0.0.1")),
           "RELAY_LISTENER__HOST": "127.0.0.1",
           "RELAY_METRICS__LISTEN": f"127.0.0.1:{free_port('127.0.0.1')}",
           "RELAY_QUEUE__PATH": str(tmp_path / "none.db"),
           "RELAY_DNS__NAMESERVERS": f'["{ip}:{port}"]'}
    r = subprocess.run([sys.executable, "-m", "relay", "health", "-c",
                        str(ROOT / "config/relay.docker.toml")], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={**_clean_env(), **env})
    assert r.returncode == 1
    assert "listener  FAIL" in r.stdout and "database  FAIL" in r.stdout
    assert "no relay answering" in r.stdout  # the compose config has a metrics endpoint
    assert "resolver  ok" in r.stdout


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}


# --- the real stack (marker "compose": scripts/compose-test) -----------------------------

HOLD = 12.0  # seconds a transaction stays open after `stop`: longer than Docker's 10 s


@pytest.fixture(scope="module")
def world(compose_world: World) -> World:
    """The engine and the world of the session (tests/e2e/conftest.py)."""
    return compose_world


@pytest.fixture(scope="module")
def stack(world: World) -> Iterator[Stack]:
    override = world.write_override((ROOT / "config/unbound.conf").read_text())
    ops = world.dir / "operator"
    ops.mkdir()
    s = Stack(override, ops, quiet_port("0.0.0.0"), quiet_port("127.0.0.1"))
    s.compose("down", "-v", "--remove-orphans", check=False)  # an earlier run's leftovers
    try:
        began = time.monotonic()
        s.doc("up", timeout=1800)
        s.started_in = time.monotonic() - began
        yield s
    finally:
        (world.dir / "transcript.txt").write_text("\n".join(s.transcript))
        with contextlib.suppress(Exception):
            (world.dir / "relay.log").write_text(s.logs("relay"))
        s.compose("down", "-v", "--remove-orphans", check=False, timeout=180)
        subprocess.run(["docker", "network", "rm", OTHER_NET], capture_output=True,
                       timeout=60)


OTHER_NET = f"{PROJECT}-other"
SENDER, RCPT, DEFER_RCPT = "app@lan.test", "user@dest.test", "user@defer.test"
LATER_RCPT = "user@later.test"  # a domain the relay has not looked up before


def lan_send(stack: Stack, world: World, rcpt: str) -> str:
    """The documented swaks command, run by a mail server on the LAN; the queue id."""
    r = stack.doc("send", tty=False, prefix=world.net.in_lan([]), subst={
        "relay.example.com:2525": f"{LAN_HOST}:{stack.smtp_port}",
        "you@example.com": SENDER, "someone@example.org": rcpt})
    assert f"220 {RELAY_NAME} ESMTP" in r.stdout  # listener.hostname, not the container id
    m = re.search(r"250 2\.0\.0 .*queued as (\S+)", r.stdout)
    assert m, r.stdout
    return m.group(1)


def _relay_refuses(host: str, port: int) -> str:
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.ehlo("host.test")
        client.mail("someone@host.test")
        code, text = client.rcpt(RCPT)
    return f"{code} {text.decode()}"


@pytest.mark.compose
@pytest.mark.timeout(1800)
def test_stack_comes_up_healthy(stack: Stack) -> None:
    stack.wait_healthy()
    ps = stack.doc("ps").stdout
    assert ps.count("(healthy)") == 2, ps
    health = stack.doc("health").stdout
    for part in ("listener", "database", "resolver"):
        assert re.search(rf"^{part} +ok ", health, re.M), health
    assert stack.wait_event("resolver_check", lambda e: e["validating"])
    assert stack.events("gateway_allowed") == [] and stack.events("fatal") == []
    started = stack.events("starting")[0]
    assert started["config"] == "/etc/dane-relay/relay.docker.toml"


@pytest.mark.compose
@pytest.mark.timeout(600)
def test_lan_mail_is_delivered_with_dnssec_and_dane(stack: Stack, world: World) -> None:
    check = stack.doc("check", subst={"example.com": "dest.test"})
    assert "dane-authenticated" in check.stdout, check.stdout
    qid = lan_send(stack, world, RCPT)
    assert world.destination is not None
    got = world.destination.wait_messages(1, timeout=120)[0]
    assert got.tls and got.sni == "mx.dest.test" and got.rcpt_tos == [RCPT]
    assert f"by {RELAY_NAME}" in got.body.decode(errors="replace")
    rcpt = stack.wait_status(qid, RCPT, "delivered")
    h = rcpt["history"][-1]
    assert h["dnssec"] == "secure" and h["dane"].startswith("authenticated"), h
    assert h["mx"] == "mx.dest.test" and h["ip"] == WORLD_IP and "TLSv1" in h["tls"]
    received = stack.wait_event("received", lambda e: e.get("id") == qid)
    assert received["client_ip"] == LAN_CLIENT  # a LAN client keeps its address
    listed = stack.doc("list").stdout
    assert qid in listed, listed
    shown = stack.doc("show", subst={"QUEUE-ID": qid}).stdout
    assert "secure" in shown and "authenticated" in shown, shown
    deferred = lan_send(stack, world, DEFER_RCPT)  # its MX does not answer: it waits
    stack.wait_status(deferred, DEFER_RCPT, "deferred")
    stack.deferred_id, stack.delivered_id = deferred, qid


@pytest.mark.compose
@pytest.mark.timeout(300)
def test_metrics_answer_on_the_published_port(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.metrics_port}"
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    assert _metric(text, "relay_delivered_total") >= 1
    assert _metric(text, 'relay_dane_outcomes_total{code="",outcome="dane-authenticated"}') >= 1
    assert _metric(text, "relay_resolver_validating") == 1
    assert _metric(text, 'relay_tls_sessions_total{version="TLSv1.3"}') >= 1
    assert _metric(text, 'relay_queue_recipients{status="deferred"}') >= 1
    with urllib.request.urlopen(f"{url}/healthz", timeout=30) as resp:
        assert json.loads(resp.read())["ok"] is True


@pytest.mark.compose
@pytest.mark.timeout(300)
def test_clients_arriving_through_the_docker_gateway_are_refused(stack: Stack) -> None:
    before = len(stack.events("connect"))
    # A program on the Docker host itself: docker-proxy hands it over from the gateway.
    assert _relay_refuses("127.0.0.1", stack.smtp_port).startswith("554 5.7.1")
    # A container on another Docker network, reaching the published port.
    subprocess.run(["docker", "network", "create", OTHER_NET], capture_output=True,
                   timeout=60)
    net = json.loads(subprocess.run(["docker", "network", "inspect", OTHER_NET],
                                    capture_output=True, text=True, check=True).stdout)[0]
    gateway = net["IPAM"]["Config"][0]["Gateway"]
    script = (f"import smtplib; c = smtplib.SMTP({gateway!r}, {stack.smtp_port}, timeout=30)\n"
              "c.ehlo('other.test'); c.mail('x@other.test')\n"
              f"code, text = c.rcpt({RCPT!r}); print(code, text.decode())")
    r = subprocess.run(["docker", "run", "--rm", "--network", OTHER_NET, "--entrypoint",
                        "python", "dane-relay:0.1.0", "-c", script], capture_output=True,
                       text=True, timeout=120)
    assert r.stdout.startswith("554 5.7.1"), r.stdout + r.stderr
    connects = stack.events("connect")[before:]
    assert [c["client_ip"] for c in connects] == ["172.28.53.1", "172.28.53.1"], connects


@pytest.mark.compose
@pytest.mark.timeout(300)
def test_health_checks_leave_no_smtp_sessions_in_the_log(stack: Stack) -> None:
    deadline = time.monotonic() + 120
    while True:  # Docker keeps the last five results: at least one has passed
        runs = [h for h in stack.state("relay")["Health"]["Log"] if h["ExitCode"] == 0]
        if runs:
            break
        assert time.monotonic() < deadline, stack.state("relay")["Health"]
        time.sleep(2)
    assert "the relay on 127.0.0.1:9125 is listening on 0.0.0.0:2525" in runs[-1]["Output"]
    local = [e for e in stack.events("connect") if e["client_ip"].startswith("127.")]
    assert local == [], local


@pytest.mark.compose
@pytest.mark.timeout(600)
def test_intake_does_not_wait_for_the_resolver(stack: Stack, world: World) -> None:
    stack.compose("stop", "resolver")
    try:
        qid = lan_send(stack, world, LATER_RCPT)  # accepted: intake never waits for DNS
        rcpt = stack.wait_status(qid, LATER_RCPT, "deferred", timeout=120)
        assert rcpt["code"] == "4.4.312", rcpt
        health = stack.doc("health", check=False)
        assert health.returncode == 1 and re.search(r"^resolver +FAIL", health.stdout, re.M)
    finally:
        stack.compose("start", "resolver")
    stack.wait_validating()
    stack.relay("queue", "retry", qid)
    rcpt = stack.wait_status(qid, LATER_RCPT, "delivered", timeout=120)
    assert rcpt["history"][-1]["dane"].startswith("authenticated"), rcpt


@pytest.mark.compose
@pytest.mark.timeout(600)
def test_backup_and_restore_as_documented(stack: Stack) -> None:
    for step in ("backup", "backup-copy", "backup-remove"):
        stack.doc(step)
    backup = stack.workdir / "relay-backup.db"
    with contextlib.closing(sqlite3.connect(backup)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    listed = json.loads(stack.relay("queue", "list", "--all", "--json").stdout)
    for step in ("restore-stop", "restore", "restore-start"):
        stack.doc(step)
    stack.wait_running("relay")
    stack.wait_event("listening")
    assert json.loads(stack.relay("queue", "list", "--all", "--json").stdout) == listed


@pytest.mark.compose
@pytest.mark.timeout(600)
def test_stop_drains_an_open_transaction(stack: Stack, world: World) -> None:
    client = subprocess.Popen(
        world.net.in_lan([sys.executable, str(ROOT / "tests/support/lan_client.py"),
                          LAN_HOST, str(stack.smtp_port), SENDER, RCPT, "--hold"]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    try:
        steps = [json.loads(client.stdout.readline()) for _ in range(6)]
        assert steps[-1] == {"step": "holding"}, steps
        result: dict[str, subprocess.CompletedProcess[str]] = {}
        stopper = threading.Thread(target=lambda: result.update(stop=stack.doc("stop")))
        began = time.monotonic()
        stopper.start()
        stack.wait_event("draining", timeout=30)
        time.sleep(max(0.0, began + HOLD - time.monotonic()))  # past Docker's default 10 s
        client.stdin.write("go\n")
        client.stdin.flush()
        final = json.loads(client.stdout.readline())
        assert final["step"] == "final" and final["code"] == 250, final
        stopper.join(120)
        assert result["stop"].returncode == 0
        state = stack.state("relay")
        assert state["ExitCode"] == 0 and not state["OOMKilled"], state
        assert stack.events("stopped")[-1]["code"] == 0
    finally:
        client.kill()
        client.wait()
    qid = final["text"].rsplit(" ", 1)[-1]
    stack.doc("start")
    stack.wait_running("relay")
    stack.wait_status(qid, RCPT, "delivered", timeout=120)


@pytest.mark.compose
@pytest.mark.timeout(600)
def test_queue_survives_down_and_up(stack: Stack) -> None:
    before = json.loads(stack.relay("queue", "list", "--all", "--json").stdout)
    assert stack.deferred_id in [m["id"] for m in before]
    stack.doc("down")
    volumes = subprocess.run(["docker", "volume", "ls", "-q"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert f"{PROJECT}_queue" in volumes
    stack.doc("start")
    stack.wait_running("relay")
    after = json.loads(stack.relay("queue", "list", "--all", "--json").stdout)
    assert [m["id"] for m in after] == [m["id"] for m in before]
    shown = stack.show(stack.delivered_id)
    assert shown["recipients"][0]["history"][-1]["dnssec"] == "secure"
    assert stack.show(stack.deferred_id)["recipients"][0]["status"] == "deferred"


@pytest.mark.compose
@pytest.mark.timeout(300)
def test_allowed_docker_gateway_is_warned_about(stack: Stack) -> None:
    r = subprocess.run(
        ["docker", "run", "--rm", "--network", f"{PROJECT}_relaynet",
         "-e", 'RELAY_LISTENER__ALLOWED_NETWORKS=["172.16.0.0/12"]',
         "-e", "RELAY_QUEUE__PATH=/tmp/queue/relay.db", "--entrypoint", "timeout",
         "dane-relay:0.1.0", "-s", "TERM", "8", "relay", "serve"],
        capture_output=True, text=True, timeout=120)
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    warned = [e for e in events if e["event"] == "gateway_allowed"]
    assert [(e["network"], e["gateway"], e["level"]) for e in warned] == [
        ("172.16.0.0/12", "172.28.53.1", "warning")], r.stdout + r.stderr


@pytest.mark.compose
@pytest.mark.timeout(300)
def test_root_owned_bind_mount_is_one_fatal_event(stack: Stack) -> None:
    folder = stack.workdir / "root-owned-queue"
    folder.mkdir(mode=0o755)
    os.chown(folder, 0, 0)
    r = subprocess.run(["docker", "run", "--rm", "-v", f"{folder}:/var/spool/dane-relay",
                        "dane-relay:0.1.0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr == "", r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["event"] for e in events] == ["starting", "fatal"]
    fatal = events[-1]
    assert (fatal["path"], fatal["uid"], fatal["owner_uid"]) == (
        "/var/spool/dane-relay", 10025, 0), fatal
    assert "chown -R 10025:10025" in fatal["error"]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")
