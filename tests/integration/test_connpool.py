"""The connection cache with real SMTP sessions to an aiosmtpd destination."""

from __future__ import annotations

import asyncio

from relay.delivery.connpool import SessionPool
from relay.smtp.client import SmtpSession, Timeouts
from tests.support.smtpd import Destination

BODY = b"Subject: x\r\n\r\nhello\r\n"


async def _session(dest: Destination) -> SmtpSession:
    sess = await SmtpSession.connect(dest.host_ip, dest.port, helo_name="relay.test",
                                     timeouts=Timeouts.uniform(5))
    await sess.ehlo()
    await sess.send_mail("a@x.test", ["b@y.test"], BODY)
    return sess


async def test_take_returns_the_session_given_for_the_same_key_only() -> None:
    async with Destination("127.25.6.1") as dest:
        pool = SessionPool(idle_time=5, max_uses=10)
        sess = await _session(dest)
        assert pool.give(("k", 1), sess, "state")
        assert pool.take(("k", 2)) is None  # another policy never gets it
        got = pool.take(("k", 1))
        assert got == (sess, "state") and pool.reused == 1
        assert pool.take(("k", 1)) is None  # taken once
        await sess.send_mail("a@x.test", ["c@y.test"], BODY)
        assert sess.transactions == 2
        pool.give(("k", 1), sess, "state")
        await pool.close()
        assert sess.closed
        await dest.idle_async()
        assert dest.connections[0].verbs()[-1] == "QUIT"


async def test_limits_idle_time_and_uses() -> None:
    async with Destination("127.25.6.2") as dest:
        pool = SessionPool(idle_time=0.2, max_uses=2)
        sess = await _session(dest)
        pool.give("k", sess, None)
        await asyncio.sleep(0.35)  # idle too long: reaped (QUIT)
        assert pool.take("k") is None and pool.idle_count() == 0
        await asyncio.sleep(0.1)
        assert sess.closed
        used = await _session(dest)
        await used.send_mail("a@x.test", ["b@y.test"], BODY)  # 2 transactions = max_uses
        assert not pool.give("k", used, None)
        await pool.close()


async def test_a_session_the_server_closed_is_not_reused() -> None:
    async with Destination("127.25.6.3") as dest:
        pool = SessionPool(idle_time=5, max_uses=10)
        sess = await _session(dest)
        pool.give("k", sess, None)
        dest.stop()  # the server goes away
        await asyncio.sleep(0.2)
        assert pool.take("k") is None
        await pool.close()


async def test_reuse_off() -> None:
    async with Destination("127.25.6.4") as dest:
        pool = SessionPool(idle_time=0, max_uses=10)
        sess = await _session(dest)
        assert not pool.give("k", sess, None)
        await pool.close()
        assert sess.closed
