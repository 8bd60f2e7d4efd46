"""AUTH brute force from one address against `relay serve` (not a test).

    .venv/bin/python bench/auth_bench.py [--seconds 60] [--parallel 8] [--per-session 5]

The world, on loopback: one `relay serve` (delivery off) with STARTTLS (a generated
certificate) and a users file of two scrypt users; `allowed_networks =
["127.0.0.1/32"]`, so both clients below must authenticate to relay.

- The attacker, from 127.0.0.2: `--parallel` smtplib sessions at once, each STARTTLS,
  EHLO, then up to `--per-session` `AUTH PLAIN` with a wrong password, then QUIT and
  reconnect at once (the pattern of the issue: 5 failures per session). Counted: AUTH
  commands answered `535` (an attempt the relay checked), AUTH commands or connections
  refused with `421` (throttled), and how long each answer took.
- The legitimate user, from 127.0.0.3, once every `--interval` seconds: STARTTLS, AUTH
  with the right password, one message, QUIT. Counted: successes and the time AUTH took.

Printed: AUTH attempts per minute from the one attacking address that the relay
checked (its `auth` events), the 535 and 421 answers the attacker saw, lockouts
(`auth_lockout` events), and the legitimate user's AUTH latency (p50, p99) and success
count.
"""

from __future__ import annotations

import argparse
import base64
import smtplib
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import RelayServer, machine, relay_config, table

from relay.intake.auth import hash_password
from tests.support import certs

BOB_PASSWORD = "bob's right password"


@dataclass
class Counts:
    checked: int = 0  # 535 answers
    refused: int = 0  # 421 answers (AUTH or connect)
    other: int = 0
    sessions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def attacker(host: str, port: int, per_session: int, end: float, counts: Counts) -> None:
    wrong = base64.b64encode(b"\0alice\0not the password").decode()
    while time.monotonic() < end:
        try:
            with smtplib.SMTP(host, port, local_hostname="brute.example", timeout=60,
                              source_address=("127.0.0.2", 0)) as c:
                with counts.lock:
                    counts.sessions += 1
                c.starttls(context=_ctx())
                c.ehlo()
                for _ in range(per_session):
                    if time.monotonic() >= end:
                        break
                    code, _ = c.docmd("AUTH", f"PLAIN {wrong}")
                    with counts.lock:
                        if code == 535:
                            counts.checked += 1
                        elif code == 421:
                            counts.refused += 1
                        else:
                            counts.other += 1
                    if code == 421:
                        break
        except smtplib.SMTPConnectError as exc:
            with counts.lock:
                counts.refused += exc.smtp_code == 421
            time.sleep(0.05)
        except (OSError, smtplib.SMTPException):
            time.sleep(0.05)


def legit(host: str, port: int, interval: float, end: float, auth_times: list[float],
          failures: list[str]) -> None:
    n = 0
    while time.monotonic() < end:
        began = time.monotonic()
        try:
            with smtplib.SMTP(host, port, local_hostname="legit.example", timeout=60,
                              source_address=("127.0.0.3", 0)) as c:
                c.starttls(context=_ctx())
                c.ehlo()
                t0 = time.monotonic()
                c.login("bob", BOB_PASSWORD)
                auth_times.append(time.monotonic() - t0)
                n += 1
                c.sendmail("bob@org.example", ["x@dest.example"],
                           f"Subject: legit {n}\r\n\r\nhi\r\n".encode())
        except (OSError, smtplib.SMTPException) as exc:
            failures.append(f"{type(exc).__name__}: {str(exc)[:60]}")
        time.sleep(max(0.0, interval - (time.monotonic() - began)))


def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--per-session", type=int, default=5)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        cert, key = certs.write_pair(certs.make_leaf(["relay.bench.test"]), directory=work)
        users = work / "users"
        users.write_text(f"alice:{hash_password('alice secret')}\n"
                         f"bob:{hash_password(BOB_PASSWORD)}\n")
        cfg = relay_config(work, "127.0.0.1", listener={
            "allowed_networks": ["127.0.0.1/32"], "tls_cert": str(cert),
            "tls_key": str(key), "users_file": str(users)})
        relay = RelayServer(work / "relay", cfg).start()
        counts = Counts()
        auth_times: list[float] = []
        failures: list[str] = []
        try:
            began = time.monotonic()
            end = began + args.seconds
            threads = [threading.Thread(target=attacker, args=(relay.host, relay.port,
                                                               args.per_session, end, counts))
                       for _ in range(args.parallel)]
            threads.append(threading.Thread(target=legit, args=(relay.host, relay.port,
                                                                 args.interval, end,
                                                                 auth_times, failures)))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - began
            auths = relay.events("auth")
            lockouts = len(relay.events("auth_lockout"))
        finally:
            relay.stop()
    minutes = wall / 60
    checked = sum(1 for e in auths if e.get("client_ip") == "127.0.0.2")
    print(f"\nattacker: {args.parallel} parallel sessions from 127.0.0.2, "
          f"{args.per_session} wrong AUTH per session; legitimate user every "
          f"{args.interval:g} s from 127.0.0.3; {wall:.0f} s\n")
    print(table(["checked by the relay/min", "535 seen/min", "421 seen/min",
                 "sessions/min", "lockouts", "legit AUTH ok", "legit AUTH p50 ms", "p99 ms"],
                [[f"{checked / minutes:.1f}", f"{counts.checked / minutes:.1f}",
                  f"{counts.refused / minutes:.1f}", f"{counts.sessions / minutes:.1f}",
                  lockouts, f"{len(auth_times)}/{len(auth_times) + len(failures)}",
                  pct(auth_times, 0.5), pct(auth_times, 0.99)]]))
    if failures:
        print("legit failures:", "; ".join(sorted(set(failures))[:5]))


if __name__ == "__main__":
    main()
