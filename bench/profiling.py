"""py-spy profiles of the relay process, summarized as text (no flame graph viewer needed).

`record(pid, seconds, out)` runs `py-spy record --format raw` (collapsed stacks, one
"frame;frame;... count" line per distinct stack; idle samples excluded, so shares are of
the CPU the relay used) on a running relay. `summarize(path)` prints the top functions
by own ("self") and inclusive samples, and CPU shares per area of the relay, decided by
the innermost frame that belongs to a known area (see AREAS).

py-spy is not a project dependency: `pip install --target /tmp/pyspy py-spy` and pass
`--py-spy /tmp/pyspy/bin/py-spy`, or have `py-spy` on PATH.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
from pathlib import Path

# (area, substrings of a frame "function (file:line)") — the innermost match wins, so the
# more specific areas come first.
AREAS: list[tuple[str, tuple[str, ...]]] = [
    ("log (relay/log.py: json + write)", ("relay/log.py",)),
    ("sqlite (aiosqlite thread: execute/commit/fsync)", ("aiosqlite/core.py", "sqlite3")),
    ("store writer/claim/record (relay/store)", ("relay/store/",)),
    ("TLS (ssl, sslproto)", ("ssl.py", "sslproto.py", "relay/smtp/tlscompat.py")),
    ("DANE verify (relay/dane.py, relay/verdict.py)", ("relay/dane.py", "relay/verdict.py")),
    ("DNS (relay/resolve.py, dnspython)", ("relay/resolve.py", "dns/")),
    ("SMTP client (relay/smtp)", ("relay/smtp/",)),
    ("delivery + scheduler (relay/delivery.py, scheduler.py, policy.py)",
     ("relay/delivery.py", "relay/scheduler.py", "relay/policy.py", "relay/destination.py",
      "relay/classify.py", "relay/retry.py")),
    ("Received header (relay/intake/received.py)", ("relay/intake/received.py",)),
    ("listener session (relay/intake/session.py, address.py, listener.py)",
     ("relay/intake/", "relay/listener.py")),
    ("aiosmtpd (its SMTP class)", ("aiosmtpd/",)),
    ("asyncio streams/transports", ("asyncio/streams.py", "asyncio/selector_events.py",
                                     "asyncio/transports.py")),
    ("asyncio loop (scheduling, selectors)", ("asyncio/", "selectors.py")),
]


def find_py_spy(explicit: str | None = None) -> str | None:
    for cand in (explicit, shutil.which("py-spy"), "/tmp/pyspy/bin/py-spy"):
        if cand and Path(cand).exists():
            return cand
    return None


def record(py_spy: str, pid: int, seconds: float, out: Path, *, rate: int = 200
           ) -> subprocess.Popen[bytes]:
    """Start recording (returns the py-spy process; wait() on it)."""
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration",
                             str(max(1, round(seconds))), "--rate", str(rate), "--format",
                             "raw", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stacks(path: Path) -> list[tuple[list[str], int]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


def area_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for area, needles in AREAS:
            if any(n in frame for n in needles):
                return area
    return "other (interpreter start, stdlib)"


def summarize(path: Path, *, top: int = 12) -> str:
    stacks = _stacks(path)
    total = sum(c for _, c in stacks) or 1
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
        areas[area_of(frames)] += count
    lines = [f"{total} samples (CPU only; idle excluded)", "", "by area (innermost known frame):"]
    lines += [f"  {100 * c / total:5.1f}%  {a}" for a, c in areas.most_common()]
    lines += ["", f"top {top} functions by own samples:"]
    lines += [f"  {100 * c / total:5.1f}%  {_short(f)}" for f, c in own.most_common(top)]
    lines += ["", f"top {top} functions by inclusive samples (excluding the loop itself):"]
    shown = 0
    for f, c in incl.most_common():
        if any(s in f for s in ("run_forever", "_run_once", "<module>", "run (asyncio",
                                "run_until_complete", "main (", "_run (asyncio/events",
                                "_bootstrap", "cmd_serve", "serve (relay/app")):
            continue
        lines.append(f"  {100 * c / total:5.1f}%  {_short(f)}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(lines)


def _short(frame: str) -> str:
    for prefix in ("/work/main/", "/usr/lib/python3.11/", "site-packages/"):
        frame = frame.replace(prefix, "")
    idx = frame.find("lib/python3.11/")
    return frame if idx < 0 else frame[:frame.find("(") + 1] + frame[idx + 15:]
