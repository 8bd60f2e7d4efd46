"""`relay check DOMAIN [--json] [--no-connect]`: run relay.check.probe and print it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from relay import config as configmod
from relay import log
from relay.check import render as checkfmt
from relay.check.probe import run_check
from relay.dane.policy import is_ip
from relay.idn import to_ascii

# --- the command ----------------------------------------------------------------------------


def use_colour(stream: Any = None, environ: Mapping[str, str] | None = None) -> bool:
    """ANSI colour only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    env = os.environ if environ is None else environ
    stream = stream or sys.stdout
    if env.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


_LDH = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def domain_problem(domain: str) -> str | None:
    """Why `domain` is not a mail domain the relay could deliver to, or None."""
    name = domain.strip().rstrip(".")
    if not name:
        return "give a domain name"
    if name.startswith("[") or is_ip(name):
        return f"{domain!r} is an address, not a domain name"
    try:
        ascii_name = to_ascii(name)
    except ValueError as exc:
        return f"{domain!r} is not a valid domain name ({exc})"
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or not all(_LDH.fullmatch(label) for label in labels):
        return f"{domain!r} is not a valid domain name"
    return None


def cmd_check(args: argparse.Namespace) -> int:
    cfg = configmod.load(getattr(args, "config", None))
    problem = domain_problem(args.domain)
    if problem:
        print(f"relay: check: {problem}, e.g. relay check example.org", file=sys.stderr)
        return 2
    connect = not getattr(args, "no_connect", False)
    log.configure(fmt="json", level="error", stream=sys.stderr)  # stdout is the report
    report = asyncio.run(run_check(args.domain, cfg, connect=connect))
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    else:
        encoding = getattr(sys.stdout, "encoding", None) or ""
        print(checkfmt.render(report, colour=use_colour(),
                              unicode="utf" in encoding.lower()), end="")
    return 0 if report["deliverable"] else 1
