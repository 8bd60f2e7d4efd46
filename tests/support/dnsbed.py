"""A real DNSSEC test bed on loopback: private root, NSD, validating Unbound.

In a test module (one bed per module, started before its first test, stopped after):

    from tests.support.dnsbed import DnsBed, dnsbed_fixture

    def world(bed: DnsBed) -> None:
        z = bed.zone("example.test")                   # signed, NSEC (dnspython)
        z.add("@", "MX", "10 mx.example.test.").add("mx", "A", "127.25.0.10")
        z.add("_25._tcp.mx", "TLSA", "3 1 1 <64 hex>")
        bed.zone("n3.test", nsec3=True)                # signed, NSEC3 (ldns-signzone)
        bed.zone("insecure.test", signed=False)        # delegated without DS
        bed.break_rrsig("example.test", "_25._tcp.mx.example.test", "TLSA")
        bed.servfail_zone("_tcp.mx.bad.test", with_ds=True)

    dnsbed = dnsbed_fixture(world)                     # then: def test_x(dnsbed: DnsBed)

or by hand: `bed = DnsBed(tmp_path); ...; bed.start(); ...; bed.stop()` (or `with bed:`).
After start, `bed.resolver` is ("127.a.b.c", port) of the validating Unbound and
`bed.nameserver` the same as "ip:port" for the relay's `dns.nameservers`.

Names: "@" is the apex, "mx" is relative to the zone, "mx.example.test" (ending in the zone's
name) or "mx.example.test." is absolute.

Layout: every zone (root ".", "test." and the test's zones) is served by one NSD on a random
127.x.y.z address and a free port; parents hold NS (+ DS for signed children). Unbound cannot
follow a referral to a non-53 port (glue has no port, and a root-hints file neither: with one,
Unbound even ignores a stub-zone for "."), so its config has a `stub-zone` for EVERY zone with
`stub-addr: <addr>@<port>`; validation still walks the real chain (Unbound asks the parent's
stub for DS, the child's for DNSKEY), so insecure delegations are proved by the parent's
NSEC/NSEC3 as in the wild. The trust anchor is the private root's DS.

Also started: a second Unbound with `module-config: "iterator"` (`nonvalidating_resolver`,
never sets AD), a SERVFAIL server (Python subprocess, UDP+TCP) for `servfail_zone`s, and
`dead_resolver` (nothing listens: TCP refused, UDP unanswered) / `silent_resolver` (UDP and
TCP bound, never answer) addresses.
"""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.rdatatype
import pytest

from tests.support.dnsprocs import (
    Addr,
    DnsBedError,
    free_port,
    hostport,
    kill,
    preexec,
    query,
    random_addr,
    spawn,
    track,
    wait_answering,
)
from tests.support.zones import (
    DEFAULT_TTL,
    NS_NAME,
    SERVFAIL_NS_NAME,
    ZoneKey,
    ZoneSpec,
    make_rdata,
    render_zone,
    soa_text,
)

__all__ = [
    "Addr", "DnsBed", "DnsBedError", "ZoneSpec", "dnsbed", "dnsbed_fixture", "hostport",
    "query",
]
ROOT = dns.name.root
TLD = dns.name.from_text("test.")
SERVFAIL_SCRIPT = Path(__file__).with_name("servfail_server.py")


class DnsBed:
    """Private DNSSEC world on loopback. Declare zones, then start(); stop() ends it all."""

    def __init__(self, workdir: Path | str, *, nonvalidating: bool = True,
                 val_override_date: str | dt.datetime | None = None) -> None:
        """workdir: configs, zone files, logs, pid files. nonvalidating: also start the
        iterator-only Unbound. val_override_date: the validating Unbound's clock
        ("YYYYMMDDHHMMSS" UTC or a datetime), for signature-expiry cases."""
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if isinstance(val_override_date, dt.datetime):
            val_override_date = val_override_date.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S")
        self.val_override_date = val_override_date
        self.zones: dict[dns.name.Name, ZoneSpec] = {}
        self.nsd_server: Addr = (random_addr(), 0)
        self.resolver: Addr = (random_addr(), 0)
        self.nonvalidating_resolver: Addr | None = (random_addr(), 0) if nonvalidating else None
        self.servfail_server: Addr = (random_addr(), 0)
        self.dead_resolver: Addr = (random_addr(), 0)
        self.silent_resolver: Addr = (random_addr(), 0)
        self.setup_seconds = 0.0
        self._nsd: subprocess.Popen[bytes] | None = None
        self._unbound: subprocess.Popen[bytes] | None = None
        self._unbound_nv: subprocess.Popen[bytes] | None = None
        self._servfail: subprocess.Popen[bytes] | None = None
        self._silent: list[socket.socket] = []
        self.zone(".")
        self.zone("test")

    # ----- declaring the world -------------------------------------------------------------

    def zone(self, name: str, *, signed: bool | None = None,
             nsec3: bool | None = None) -> ZoneSpec:
        """The zone `name`, created on first call (default: signed, NSEC); later calls return
        it (flags given then must match). Delegated from the closest declared ancestor zone,
        with a DS there when signed. Records go in with ZoneSpec.add()."""
        origin = dns.name.from_text(name if name.endswith(".") else name + ".")
        spec = self.zones.get(origin)
        if spec is None:
            signed = True if signed is None else signed
            nsec3 = bool(nsec3)
            if nsec3 and not signed:
                raise ValueError("nsec3=True needs signed=True")
            spec = ZoneSpec(origin, signed=signed, nsec3=nsec3,
                            key=ZoneKey.generate() if signed else None)
            self.zones[origin] = spec
        elif spec.servfail or signed not in (None, spec.signed) or nsec3 not in (None, spec.nsec3):
            raise ValueError(f"zone {origin} already declared differently")
        return spec

    def servfail_zone(self, name: str, *, with_ds: bool = False) -> ZoneSpec:
        """Zone `name` delegated to the SERVFAIL server (every query there: SERVFAIL).
        with_ds=True puts a DS in the (signed) parent, so the zone is expected signed."""
        origin = dns.name.from_text(name if name.endswith(".") else name + ".")
        if origin in self.zones:
            raise ValueError(f"zone {origin} already declared")
        spec = ZoneSpec(origin, signed=with_ds, servfail=True,
                        key=ZoneKey.generate() if with_ds else None)
        self.zones[origin] = spec
        return spec

    def break_rrsig(self, zone: str, name: str, rdtype: str | int) -> None:
        """After signing, corrupt the RRSIG covering (name, rdtype) in `zone`: bogus."""
        self.zone_of(zone).break_rrsig(name, rdtype)

    def expire_rrsig(self, zone: str, name: str, rdtype: str | int) -> None:
        """After signing, replace the RRSIG covering (name, rdtype) by an expired one."""
        self.zone_of(zone).expire_rrsig(name, rdtype)

    def zone_of(self, name: str) -> ZoneSpec:
        origin = dns.name.from_text(name if name.endswith(".") else name + ".")
        return self.zones[origin]

    def parent_of(self, origin: dns.name.Name) -> ZoneSpec:
        best: ZoneSpec | None = None
        for other, spec in self.zones.items():
            if origin != other and origin.is_subdomain(other) and (
                    best is None or len(other) > len(best.origin)):
                best = spec
        assert best is not None
        if best.servfail:
            raise ValueError(f"{origin} is below SERVFAIL zone {best.origin}")
        return best

    # ----- zone files ---------------------------------------------------------------------

    def _records(self, spec: ZoneSpec, serial: int) -> list[tuple[dns.name.Name, int, Any]]:
        o = spec.origin
        recs = [(o, DEFAULT_TTL, make_rdata(dns.rdatatype.SOA, soa_text(serial), o)),
                (o, DEFAULT_TTL, make_rdata(dns.rdatatype.NS, NS_NAME.to_text(), o))]
        if o in (ROOT, TLD):  # glue in the root; authoritative data in "test."
            recs.append((NS_NAME, DEFAULT_TTL, make_rdata(dns.rdatatype.A, self.nsd_server[0], o)))
        if o == TLD:
            recs.append((SERVFAIL_NS_NAME, DEFAULT_TTL,
                         make_rdata(dns.rdatatype.A, self.servfail_server[0], o)))
        for child in self.zones.values():
            if child.origin in (o, ROOT) or self.parent_of(child.origin) is not spec:
                continue
            ns = SERVFAIL_NS_NAME if child.servfail else NS_NAME
            recs.append((child.origin, DEFAULT_TTL, make_rdata(dns.rdatatype.NS, ns.to_text(), o)))
            if child.key is not None:
                recs.append((child.origin, DEFAULT_TTL, child.key.ds(child.origin)))
        for owner, ttl, rdata in spec.records:
            cut = self._cut_below(spec, owner)
            if cut is not None:
                raise ValueError(f"{owner} is inside child zone {cut} (add it there)")
            recs.append((owner, ttl, rdata))
        return recs

    def _cut_below(self, spec: ZoneSpec, owner: dns.name.Name) -> dns.name.Name | None:
        for other in self.zones:
            if other != spec.origin and other.is_subdomain(spec.origin) and \
                    owner.is_subdomain(other):
                return other
        return None

    def _write_zones(self) -> None:
        serial = int(time.time())
        for spec in self.zones.values():
            if spec.servfail:
                continue
            text = render_zone(spec, self._records(spec, serial), self.dir)
            (self.dir / self._zonefile(spec)).write_text(text)
        root_key = self.zones[ROOT].key
        assert root_key is not None
        (self.dir / "root.anchor").write_text(f". {DEFAULT_TTL} IN DS {root_key.ds(ROOT)}\n")

    @staticmethod
    def _zonefile(spec: ZoneSpec) -> str:
        return (spec.origin.to_text().rstrip(".") or "root") + ".zone"

    def _nsd_conf(self) -> Path:
        d = self.dir
        lines = [
            "server:",
            f"  ip-address: {self.nsd_server[0]}@{self.nsd_server[1]}",
            "  do-ip6: no", "  username: \"\"", "  chroot: \"\"", f"  zonesdir: \"{d}\"",
            f"  pidfile: \"{d}/nsd.pid\"", "  database: \"\"", f"  logfile: \"{d}/nsd.log\"",
            f"  zonelistfile: \"{d}/zone.list\"", f"  xfrdfile: \"{d}/xfrd.state\"",
            f"  xfrdir: \"{d}\"", "  server-count: 1", "  verbosity: 1", "  hide-version: yes",
            "  tcp-count: 32", "  reuseport: no", "  refuse-any: no",
            "remote-control:", "  control-enable: no",
        ]
        for spec in self.zones.values():
            if not spec.servfail:
                lines += ["zone:", f"  name: \"{spec.origin}\"",
                          f"  zonefile: \"{self._zonefile(spec)}\""]
        conf = d / "nsd.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _unbound_conf(self, addr: Addr, validating: bool, tag: str) -> Path:
        d = self.dir
        lines = [
            "server:",
            f"  interface: {addr[0]}@{addr[1]}", f"  port: {addr[1]}",
            "  do-ip4: yes", "  do-ip6: no", "  do-udp: yes", "  do-tcp: yes",
            "  username: \"\"", "  chroot: \"\"", f"  directory: \"{d}\"",
            f"  pidfile: \"{d}/{tag}.pid\"", f"  logfile: \"{d}/{tag}.log\"",
            "  use-syslog: no", "  do-daemonize: no", "  num-threads: 1",
            "  access-control: 127.0.0.0/8 allow", "  do-not-query-localhost: no",
            "  local-zone: \"test.\" nodefault",
            # no root-hints: a hints file cannot carry a port, and with one Unbound ignores
            # the stub-zone for "." ("second hints for zone . ignored").
            "  trust-anchor-signaling: no", "  root-key-sentinel: no",
            "  qname-minimisation: no", "  so-reuseport: no",
            "  msg-cache-size: 4m", "  rrset-cache-size: 4m", "  key-cache-size: 4m",
            "  cache-max-negative-ttl: 5", "  infra-host-ttl: 30", "  infra-cache-min-rtt: 50",
            "  ede: yes", "  log-servfail: yes", "  verbosity: 1", "  edns-buffer-size: 1232",
        ]
        if validating:
            lines += [
                "  module-config: \"validator iterator\"",
                f"  trust-anchor-file: \"{d}/root.anchor\"",
                "  harden-dnssec-stripped: yes", "  val-log-level: 2", "  val-bogus-ttl: 5",
            ]
            if self.val_override_date:
                lines.append(f"  val-override-date: \"{self.val_override_date}\"")
        else:
            lines.append("  module-config: \"iterator\"")
        lines += ["remote-control:", "  control-enable: no"]
        for spec in self.zones.values():
            server = self.servfail_server if spec.servfail else self.nsd_server
            lines += ["stub-zone:", f"  name: \"{spec.origin}\"",
                      f"  stub-addr: {server[0]}@{server[1]}"]
        conf = d / f"{tag}.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    # ----- processes ----------------------------------------------------------------------

    def start(self) -> DnsBed:
        """Sign and write every zone, start NSD, the SERVFAIL server and Unbound(s).
        Returns self. Raises DnsBedError (with the process log) if something won't start."""
        began = time.monotonic()
        try:
            self._allocate()
            self._write_zones()
            self._start_servfail()
            self._start_nsd()
            self._start_unbounds()
        except BaseException:
            self.stop()
            raise
        self.setup_seconds = time.monotonic() - began
        return self

    def _allocate(self) -> None:
        if self.nsd_server[1]:  # started before: same addresses and ports again
            if not self._silent:
                self._start_silent()
            return
        self.nsd_server = (self.nsd_server[0], free_port(self.nsd_server[0]))
        self.resolver = (self.resolver[0], free_port(self.resolver[0]))
        if self.nonvalidating_resolver:
            a = self.nonvalidating_resolver[0]
            self.nonvalidating_resolver = (a, free_port(a))
        self.dead_resolver = (self.dead_resolver[0], free_port(self.dead_resolver[0]))
        self._start_silent()

    def _start_silent(self) -> None:
        addr = self.silent_resolver[0]
        port = self.silent_resolver[1] or free_port(addr)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind((addr, port))
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.bind((addr, port))
        t.listen(64)
        self._silent = [u, t]
        self.silent_resolver = (addr, port)

    def _start_servfail(self) -> None:
        if self._servfail is not None and self._servfail.poll() is None:
            return
        proc = subprocess.Popen(
            [sys.executable, str(SERVFAIL_SCRIPT), self.servfail_server[0],
             str(self.servfail_server[1])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=preexec(),
        )
        track(proc)
        self._servfail = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise DnsBedError("SERVFAIL server did not start")
        self.servfail_server = (self.servfail_server[0], int(line))

    def _start_nsd(self) -> None:
        conf = self._nsd_conf()
        log = self.dir / "nsd.out"
        self._nsd = spawn(["nsd", "-d", "-c", str(conf)], log)
        wait_answering(self._nsd, self.nsd_server, ".", "SOA", log, "NSD")

    def _start_unbounds(self) -> None:
        conf = self._unbound_conf(self.resolver, True, "unbound")
        self._unbound = spawn(["unbound", "-d", "-c", str(conf)], self.dir / "unbound.out")
        nv = self.nonvalidating_resolver
        if nv is not None:
            conf_nv = self._unbound_conf(nv, False, "unbound-nv")
            self._unbound_nv = spawn(["unbound", "-d", "-c", str(conf_nv)],
                                      self.dir / "unbound-nv.out")
        wait_answering(self._unbound, self.resolver, "localhost.", "A",
                        self.dir / "unbound.log", "Unbound")
        if nv is not None and self._unbound_nv is not None:
            wait_answering(self._unbound_nv, nv, "localhost.", "A",
                            self.dir / "unbound-nv.log", "Unbound (non-validating)")

    def reload(self) -> None:
        """Apply zone changes made after start(): re-sign and rewrite every zone, restart
        NSD and both Unbounds (same addresses and ports; caches emptied)."""
        began = time.monotonic()
        kill(self._unbound)
        kill(self._unbound_nv)
        kill(self._nsd)
        self._write_zones()
        self._start_nsd()
        self._start_unbounds()
        self.setup_seconds = time.monotonic() - began

    def flush(self) -> None:
        """Empty the resolvers' caches (restarts both Unbounds on the same address/port)."""
        kill(self._unbound)
        kill(self._unbound_nv)
        self._start_unbounds()

    def stop(self) -> None:
        """Stop every process the bed started (by PID) and close its sockets."""
        for proc in (self._unbound, self._unbound_nv, self._nsd, self._servfail):
            kill(proc)
        self._unbound = self._unbound_nv = self._nsd = self._servfail = None
        for s in self._silent:
            s.close()
        self._silent = []

    def __enter__(self) -> DnsBed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- conveniences -------------------------------------------------------------------

    @property
    def nameserver(self) -> str:
        """The validating Unbound as "ip:port" (for the relay's `dns.nameservers`)."""
        return hostport(self.resolver)

    def query(self, name: str, rdtype: str | int = "A", *, cd: bool = False,
              server: Addr | None = None, timeout: float = 5.0) -> dns.message.Message:
        """Query the validating Unbound (or `server`) with DO set; see module `query`."""
        return query(server or self.resolver, name, rdtype, cd=cd, timeout=timeout)

    def log(self, tag: str = "unbound") -> str:
        """Text of a log: 'unbound', 'unbound-nv' or 'nsd'."""
        path = self.dir / f"{tag}.log"
        return path.read_text() if path.exists() else ""


def dnsbed_fixture(world: Callable[[DnsBed], None] | None = None, *,
                   scope: str = "module") -> Any:
    """Make a pytest fixture yielding a started DnsBed. `world(bed)` declares the zones.

        def world(bed): bed.zone("example.test").add("mx", "A", "127.25.0.10")
        dnsbed = dnsbed_fixture(world)
    """

    @pytest.fixture(scope=scope)  # type: ignore[misc]
    def _fixture(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsBed]:
        bed = DnsBed(tmp_path_factory.mktemp("dnsbed"))
        build = world or getattr(request.module, "dnsbed_world", None)
        if build is not None:
            build(bed)
        bed.start()
        try:
            yield bed
        finally:
            bed.stop()

    return _fixture


# Ready-made module-scoped fixture: declares the world with the test module's
# `dnsbed_world(bed)` function if it has one. Importing it works for pytest, but ruff then
# reports F811 at every test taking `dnsbed`: prefer `dnsbed = dnsbed_fixture(world)`.
dnsbed = dnsbed_fixture()
