"""A destination that is slow on purpose, in a process of its own (its CPU is not the
relay's): an aiosmtpd server (tests/support/smtpd.py) that waits `--delay` seconds before
every reply, and counts what it accepted.

    python bench/slowsink.py --ip 127.77.0.1 --delay 0.05      # prints "READY <port>"

Every 0.2 s it writes "<messages> <distinct queue ids>" to /tmp/slowsink-<port>.count (the
queue id from the relay's own Received: line: a message delivered twice counts once);
it ends on SIGTERM.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.dnsprocs import free_port  # noqa: E402
from tests.support.smtpd import Destination  # noqa: E402

QUEUE_ID = re.compile(rb"\(dane-relay\) with \S+ id ([0-9A-Z]{16})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ip", default="127.77.0.1")
    ap.add_argument("--delay", type=float, default=0.05, help="seconds before every reply")
    ap.add_argument("--data-delay", type=float, default=0.0,
                    help="seconds holding the reply to the final dot")
    args = ap.parse_args()
    dest = Destination(args.ip, free_port(args.ip), starttls=False,
                       command_delay=args.delay, data_delay=args.data_delay)
    dest.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"READY {dest.port}", flush=True)
    count_file = Path(f"/tmp/slowsink-{dest.port}.count")
    while not stop.wait(0.2):
        ids = {m.group(1) for msg in list(dest.messages)
               if (m := QUEUE_ID.search(msg.body[:2000]))}
        count_file.write_text(f"{len(dest.messages)} {len(ids)}\n")
    dest.stop()
    count_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
