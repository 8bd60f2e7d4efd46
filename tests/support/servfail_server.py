"""A DNS server that answers SERVFAIL to every query, over UDP and TCP.

Run as `python servfail_server.py ADDR PORT` (PORT 0: pick one). Prints the port once bound,
exits when its stdin closes (so it dies with the test process) or on SIGTERM.
Standalone on purpose: imports only dnspython, so it starts in a fraction of a second.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

import dns.message
import dns.rcode


def answer(wire: bytes) -> bytes | None:
    try:
        q = dns.message.from_wire(wire)
    except Exception:
        return None
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.SERVFAIL)
    return r.to_wire()


def bind(addr: str, port: int) -> tuple[socket.socket, socket.socket]:
    for _ in range(100):
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((addr, port))
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind((addr, t.getsockname()[1]))
        except OSError:
            t.close()
            u.close()
            continue
        t.listen(16)
        return u, t
    raise SystemExit(f"no free port on {addr}")


def udp_loop(u: socket.socket) -> None:
    while True:
        wire, peer = u.recvfrom(65535)
        out = answer(wire)
        if out is not None:
            u.sendto(out, peer)


def tcp_conn(c: socket.socket) -> None:
    with c:
        while True:
            head = c.recv(2, socket.MSG_WAITALL)
            if len(head) < 2:
                return
            out = answer(c.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL))
            if out is None:
                return
            c.sendall(len(out).to_bytes(2, "big") + out)


def tcp_loop(t: socket.socket) -> None:
    while True:
        c, _ = t.accept()
        threading.Thread(target=tcp_conn, args=(c,), daemon=True).start()


def main() -> None:
    u, t = bind(sys.argv[1], int(sys.argv[2]))
    threading.Thread(target=udp_loop, args=(u,), daemon=True).start()
    threading.Thread(target=tcp_loop, args=(t,), daemon=True).start()
    print(t.getsockname()[1], flush=True)
    sys.stdin.read()
    os._exit(0)


if __name__ == "__main__":
    main()
