"""The STARTTLS sink of the delivery benchmark: bench/tlssink.c, compiled on first use.

    sink = TlsSink(workdir, "127.a.b.c", cert_path, key_path).start()
    sink.stats()  # {"msgs": .., "conns": .., "tls": .., "resumed": .., "tls13": ..}
    sink.stop()

Why C: the sink runs on the same two cores as the MTA under test, so it must cost as
little as possible; an aiosmtpd destination would use more CPU per message than the
relay itself. It is a real SMTP server with a real TLS stack (OpenSSL), offers
PIPELINING and STARTTLS, accepts everything and keeps nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from benchlib import tool

SOURCE = Path(__file__).with_name("tlssink.c")


def build(workdir: Path) -> Path:
    exe = workdir / "tlssink"
    if not exe.exists() or exe.stat().st_mtime < SOURCE.stat().st_mtime:
        subprocess.run([tool("cc"), "-O2", "-Wall", "-o", str(exe), str(SOURCE), "-lssl",
                        "-lcrypto", "-lpthread"], check=True, capture_output=True, text=True)
    return exe


class TlsSink:
    def __init__(self, workdir: Path, host: str, cert: Path, key: Path, port: int = 0) -> None:
        self.dir = workdir
        self.host = host
        self.port = port
        self.cert = cert
        self.key = key
        self.proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> TlsSink:
        exe = build(self.dir)
        self.proc = subprocess.Popen([str(exe), self.host, str(self.port), str(self.cert),
                                      str(self.key)], stdout=subprocess.PIPE, text=True,
                                     stderr=open(self.dir / "tlssink.err", "w"))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            self.stop()
            raise RuntimeError(f"tlssink did not start: {(self.dir / 'tlssink.err').read_text()}")
        self.port = int(line[1])
        return self

    def stats(self) -> dict[str, int]:
        with socket.create_connection((self.host, self.port), timeout=5) as s:
            f = s.makefile("rwb")
            f.readline()  # 220
            f.write(b"XSTAT\r\nQUIT\r\n")
            f.flush()
            reply = f.readline().decode()
        return {k: int(v) for k, v in (kv.split("=") for kv in reply.split()[1:])}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
