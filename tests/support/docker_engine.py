"""A Docker engine for the compose stack test, on a Debian machine with no image registry.

    with DockerEngine(workdir) as engine:        # dockerd running, containers fenced in
        engine.ensure_base_images([ROOT / "Dockerfile", ROOT / "resolver.Dockerfile"])
        engine.docker("ps")

- The daemon: a running dockerd is used as it is; otherwise one is started
  (`dockerd --storage-driver=overlay2`, its PID kept in `PID_FILE`) and stopped at the
  end. A dockerd this code did not start is never stopped (one that an interrupted run
  started, still named by `PID_FILE`, is).
- The fence: `iptables -I DOCKER-USER -o <outward interface> -j DROP` (tagged with a
  comment), so no container reaches beyond the machine (a validating Unbound would
  otherwise keep asking the root servers); removed at the end.
- Base images: a Dockerfile's `FROM` image that is neither present nor pullable is built
  locally under exactly that tag: `debian:*` from `debootstrap --variant=minbase`
  (imported with `docker import`), `python:*` from that Debian with Debian's python3 as a
  venv at /usr/local (`python`, `pip` on PATH as in the official image), plus the host's
  CA bundle and an /etc/pip.conf pointing at it so that pip in a build reaches PyPI the
  way this machine does. Those belong to the stand-in only, never to the project's
  Dockerfiles. Stand-ins carry the label `dane-relay.stand-in` and stay in the engine's
  image store, and the debootstrap tree is kept as a tarball, so reruns are fast.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

CACHE = Path(os.environ.get("DANE_RELAY_STACK_CACHE", "/var/cache/dane-relay-stack-test"))
MIRROR = "http://deb.debian.org/debian"
FENCE_COMMENT = "dane-relay-stack-test"
STAND_IN_LABEL = "dane-relay.stand-in"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
PID_FILE = CACHE / "dockerd.pid"  # the dockerd this code started, while it runs

PYTHON_STAND_IN = """\
FROM {debian}
LABEL {label}="python: Debian's python3 as a venv at /usr/local"
COPY host-ca.crt /etc/ssl/certs/stand-in-host-ca.crt
RUN apt-get update \\
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \\
      netbase tzdata \\
 && rm -rf /var/lib/apt/lists/* \\
 && python3 -m venv /usr/local \\
 && printf '[global]\\ncert = /etc/ssl/certs/stand-in-host-ca.crt\\n' > /etc/pip.conf
ENV LANG=C.UTF-8
CMD ["python3"]
"""


class EngineError(Exception):
    """The engine could not be prepared (the message says what failed, with output)."""


def run(argv: Sequence[str], *, timeout: float = 600, check: bool = True,
        input: bytes | None = None, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, timeout=timeout, input=input,
                       env=env, cwd=cwd)
    out = subprocess.CompletedProcess(r.args, r.returncode,
                                      r.stdout.decode(errors="replace"),
                                      r.stderr.decode(errors="replace"))
    if check and out.returncode != 0:
        raise EngineError(f"{' '.join(argv)} exited {out.returncode}:\n"
                          f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def outward_interfaces() -> list[str]:
    """The interfaces of the machine's default routes (IPv4 and IPv6)."""
    names: list[str] = []
    for family in ("-4", "-6"):
        r = run(["ip", family, "route", "show", "default"], check=False)
        names += re.findall(r"\bdev (\S+)", r.stdout)
    return list(dict.fromkeys(names))


def from_images(dockerfiles: Iterable[Path]) -> list[str]:
    """The `FROM` images of the Dockerfiles, in order, without duplicates."""
    tags: list[str] = []
    for path in dockerfiles:
        for line in path.read_text().splitlines():
            m = re.match(r"\s*FROM\s+(?:--\S+\s+)*(\S+)", line, re.IGNORECASE)
            if m:
                tags.append(m.group(1))
    return list(dict.fromkeys(tags))


class DockerEngine:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.started: subprocess.Popen[bytes] | None = None
        self.adopted: int | None = None  # pid of a dockerd an interrupted run left behind
        self.fenced: list[tuple[str, str]] = []  # (iptables binary, interface)
        self.notes: list[str] = []  # what was done, for the test's report

    # --- daemon and fence -----------------------------------------------------------

    def running(self) -> bool:
        return run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False,
                   timeout=30).returncode == 0

    def start(self) -> DockerEngine:
        try:
            leftover = self._leftover_daemon()
            if leftover is not None:
                self.adopted = leftover
                self.notes.append(f"dockerd: pid {leftover}, started by an earlier run "
                                  "that did not finish; stopped at the end")
            elif self.running():
                self.notes.append("dockerd: already running (left alone)")
            else:
                self._start_daemon()
            self._fence()
        except BaseException:
            self.stop()
            raise
        return self

    def _leftover_daemon(self) -> int | None:
        """The dockerd an interrupted run of this code started, if it still runs."""
        try:
            pid = int(PID_FILE.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except (OSError, ValueError):
            return None
        return pid if cmdline.endswith(b"dockerd") else None

    def _start_daemon(self) -> None:
        log = self.workdir / "dockerd.log"
        with open(log, "ab") as out:
            self.started = subprocess.Popen(
                ["dockerd", "--storage-driver=overlay2"], stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        PID_FILE.parent.mkdir(parents=True, exist_ok=True)
        PID_FILE.write_text(f"{self.started.pid}\n")
        deadline = time.monotonic() + 90
        while not self.running():
            if self.started.poll() is not None:
                raise EngineError(f"dockerd exited {self.started.returncode}:\n"
                                  f"{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise EngineError(f"dockerd did not answer in 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.notes.append(f"dockerd: started (pid {self.started.pid})")

    def _fence(self) -> None:
        for ipt in ("iptables", "ip6tables"):
            if run([ipt, "-n", "-L", "DOCKER-USER"], check=False).returncode != 0:
                continue  # no such chain: Docker does not manage this family here
            for dev in outward_interfaces():
                rule = ["DOCKER-USER", "-o", dev, "-m", "comment", "--comment",
                        FENCE_COMMENT, "-j", "DROP"]
                while run([ipt, "-D", *rule], check=False).returncode == 0:
                    pass  # an interrupted run's rule: one is enough
                run([ipt, "-I", *rule])
                self.fenced.append((ipt, dev))
        if not self.fenced:
            raise EngineError("could not add the DOCKER-USER DROP rule for the outward "
                              "interface (no DOCKER-USER chain, or no default route)")

    def stop(self) -> None:
        """Remove the fence; stop dockerd if (and only if) this object started it."""
        for ipt, dev in self.fenced:
            run([ipt, "-D", "DOCKER-USER", "-o", dev, "-m", "comment", "--comment",
                 FENCE_COMMENT, "-j", "DROP"], check=False)
        self.fenced = []
        proc, self.started = self.started, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        adopted, self.adopted = self.adopted, None
        if adopted is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(adopted, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while Path(f"/proc/{adopted}").exists() and time.monotonic() < deadline:
                time.sleep(0.5)
        if proc is not None or adopted is not None:
            with contextlib.suppress(FileNotFoundError):
                PID_FILE.unlink()

    def __enter__(self) -> DockerEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- commands ---------------------------------------------------------------------

    def docker(self, *args: str, timeout: float = 300,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["docker", *args], timeout=timeout, check=check)

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False, timeout=30).returncode == 0

    # --- base images --------------------------------------------------------------------

    def ensure_base_images(self, dockerfiles: Iterable[Path]) -> None:
        tags = from_images(dockerfiles)
        # Debian first: the Python stand-in is built on it.
        for tag in sorted(tags, key=lambda t: not t.startswith("debian:")):
            if self.has_image(tag):
                continue
            if self.docker("pull", tag, check=False, timeout=600).returncode == 0:
                self.notes.append(f"{tag}: pulled")
                continue
            if tag.startswith("debian:"):
                self._debian_stand_in(tag)
            elif tag.startswith("python:"):
                debian = next((t for t in tags if t.startswith("debian:")), None)
                if debian is None:
                    debian = "dane-relay-stand-in/debian:bookworm"
                    if not self.has_image(debian):
                        self._debian_stand_in(debian)
                self._python_stand_in(tag, debian)
            else:
                raise EngineError(f"{tag}: cannot be pulled and no stand-in is known")

    def _debian_stand_in(self, tag: str) -> None:
        suite = "bookworm"
        if suite not in tag:
            raise EngineError(f"{tag}: only bookworm stand-ins are built")
        CACHE.mkdir(parents=True, exist_ok=True)
        tarball = CACHE / f"debian-{suite}-minbase.tar"
        if not tarball.exists():
            began = time.monotonic()
            with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                root = Path(tmp) / "root"
                run(["debootstrap", "--variant=minbase", suite, str(root), MIRROR],
                    timeout=1800)
                for junk in ("var/lib/apt/lists", "var/cache/apt/archives"):
                    for item in (root / junk).glob("*"):
                        if item.is_file():
                            item.unlink()
                partial = tarball.with_suffix(".partial")
                run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."],
                    timeout=600)
                partial.rename(tarball)
            self.notes.append(f"debootstrap {suite}: {time.monotonic() - began:.0f} s")
        with open(tarball, "rb") as data:
            r = subprocess.run(["docker", "import", "-c", 'CMD ["bash"]', "-c",
                                f'LABEL {STAND_IN_LABEL}="debian: debootstrap minbase"',
                                "-", tag], stdin=data, capture_output=True, timeout=600)
        if r.returncode != 0:
            raise EngineError(f"docker import {tag}: {r.stderr.decode(errors='replace')}")
        self.notes.append(f"{tag}: stand-in imported")

    def _python_stand_in(self, tag: str, debian: str) -> None:
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            ctx = Path(tmp)
            shutil.copy(HOST_CA, ctx / "host-ca.crt")
            (ctx / "Dockerfile").write_text(
                PYTHON_STAND_IN.format(debian=debian, label=STAND_IN_LABEL))
            run(["docker", "build", "--network", "host", "-q", "-t", tag, str(ctx)],
                timeout=1800)
        self.notes.append(f"{tag}: stand-in built")

