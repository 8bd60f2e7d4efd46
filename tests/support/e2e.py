"""Shared steps of the end-to-end tests: a delivering relay, mail in, outcomes out.

    with delivering_relay(work, bed.nameserver, PORT, delivery={...}) as relay:
        qid = submit(relay, ["bob@ok.test"])
        ev = final(relay, qid, "bob@ok.test")          # delivered / bounced / expired
        info = show(relay, qid)                        # `relay queue show --json`
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tests.support.relayproc import RelayProc, deep_merge, default_config
from tests.support.smtpd import Destination, Received

ROOT = Path(__file__).resolve().parents[2]
SENDER = "alice@senderbox.test"
FINAL_EVENTS = ("delivered", "bounced", "expired")
T = TypeVar("T")


@contextlib.contextmanager
def delivering_relay(workdir: Path, nameserver: str, port: int,
                     **sections: Mapping[str, Any]) -> Iterator[RelayProc]:
    """`relay serve` with delivery on, the test bed's resolver and `delivery.port`,
    started once the resolver is known to validate; always stopped."""
    config = deep_merge(default_config(workdir), {
        "dns": {"nameservers": [nameserver], "timeout": "3s"},
        "delivery": {"enabled": True, "port": port, "poll_interval": "0.2s",
                     "connect_timeout": "2s", "greeting_timeout": "5s"},
    })
    proc = RelayProc(workdir, deep_merge(config, sections))
    proc.start()
    try:
        proc.wait_event("resolver_check", validating=True, timeout=15)
        yield proc
    finally:
        if proc.running:
            proc.stop()


@contextlib.contextmanager
def running(dests: Mapping[str, Destination]) -> Iterator[Mapping[str, Destination]]:
    for d in dests.values():
        d.start()
    try:
        yield dests
    finally:
        for d in dests.values():
            d.stop()


def submit(relay: RelayProc, rcpts: list[str], sender: str = SENDER,
           tag: str | None = None) -> str:
    """Send one message through the relay (smtplib); its queue id."""
    mark = relay.mark()
    tag = tag or uuid.uuid4().hex[:8]
    body = (f"From: <{sender}>\r\nTo: <{rcpts[0]}>\r\nSubject: test {tag}\r\n"
            f"Message-ID: <{tag}@client.test>\r\n\r\nHello {tag}\r\n.leading dot\r\n")
    with relay.smtp() as client:
        client.sendmail(sender, rcpts, body.encode())
    return str(relay.wait_event("received", after=mark)["id"])


def cli(relay: RelayProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args, "-c", str(relay.config_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


def show(relay: RelayProc, qid: str) -> dict[str, Any]:
    r = cli(relay, "queue", "show", qid, "--json")
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def recipient(info: dict[str, Any], address: str) -> dict[str, Any]:
    return next(r for r in info["recipients"] if r["address"] == address)


def wait_for(pred: Callable[[], T], timeout: float = 20.0, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def final(relay: RelayProc, qid: str, rcpt: str, timeout: float = 20) -> dict[str, Any]:
    """The recipient's final event (delivered / bounced / expired), waiting for it."""

    def found() -> dict[str, Any] | None:
        for name in FINAL_EVENTS:
            events = relay.events(name, id=qid, recipient=rcpt)
            if events:
                return events[0]
        return None

    try:
        return wait_for(found, timeout, f"{rcpt} of {qid} to be final")
    except AssertionError:
        raise AssertionError(f"{rcpt} of {qid} not final within {timeout}s:\n"
                             + "\n".join(relay.lines[-30:])) from None


def message_for(dest: Destination, needle: str, timeout: float = 20) -> Received:
    """The first message `dest` received whose body contains `needle` (e.g. a queue id)."""
    return wait_for(lambda: next((m for m in dest.messages if needle.encode() in m.body),
                                 None), timeout, f"a message with {needle} at {dest}")


def delivery_status(msg: Received) -> list[dict[str, str]]:
    """The blocks of an NDR's message/delivery-status part (per-message block first),
    after checking the report's structure."""
    parsed = email.message_from_bytes(msg.body, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["Auto-Submitted"] == "auto-replied"
    ds = next(p for p in parsed.iter_parts()
              if p.get_content_type() == "message/delivery-status")
    return [{k.lower(): str(v) for k, v in block.items()} for block in ds.get_payload()]
