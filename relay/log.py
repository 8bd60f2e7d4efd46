"""JSON-lines event log with a fixed vocabulary of event names.

One object per line on stdout: `{"ts": ..., "level": ..., "event": ..., ...fields}`.
Never bodies, never credentials: callers pass only the fields below, and `event()`
refuses names outside EVENTS so the vocabulary cannot drift silently.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

EVENTS: dict[str, str] = {
    # life cycle
    "starting": "relay serve is starting (config file, version)",
    "listening": "the SMTP listener is bound (host, port)",
    "resolver_check": "the resolver validation probe ran (validating, nameservers, detail)",
    "draining": "first SIGTERM: no new sessions, open transactions finish",
    "stopped": "the relay has stopped",
    "storage_error": "the queue store failed a write (kind, detail)",
    "storage_recovered": "writes succeed again after a storage error",
    "internal_error": "an unexpected exception was contained (session or component, error)",
    "fatal": "relay serve cannot start or go on; it exits (error naming the problem, exit, "
             "and e.g. path, uid, key)",
    "queue_wait": "start-up: the shared queue (PostgreSQL) does not answer yet; serve tries "
                  "again (error, retry_in, gives_up_in), then a fatal",
    "integrity_check": "the queue file's integrity check (SQLite quick_check), run after an "
                       "unclean stop in the background: result started | ok | damaged "
                       "(path, reason, seconds, detail, action)",
    "worker_started": "an intake worker process is listening (worker, pid; "
                      "listener.workers > 1)",
    "worker_exited": "an intake worker process ended (worker, pid, code or signal); "
                     "unless the relay is stopping it is started again (restart_in)",
    "gateway_allowed": "listener.allowed_networks covers the default gateway (the Docker "
                       "bridge gateway in a container): who comes through it may relay",
    # intake
    "connect": "a client connected (client_ip)",
    "disconnect": "a client went away (client_ip)",
    "connection_limit": "a connection limit was reached (limit: total, per_ip, untrusted); "
                        "at most once a minute per limit",
    "auth": "SMTP AUTH attempt (client_ip, user, success, delay) — never the password",
    "auth_lockout": "a client address is locked out of AUTH after too many failures "
                    "(client_ip, failures, seconds)",
    "rejected": "a command was refused (client_ip, command, reply)",
    "received": "a message was committed to the queue (id, sender, recipients, size)",
    # delivery
    "attempt": "one delivery attempt to one host ended (id, domain, mx, ip, tls, dane, code)",
    "delivered": "a recipient was delivered (id, recipient, mx, reply)",
    "deferred": "a recipient was deferred (id, recipient, code, reply, next_attempt_at)",
    "bounced": "a recipient bounced (id, recipient, code, reply)",
    "expired": "a recipient's lifetime ran out (id, recipient, code)",
    "ndr_sent": "a non-delivery report was queued (id, ndr_id, recipients)",
    "delay_warning": "a delay warning was queued (id, warning_id)",
    "queue_op": "an operator changed the queue (op, id)",
    "takeover": "a claim took over work whose lease had run out: it may have been done "
                "already (id, domain, recipients, previous, owner)",
    "lease_lost": "a job's lease was taken over or could not be renewed in time: no "
                  "further SMTP transaction for it, nothing recorded (id, domain, reason)",
    "purged": "finished messages past trace retention were removed (count)",
    "corrupt_body": "a body failed its digest check before delivery: the message is held, "
                    "never sent (id, detail)",
    "job_released": "a claimed job gave its lease back without an attempt (id, reason)",
    "destination_dead": "a destination failed its first connections: its due mail is "
                        "deferred without a connection until it may be tried again "
                        "(domain, code, reply, failures, until)",
    "destination_recovered": "a destination marked dead took a transaction again (domain)",
    # MTA-STS
    "sts_fetched": "an MTA-STS policy was fetched and cached (domain, policy_id, mode, max_age)",
    "sts_fetch_failed": "an MTA-STS policy fetch failed (domain, policy_id, result_type, detail)",
    # reporting
    "tlsrpt_sent": "a TLS report was sent (policy_domain, via)",
    "tlsrpt_failed": "a TLS report could not be sent (policy_domain, via, detail)",
}

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_AT_ONCE = frozenset({"received", "fatal"})  # never held back by `coalesce`


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventLog:
    def __init__(self, stream: TextIO | None = None, fmt: str = "json", level: str = "info",
                 *, extra: dict[str, Any] | None = None, coalesce: bool = False):
        self._stream = stream
        self._fmt = fmt
        self._min = _LEVELS[level]
        self._extra = dict(extra or {})  # fields of every line (an intake worker: its number)
        # An intake worker: the lines of one turn of the event loop go out in one write
        # (to the main process's pipe), not one write and one wake-up there per line.
        self._coalesce = coalesce
        self._pending: list[str] = []

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def event(self, name: str, level: str = "info", **fields: Any) -> None:
        if name not in EVENTS:
            raise ValueError(f"unknown log event {name!r}")
        if _LEVELS[level] < self._min:
            return
        record: dict[str, Any] = {"ts": _now(), "level": level, "event": name}
        record.update(self._extra)
        record.update({k: v for k, v in fields.items() if v is not None})
        self.write(record)

    @property
    def is_json(self) -> bool:
        return self._fmt == "json"

    def write_lines(self, text: str) -> None:
        """Whole lines as they are (also an intake worker's, relayed by the main process)."""
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must not stop mail

    def write(self, record: dict[str, Any]) -> None:
        """One record (ts, level, event, fields) as one line, in this log's format."""
        level, name = str(record.get("level", "info")), str(record.get("event", ""))
        if self._fmt == "json":
            line = json.dumps(record, default=str, ensure_ascii=False)
        else:
            skip = ("ts", "level", "event")
            extras = " ".join(f"{k}={v}" for k, v in record.items() if k not in skip)
            line = f"{record['ts']} {level.upper():7} {name:14} {extras}"
        if self._coalesce:
            self._pending.append(line + "\n")
            if name in _AT_ONCE:  # logged before its 250 is sent, as without coalescing
                self.flush()
            elif len(self._pending) == 1:
                try:
                    asyncio.get_running_loop().call_soon(self.flush)
                except RuntimeError:  # no event loop: at once
                    self.flush()
            return
        self.write_lines(line + "\n")

    def flush(self) -> None:
        """Write the lines held back by `coalesce` (whole lines, one write)."""
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self.write_lines(text)


# The process-wide log; `relay serve` configures it, tests may replace it.
log = EventLog()

# Observers see every event (whatever the level), e.g. the Prometheus counters.
Observer = Callable[[str, dict[str, Any]], None]
observers: list[Observer] = []


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None,
              *, extra: dict[str, Any] | None = None, coalesce: bool = False) -> EventLog:
    global log
    log = EventLog(stream, fmt, level, extra=extra, coalesce=coalesce)
    return log


def event(name: str, level: str = "info", **fields: Any) -> None:
    log.event(name, level, **fields)
    for observer in observers:
        try:
            observer(name, fields)
        except Exception:  # metrics must never stop mail
            pass
