"""A private PostgreSQL server for the tests: Debian's binaries, initdb into a temporary
folder owned by the `postgres` user, listening on a loopback address and port (and a Unix
socket in the same folder), started and stopped by PID.

    with PgServer(tmp_path) as pg:
        url = pg.url("relay")      # postgresql://relay@127.x.y.z:PORT/relay
        pg.restart()               # a real stop (fast or immediate) and start

Root is needed only to run the server as `postgres` (initdb refuses root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.support.dnsprocs import free_port, random_addr

BIN = Path("/usr/lib/postgresql/15/bin")


class PgError(Exception):
    """The server failed to start or stop (the message carries its log)."""


def available() -> str | None:
    """Why a private PostgreSQL cannot run here, or None when it can."""
    if not (BIN / "initdb").exists():
        return f"{BIN}/initdb missing (apt-get install postgresql)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user (apt-get install postgresql)"
    return None


class PgServer:
    def __init__(self, root: Path, *, user: str = "relay") -> None:
        self.root = Path(root) / "pg"
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.user = user
        self.host = random_addr()
        self.port = 0
        self.pid: int | None = None
        pw = pwd.getpwnam("postgres")
        self._uid, self._gid = pw.pw_uid, pw.pw_gid

    # --- life cycle ---------------------------------------------------------------------

    def _as_postgres(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        def demote() -> None:
            os.setgid(self._gid)
            os.setuid(self._uid)

        return subprocess.run(argv, preexec_fn=demote if os.geteuid() == 0 else None,
                              capture_output=True, text=True, cwd="/", **kw)  # type: ignore[call-overload]

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chown(self.root, self._uid, self._gid)
        out = self._as_postgres([str(BIN / "initdb"), "-D", str(self.data), "-A", "trust",
                                 "-U", "postgres", "--no-locale", "-E", "UTF8"], timeout=120)
        if out.returncode:
            raise PgError(f"initdb failed: {out.stdout}{out.stderr}")
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write("\n# dane-relay tests\n"
                    f"unix_socket_directories = '{self.root}'\n"
                    "max_connections = 200\nshared_buffers = 64MB\n"
                    "fsync = on\nsynchronous_commit = on\n"
                    "log_min_messages = warning\n")

    def start(self) -> None:
        if not self.data.exists():
            self.init()
        if not self.port:
            self.port = free_port(self.host)
        out = self._as_postgres(
            [str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
             "-o", f"-h {self.host} -p {self.port}", "start"], timeout=90)
        if out.returncode:
            raise PgError(f"pg_ctl start failed: {out.stdout}{out.stderr}\n{self._log()}")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        self._ensure_role()

    def stop(self, mode: str = "fast") -> None:
        """`mode`: fast (clean), immediate (like a crash: recovery at the next start)."""
        if self.pid is None:
            return
        out = self._as_postgres([str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                                 "-t", "60", "stop"], timeout=90)
        if out.returncode and _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None

    def restart(self, mode: str = "fast", down: float = 0.0) -> None:
        self.stop(mode)
        time.sleep(down)
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # --- use ----------------------------------------------------------------------------

    def psql(self, sql: str, db: str = "postgres") -> str:
        out = self._as_postgres([str(BIN.parent / "bin/psql") if (BIN / "psql").exists()
                                 else "psql", "-X", "-q", "-A", "-t", "-h", self.host,
                                 "-p", str(self.port), "-U", "postgres", "-d", db,
                                 "-v", "ON_ERROR_STOP=1", "-c", sql], timeout=60)
        if out.returncode:
            raise PgError(f"psql failed: {out.stderr}")
        return out.stdout

    def _ensure_role(self) -> None:
        have = self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{self.user}'").strip()
        if not have:
            self.psql(f"CREATE ROLE {self.user} LOGIN")

    def create_db(self, name: str) -> str:
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.psql(f"CREATE DATABASE {name} OWNER {self.user}")
        return self.url(name)

    def url(self, db: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{db}"

    def _log(self) -> str:
        try:
            return self.log.read_text()[-4000:]
        except OSError:
            return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
