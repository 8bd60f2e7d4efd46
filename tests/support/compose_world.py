"""The world around the compose stack in its test: addresses on the Docker host, a private
signed DNS tree, a DANE destination, a LAN client, and the compose override file.

- `HostNetwork`: a network namespace `LAN_NS` joined to the host by a veth pair: a mail
  server on the organization's LAN (`LAN_CLIENT`, in 10.0.0.0/8) that reaches the
  published port at `LAN_HOST` and keeps its own address, as a LAN client does through
  Docker's DNAT (programs on the host itself arrive from the compose network's gateway
  instead). The host's end of the pair also carries the world's addresses (`WORLD_IP`,
  `DEAD_IP`): host-local, so every container reaches them through its gateway, and
  nothing outside the machine does (no dummy interface: its kernel module may be absent).
- `World`: the tests' DNSSEC bed (tests/support/dnsbed.py) with its NSD on `WORLD_IP`
  serving a private signed root, `test.` and the destination zones; an aiosmtpd
  destination with a generated certificate and its `3 1 1` TLSA record on `WORLD_IP`;
  `defer.test`, whose MX has nothing listening; `later.test`, with the destination as its
  MX, for mail sent while the resolver is stopped (nothing about it is cached).
  `unbound_conf()` is the shipped config/unbound.conf with only the root changed (the
  private root's trust anchor instead of unbound-anchor's, stub zones to NSD, `test.`
  not local).
- `override()`: the compose override that mounts that resolver config, sets the
  destination port and the relay's name, and lets image builds use the host's network
  (the fence drops container traffic to the outside); with `cluster=True` the same for
  the services of the profile `cluster` (the second relay node, PostgreSQL).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from tests.support.certs import Issued, make_ca, make_leaf
from tests.support.dnsbed import DnsBed
from tests.support.dnsprocs import free_port
from tests.support.smtpd import Destination

WORLD_IP, DEAD_IP = "10.254.53.1", "10.254.53.2"
LAN_HOST, LAN_CLIENT = "10.253.53.1", "10.253.53.2"
LAN_NS, VETH_HOST, VETH_LAN = "drlan", "drlan0", "drlan1"
RELAY_NAME = "relay.stack.test"
ANCHOR_IN_CONTAINER = "/etc/unbound/stack-test-root.anchor"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


class HostNetwork:
    def start(self) -> HostNetwork:
        self.stop()  # leftovers of a run that was killed
        try:
            _ip("netns", "add", LAN_NS)
            _ip("link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_LAN)
            _ip("link", "set", VETH_LAN, "netns", LAN_NS)
            _ip("addr", "add", f"{LAN_HOST}/30", "dev", VETH_HOST)
            for addr in (WORLD_IP, DEAD_IP):
                _ip("addr", "add", f"{addr}/32", "dev", VETH_HOST)
            _ip("link", "set", VETH_HOST, "up")
            for args in (("addr", "add", f"{LAN_CLIENT}/30", "dev", VETH_LAN),
                         ("link", "set", VETH_LAN, "up"), ("link", "set", "lo", "up"),
                         ("route", "add", "default", "via", LAN_HOST)):
                _ip("netns", "exec", LAN_NS, "ip", *args)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        _ip("netns", "del", LAN_NS, check=False)  # takes its end of the veth pair along
        _ip("link", "del", VETH_HOST, check=False)

    def in_lan(self, argv: list[str]) -> list[str]:
        """`argv` run inside the LAN namespace."""
        return ["ip", "netns", "exec", LAN_NS, *argv]


class World:
    def __init__(self, workdir: Path, net: HostNetwork) -> None:
        self.dir = workdir
        self.net = net
        self.bed = DnsBed(workdir / "dns", nonvalidating=False)
        self.bed.nsd_server = (WORLD_IP, 0)  # where containers can reach it
        self.port = 0  # delivery.port of the relay in the stack
        self.destination: Destination | None = None
        ca = make_ca("Stack Test Root")
        self.inter = make_ca("Stack Test Intermediate", issuer=ca)
        self.cert: Issued = make_leaf(["mx.dest.test"], issuer=self.inter)

    def start(self) -> World:
        """Start the network, then the zones and the destination on it."""
        self.net.start()
        try:
            self.port = free_port(WORLD_IP)
            tlsa = "3 1 1 " + self.cert.tlsa_data(1, 1).hex()
            dest = self.bed.zone("dest.test")
            dest.add("@", "MX", "10 mx.dest.test.").add("mx", "A", WORLD_IP)
            dest.add(f"_{self.port}._tcp.mx", "TLSA", tlsa)
            self.bed.zone("defer.test").add("@", "MX", "10 mx.defer.test.").add(
                "mx", "A", DEAD_IP)
            # Same destination, first looked up while the resolver is stopped.
            self.bed.zone("later.test").add("@", "MX", "10 mx.dest.test.")
            self.bed.start()
            self.destination = Destination(WORLD_IP, self.port, tls=(self.cert, [self.inter]),
                                           hostname="mx.dest.test").start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.destination is not None:
            self.destination.stop()
        self.bed.stop()
        self.net.stop()

    def unbound_conf(self, shipped: str) -> str:
        text, n = re.subn(r'auto-trust-anchor-file: "[^"]*"',
                          f'trust-anchor-file: "{ANCHOR_IN_CONTAINER}"', shipped)
        assert n == 1, "config/unbound.conf no longer has auto-trust-anchor-file"
        text = text.replace("server:\n", 'server:\n    local-zone: "test." nodefault\n', 1)
        ns = self.bed.nsd_server
        for origin in self.bed.zones:
            text += f'\nstub-zone:\n    name: "{origin}"\n    stub-addr: {ns[0]}@{ns[1]}\n'
        return text

    def override(self, shipped_unbound: str, *, cluster: bool = False) -> dict[str, Any]:
        conf = self.dir / "unbound.conf"
        conf.write_text(self.unbound_conf(shipped_unbound))
        conf.chmod(0o644)
        anchor = self.bed.dir / "root.anchor"
        anchor.chmod(0o644)
        relay = {"build": {"network": "host"},
                 "environment": {"RELAY_DELIVERY__PORT": str(self.port),
                                 "RELAY_LISTENER__HOSTNAME": RELAY_NAME}}
        services: dict[str, Any] = {
            "resolver": {
                "build": {"network": "host"},
                "volumes": [f"{conf}:/etc/unbound/unbound.conf:ro",
                            f"{anchor}:{ANCHOR_IN_CONTAINER}:ro"]},
            "relay": relay,
        }
        if cluster:  # the profile's services: the same for the second node, host builds
            services["relay-2"] = relay
            services["postgres"] = {"build": {"network": "host"}}
        return {"services": services}

    def write_override(self, shipped_unbound: str, *, cluster: bool = False) -> Path:
        name = "docker-compose.cluster-test.yml" if cluster else "docker-compose.stack-test.yml"
        path = self.dir / name
        # JSON is YAML: Compose v1 and v2 read it as an override file.
        path.write_text(json.dumps(self.override(shipped_unbound, cluster=cluster), indent=2)
                        + "\n")
        return path
