"""The compose stack run natively: config/unbound.conf in a real Unbound, and a relay with
the container's config (config/relay.docker.toml, paths and addresses overridden through
RELAY_ environment variables as an operator would), against signed test zones.

Only what cannot work outside a container is changed in the resolver config: the listen
address and port, the unprivileged user, the working folder, and the trust anchor (the
private test root's instead of the Internet root's, which unbound-anchor keeps in the
container). Every validation setting is the shipped file's own.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

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
           "RELAY_QUEUE__PATH": str(tmp_path / "none.db"),
           "RELAY_DNS__NAMESERVERS": f'["{ip}:{port}"]'}
    r = subprocess.run([sys.executable, "-m", "relay", "health", "-c",
                        str(ROOT / "config/relay.docker.toml")], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={**_clean_env(), **env})
    assert r.returncode == 1
    assert "listener  FAIL" in r.stdout and "database  FAIL" in r.stdout
    assert "resolver  ok" in r.stdout


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
