"""`relay health [--json]`: exit 0 when the listener, the queue and the resolver are fine.

The container's HEALTHCHECK runs it without `-c`, so RELAY_CONFIG (set by the compose
file) names the same config as `relay serve` reads. See relay.ops.health for how the
listener is checked without flooding the log.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from relay import config as configmod
from relay.ops.health import health


def cmd_health(args: argparse.Namespace) -> int:
    cfg = configmod.load(getattr(args, "config", None))
    result = asyncio.run(health(cfg))
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        for name in ("listener", "database", "resolver"):
            r = result[name]
            print(f"{name:9} {'ok  ' if r['ok'] else 'FAIL'} {r['detail']}")
    return 0 if result["ok"] else 1
