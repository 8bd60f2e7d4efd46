"""The outbound SMTP client against real aiosmtpd destinations on loopback."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from relay.errors import SmtpClientError, TlsError, TlsInjection
from relay.smtp import SmtpSession, Timeouts
from relay.smtp.protocol import State
from tests.support import certs
from tests.support.smtpd import Destination, start_group

HELO = "relay.example.net"
T = Timeouts.uniform(10.0)


@dataclass(frozen=True)
class Pki:
    root: certs.Issued
    inter: certs.Issued
    leaf: certs.Issued


@pytest.fixture(scope="module")
def pki() -> Pki:
    root = certs.make_ca("Test Root")
    inter = certs.make_ca("Test Intermediate", issuer=root)
    return Pki(root, inter, certs.make_leaf(["mx.example.test"], issuer=inter))


@pytest.fixture
async def tls_dest(pki: Pki) -> AsyncIterator[Destination]:
    async with Destination("127.25.20.1", tls=(pki.leaf, [pki.inter])) as dest:
        yield dest


async def _session(dest: Destination, timeouts: Timeouts = T) -> SmtpSession:
    return await SmtpSession.connect(dest.host_ip, dest.port, helo_name=HELO, timeouts=timeouts)


async def _mail_chunks(dest: Destination) -> list[bytes]:
    [conn] = await dest.idle_async()
    return [c for c in conn.chunks if b"MAIL FROM" in c or b"RCPT TO" in c]


# --- plain and TLS sessions ------------------------------------------------------------


async def test_plain_session_delivers() -> None:
    async with Destination("127.25.20.2") as dest:
        sess = await _session(dest)
        assert sess.greeting is not None and sess.greeting.code == 220
        await sess.ehlo()
        assert not sess.extensions.starttls
        body = b"Subject: t\r\n\r\nhello\r\n"
        res = await sess.send_mail("s@relay.test", ["r@example.test"], body)
        await sess.quit()
        assert res.delivered == ("r@example.test",)
        assert str(res.data) == "250 2.0.0 OK queued"
        [msg] = await dest.messages_async(1)
        assert (msg.mail_from, msg.rcpt_tos, msg.body, msg.tls) == (
            "s@relay.test", ["r@example.test"], body, False)
        assert msg.helo == HELO
        assert sess.closed


async def test_starttls_captures_the_full_presented_chain(tls_dest: Destination,
                                                          pki: Pki) -> None:
    sess = await _session(tls_dest)
    await sess.ehlo()
    assert sess.extensions.starttls
    tls = await sess.starttls("mx.example.test")
    assert tls.chain == (pki.leaf.der, pki.inter.der)  # leaf first, as presented
    assert list(tls.chain) == tls_dest.presented_chain
    assert tls.version in ("TLSv1.2", "TLSv1.3") and tls.cipher and tls.bits
    assert sess.extensions.keywords == {}  # forgotten after TLS (RFC 3207 §4.2)
    assert sess.state is State.GREETED
    await sess.ehlo()
    assert not sess.extensions.starttls  # not offered again inside TLS
    res = await sess.send_mail("s@relay.test", ["r@example.test"], b"x\r\n")
    await sess.quit()
    assert res.delivered == ("r@example.test",)
    [msg] = await tls_dest.messages_async(1)
    assert msg.tls and msg.tls_version == tls.version


async def test_sni_seen_by_the_server(tls_dest: Destination) -> None:
    sess = await _session(tls_dest)
    await sess.ehlo()
    tls = await sess.starttls("_base.mx.example.test")
    assert tls.server_hostname == "_base.mx.example.test"
    await sess.quit()
    second = await _session(tls_dest)
    await second.ehlo()
    await second.starttls(None)  # no SNI at all
    await second.quit()
    first_conn, second_conn = await tls_dest.idle_async()
    assert first_conn.sni == "_base.mx.example.test"
    assert second_conn.tls_version is not None and second_conn.sni is None


async def test_tls_12_minimum_against_a_tls_11_server(pki: Pki) -> None:
    async with Destination("127.25.20.3", tls=(pki.leaf, []), tls_max_version="1.1") as dest:
        sess = await _session(dest)
        await sess.ehlo()
        with pytest.raises(TlsError) as err:
            await sess.starttls("mx.example.test")  # min_version="1.2" by default
        assert err.value.phase == "tls"
        assert sess.closed
        with pytest.raises(SmtpClientError):
            await sess.send_mail("s@relay.test", ["r@example.test"], b"x\r\n")
        # Control: the same server is reachable when 1.0+ is allowed (so the test can fail).
        old = await _session(dest)
        await old.ehlo()
        tls = await old.starttls("mx.example.test", min_version="1.0")
        assert tls.version == "TLSv1.1"
        await old.quit()
        conns = await dest.idle_async()
        assert b"MAIL" not in conns[0].data


# --- pipelining ------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline_data", [True, False])
async def test_pipelining_sends_mail_and_all_rcpts_in_one_write(tls_dest: Destination,
                                                               pipeline_data: bool) -> None:
    rcpts = [f"r{i}@example.test" for i in range(5)]
    sess = await SmtpSession.connect(tls_dest.host_ip, tls_dest.port, helo_name=HELO,
                                     timeouts=T, pipeline_data=pipeline_data)
    await sess.ehlo()
    await sess.starttls("mx.example.test")
    await sess.ehlo()
    assert sess.extensions.pipelining
    res = await sess.send_mail("s@relay.test", rcpts, b"x\r\n")
    await sess.quit()
    assert res.pipelined and res.delivered == tuple(rcpts)
    [batch] = await _mail_chunks(tls_dest)  # one read on the server: MAIL, every RCPT (, DATA)
    assert batch.count(b"RCPT TO:") == 5 and batch.startswith(b"MAIL FROM:<s@relay.test>")
    assert batch.endswith(b"DATA\r\n") == pipeline_data


async def test_no_pipelining_when_not_offered() -> None:
    async with Destination("127.25.20.4", pipelining=False) as dest:
        sess = await _session(dest)
        await sess.ehlo()
        assert not sess.extensions.pipelining
        res = await sess.send_mail("s@relay.test", ["a@example.test", "b@example.test"], b"x")
        await sess.quit()
        assert not res.pipelined and len(res.delivered) == 2
        chunks = await _mail_chunks(dest)
        assert len(chunks) == 3 and all(c.count(b"\r\n") == 1 for c in chunks)


# --- per-recipient replies and transaction outcomes ------------------------------------


async def test_per_recipient_mix_in_one_transaction() -> None:
    replies = {"rcpt:later@example.test": (450, "4.2.1 mailbox busy"),
               "rcpt:gone@example.test": (550, "5.1.1 no such user")}
    async with Destination("127.25.20.5", replies=replies) as dest:
        sess = await _session(dest)
        await sess.ehlo()
        res = await sess.send_mail(
            "s@relay.test", ["ok@example.test", "later@example.test", "gone@example.test"], b"x")
        await sess.quit()
    assert res.mail is not None and res.mail.enhanced == "2.1.0"
    assert {a: (r.code, r.enhanced) for a, r in res.recipients.items()} == {
        "ok@example.test": (250, "2.1.5"),
        "later@example.test": (450, "4.2.1"),
        "gone@example.test": (550, "5.1.1"),
    }
    assert res.delivered == ("ok@example.test",)
    assert str(res.reply_for("gone@example.test")) == "550 5.1.1 no such user"
    assert res.reply_for("later@example.test").transient
    assert res.reply_for("ok@example.test").code == 250
    [msg] = await dest.messages_async(1)
    assert msg.rcpt_tos == ["ok@example.test"]


@pytest.mark.parametrize("pipeline_data", [True, False])
async def test_all_recipients_refused_then_rset_before_next(pipeline_data: bool) -> None:
    replies = {"rcpt:gone@example.test": (550, "5.1.1 no such user")}
    async with Destination("127.25.20.6", replies=replies) as dest:
        sess = await SmtpSession.connect(dest.host_ip, dest.port, helo_name=HELO, timeouts=T,
                                         pipeline_data=pipeline_data)
        await sess.ehlo()
        first = await sess.send_mail("s@relay.test", ["gone@example.test"], b"one")
        assert first.data is None and first.delivered == ()
        assert sess.usable and sess.state is State.MAIL  # an open transaction on the server
        second = await sess.send_mail("s@relay.test", ["ok@example.test"], b"two")
        await sess.quit()
        assert second.delivered == ("ok@example.test",)
        [conn] = await dest.idle_async()
        # a pipelined DATA after refused RCPTs is refused by the server (503), no body sent
        data = ["DATA"] if pipeline_data else []
        assert conn.verbs() == ["EHLO", "MAIL", "RCPT", *data, "RSET", "MAIL", "RCPT", "DATA",
                                "QUIT"]
        assert [m.body for m in dest.messages] == [b"two\r\n"]


async def test_two_messages_over_one_tls_session(tls_dest: Destination) -> None:
    sess = await _session(tls_dest)
    await sess.ehlo()
    await sess.starttls("mx.example.test")
    await sess.ehlo()
    for i in range(2):
        res = await sess.send_mail("s@relay.test", ["r@example.test"], b"msg %d\r\n" % i)
        assert res.delivered == ("r@example.test",)
        assert sess.usable
    await sess.quit()
    assert sess.transactions == 2
    msgs = await tls_dest.messages_async(2)
    assert [m.body for m in msgs] == [b"msg 0\r\n", b"msg 1\r\n"]
    assert len(await tls_dest.idle_async()) == 1 and all(m.tls for m in msgs)


async def test_end_of_data_refusal_is_a_value() -> None:
    async with Destination("127.25.20.7", replies={"data": (451, "4.3.0 try again")}) as dest:
        sess = await _session(dest)
        await sess.ehlo()
        res = await sess.send_mail("s@relay.test", ["r@example.test"], b"x")
        assert res.data is not None and res.data.enhanced == "4.3.0"
        assert res.reply_for("r@example.test").transient and res.delivered == ()
        assert sess.usable
        await sess.quit()
        assert dest.messages == []


async def test_421_during_rcpt_ends_the_session_as_values() -> None:
    replies = {"rcpt:b@example.test": (421, "4.3.2 shutting down")}
    async with Destination("127.25.20.8", replies=replies, pipelining=False) as dest:
        sess = await _session(dest)
        await sess.ehlo()
        res = await sess.send_mail("s@relay.test",
                                   ["a@example.test", "b@example.test", "c@example.test"], b"x")
        assert [r.code for r in res.recipients.values()] == [250, 421, 421]
        assert res.reply_for("a@example.test").code == 421  # accepted, but no DATA followed
        assert res.delivered == () and sess.closed
        [conn] = await dest.idle_async()
        assert "DATA" not in conn.verbs() and conn.verbs().count("RCPT") == 2


# --- SIZE, SMTPUTF8, 8BITMIME, dot-stuffing --------------------------------------------


async def test_size_limit_refuses_without_sending() -> None:
    async with Destination("127.25.20.9", size_limit=1000) as dest:
        sess = await _session(dest)
        await sess.ehlo()
        assert sess.extensions.size == 1000
        big = await sess.send_mail("s@relay.test", ["r@example.test"], b"x" * 900,
                                   size=1001)
        assert big.refused is not None and big.refused.enhanced == "5.3.4"
        assert big.mail is None and big.reply_for("r@example.test").permanent
        small = await sess.send_mail("s@relay.test", ["r@example.test"], b"y" * 998)
        await sess.quit()
        assert small.delivered == ("r@example.test",)
        [msg] = await dest.messages_async(1)
        assert "SIZE=998" in msg.mail_options
        [conn] = await dest.idle_async()
        assert conn.verbs().count("MAIL") == 1


async def test_smtputf8_needed_but_absent() -> None:
    async with Destination("127.25.20.10", smtputf8=False) as dest:
        sess = await _session(dest)
        await sess.ehlo()
        res = await sess.send_mail("s@relay.test", ["jörg@example.test"], b"x")
        flagged = await sess.send_mail("s@relay.test", ["r@example.test"], b"x", smtputf8=True)
        await sess.quit()
        for r in (res, flagged):
            assert r.refused is not None and r.refused.enhanced == "5.6.7" and r.mail is None
        [conn] = await dest.idle_async()
        assert "MAIL" not in conn.verbs()


async def test_smtputf8_and_8bitmime_used_when_offered() -> None:
    body = "Subject: grüße\r\n\r\nÄ\r\n".encode()
    async with Destination("127.25.20.11") as dest:
        sess = await _session(dest)
        await sess.ehlo()
        res = await sess.send_mail("s@relay.test", ["jörg@example.test"], body)
        await sess.quit()
        assert res.delivered == ("jörg@example.test",)
        [msg] = await dest.messages_async(1)
        assert msg.smtputf8 and msg.rcpt_tos == ["jörg@example.test"]
        assert "BODY=8BITMIME" in msg.mail_options and "SMTPUTF8" in msg.mail_options
        assert msg.body == body


async def test_dot_stuffing_survives_a_real_server(tls_dest: Destination) -> None:
    body = b".starts\r\n.\r\n..\r\nmid.dle\r\n. \r\nlast line without end"
    sess = await _session(tls_dest)
    await sess.ehlo()
    res = await sess.send_mail("s@relay.test", ["r@example.test"], body)
    await sess.quit()
    assert res.delivered
    [msg] = await tls_dest.messages_async(1)
    assert msg.body == body + b"\r\n"


async def test_large_body_over_tls(tls_dest: Destination) -> None:
    line = b"0123456789" * 9 + b"\r\n"
    body = line * 20_000  # ~1.8 MB: several chunked writes with flow control
    sess = await _session(tls_dest)
    await sess.ehlo()
    await sess.starttls("mx.example.test")
    await sess.ehlo()
    res = await sess.send_mail("s@relay.test", ["r@example.test"], body)
    await sess.quit()
    assert res.delivered
    [msg] = await tls_dest.messages_async(1)
    assert msg.body == body


# --- failures --------------------------------------------------------------------------


async def test_injection_after_starttls_220_aborts(pki: Pki) -> None:
    async with Destination("127.25.20.12", tls=(pki.leaf, [pki.inter]),
                           inject_after_starttls=b"250 injected\r\n") as dest:
        sess = await _session(dest)
        await sess.ehlo()
        with pytest.raises(TlsError) as err:
            await sess.starttls("mx.example.test")
        assert err.value.phase == "starttls" and "buffered" in str(err.value)
        assert isinstance(err.value, TlsInjection) and "injection" in str(err.value)
        assert sess.closed and sess.tls is None
        with pytest.raises(SmtpClientError):
            await sess.send_mail("s@relay.test", ["r@example.test"], b"x")
        [conn] = await dest.idle_async()
        assert conn.verbs() == ["EHLO", "STARTTLS"]
        assert b"MAIL" not in conn.data and dest.messages == []


async def test_server_drops_mid_data() -> None:
    async with Destination("127.25.20.13", drop_in_data=1) as dest:
        sess = await _session(dest)
        await sess.ehlo()
        with pytest.raises(SmtpClientError) as err:
            await sess.send_mail("s@relay.test", ["r@example.test"], b"line\r\n" * 100)
        assert err.value.phase == "data" and not isinstance(err.value, TlsError)
        assert sess.closed
        # the count is used up: the retry goes through
        again = await _session(dest)
        await again.ehlo()
        res = await again.send_mail("s@relay.test", ["r@example.test"], b"line\r\n")
        await again.quit()
        assert res.delivered and len(await dest.messages_async(1)) == 1


async def test_greeting_timeout() -> None:
    async with Destination("127.25.20.14", greeting_delay=math.inf) as dest:
        started = time.monotonic()
        with pytest.raises(SmtpClientError) as err:
            await _session(dest, Timeouts(greeting=0.3))
        assert err.value.phase == "greeting" and "timeout" in str(err.value)
        assert time.monotonic() - started < 5
        await dest.idle_async()


async def test_greeting_refused() -> None:
    async with Destination("127.25.20.15", greeting="554 5.7.1 no service here") as dest:
        with pytest.raises(SmtpClientError) as err:
            await _session(dest)
        assert (err.value.phase, err.value.code) == ("greeting", 554)
        assert err.value.reply == "554 5.7.1 no service here"
        [conn] = await dest.idle_async()
        assert conn.commands == ["QUIT"]


async def test_helo_fallback_when_ehlo_is_refused() -> None:
    async with Destination("127.25.20.16", ehlo=False) as dest:
        sess = await _session(dest)
        reply = await sess.ehlo()
        assert reply.code == 250 and not sess.extensions.esmtp
        res = await sess.send_mail("s@relay.test", ["r@example.test"], b"x")
        await sess.quit()
        assert res.delivered
        [msg] = await dest.messages_async(1)
        assert msg.mail_options == [] and msg.helo == HELO
        [conn] = await dest.idle_async()
        assert conn.verbs()[:2] == ["EHLO", "HELO"]


async def test_starttls_refused_leaves_cleartext_usable(pki: Pki) -> None:
    replies = {"starttls": (454, "4.7.0 TLS not available now")}
    async with Destination("127.25.20.17", tls=(pki.leaf, []), replies=replies) as dest:
        sess = await _session(dest)
        await sess.ehlo()
        with pytest.raises(TlsError) as err:
            await sess.starttls("mx.example.test")
        assert (err.value.phase, err.value.code) == ("starttls", 454)
        assert not sess.closed and sess.state is State.READY
        res = await sess.send_mail("s@relay.test", ["r@example.test"], b"x")  # caller's choice
        await sess.quit()
        assert res.delivered and not (await dest.messages_async(1))[0].tls


async def test_starttls_not_offered(pki: Pki) -> None:
    async with Destination("127.25.20.18", tls=(pki.leaf, []), starttls=False) as dest:
        sess = await _session(dest)
        await sess.ehlo()
        with pytest.raises(TlsError, match="not offered"):
            await sess.starttls("mx.example.test")
        await sess.quit()
        assert "STARTTLS" not in (await dest.idle_async())[0].verbs()


async def test_required_tls_refuses_cleartext_mail_as_a_value(pki: Pki) -> None:
    async with Destination("127.25.20.19", tls=(pki.leaf, []), require_tls=True) as dest:
        sess = await _session(dest)
        await sess.ehlo()
        res = await sess.send_mail("s@relay.test", ["r@example.test"], b"x")
        await sess.quit()
        assert res.mail is not None and res.mail.code == 530 and res.data is None


async def test_connect_refused() -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.25.20.20", 0))
        port = s.getsockname()[1]
        with pytest.raises(SmtpClientError) as err:
            await SmtpSession.connect("127.25.20.20", port, helo_name=HELO, timeouts=T)
    assert err.value.phase == "connect"


async def test_ipv6_loopback() -> None:
    async with Destination("::1") as dest:
        sess = await _session(dest)
        await sess.ehlo()
        res = await sess.send_mail("s@relay.test", ["r@example.test"], b"x")
        await sess.quit()
        assert res.delivered
        assert (await dest.messages_async(1))[0].connection.peer[0] == "::1"


async def test_oversize_reply_from_a_hostile_server() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220-" + b"A" * 100_000)  # never a line end
        await writer.drain()
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(handle, "127.25.20.21", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(SmtpClientError) as err:
            await SmtpSession.connect("127.25.20.21", port, helo_name=HELO, timeouts=T)
    assert err.value.phase == "greeting" and "longer than" in str(err.value)


async def test_destinations_share_one_port(pki: Pki) -> None:
    dests = [Destination(f"127.25.21.{i}", tls=(pki.leaf, [])) for i in (1, 2)]
    port = start_group(dests)
    try:
        assert all(d.port == port for d in dests)
        for d in dests:
            sess = await SmtpSession.connect(d.host_ip, port, helo_name=HELO, timeouts=T)
            await sess.ehlo()
            await sess.send_mail("s@relay.test", [f"r@{d.host_ip}"], b"x")
            await sess.quit()
        assert [(await d.messages_async(1))[0].rcpt_tos for d in dests] == [
            ["r@127.25.21.1"], ["r@127.25.21.2"]]
    finally:
        for d in dests:
            d.stop()


# --- scripted raw servers for what aiosmtpd will not do ---------------------------------


async def test_354_without_recipients_ends_an_empty_message() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw\r\n")
        seen.append(await reader.readline())  # EHLO
        writer.write(b"250-raw\r\n250 PIPELINING\r\n")
        for _ in range(3):  # MAIL, RCPT, DATA in one batch
            seen.append(await reader.readline())
        writer.write(b"250 ok\r\n550 no\r\n354 go ahead anyway\r\n")  # broken: 354
        seen.append(await reader.readline())
        writer.write(b"554 no valid recipients\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")
        writer.close()

    server = await asyncio.start_server(handle, "127.25.20.22", 0)
    async with server:
        sess = await SmtpSession.connect("127.25.20.22", server.sockets[0].getsockname()[1],
                                         helo_name=HELO, timeouts=T)
        await sess.ehlo()
        res = await sess.send_mail("s@relay.test", ["r@example.test"], b"secret body\r\n")
        await sess.quit()
    assert res.data is None and res.reply_for("r@example.test").code == 550
    assert seen[1:] == [b"MAIL FROM:<s@relay.test>\r\n", b"RCPT TO:<r@example.test>\r\n",
                        b"DATA\r\n", b".\r\n", b"QUIT\r\n"]  # the body was never sent


async def test_cleartext_after_220_that_arrives_late_still_fails_tls() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw\r\n")
        await reader.readline()
        writer.write(b"250-raw\r\n250 STARTTLS\r\n")
        await reader.readline()
        writer.write(b"220 go ahead\r\n")
        await reader.read(1)  # the ClientHello is arriving: now inject, in cleartext
        writer.write(b"250 injected\r\n")
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.25.20.23", 0)
    async with server:
        sess = await SmtpSession.connect("127.25.20.23", server.sockets[0].getsockname()[1],
                                         helo_name=HELO, timeouts=T)
        await sess.ehlo()
        with pytest.raises(TlsError) as err:
            await sess.starttls("mx.example.test")
    assert err.value.phase == "tls" and sess.closed


async def test_unsolicited_reply_makes_a_session_unusable_for_reuse() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw\r\n")
        await reader.readline()
        writer.write(b"250 raw\r\n421 4.4.2 idle timeout\r\n")  # then the server goes away
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.25.20.24", 0)
    async with server:
        sess = await SmtpSession.connect("127.25.20.24", server.sockets[0].getsockname()[1],
                                         helo_name=HELO, timeouts=T)
        await sess.ehlo()
        assert not sess.usable
        with pytest.raises(SmtpClientError) as err:
            await sess.send_mail("s@relay.test", ["r@example.test"], b"x")
    assert err.value.phase == "mail" and sess.closed


async def test_local_address_is_used() -> None:
    async with Destination("127.25.20.25") as dest:
        sess = await SmtpSession.connect(dest.host_ip, dest.port, helo_name=HELO, timeouts=T,
                                         local_ip="127.25.20.99")
        await sess.ehlo()
        await sess.quit()
        [conn] = await dest.idle_async()
        assert conn.peer[0] == "127.25.20.99"
