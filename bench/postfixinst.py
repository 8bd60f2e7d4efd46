"""A private Postfix instance for the benchmarks: own config directory, queue and log.

    pf = PostfixInstance(workdir, ("127.a.b.c", port), main={"relayhost": "[127.x.y.z]:2600"})
    pf.start(); ...; pf.stop()

Never the system instance: `postfix -c WORKDIR/etc start` with `queue_directory` and
`data_directory` under WORKDIR, `maillog_file` = WORKDIR/maillog (postlogd; there is no
syslog here) and one smtpd listener on the given loopback address and port in
master.cf. `inet_interfaces = loopback-only`: Postfix refuses an `inet_interfaces`
address that is not configured on an interface (127.a.b.c is only routed by lo), and the
master.cf listener binds its own address anyway. No service is chrooted, so no copies of
/etc are needed in the queue directory.

`resolv_conf`: text for /etc/resolv.conf as this instance sees it. Postfix resolves with
the C library (res_query), which reads only /etc/resolv.conf, allows no port (so the
validating resolver must listen on port 53 of its own 127.x address) and passes the AD
bit through only with `options trust-ad` (glibc >= 2.31). The instance is started inside
a private mount namespace (`unshare -m`) where that text is bind-mounted over
/etc/resolv.conf: the master and every daemon it forks inherit it, nothing else on the
machine sees it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from benchlib import cpu_tree, free_port, port_open, pss_tree, tool

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
tlsproxy  unix  -       -       n       -       0       tlsproxy
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(RuntimeError):
    pass


class PostfixInstance:
    def __init__(self, workdir: Path, listen: tuple[str, int], *,
                 main: Mapping[str, str] | None = None, resolv_conf: str | None = None) -> None:
        self.dir = Path(workdir)
        self.etc = self.dir / "etc"
        self.spool = self.dir / "spool"
        self.data = self.dir / "data"
        self.maillog = self.dir / "maillog"
        self.listen = listen if listen[1] else (listen[0], free_port(listen[0]))
        self.resolv_conf = resolv_conf
        self.main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.spool),
            "data_directory": str(self.data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "myhostname": "postfix.bench.test",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.dir),
            "biff": "no",
        }
        self.main.update(main or {})

    # --- life cycle ---------------------------------------------------------------------

    def write_config(self) -> None:
        self.etc.mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        pw = pwd.getpwnam("postfix")
        os.chown(self.data, pw.pw_uid, pw.pw_gid)
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.main.items()))
        host, port = self.listen
        (self.etc / "master.cf").write_text(MASTER_CF.format(listen=f"{host}:{port}"))

    def _postfix(self, *args: str) -> list[str]:
        return [tool("postfix"), "-c", str(self.etc), *args]

    def start(self, timeout: float = 30.0) -> PostfixInstance:
        if os.geteuid() != 0:
            raise PostfixError("a private Postfix instance needs root (postfix -c DIR start)")
        self.write_config()
        cmd = self._postfix("start")
        if self.resolv_conf is not None:
            resolv = self.dir / "resolv.conf"
            resolv.write_text(self.resolv_conf)
            inner = (f"mount --bind {shlex.quote(str(resolv))} /etc/resolv.conf && exec "
                     + shlex.join(cmd))
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", inner]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.master_pid() and port_open(*self.listen):
                return self
            time.sleep(0.05)
        raise PostfixError(f"postfix did not start (exit {proc.returncode}): "
                           f"{proc.stdout}{proc.stderr}\n{self.log_tail()}")

    def stop(self) -> None:
        pid = self.master_pid()
        subprocess.run(self._postfix("stop"), capture_output=True, timeout=60, check=False)
        if pid is None:
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():  # the master did not stop: end it and its children
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def reload(self) -> None:
        subprocess.run(self._postfix("reload"), capture_output=True, timeout=60, check=True)

    def master_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.spool / "pid" / "master.pid").read_text().split()[0])
            if Path(f"/proc/{pid}").exists():
                return pid
        return None

    # --- readings -----------------------------------------------------------------------

    def cpu(self) -> float:
        """CPU seconds of the whole instance so far (master, reaped and live children)."""
        pid = self.master_pid()
        return cpu_tree(pid) if pid else 0.0

    def pss(self) -> int:
        pid = self.master_pid()
        return pss_tree(pid) if pid else 0

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.maillog.read_text(errors="replace")
        return ""

    def log_count(self, needle: str) -> int:
        return self.log_text().count(needle)

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def queued(self, *queues: str) -> int:
        """Queue files in the named queues (default: incoming, active, deferred, hold)."""
        total = 0
        for q in queues or ("incoming", "active", "deferred", "hold", "maildrop"):
            for _, _, files in os.walk(self.spool / q):
                total += len(files)
        return total

    # --- queue commands -----------------------------------------------------------------

    def postsuper(self, *args: str) -> None:
        subprocess.run([tool("postsuper"), "-c", str(self.etc), *args], capture_output=True,
                       timeout=120, check=True)

    def postqueue(self, *args: str) -> None:
        subprocess.run([tool("postqueue"), "-c", str(self.etc), *args], capture_output=True,
                       timeout=120, check=True)
