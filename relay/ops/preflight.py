"""Start-up checks of `relay serve` that turn the usual deployment mistakes into one clear
log line instead of a crash loop or a silent hole.

- `queue_folder_problem`: the queue folder (or the database file in it) cannot be written
  by the user the relay runs as — typically a root-owned bind mount under a container
  user (uid 10025). Tried for real (create and remove a file), so read-only mounts, ACLs
  and SELinux labels are caught as well as modes.
- `gateway_warnings`: `listener.allowed_networks` covers the relay's default gateway. In a
  Docker container that is the bridge gateway, and every client that reaches a published
  port through docker-proxy — including containers on unrelated Docker networks and
  programs on the Docker host — arrives from that address; behind a NAT router it is the
  router. Allowing it opens the relay to all of them.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RTF_GATEWAY = 0x0002


# --- the queue folder -----------------------------------------------------------------


def _owner(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except OSError:
        return {}
    return {"owner_uid": st.st_uid, "owner_gid": st.st_gid,
            "mode": f"{stat.S_IMODE(st.st_mode):04o}"}


def queue_folder_problem(db: Path) -> dict[str, Any] | None:
    """None when the relay (this process's uid/gid) can create and write `db`; else the
    fields of a `fatal` event: `error` (one sentence saying what to change), `path`,
    `uid`, `gid` and the folder's owner and mode."""
    uid, gid = os.geteuid(), os.getegid()
    folder = db.parent
    where = {"path": str(folder), "uid": uid, "gid": gid}
    hint = (f"make it writable for uid {uid} (if it is a bind mount: on the Docker host, "
            f"chown -R {uid}:{gid} the folder mounted there), or use the compose file's "
            "named volume")
    if not folder.is_dir():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parent = next((p for p in folder.parents if p.is_dir()), folder)
            return {**where, **_owner(parent),
                    "error": f"queue folder {folder} does not exist and cannot be created by "
                             f"uid {uid} ({exc.strerror}): create it and {hint}"}
    probe = folder / f".relay-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        return {**where, **_owner(folder),
                "error": f"queue folder {folder} is not writable by uid {uid} "
                         f"({exc.strerror}): {hint}"}
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if not path.exists():
            continue
        try:
            with open(path, "r+b"):
                pass
        except OSError as exc:
            return {**where, "path": str(path), **_owner(path),
                    "error": f"queue database file {path} cannot be written by uid {uid} "
                             f"({exc.strerror}): chown {uid}:{gid} it, or {hint}"}
    return None


# --- the default gateway --------------------------------------------------------------


def parse_route4(text: str) -> list[IPAddress]:
    """Default gateways from the text of /proc/net/route (addresses in little-endian hex)."""
    out: list[IPAddress] = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 8:
            continue
        try:
            dest, gateway, flags, mask = (int(cols[1], 16), int(cols[2], 16),
                                          int(cols[3], 16), int(cols[7], 16))
        except ValueError:
            continue
        if dest == 0 and mask == 0 and flags & RTF_GATEWAY and gateway:
            out.append(ipaddress.IPv4Address(gateway.to_bytes(4, "little")))
    return out


def parse_route6(text: str) -> list[IPAddress]:
    """Default gateways from the text of /proc/net/ipv6_route."""
    out: list[IPAddress] = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 10:
            continue
        try:
            dest, plen, nexthop = int(cols[0], 16), int(cols[1], 16), int(cols[4], 16)
        except ValueError:
            continue
        if dest == 0 and plen == 0 and nexthop:
            out.append(ipaddress.IPv6Address(nexthop))
    return out


def default_gateways(proc_net: Path = Path("/proc/net")) -> list[IPAddress]:
    """This machine's (or container's) default gateways; [] where /proc cannot tell."""
    found: list[IPAddress] = []
    for name, parse in (("route", parse_route4), ("ipv6_route", parse_route6)):
        try:
            found += parse((proc_net / name).read_text())
        except OSError:
            continue
    return list(dict.fromkeys(found))


def gateway_warnings(networks: Sequence[IPNetwork],
                     gateways: Iterable[IPAddress]) -> list[dict[str, str]]:
    """The fields of one `gateway_allowed` warning per allowed network that covers a
    default gateway."""
    out = []
    for gw in gateways:
        for net in networks:
            if gw.version == net.version and gw in net:
                out.append({
                    "network": str(net), "gateway": str(gw),
                    "detail": f"listener.allowed_networks entry {net} covers {gw}, this "
                              "relay's default gateway. In a Docker container that is the "
                              "bridge gateway: every client reaching the published port "
                              "through docker-proxy (other containers, programs on the Docker "
                              "host) arrives from it and could relay. Allow your mail "
                              "servers' own networks only; clients on the Docker host must "
                              "authenticate (docs/deploy.md)."})
    return out
