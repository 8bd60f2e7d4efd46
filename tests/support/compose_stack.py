"""Driving the real compose stack in tests: the operator's commands from docs/deploy.md,
verbatim, plus the look-ups a test needs (containers, health, the relay's log).

Every command runs in the repository with `COMPOSE_FILE` = docker-compose.yml plus the
test's override file, `COMPOSE_PROJECT_NAME` = `PROJECT`, and the published ports from
`DANE_RELAY_SMTP_PORT` / `DANE_RELAY_METRICS_PORT` (free ports: this machine is shared).
`Stack.doc(name)` runs the command `DOC[name]` (`CLUSTER_DOC[name]` for a `Stack` made
with `cluster=True`) only after checking that docs/deploy.md says it word for word (with
Compose v2 only, `docker-compose ` becomes `docker compose `); it runs under a
pseudo-terminal, as typed by an operator (`exec` wants one).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
PROJECT = "danerelaystack"

# The operator's commands as docs/deploy.md writes them (a test checks each is there).
DOC: dict[str, str] = {
    "install": "apt-get install -y docker.io docker-compose",
    "up": "docker-compose up -d --build",
    "ps": "docker-compose ps",
    "health": "docker-compose exec relay relay health",
    "check": "docker-compose exec relay relay check example.com",
    "send": "swaks --server relay.example.com:2525 --from you@example.com "
            "--to someone@example.org",
    "list": "docker-compose exec relay relay queue list --all",
    "show": "docker-compose exec relay relay queue show QUEUE-ID",
    "stop": "docker-compose stop",
    "start": "docker-compose up -d",
    "down": "docker-compose down",
    "backup": "docker-compose exec relay relay queue backup /var/spool/dane-relay/backup.db",
    "backup-copy": 'docker cp "$(docker-compose ps -q relay)":/var/spool/dane-relay/backup.db'
                   " relay-backup.db",
    "backup-remove": "docker-compose exec relay rm /var/spool/dane-relay/backup.db",
    "restore-stop": "docker-compose stop relay",
    "restore": 'docker-compose run --rm --no-deps -v "$PWD/relay-backup.db:/restore.db:ro" '
               "--entrypoint sh relay -c 'cp /restore.db /var/spool/dane-relay/relay.db "
               "&& rm -f /var/spool/dane-relay/relay.db-wal /var/spool/dane-relay/relay.db-shm "
               "/var/spool/dane-relay/relay.db-run'",
    "restore-start": "docker-compose up -d relay",
}

# The same for the profile `cluster` (docs/deploy.md, "Several nodes"); the two `env-`
# lines run beside docker-compose.yml, where Compose reads `.env`.
CLUSTER_DOC: dict[str, str] = {
    "env-password": 'echo "DANE_RELAY_DB_PASSWORD=$(openssl rand -hex 24)" >> .env',
    "env-url": 'echo "DANE_RELAY_QUEUE_URL=postgresql://relay@postgres/relay" >> .env',
    "env-chmod": "chmod 600 .env",
    "up": "docker-compose --profile cluster up -d --build",
    "ps": "docker-compose --profile cluster ps",
    "nodes": "docker-compose exec relay relay queue nodes",
    "send-1": DOC["send"],
    "send-2": "swaks --server relay.example.com:2526 --from you@example.com "
              "--to someone@example.org",
    "list-2": "docker-compose exec relay-2 relay queue list --all",
    "import": "docker-compose exec relay relay queue import /var/spool/dane-relay/relay.db",
    "kill": "docker-compose kill relay",
    "start": "docker-compose --profile cluster up -d",
    "dump": "docker-compose exec -T postgres pg_dump --format=custom relay > relay-queue.dump",
    "down": "docker-compose --profile cluster down",
}


def quiet_port(host: str) -> int:
    """A free TCP port below the ephemeral range: the stack publishes it only after the
    images are built, and an ephemeral port may meanwhile be taken by anyone's outgoing
    connection on this shared machine."""
    low = 20000
    with contextlib.suppress(OSError, ValueError):
        low = min(low, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]))
    for _ in range(200):
        port = random.randrange(low - 9000, low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host}")


def _clean(text: str) -> str:
    """Terminal output as lines: no CR, no echoed NUL (`^@`)."""
    return text.replace("\r", "").replace("^@", "")


def compose_argv() -> list[str]:
    """`docker-compose` (v1, Debian's) if installed, else `docker compose` (v2)."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


class Stack:
    def __init__(self, override: Path, workdir: Path, smtp_port: int, metrics_port: int, *,
                 cluster: bool = False, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.smtp_port, self.metrics_port = smtp_port, metrics_port
        self.commands = CLUSTER_DOC if cluster else DOC
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("DANE_RELAY_")},
                    "COMPOSE_FILE": f"{ROOT / 'docker-compose.yml'}:{override}",
                    "COMPOSE_PROJECT_NAME": PROJECT,
                    "DANE_RELAY_SMTP_PORT": str(smtp_port),
                    "DANE_RELAY_METRICS_PORT": str(metrics_port), **(env or {})}
        self.env.pop("RELAY_CONFIG", None)
        self.compose_cmd = compose_argv()
        self.transcript: list[str] = []
        self.started_in = 0.0  # seconds `docker-compose up -d --build` took
        self._ids: dict[str, str] = {}  # service -> container id, until the next up/down
        self._t0 = time.monotonic()
        self.delivered_id = self.deferred_id = ""  # messages the tests left in the queue

    # --- running commands ------------------------------------------------------------

    def compose(self, *args: str, timeout: float = 300,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        if args[0] not in ("ps", "exec", "logs"):
            self._ids.clear()  # containers may be replaced
        r = subprocess.run([*self.compose_cmd, *args], cwd=self.workdir, env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        self._note(" ".join(["compose", *args]), r)
        if check and r.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} exited {r.returncode}:\n"
                                 f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def doc(self, name: str, *, subst: dict[str, str] | None = None, timeout: float = 600,
            check: bool = True, tty: bool = True, prefix: list[str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run docs/deploy.md's command `name` (after `subst` replacements, for the
        placeholders an operator fills in) in a shell, in the operator's folder (or
        `cwd`); `prefix`: where it runs (e.g. `ip netns exec NS`, a machine on the LAN)."""
        command = self.commands[name]
        assert command in DEPLOY_DOC.read_text(), f"docs/deploy.md lacks {command!r}"
        for old, new in (subst or {}).items():
            command = command.replace(old, new)
        if self.compose_cmd == ["docker", "compose"]:
            command = command.replace("docker-compose ", "docker compose ")
        argv = [*(prefix or []), "bash", "-c", command]
        if tty:  # `script` gives the command a terminal, as an operator's shell does
            argv = ["script", "-qefc", shlex.join(argv), "/dev/null"]
        self._ids.clear()
        r = subprocess.run(argv, cwd=cwd or self.workdir, env=self.env, capture_output=True,
                           stdin=subprocess.DEVNULL, text=True, timeout=timeout)
        r = subprocess.CompletedProcess(r.args, r.returncode, _clean(r.stdout),
                                        _clean(r.stderr))
        self._note(command, r)
        if check and r.returncode != 0:
            raise AssertionError(f"{command!r} exited {r.returncode}:\n"
                                 f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def relay(self, *args: str, check: bool = True,
              service: str = "relay") -> subprocess.CompletedProcess[str]:
        """`relay ARGS` inside the running container of `service` (no terminal; `docker
        exec`, which starts in a fraction of the time Compose v1 takes)."""
        r = subprocess.run(["docker", "exec", self.container(service), "relay", *args],
                           capture_output=True, text=True, timeout=120)
        self._note(" ".join(["relay", *args]), r)
        if check and r.returncode != 0:
            raise AssertionError(f"relay {' '.join(args)} exited {r.returncode}:\n"
                                 f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def show(self, queue_id: str, service: str = "relay") -> dict[str, Any]:
        return json.loads(self.relay("queue", "show", queue_id, "--json",
                                     service=service).stdout)

    def _note(self, what: str, r: subprocess.CompletedProcess[str]) -> None:
        at = time.monotonic() - self._t0
        self.transcript.append(f"[{at:7.1f} s] $ {what}\n(exit {r.returncode})\n"
                               f"{r.stdout[-1500:]}{r.stderr[-1500:]}")

    # --- containers ------------------------------------------------------------------

    def container(self, service: str) -> str:
        if service not in self._ids:
            cid = self.compose("ps", "-q", service).stdout.strip()
            assert cid, f"no {service} container"
            self._ids[service] = cid
        return self._ids[service]

    def state(self, service: str) -> dict[str, Any]:
        r = subprocess.run(["docker", "inspect", self.container(service)],
                           capture_output=True, text=True, timeout=30, check=True)
        return json.loads(r.stdout)[0]["State"]

    def wait_healthy(self, services: tuple[str, ...] = ("resolver", "relay"),
                     timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            states = {s: self.state(s) for s in services}
            if all(st.get("Health", {}).get("Status") == "healthy" for st in states.values()):
                return states
            for s, st in states.items():
                assert st.get("Status") == "running", f"{s} is {st.get('Status')}: " \
                    f"{self.logs(s)[-3000:]}"
            if time.monotonic() > deadline:
                raise AssertionError(f"not healthy after {timeout:g} s: "
                                     f"{json.dumps(states, indent=1)[-4000:]}\n"
                                     f"{self.logs('relay')[-3000:]}")
            time.sleep(1)

    def wait_validating(self, timeout: float = 90) -> None:
        """Until the resolver container's own HEALTHCHECK command passes (run now, not on
        Docker's 30 s schedule)."""
        r = subprocess.run(["docker", "inspect", "-f", "{{json .Config.Healthcheck.Test}}",
                            self.container("resolver")], capture_output=True, text=True,
                           timeout=30, check=True)
        test = json.loads(r.stdout)
        assert test[0] == "CMD", test
        deadline = time.monotonic() + timeout
        argv = ["docker", "exec", self.container("resolver"), *test[1:]]
        while subprocess.run(argv, capture_output=True, timeout=60).returncode:
            assert time.monotonic() < deadline, "the resolver does not validate"
            time.sleep(1)

    def wait_running(self, service: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.state(service).get("Status") != "running":
            assert time.monotonic() < deadline, f"{service} not running: {self.logs(service)}"
            time.sleep(0.5)

    # --- the relay's log -------------------------------------------------------------

    def logs(self, service: str = "relay") -> str:
        r = subprocess.run(["docker", "logs", self.container(service)], capture_output=True,
                           text=True, timeout=60)
        return r.stdout + r.stderr

    def events(self, name: str | None = None, service: str = "relay") -> list[dict[str, Any]]:
        out = []
        for line in self.logs(service).splitlines():
            if line.startswith("{"):
                ev = json.loads(line)
                if name is None or ev.get("event") == name:
                    out.append(ev)
        return out

    def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool] = lambda e: True,
                   timeout: float = 60, service: str = "relay") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(name, service) if match(e)]
            if found:
                return found[-1]
            assert time.monotonic() < deadline, \
                f"no {name} event in {timeout:g} s:\n{self.logs(service)[-4000:]}"
            time.sleep(0.5)

    def wait_status(self, queue_id: str, address: str, status: str,
                    timeout: float = 90, service: str = "relay") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.show(queue_id, service)
            rcpt = next(r for r in msg["recipients"] if r["address"] == address)
            if rcpt["status"] == status:
                return rcpt
            assert time.monotonic() < deadline, f"{address} still {rcpt}"
            time.sleep(1)
