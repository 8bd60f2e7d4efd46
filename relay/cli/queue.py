"""`relay queue …`: list, show, retry, delete, hold, release, stats, backup, import, nodes.

Each command opens the configured queue (the SQLite file at `queue.path`, or the shared
PostgreSQL queue at `queue.url`) beside a running `relay serve` (SQLite's WAL: readers
never block it; writes wait for each other; on PostgreSQL any node's CLI sees the whole
queue).
Human output is a table; `--json` prints the contract's shapes for scripts. A queue id
that does not exist is an error on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO, TypeVar

from relay import config as configmod
from relay import log
from relay.errors import NotFound
from relay.store import MessageInfo, Stats, Store, iso, open_store

T = TypeVar("T")


_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")


def _run(args: argparse.Namespace, fn: Callable[[Store], Awaitable[T]], *,
         create: bool = False) -> T:
    qid = getattr(args, "id", None)
    if qid is not None and not _QUEUE_ID.fullmatch(qid):
        raise NotFound(f"not a queue id: {ascii(qid)[:100]}")
    cfg = configmod.load(getattr(args, "config", None))
    # stdout carries the command's output; store warnings go to stderr.
    log.configure(fmt="json", level="warning", stream=sys.stderr)

    async def main() -> T:
        store = await open_store(cfg.queue, check=False, create=create)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(main())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _fail(message: str) -> int:
    print(f"relay: {message}", file=sys.stderr)
    return 1


# --- formatting -------------------------------------------------------------------------


def age(seconds: float) -> str:
    """45 → "45s", 300 → "5m", 11520 → "3h12m", 180000 → "2d2h"."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m:02d}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def size(octets: int) -> str:
    if octets < 1024:
        return f"{octets}B"
    for unit in ("K", "M", "G"):
        octets /= 1024  # type: ignore[assignment]
        if octets < 1024:
            return f"{octets:.1f}{unit}" if octets < 10 else f"{octets:.0f}{unit}"
    return f"{octets:.0f}T"


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


LIST_HEADER = f"{'ID':<16}  {'AGE':>6}  {'SIZE':>6}  SENDER / RECIPIENTS"


def format_message(m: MessageInfo, now: float) -> list[str]:
    """The lines of one message in `relay queue list`."""
    flag = f"  [held: {_short(m.held_reason)}]" if m.held and m.held_reason else (
        "  [held]" if m.held else "")
    lines = [f"{m.id:<16}  {age(now - m.received_at):>6}  {size(m.size):>6}  "
             f"<{m.sender}>{flag}"]
    width = max(len(r.address) for r in m.recipients) if m.recipients else 0
    for r in m.recipients:
        code = f"  {r.code}" if r.code else ""
        lines.append(f"{'':<36}{r.address:<{width}}  {r.status}{code}")
    return lines


def list_footer(messages: int, octets: int, recipients: int) -> str:
    return f"-- {messages} message(s), {size(octets)}, {recipients} recipient(s)"


def format_list(messages: list[MessageInfo], now: float) -> str:
    if not messages:
        return "Queue is empty."
    lines = [LIST_HEADER]
    for m in messages:
        lines.extend(format_message(m, now))
    lines.append(list_footer(len(messages), sum(m.size for m in messages),
                             sum(len(m.recipients) for m in messages)))
    return "\n".join(lines)


def pretty_json(value: Any, pad: str = "") -> str:
    """`json.dumps(value, indent=2, ensure_ascii=False)`, byte for byte, for the values
    of the queue's JSON shapes (dicts, lists, str, int, float, bool, None), about five
    times faster than the json module's pure-Python indenting encoder."""
    if isinstance(value, str):
        return _encode_str(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, dict):
        if not value:
            return "{}"
        inner = pad + "  "
        items = ",\n".join(f"{inner}{_encode_str(str(k))}: {pretty_json(v, inner)}"
                           for k, v in value.items())
        return f"{{\n{items}\n{pad}}}"
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        inner = pad + "  "
        items = ",\n".join(inner + pretty_json(v, inner) for v in value)
        return f"[\n{items}\n{pad}]"
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n" + pad)


_encode_str = json.encoder.encode_basestring  # type: ignore[attr-defined]


class JsonArray:
    """Writes one JSON array element by element, byte for byte as `json.dumps(list,
    indent=2, ensure_ascii=False)` would: a million messages never sit in memory."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.count = 0

    def add(self, value: Any) -> None:
        self.out.write(("[\n  " if self.count == 0 else ",\n  ") + pretty_json(value, "  "))
        self.count += 1

    def close(self) -> None:
        self.out.write("[]\n" if self.count == 0 else "\n]\n")


def format_show(m: MessageInfo, now: float) -> str:
    out = [
        f"Message {m.id}",
        f"  sender:    <{m.sender}>",
        f"  received:  {iso(m.received_at)} ({age(now - m.received_at)} ago)",
        f"  size:      {m.size} bytes{'  (SMTPUTF8)' if m.smtputf8 else ''}",
        f"  client:    {m.client_ip or '-'} ({m.client_helo or '-'})"
        + (f" user {m.auth_user}" if m.auth_user else ""),
        f"  held:      {'yes' if m.held else 'no'}"
        + (f" ({m.held_reason})" if m.held and m.held_reason else ""),
    ]
    if m.requiretls:
        out.append("  tls:       REQUIRETLS (RFC 8689): DANE or MTA-STS authenticated hops only")
    if m.finished_at is not None:
        out.append(f"  finished:  {iso(m.finished_at)} (body removed; trace kept)")
    for r in m.recipients:
        out.append("")
        out.append(f"Recipient {r.address}: {r.status}" + (f" {r.code}" if r.code else ""))
        line = f"  attempts: {r.attempts}"
        if not r.status.final and r.next_attempt_at is not None:
            when = r.next_attempt_at - now
            rel = f"in {age(when)}" if when > 0 else "due now"
            line += f"; next attempt {iso(r.next_attempt_at)} ({rel})"
        if r.leased_until is not None and r.leased_until > now:
            line += f"; in progress ({r.lease_owner})"
        out.append(line)
        if r.reply:
            out.append(f"  last reply: {r.reply}")
        if r.history:
            out.append("  history:")
        for a in r.history:
            host = a.mx or "-"
            if a.ip:
                host += f" [{a.ip}]"
            facts = " ".join(
                f"{k}={v}" for k, v in (("dnssec", a.dnssec), ("tlsa", a.tlsa), ("tls", a.tls),
                                        ("dane", a.dane), ("policy", a.policy)) if v
            )
            out.append(f"    {iso(a.at)}  {host}  {a.code or '-'}  {facts}".rstrip())
            if a.reply:
                out.append(f"        {a.reply}")
    return "\n".join(out)


def format_stats(st: Stats) -> str:
    rec = st.as_json()["recipients"]
    out = [
        f"messages in queue: {st.messages} ({size(st.bytes)}), held: {st.held}, "
        f"finished (trace kept): {st.finished}",
        "recipients: " + ", ".join(f"{k} {v}" for k, v in rec.items()),
        f"oldest message: {age(st.oldest_age) if st.oldest_age is not None else '-'}",
    ]
    if st.by_code:
        out.append("by code:")
        out.extend(f"  {c:<10} {s:<9} {n}" for c, s, n in st.by_code)
    if st.top_deferred_domains:
        out.append("most deferred destinations:")
        out.extend(f"  {d:<40} {n}" for d, n in st.top_deferred_domains)
    return "\n".join(out)


# --- commands ---------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    """Streams the listing page by page (relay.store.views): memory and the time to the
    first message do not grow with the queue. All matching messages by default (the
    `--json` array is the contract's: scripts get every message); `--limit N` stops
    after N and says on stderr (JSON) or in the last line (table) how to go on
    (`--after ID`)."""
    if args.limit is not None and args.limit < 1:
        return _fail("--limit must be at least 1")
    if args.after is not None and not _QUEUE_ID.fullmatch(args.after):
        return _fail(f"--after needs a queue id, not {ascii(args.after)[:100]}")
    filters = {"include_final": args.all, "status": args.status, "domain": args.domain,
               "code": args.code, "sender": args.sender, "recipient": args.recipient}
    out = sys.stdout
    now = time.time()

    async def fn(store: Store) -> tuple[int, str | None, int | None]:
        shown, octets, recipients, last = 0, 0, 0, None
        array = JsonArray(out) if args.json else None
        limit = args.limit
        async for m in store.iter_messages(after=args.after or "",
                                           limit=None if limit is None else limit + 1,
                                           **filters):
            if limit is not None and shown == limit:  # one more exists: say so
                more = last
                break
            if array is not None:
                array.add(m.summary_json())
            else:
                if shown == 0:
                    out.write(LIST_HEADER + "\n")
                out.write("\n".join(format_message(m, now)) + "\n")
            shown += 1
            octets += m.size
            recipients += len(m.recipients)
            last = m.id
        else:
            more = None
        total = None
        if more is not None and not any(filters[k] for k in filters if k != "include_final"):
            st = await store.stats(now=now)  # counted cheaply: no scan of the queue
            total = st.messages + (st.finished if args.all else 0)
        if array is not None:
            array.close()
        elif shown == 0:
            out.write("Queue is empty.\n" if not args.after else "No more messages.\n")
        else:
            line = list_footer(shown, octets, recipients)
            if more is not None:
                line += f" shown{f' of {total}' if total is not None else ''}; more: " \
                        f"relay queue list --after {more}"
            out.write(line + "\n")
        return shown, more, total

    try:
        shown, more, total = _run(args, fn)
    except BrokenPipeError:  # `relay queue list | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if more is not None and args.json:
        print(f"relay: {shown} message(s) shown{f' of {total}' if total is not None else ''}"
              f"; more after {more}: add --after {more}", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    async def fn(store: Store) -> MessageInfo | None:
        try:
            return await store.get_message(args.id)
        except NotFound:
            return None

    message = _run(args, fn)
    if message is None:
        return _fail(f"no message with queue id {args.id}")
    if args.json:
        _print_json(message.detail_json())
    else:
        print(format_show(message, time.time()))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    target = None if args.all else args.id

    async def fn(store: Store) -> int | None:
        try:
            return await store.retry(target, now=time.time())
        except NotFound:
            return None

    count = _run(args, fn)
    if count is None:
        return _fail(f"no message with queue id {args.id}")
    print(f"{count} recipient(s) due now" + ("" if target is None else f" in {target}"))
    return 0


def _simple(args: argparse.Namespace, op: str, done: str) -> int:
    async def fn(store: Store) -> bool:
        return bool(await getattr(store, op)(args.id))

    if not _run(args, fn):
        return _fail(f"no message with queue id {args.id}")
    print(f"{args.id}: {done}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    return _simple(args, "delete", "deleted")


def cmd_hold(args: argparse.Namespace) -> int:
    return _simple(args, "hold", "held")


def cmd_release(args: argparse.Namespace) -> int:
    return _simple(args, "release", "released")


def cmd_stats(args: argparse.Namespace) -> int:
    now = time.time()

    async def fn(store: Store) -> Stats:
        return await store.stats(now=now)

    st = _run(args, fn)
    if args.json:
        _print_json(st.as_json())
    else:
        print(format_stats(st))
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    async def fn(store: Store) -> str:
        return str(await store.backup(args.file))

    print(f"backup written to {_run(args, fn)}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """`relay queue import FILE.db`: move the mail of a SQLite queue into the configured
    one (a dead node's disk, or a move from SQLite to PostgreSQL)."""
    from pathlib import Path

    source_path = Path(args.file).resolve()

    async def fn(store: Store) -> tuple[int, int]:
        if store.path is not None and source_path == store.path.absolute():
            raise NotFound(f"{source_path} is the configured queue itself")
        source = await Store.open(source_path, create=False)
        try:
            return await store.import_from(source)
        finally:
            await source.close()

    moved, recipients = _run(args, fn, create=True)  # a new queue may be the target
    if args.json:
        _print_json({"messages": moved, "recipients": recipients})
    else:
        print(f"moved {moved} message(s) with {recipients} recipient(s) from {source_path}")
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    """`relay queue nodes`: the relay nodes seen on this queue and who runs what."""

    async def fn(store: Store) -> dict[str, Any]:
        now = time.time()
        return {"backend": store.backend.kind, "nodes": await store.nodes(now=now),
                "singletons": [{"name": n, "owner": o, "leased_until": iso(u)}
                               for n, o, u in await store.singletons()]}

    data = _run(args, fn)
    if args.json:
        _print_json(data)
        return 0
    print(f"queue backend: {data['backend']}")
    if not data["nodes"]:
        print("no node has run on this queue yet")
    for n in data["nodes"]:
        state = "alive" if n["seen_ago"] < 60 else f"silent for {age(n['seen_ago'])}"
        print(f"  {n['owner']:<40} started {iso(n['started_at'])}  {state}")
    for s in data["singletons"]:
        print(f"  {s['name']:<16} held by {s['owner']} until {s['leased_until']}")
    return 0
