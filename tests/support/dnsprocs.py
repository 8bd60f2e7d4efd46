"""Processes and sockets of the DNSSEC test bed: free loopback ports, spawn/stop by PID.

Every process is started with its own log, tracked, and stopped by PID (SIGTERM, then
SIGKILL); an atexit hook stops leftovers, and children started from the main thread also
get SIGTERM if the test process dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query

Addr = tuple[str, int]
_LIVE: set[subprocess.Popen[bytes]] = set()


class DnsBedError(Exception):
    """A bed process failed to start (the message carries its log)."""


def random_addr() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(1, 254)}.{random.randint(1, 254)}"


def free_port(addr: str) -> int:
    """A port free for both UDP and TCP on addr (addr is random per bed, so no race)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((addr, 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((addr, port))
                except OSError:
                    continue
                return port
    raise DnsBedError(f"no free port on {addr}")


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the child gets SIGTERM if the test process dies.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def preexec() -> Callable[[], None] | None:
    # PDEATHSIG fires when the spawning *thread* exits: only use it from the main thread.
    return _die_with_parent if threading.current_thread() is threading.main_thread() else None


def _tool(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin") or name


def spawn(argv: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen([_tool(argv[0]), *argv[1:]], stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=preexec(), **kw)
    _LIVE.add(proc)
    return proc


def kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
    _LIVE.discard(proc)


@atexit.register
def _kill_all() -> None:
    for proc in list(_LIVE):
        kill(proc)


def hostport(addr: Addr) -> str:
    """"ip:port", the form of the relay's `dns.nameservers` config entries."""
    return f"{addr[0]}:{addr[1]}"


def query(server: Addr, name: str, rdtype: str | int = "A", *, cd: bool = False,
          timeout: float = 5.0) -> dns.message.Message:
    """One DNSSEC-OK query (RD, optional CD) over UDP, retried over TCP if truncated."""
    q = dns.message.make_query(name, rdtype, want_dnssec=True, use_edns=0, payload=1232)
    if cd:
        q.flags |= dns.flags.CD
    return dns.query.udp_with_fallback(q, server[0], timeout=timeout, port=server[1])[0]


def wait_answering(proc: subprocess.Popen[bytes], server: Addr, name: str, rdtype: str,
                    log: Path, what: str, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise DnsBedError(f"{what} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        q = dns.message.make_query(name, rdtype)
        try:
            dns.query.udp(q, server[0], port=server[1], timeout=0.1)
            return
        except (dns.exception.Timeout, OSError):
            continue
    raise DnsBedError(f"{what} not answering on {server}:\n{log.read_text()[-3000:]}")


def track(proc: subprocess.Popen[bytes]) -> None:
    """Stop `proc` at exit if nobody did."""
    _LIVE.add(proc)
