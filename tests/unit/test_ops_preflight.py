"""Start-up checks: default gateways read from /proc/net, and the warning when
listener.allowed_networks covers one (relay.ops.preflight)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from relay.config import build
from relay.ops.preflight import (
    default_gateways,
    gateway_warnings,
    parse_route4,
    parse_route6,
)

# /proc/net/route of a container on the compose network (gateway 172.28.53.1), and of a
# host with a default route and a directly connected LAN.
ROUTE_CONTAINER = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t01351CAC\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t00351CAC\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""
ROUTE_HOST_NO_DEFAULT = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""
IPV6_ROUTE = (
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n"
    "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n"
)


def test_ipv4_default_gateway_is_read_little_endian() -> None:
    assert parse_route4(ROUTE_CONTAINER) == [ipaddress.ip_address("172.28.53.1")]
    assert parse_route4(ROUTE_HOST_NO_DEFAULT) == []
    assert parse_route4("") == [] and parse_route4("garbage\nnot a route line\n") == []


def test_ipv6_default_gateway() -> None:
    assert parse_route6(IPV6_ROUTE) == [ipaddress.ip_address("fe80::1")]


def test_default_gateways_reads_both_files(tmp_path: Path) -> None:
    (tmp_path / "route").write_text(ROUTE_CONTAINER)
    (tmp_path / "ipv6_route").write_text(IPV6_ROUTE)
    assert [str(a) for a in default_gateways(tmp_path)] == ["172.28.53.1", "fe80::1"]
    assert default_gateways(tmp_path / "missing") == []


def _networks(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    cfg = build({"listener": {"allowed_networks": list(cidrs)}}, source="test")
    return cfg.listener.allowed_networks


def test_an_entry_covering_the_gateway_is_warned_about() -> None:
    gw = parse_route4(ROUTE_CONTAINER)
    [warning] = gateway_warnings(_networks("10.0.0.0/8", "172.16.0.0/12"), gw)
    assert warning["network"] == "172.16.0.0/12" and warning["gateway"] == "172.28.53.1"
    assert "docker-proxy" in warning["detail"] and "authenticate" in warning["detail"]


def test_the_shipped_container_config_does_not_cover_the_compose_gateway() -> None:
    root = Path(__file__).resolve().parents[2]
    from relay.config import load

    cfg = load(root / "config/relay.docker.toml", environ={})
    assert gateway_warnings(cfg.listener.allowed_networks, parse_route4(ROUTE_CONTAINER)) == []
    # ... while it still lets the LAN in.
    assert any(ipaddress.ip_address("192.168.1.20") in n for n in cfg.listener.allowed_networks)
    assert any(ipaddress.ip_address("10.1.2.3") in n for n in cfg.listener.allowed_networks)


def test_address_families_never_match_each_other() -> None:
    v6 = [ipaddress.ip_address("::ffff:172.28.53.1"), ipaddress.ip_address("fe80::1")]
    assert gateway_warnings(_networks("172.16.0.0/12"), v6) == []
    assert len(gateway_warnings(_networks("fe80::/10"), v6)) == 1
