"""MTA-STS policy servers for tests: real HTTPS servers on loopback port 443.

    srv = PolicyServer("127.44.1.2", "mail.test", ca=CA, policy=POLICY_TEXT)
    with srv:                               # started in its own thread and event loop
        ... srv.requests (paths), srv.sni ...
        srv.mode = "404"                    # change behaviour while running

The server answers `GET /.well-known/mta-sts.txt` for `mta-sts.<domain>` with a
certificate from `ca` (or a self-signed one: `self_signed=True`). Port 443 on a
dedicated 127.x address: the tests run as root (scripts/test does too), and every
module picks its own random addresses.

Modes (`mode`, read per request): "ok" (200 text/plain with `policy`), "404", "500",
"redirect" (301 to another URL), "wrong-type" (200 text/html), "drip" (200, then one
byte a second, forever), "endless" (200 chunked, never ending), "hang" (accepts the
request, never answers), "raw" (200 text/plain with `raw` bytes as the body).
"""

from __future__ import annotations

import asyncio
import random
import ssl
import threading
from pathlib import Path
from typing import Any

from tests.support.certs import Issued, make_leaf, server_context

POLICY_PATH = "/.well-known/mta-sts.txt"


def sts_addr() -> str:
    """A random loopback address for one policy server (port 443 is then free)."""
    return f"127.{random.randint(40, 90)}.{random.randint(1, 254)}.{random.randint(1, 254)}"


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx),
             f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


class PolicyServer:
    def __init__(self, ip: str, domain: str, *, ca: Issued | None = None,
                 chain: tuple[Issued, ...] = (), policy: str = "", mode: str = "ok",
                 raw: bytes = b"", self_signed: bool = False, port: int = 443,
                 directory: Path | None = None) -> None:
        self.ip = ip
        self.port = port
        self.domain = domain
        self.host = f"mta-sts.{domain}"
        self.policy = policy
        self.mode = mode
        self.raw = raw
        leaf = make_leaf([self.host]) if self_signed or ca is None else \
            make_leaf([self.host], issuer=ca)
        self.context = server_context(leaf, list(chain), directory)
        self.context.sni_callback = self._on_sni
        self.requests: list[str] = []
        self.sni: list[str | None] = []
        self.open = 0
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    def _on_sni(self, sslobj: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        with self._cond:
            self.sni.append(name)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._cond:
            self.open += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            with self._cond:
                self.requests.append(line)
                self._cond.notify_all()
            await self._respond(writer, self.mode)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ssl.SSLError, asyncio.CancelledError):
            pass  # the client went away, or the server is stopping
        finally:
            with self._cond:
                self.open -= 1
                self._cond.notify_all()
            writer.transport.abort()

    async def _respond(self, w: asyncio.StreamWriter, mode: str) -> None:
        def send(status: str, ctype: str, body: bytes, extra: str = "") -> None:
            w.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: "
                    f"{len(body)}\r\n{extra}Connection: close\r\n\r\n".encode() + body)

        if mode == "ok":
            send("200 OK", "text/plain; charset=utf-8", self.policy.encode())
        elif mode == "raw":
            send("200 OK", "text/plain", self.raw)
        elif mode in ("404", "500"):
            send(f"{mode} {'Not Found' if mode == '404' else 'Internal Server Error'}",
                 "text/plain", b"no\n")
        elif mode == "redirect":
            send("301 Moved Permanently", "text/plain", b"",
                 f"Location: https://elsewhere.test{POLICY_PATH}\r\n")
        elif mode == "wrong-type":
            send("200 OK", "text/html", self.policy.encode())
        elif mode == "drip":
            body = self.policy.encode() * 1000
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n")
            for i in range(len(body)):
                if w.transport.is_closing():
                    break
                w.write(body[i:i + 1])
                await w.drain()
                await asyncio.sleep(1.0)
        elif mode == "endless":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"mx: x.example.com\n" * 200
            for _ in range(100_000):  # ~360 MB at most; the client stops long before
                if w.transport.is_closing():
                    break
                w.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await w.drain()
        elif mode == "hang":
            await asyncio.get_running_loop().create_future()
        await w.drain()

    # --- life cycle ---------------------------------------------------------------

    def start(self) -> PolicyServer:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(asyncio.start_server(
                    self._handle, self.ip, self.port, ssl=self.context))
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"sts-{self.ip}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            self._thread.join()
            self._thread = self._loop = None
            raise failure[0]
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = self._loop = None

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no connection is open (a client that gave up has closed its side)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.open == 0, timeout):
                raise AssertionError(f"{self.host}: {self.open} connections still open")

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
