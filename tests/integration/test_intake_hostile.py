"""Hostile clients against `relay serve` (issue 10 items 4-7): each may cost itself,
never the others. Real sockets and smtplib on loopback; waits are event-driven."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.support import certs
from tests.support.relayproc import Dialog, RelayProc, start_relay


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(scope="module")
def tls_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProc]:
    work = tmp_path_factory.mktemp("hostile-tls")
    cert, key = certs.write_pair(certs.make_leaf(["relay.test"]), directory=work)
    with start_relay(work, listener={"tls_cert": str(cert), "tls_key": str(key),
                                     "max_connections_per_ip": 50}) as relay:
        yield relay


def test_starttls_garbage_and_close_frees_the_slot_at_once(tls_relay: RelayProc) -> None:
    """Item 4: STARTTLS + ~20 KB of garbage + close, 50 times from one address (the
    per-IP limit): every slot is free again at once, not after the 60 s handshake
    timeout, and a normal client from that address gets its 220."""
    relay, ip = tls_relay, "127.0.0.5"
    mark = relay.mark()
    ports = []
    began = time.monotonic()
    for _ in range(50):
        s = socket.create_connection((relay.host, relay.port), timeout=10,
                                     source_address=(ip, 0))
        ports.append(s.getsockname()[1])
        assert _read_reply(s).startswith(b"220")
        s.sendall(b"EHLO hostile.test\r\n")
        assert b"STARTTLS" in _read_reply(s)
        s.sendall(b"STARTTLS\r\n" + bytes(range(256)) * 80)  # 20 KB, no TLS ClientHello
        s.close()
    for port in ports:
        sid = relay.wait_event("connect", after=mark, client_port=port)["session"]
        relay.wait_event("disconnect", after=mark, session=sid, timeout=15)
    freed = time.monotonic() - began
    with Dialog(relay.host, relay.port, source=ip) as d:
        assert d.greeting[0] == 220
        assert d.cmd("EHLO client.test")[0] == 250
    assert freed < 20, freed  # the handshake timeout is 60 s
    connects = relay.events("connect", after=mark, client_ip=ip)
    disconnects = relay.events("disconnect", after=mark, client_ip=ip)
    assert len(connects) == 51 and len(disconnects) >= 50  # slot count back to 0
    assert not relay.events("internal_error", after=mark)
