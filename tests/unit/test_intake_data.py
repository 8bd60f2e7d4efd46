"""relay.intake.data: end of data, smuggling, size and line limits, fast = slow path."""

from __future__ import annotations

import asyncio
import random

import pytest
from aiosmtpd.smtp import SMTP

from relay.intake import data
from relay.intake.data import BARE, TOO_BIG, TOO_LONG, read_message


async def read(raw: bytes, *, max_size: int = 10_000, max_line: int = 1000,
               fast: bool = True, piece: int = data.PIECE, grant: data.Grant | None = None
               ) -> tuple[str | None, bytes, bytes]:
    """(problem, body, what is left in the stream after the end of data)."""
    reader = asyncio.StreamReader(limit=max_line)
    reader.feed_data(raw)
    reader.feed_eof()
    if not fast:
        body = data._Body(max_size, max_line, grant or data._Unlimited())
        problem, parts = await data._line_by_line(reader, body)
    else:
        problem, parts = await read_message(reader, max_size=max_size, max_line=max_line,
                                            piece=piece, grant=grant)
    return problem, b"".join(parts), await reader.read()


@pytest.mark.parametrize("fast", [True, False])
async def test_end_of_data_and_unstuffing(fast: bool) -> None:
    assert await read(b".\r\nQUIT\r\n", fast=fast) == (None, b"", b"QUIT\r\n")
    got = await read(b"a\r\n..b\r\n.c\r\n\r\n.\r\nNEXT\r\n", fast=fast)
    assert got == (None, b"a\r\n.b\r\nc\r\n\r\n", b"NEXT\r\n")


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("fake", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n",
                                  b"\r\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"])
async def test_fake_ends_are_data_and_refuse_the_message(fake: bytes, fast: bool) -> None:
    raw = b"x" + fake + b"MAIL FROM:<e@evil.test>\r\nDATA\r\nz\r\n.\r\nQUIT\r\n"
    assert await read(raw, fast=fast) == (BARE, b"", b"QUIT\r\n")


async def test_limits() -> None:
    assert (await read(b"a" * 20 + b"\r\n" + b"b\r\n.\r\n", max_line=10))[:2] == (TOO_LONG, b"")
    assert (await read(b"a\r\n" + b"b" * 20 + b"\r\n.\r\n", max_line=10))[:2] == (TOO_LONG, b"")
    body = b"y" * 98 + b"\r\n"
    assert (await read(body * 100 + b".\r\n", max_size=10_000))[0] is None  # exactly 10000
    got = await read(body * 101 + b".\r\nRSET\r\n", max_size=10_000)
    assert got == (TOO_BIG, b"", b"RSET\r\n")
    # far over the limit: the slow path takes over, keeps nothing, still finds the end
    got = await read(body * 2000 + b"\r\n.\r\nRSET\r\n", max_size=10_000)
    assert got == (TOO_BIG, b"", b"RSET\r\n")


async def test_fast_and_slow_paths_agree_on_random_input() -> None:
    """Whole-buffer reference (the old fast path, kept here as the oracle), the piece
    reader with every piece size from 5 octets up (CRLF and CRLF.CRLF split across
    pieces), and the line-by-line path all agree."""
    rng = random.Random(7)
    alphabet = [b"a", b".", b"\r\n", b"\r", b"\n", b"\x00", b"\r\n.", b"x" * 30]
    for i in range(3000):
        raw = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        raw += b"\r\n.\r\nTAIL"
        expected = oracle(raw, max_size=200, max_line=60)
        fast = await read(raw, max_size=200, max_line=60)
        tiny = await read(raw, max_size=200, max_line=60, piece=5 + i % 40)
        slow = await read(raw, max_size=200, max_line=60, fast=False)
        assert fast == tiny == slow == expected, raw


def oracle(raw: bytes, *, max_size: int, max_line: int) -> tuple[str | None, bytes, bytes]:
    """The message read all at once, the obvious way (what the readers must agree with)."""
    data_, _, rest = (b"\r\n" + raw).partition(b"\r\n.\r\n")
    data_ = data_[2:] + b"\r\n" if data_ != b"" else b""
    body = (b"\r\n" + data_).replace(b"\r\n.", b"\r\n")[2:]
    problems = []
    if data.bare_characters(data_):
        problems.append(BARE)
    if data_ and max(map(len, data_.split(b"\r\n"))) > max_line:
        problems.append(TOO_LONG)
    if len(body) > max_size:
        problems.append(TOO_BIG)
    return (problems[0], b"", rest) if problems else (None, body, rest)


async def test_memory_grant_refuses_what_the_budget_cannot_hold() -> None:
    from relay.intake.budget import COPIES, MemoryBudget

    budget = MemoryBudget(1000 * COPIES)
    grant = await budget.grant(100)
    assert grant is not None and budget.used == 100 * COPIES
    line = b"y" * 98 + b"\r\n"
    got = await read(line * 20 + b".\r\nNEXT\r\n", grant=grant, piece=64)  # 2000 octets
    assert got == (data.MEMORY, b"", b"NEXT\r\n")  # read to its end, nothing kept
    grant.release()
    assert budget.used == 0
    grant = await budget.grant(100)
    assert grant is not None
    got = await read(line * 5 + b".\r\n", grant=grant, piece=64)
    assert got == (None, line * 5, b"") and budget.used == 500 * COPIES
    grant.release()
    assert budget.used == 0


async def test_session_sets_every_attribute_aiosmtpd_sets() -> None:
    """IntakeSession skips SMTP.__init__; it must still set what SMTP.__init__ sets."""
    from relay.intake.core import Intake, IntakeSettings
    from relay.intake.session import IntakeSession

    loop = asyncio.get_running_loop()
    reference = SMTP(object(), loop=loop)
    ours = IntakeSession(Intake(IntakeSettings(hostname="relay.test"), sink=None), loop)  # type: ignore[arg-type]
    missing = set(vars(reference)) - set(vars(ours))
    assert missing == set(), missing
