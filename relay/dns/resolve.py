"""DNSSEC-aware resolution: every answer is a relay.model.DnsAnswer with its security.

The relay does no DNSSEC validation itself: it asks the configured (trusted, normally
loopback) validating resolvers with EDNS0 + DO and reads the AD bit of every answer.
Queries go out as dnspython messages over our own small UDP/TCP transport, so that
every response can be parsed leniently: dnspython 2.9 refuses a TLSA record whose digest
length does not fit its matching type and then fails the WHOLE message; here such a
record survives as a TlsaRecord with its raw data (relay.dane finds it unusable).

Pieces:
- relay.dns.wire `parse_reply(wire, qname, rdtype, ...)`: pure, one response → `Reply`
  (rcode class, AD, CNAME links, records, EDE, cache TTL).
- `Resolver`: transport (nameservers in order, per-lookup deadline, UDP then TCP on TC),
  CNAME link security, SERVFAIL diagnosis (EDE, else a re-query with CD), TTL cache with
  an injected clock, in-flight de-duplication.
- `check_validating(resolver)`: the `. DNSKEY` probe proving the resolver validates.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.wire

from relay.config import DnsConfig, split_hostport
from relay.dns.wire import Reply, name_text, parse_reply
from relay.model import CnameLink, DnsAnswer, Ede, Rcode

Clock = Callable[[], float]
QueryHook = Callable[[str, str, bool], None]  # (qname, rdtype, cd) for every wire query

_PAYLOAD = 1232  # EDNS0 buffer size (DNS flag day 2020)
_UDP_RETRY = 1.0  # resend a UDP query after this many seconds without an answer
# EDE codes that mark an answer as bogus even when it is not a SERVFAIL. Codes 1 and 2
# (unsupported algorithm / digest) are left out: the zone is then treated as insecure.
_BOGUS_EDE = frozenset({6, 7, 8, 9, 10, 11, 12})


@dataclass(frozen=True)
class ValidationProbe:
    """Whether the resolver validates DNSSEC (a signed answer came back with AD)."""

    validating: bool
    detail: str
    reachable: bool = True


class _UdpWaiter(asyncio.DatagramProtocol):
    def __init__(self, accept: Callable[[bytes], bool]) -> None:
        self.accept = accept
        self.future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.future.done() and self.accept(data):
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def system_nameservers() -> tuple[tuple[str, int], ...]:
    """The nameservers of /etc/resolv.conf (port 53)."""
    try:
        conf = dns.resolver.Resolver(configure=True)
    except dns.exception.DNSException:
        return (("127.0.0.1", 53),)
    return tuple((str(ns), conf.port) for ns in conf.nameservers) or (("127.0.0.1", 53),)


class Resolver:
    """Asks the trusted validating resolvers; caches answers; never raises for DNS trouble."""

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] | None = None,
        *,
        timeout: float = 10.0,
        max_records: int = 100,
        max_cname_chain: int = 8,
        cache_max_ttl: float = 3600.0,
        tlsa_cache_max_ttl: float = 300.0,
        failure_cache_ttl: float = 5.0,
        clock: Clock = time.monotonic,
        on_query: QueryHook | None = None,
        max_cache_entries: int = 10_000,
    ) -> None:
        self.nameservers: tuple[tuple[str, int], ...] = (
            tuple(nameservers) if nameservers else system_nameservers())
        self.timeout = timeout
        self.max_records = max_records
        self.max_cname_chain = max_cname_chain
        self.cache_max_ttl = cache_max_ttl
        self.tlsa_cache_max_ttl = tlsa_cache_max_ttl
        self.failure_cache_ttl = failure_cache_ttl
        self.max_cache_entries = max_cache_entries
        self.clock = clock
        self.on_query = on_query
        self.wire_queries = 0  # queries sent (UDP or TCP exchanges started)
        self.last_probe: ValidationProbe | None = None
        self._probe_at = 0.0
        self._cache: dict[tuple[str, str], tuple[float, DnsAnswer]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[DnsAnswer]] = {}

    @classmethod
    def from_config(cls, dns_cfg: DnsConfig, *, clock: Clock = time.monotonic,
                    on_query: QueryHook | None = None) -> Resolver:
        servers = tuple(split_hostport(s, 53) for s in dns_cfg.nameservers)
        return cls(servers or None, timeout=dns_cfg.timeout,
                   max_records=dns_cfg.max_records_per_rrset,
                   max_cname_chain=dns_cfg.max_cname_chain,
                   cache_max_ttl=dns_cfg.cache_max_ttl,
                   tlsa_cache_max_ttl=dns_cfg.tlsa_cache_max_ttl,
                   failure_cache_ttl=dns_cfg.failure_cache_ttl, clock=clock, on_query=on_query)

    # -- public lookups --

    async def query(self, name: str, rdtype: str, *, use_cache: bool = True) -> DnsAnswer:
        """The answer for (name, rdtype): rcode class, security, records, CNAME links."""
        key = (name.lower().rstrip("."), rdtype.upper())
        if use_cache:
            hit = self._cache.get(key)
            if hit is not None:
                if hit[0] > self.clock():
                    return hit[1]
                del self._cache[key]
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.ensure_future(self._lookup(*key, store=True))
                self._inflight[key] = task
                task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
            return await asyncio.shield(task)
        return await self._lookup(*key, store=False)

    async def tlsa(self, base: str, port: int) -> DnsAnswer:
        return await self.query(f"_{port}._tcp.{base}", "TLSA")

    def clear_cache(self) -> None:
        self._cache.clear()

    async def validation(self) -> ValidationProbe:
        """The last probe while fresh (a positive one for cache_max_ttl, a negative one
        for failure_cache_ttl), else a new `check_validating`."""
        probe = self.last_probe
        if probe is not None:
            age = self.clock() - self._probe_at
            if age < (self.cache_max_ttl if probe.validating else self.failure_cache_ttl):
                return probe
        return await check_validating(self)

    # -- lookup with CNAME link security and SERVFAIL diagnosis --

    async def _lookup(self, qname: str, rdtype: str, *, store: bool) -> DnsAnswer:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            name = dns.name.from_text(qname or ".")
        except (dns.exception.DNSException, UnicodeError) as exc:
            return DnsAnswer(qname, rdtype, Rcode.NXDOMAIN, False,
                             reason=f"invalid domain name: {exc}")
        reply = await self._ask(name, rdtype, cd=False, deadline=deadline)
        if reply.rcode.failed:
            answer = await self._failure(name, qname, rdtype, reply, deadline)
            ttl = min(self.failure_cache_ttl, reply.ttl or self.failure_cache_ttl)
        else:
            answer = await self._success(qname, rdtype, reply, deadline)
            cap = self.tlsa_cache_max_ttl if rdtype == "TLSA" else self.cache_max_ttl
            ttl = min(reply.ttl, cap)
        if store and ttl > 0:
            self._store((qname, rdtype), ttl, answer)
        return answer

    def _store(self, key: tuple[str, str], ttl: float, answer: DnsAnswer) -> None:
        now = self.clock()
        if len(self._cache) >= self.max_cache_entries:  # drop expired, then the oldest
            for k in [k for k, (exp, _) in self._cache.items() if exp <= now]:
                del self._cache[k]
            while len(self._cache) >= self.max_cache_entries:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + ttl, answer)

    async def _failure(self, name: dns.name.Name, qname: str, rdtype: str, reply: Reply,
                       deadline: float) -> DnsAnswer:
        reason = reply.reason
        dnssec = any(e.dnssec for e in reply.ede)
        if dnssec:
            reason += "; " + ", ".join(_ede_text(e) for e in reply.ede if e.dnssec)
        elif reply.rcode is Rcode.SERVFAIL:
            # No DNSSEC reason given: does the answer exist when validation is off?
            cd = await self._ask(name, rdtype, cd=True, deadline=deadline)
            if not cd.rcode.failed:
                dnssec = True
                reason += "; the answer validates only with checking disabled (CD): " \
                          "DNSSEC failure"
        if reply.ede and not dnssec:
            reason += "; " + ", ".join(_ede_text(e) for e in reply.ede)
        return DnsAnswer(qname, rdtype, reply.rcode, False, ede=reply.ede,
                         dnssec_failure=dnssec, reason=reason)

    async def _success(self, qname: str, rdtype: str, reply: Reply,
                       deadline: float) -> DnsAnswer:
        chain: list[CnameLink] = []
        for owner, target in reply.links:
            if reply.ad:
                secure = True
            else:  # the AD bit covers the whole answer: ask for each link on its own
                link = await self._ask(dns.name.from_text(owner or "."), "CNAME", cd=False,
                                       deadline=deadline)
                secure = link.ad and link.rcode is Rcode.OK
            chain.append(CnameLink(owner, target, secure))
        bogus = not reply.ad and any(e.code in _BOGUS_EDE for e in reply.ede)
        reason = reply.reason
        if reply.ede:
            reason = "; ".join(x for x in (reason, *(_ede_text(e) for e in reply.ede)) if x)
        return DnsAnswer(qname, rdtype, reply.rcode, reply.ad, reply.records,
                         canonical_name=reply.final_name, chain=tuple(chain), ede=reply.ede,
                         dnssec_failure=bogus, reason=reason)

    # -- transport --

    async def _ask(self, name: dns.name.Name, rdtype: str, *, cd: bool,
                   deadline: float) -> Reply:
        """One question to the nameservers in order, within the deadline."""
        loop = asyncio.get_running_loop()
        q = dns.message.make_query(name, rdtype, use_edns=0, want_dnssec=True,
                                   payload=_PAYLOAD)
        if cd:
            q.flags |= dns.flags.CD
        wire = q.to_wire()
        qlen = len(name.to_wire()) + 4  # type: ignore[arg-type]
        qtext = name.to_text()
        problems: list[str] = []
        refused: Reply | None = None
        for i, (host, port) in enumerate(self.nameservers):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            share = remaining / (len(self.nameservers) - i)
            self.wire_queries += 1
            if self.on_query is not None:
                self.on_query(name_text(name), rdtype, cd)
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that arrives together with the reply (a stop that hangs).
                async with asyncio.timeout(share):
                    data = await self._udp(wire, qlen, host, port)
                if data[2] & 0x02:  # TC: the answer did not fit, ask over TCP
                    async with asyncio.timeout(max(deadline - loop.time(), 0.001)):
                        data = await self._tcp(wire, qlen, host, port)
            except TimeoutError:
                problems.append(f"{host}:{port} timed out")
                continue
            except OSError as exc:
                problems.append(f"{host}:{port}: {exc.strerror or exc}")
                continue
            reply = parse_reply(data, qtext, rdtype, max_records=self.max_records,
                                max_chain=self.max_cname_chain,
                                negative_default_ttl=self.failure_cache_ttl)
            if reply.rcode is Rcode.REFUSED:  # this server will not serve us: next one
                refused = reply
                problems.append(f"{host}:{port} refused")
                continue
            return reply
        if refused is not None:
            return replace(refused, reason="; ".join(problems))
        return Reply(Rcode.TIMEOUT, False,
                     reason="no answer from the resolver: " + ("; ".join(problems) or
                                                               "lookup time exhausted"))

    @staticmethod
    def _matches(query_wire: bytes, question_len: int) -> Callable[[bytes], bool]:
        """Accept only a response to this query: same id, QR set, same question."""
        qid = query_wire[:2]
        question = query_wire[12:12 + question_len].lower()

        def accept(data: bytes) -> bool:
            return (len(data) >= 12 + question_len and data[:2] == qid
                    and bool(data[2] & 0x80)
                    and data[12:12 + question_len].lower() == question)
        return accept

    async def _udp(self, wire: bytes, qlen: int, host: str, port: int) -> bytes:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _UdpWaiter(self._matches(wire, qlen)), remote_addr=(host, port))
        try:
            while True:
                transport.sendto(wire)
                done, _ = await asyncio.wait({proto.future}, timeout=_UDP_RETRY)
                if done:
                    return proto.future.result()
        finally:
            transport.close()

    async def _tcp(self, wire: bytes, qlen: int, host: str, port: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            accept = self._matches(wire, qlen)
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
                if accept(data):
                    return data
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("connection closed by the resolver") from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _ede_text(e: Ede) -> str:
    """`EDE 6 (DNSSEC Bogus): <resolver's text>`."""
    try:
        return dns.edns.EDEOption(e.code, e.text or None).to_text()
    except ValueError:
        return f"EDE {e.code}: {e.text}" if e.text else f"EDE {e.code}"


async def check_validating(resolver: Resolver) -> ValidationProbe:
    """Prove that the resolver validates: `. DNSKEY` must come back with AD — from every
    configured nameserver, since a lookup that times out on one is answered by the next
    (a non-validating server in the list would silently turn DANE off for that answer).

    Validating: at least one server answered with AD and none answered without it (an
    unreachable server is reported but answers nothing). Sets `resolver.last_probe`
    (reused by `Resolver.validation()`); logging the result (`resolver_check`) is the
    caller's job (relay.ops.components.ResolverProbe, relay check). Never raises."""
    results = []
    for server in resolver.nameservers:
        single = Resolver([server], timeout=resolver.timeout, max_records=resolver.max_records,
                          on_query=resolver.on_query)
        answer = await single.query(".", "DNSKEY", use_cache=False)
        resolver.wire_queries += single.wire_queries
        results.append((f"{server[0]}:{server[1]}", answer))
    good = [name for name, a in results if a.rcode is Rcode.OK and a.secure]
    plain = [name for name, a in results if a.rcode is Rcode.OK and not a.secure]
    down = [(name, a) for name, a in results if a.rcode is not Rcode.OK]
    if good and not plain:
        detail = f"resolver {', '.join(good)} validates DNSSEC (. DNSKEY answered with AD)"
        if down:
            detail += "; not answering: " + ", ".join(n for n, _ in down)
        probe = ValidationProbe(True, detail)
    elif plain:
        probe = ValidationProbe(False, f"resolver {', '.join(plain)} answered . DNSKEY "
                                       "WITHOUT the AD bit: it does not validate DNSSEC, so "
                                       "DANE cannot be enforced")
    else:
        reasons = "; ".join(f"{n}: {a.rcode}: {a.reason}" for n, a in down)
        probe = ValidationProbe(False, f"resolver did not answer the . DNSKEY probe "
                                       f"({reasons})",
                                reachable=any(a.rcode is not Rcode.TIMEOUT for _, a in down))
    resolver.last_probe = probe
    resolver._probe_at = resolver.clock()
    return probe
