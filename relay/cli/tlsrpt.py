"""`relay tlsrpt show [--json]` and `relay tlsrpt send --now [--json]`.

Both run as a second process beside `relay serve`, on the same queue database.
`show` prints what has been counted in the open period(s): per policy domain, the report
that would be sent (RFC 8460 §4 JSON), plus the latest reports and their state.
`send --now` ends the open period at once and sends its reports (and any other due
report) without the random delay: mail reports go into the queue (the running relay
delivers them), HTTPS reports are posted from here. Exit 1 if a destination failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from typing import Any

from relay import config as configmod
from relay import log
from relay.config import Config
from relay.dns.resolve import Resolver
from relay.store import Store, iso, open_store
from relay.tlsrpt import report as rpt
from relay.tlsrpt.reporter import Settings, TlsReporter


def _hostname(cfg: Config) -> str:
    return cfg.listener.hostname or socket.getfqdn()


async def _open(cfg: Config) -> Store:
    return await open_store(cfg.queue, check=False, create=False)


async def show_data(store: Store, cfg: Config) -> dict[str, Any]:
    s = Settings.from_config(cfg, _hostname(cfg))
    periods = []
    for p in await store.tlsrpt_open():
        by_domain: dict[str, list[rpt.SessionResult]] = {}
        for r in p.results:
            by_domain.setdefault(r.policy_domain, []).append(r)
        reports = [
            rpt.build_report(policy_domain=d, results=rows, begin=p.begin, end=p.end,
                             organization=s.organization, contact=s.contact,
                             rid=rpt.report_id(d, p.begin, p.end, s.submitter))
            for d, rows in sorted(by_domain.items())
        ]
        periods.append({"begin": iso(p.begin), "end": iso(p.end), "reports": reports})
    recent = []
    for r in await store.tlsrpt_reports(limit=50):
        recent.append({**r, "begin": iso(r["begin"]), "end": iso(r["end"]),
                       "due_at": iso(r["due_at"]), "next_attempt_at": iso(r["next_attempt_at"])})
    return {"enabled": cfg.tlsrpt.enabled, "submitter": s.submitter, "open_periods": periods,
            "recent_reports": recent}


def _print_show(data: dict[str, Any]) -> None:
    print(f"TLS reporting {'enabled' if data['enabled'] else 'disabled'}; "
          f"submitter {data['submitter']}")
    if not data["open_periods"]:
        print("nothing recorded in an open period")
    for p in data["open_periods"]:
        print(f"period {p['begin']} .. {p['end']}")
        for rep in p["reports"]:
            for pol in rep["policies"]:
                policy, summ = pol["policy"], pol["summary"]
                mx = ",".join(policy.get("mx-host", []))
                print(f"  {policy['policy-domain']:30} {policy['policy-type']:16} mx {mx:24}"
                      f" ok {summ['total-successful-session-count']:5}"
                      f" failed {summ['total-failure-session-count']:5}")
                for d in pol.get("failure-details", []):
                    print(f"      {d['result-type']:24} {d.get('receiving-ip', '-'):15}"
                          f" x{d['failed-session-count']}")
    if data["recent_reports"]:
        print("recent reports:")
        for r in data["recent_reports"]:
            print(f"  {r['begin']} {r['policy_domain']:30} {r['state']:8} {r['detail']}")


def cmd_show(args: argparse.Namespace) -> int:
    cfg = configmod.load(getattr(args, "config", None))
    log.configure(fmt="json", level="warning", stream=sys.stderr)

    async def main() -> dict[str, Any]:
        store = await _open(cfg)
        try:
            return await show_data(store, cfg)
        finally:
            await store.close()

    data = asyncio.run(main())
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        _print_show(data)
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    cfg = configmod.load(getattr(args, "config", None))
    log.configure(fmt="json", level="warning", stream=sys.stderr)
    if not args.now:
        print("relay: tlsrpt send needs --now (the running relay sends reports on its own "
              "schedule)", file=sys.stderr)
        return 2

    async def main() -> list[dict[str, Any]]:
        store = await _open(cfg)
        try:
            reporter = TlsReporter(store, Resolver.from_config(cfg.dns), cfg,
                                   hostname=_hostname(cfg))
            results = await reporter.tick(time.time(), cut=True)
            return [r.as_json() for r in results]
        finally:
            await store.close()

    results = asyncio.run(main())
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        if not results:
            print("no report to send")
        for r in results:
            where = ", ".join(r["sent"]) or "-"
            print(f"{r['policy_domain']:30} {r['state']:8} ok {r['successful_sessions']}"
                  f" failed {r['failed_sessions']} sent to {where}"
                  + (f" ({r['detail']})" if r["detail"] else ""))
            for f in r["failed"]:
                print(f"    failed: {f['destination']}: {f['detail']}")
    return 1 if any(r["failed"] or r["state"] == "failed" for r in results) else 0
