"""DNSSEC-aware resolution: every answer is a relay.model.DnsAnswer with its security.

The relay does no DNSSEC validation itself: it asks the configured (trusted, normally
loopback) validating resolvers with EDNS0 + DO and reads the AD bit of every answer.
Queries go out as dnspython messages over our own small UDP/TCP transport, so that
every response can be parsed leniently: dnspython 2.9 refuses a TLSA record whose digest
length does not fit its matching type and then fails the WHOLE message; here such a
record survives as a TlsaRecord with its raw data (relay.dane finds it unusable).

Pieces:
- `parse_reply(wire, qname, rdtype, ...)`: pure, one response → `Reply` (rcode class,
  AD, CNAME links, records, EDE, cache TTL).
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

from relay import dane
from relay.config import DnsConfig, split_hostport
from relay.model import CnameLink, DnsAnswer, Ede, MxRecord, Rcode, TlsaRecord

Clock = Callable[[], float]
QueryHook = Callable[[str, str, bool], None]  # (qname, rdtype, cd) for every wire query

_PAYLOAD = 1232  # EDNS0 buffer size (DNS flag day 2020)
_UDP_RETRY = 1.0  # resend a UDP query after this many seconds without an answer
# EDE codes that mark an answer as bogus even when it is not a SERVFAIL. Codes 1 and 2
# (unsupported algorithm / digest) are left out: the zone is then treated as insecure.
_BOGUS_EDE = frozenset({6, 7, 8, 9, 10, 11, 12})


# --- pure parsing ---------------------------------------------------------------------------


def name_text(name: dns.name.Name) -> str:
    """Absolute name → lower-case text without the final dot; the root is ""."""
    if name == dns.name.root:
        return ""
    return name.to_text(omit_final_dot=True).lower()


def parse_tlsa_rdata(wire: bytes) -> TlsaRecord:
    """TLSA rdata → TlsaRecord, whatever its content (relay.dane.parse_tlsa_rdata).

    Never refuses: a digest of the wrong length is kept as published (relay.dane calls
    it unusable); rdata too short to hold the three parameter octets becomes a record
    with the private-use values 255/255/255, which no DANE client can use either, so
    that the RRset still exists (and TLS stays mandatory).
    """
    return dane.parse_tlsa_rdata(wire) or TlsaRecord(255, 255, 255, bytes(wire))


def extract_ede(msg: dns.message.Message) -> tuple[Ede, ...]:
    """The Extended DNS Errors (RFC 8914) carried in the response's OPT record."""
    return tuple(Ede(int(o.code), o.text or "") for o in msg.extended_errors())


@dataclass(frozen=True)
class RawRR:
    owner: dns.name.Name
    rdtype: int
    rdclass: int
    ttl: int
    rdata: bytes


def raw_answer_rrs(wire: bytes) -> list[RawRR]:
    """The answer section's records as raw rdata (no rdata parsing, names decompressed)."""
    p = dns.wire.Parser(wire)
    _id, _flags, qd, an, _ns, _ar = p.get_struct("!HHHHHH")
    for _ in range(qd):
        p.get_name(decompress=True)
        p.get_struct("!HH")
    out: list[RawRR] = []
    for _ in range(an):
        owner = p.get_name(decompress=True)
        rdtype, rdclass, ttl, rdlen = p.get_struct("!HHIH")
        out.append(RawRR(owner, rdtype, rdclass, ttl, p.get_bytes(rdlen)))
    return out


@dataclass(frozen=True)
class Reply:
    """One response reduced to what the relay needs (before CNAME link checks)."""

    rcode: Rcode
    ad: bool
    links: tuple[tuple[str, str], ...] = ()  # CNAMEs from qname on: (owner, target)
    final_name: str = ""
    records: tuple[object, ...] = ()
    ttl: float = 0.0  # how long this reply may be cached (before caps)
    ede: tuple[Ede, ...] = ()
    reason: str = ""


def _convert(rdtype: int, rdata: dns.rdata.Rdata) -> object:
    if rdtype == dns.rdatatype.MX:
        return MxRecord(rdata.preference, name_text(rdata.exchange))  # type: ignore[attr-defined]
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return rdata.address  # type: ignore[attr-defined]
    if rdtype == dns.rdatatype.TXT:  # its strings joined without spaces (RFC 8460 §3)
        return b"".join(rdata.strings).decode("utf-8", "replace")  # type: ignore[attr-defined]
    return rdata.to_text()


def _sort_key(rec: object) -> tuple[object, ...]:
    if isinstance(rec, MxRecord):
        return (rec.preference, rec.exchange)
    if isinstance(rec, TlsaRecord):
        return (rec.usage, rec.selector, rec.mtype, rec.data)
    return (str(rec),)


def _negative_ttl(msg: dns.message.Message, default: float) -> float:
    for rrset in msg.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))  # type: ignore[attr-defined]
    return default


def _rrset(msg: dns.message.Message, name: dns.name.Name, rdtype: int) -> object:
    return msg.get_rrset(msg.answer, name, dns.rdataclass.IN, rdtype)


def parse_reply(wire: bytes, qname: str, rdtype: str, *, max_records: int = 100,
                max_chain: int = 8, negative_default_ttl: float = 5.0) -> Reply:
    """Parse one response to (qname, rdtype). Pure; never raises on a bad message."""
    qtype = dns.rdatatype.from_text(rdtype)
    try:
        msg = dns.message.from_wire(wire, continue_on_error=True, ignore_trailing=True)
        raw = raw_answer_rrs(wire) if qtype == dns.rdatatype.TLSA else []
    except Exception as exc:  # any parse failure is a malformed response
        return Reply(Rcode.SERVFAIL, False, reason=f"malformed response: {exc!r}")
    # A TLSA record dnspython refuses is an error we tolerate; any other one is not.
    refused = 0
    for rr in raw:
        if rr.rdtype == qtype:
            try:
                dns.rdata.from_wire(rr.rdclass, rr.rdtype, rr.rdata, 0, len(rr.rdata))
            except Exception:  # refused by dnspython, kept by us
                refused += 1
    if len(msg.errors) > refused:
        return Reply(Rcode.SERVFAIL, False,
                     reason=f"malformed response: {msg.errors[0].exception!r}")
    ede = extract_ede(msg)
    ad = bool(msg.flags & dns.flags.AD)
    rc = msg.rcode()
    if rc not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        cls = Rcode.REFUSED if rc == dns.rcode.REFUSED else Rcode.SERVFAIL
        return Reply(cls, False, ede=ede, reason=f"rcode {dns.rcode.to_text(rc)}")

    # Follow the CNAME chain inside the answer section.
    current = dns.name.from_text(qname)
    links: list[tuple[str, str]] = []
    ttls: list[float] = []
    seen = {current}
    while qtype != dns.rdatatype.CNAME:
        cname = _rrset(msg, current, dns.rdatatype.CNAME)
        if cname is None or not len(cname):  # type: ignore[arg-type]
            break
        target = cname[0].target  # type: ignore[index]
        links.append((name_text(current), name_text(target)))
        ttls.append(cname.ttl)  # type: ignore[attr-defined]
        if target in seen or len(links) > max_chain:
            why = "CNAME loop" if target in seen else f"CNAME chain longer than {max_chain}"
            return Reply(Rcode.SERVFAIL, False, ede=ede, reason=why)
        seen.add(target)
        current = target
    records: list[object] = []
    if qtype == dns.rdatatype.TLSA:
        for rr in raw:
            if rr.owner == current and rr.rdtype == qtype and rr.rdclass == dns.rdataclass.IN:
                ttls.append(rr.ttl)
                records.append(parse_tlsa_rdata(rr.rdata))
    else:
        rrset = _rrset(msg, current, qtype)
        if rrset is not None and len(rrset):  # type: ignore[arg-type]
            ttls.append(rrset.ttl)  # type: ignore[attr-defined]
            records = [_convert(qtype, rd) for rd in rrset]  # type: ignore[attr-defined]
    records = sorted(set(records), key=_sort_key)
    reason = ""
    if len(records) > max_records:
        reason = f"{len(records)} records, only the first {max_records} kept"
        records = records[:max_records]
    if rc == dns.rcode.NXDOMAIN:
        cls = Rcode.NXDOMAIN
    else:
        cls = Rcode.OK if records else Rcode.NODATA
    if cls is Rcode.OK:
        ttl = float(min(ttls))
    else:
        ttl = _negative_ttl(msg, negative_default_ttl)
        if ttls:
            ttl = min(ttl, float(min(ttls)))
    return Reply(cls, ad, tuple(links), name_text(current), tuple(records), ttl, ede, reason)


# --- the resolver ---------------------------------------------------------------------------


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
    caller's job (relay.ops.ResolverProbe, relay check). Never raises."""
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
