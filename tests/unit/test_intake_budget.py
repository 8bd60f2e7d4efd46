"""relay.intake.budget: the memory budget for messages in flight (asyncio, no sockets).
Messages are charged COPIES times their size."""

from __future__ import annotations

import asyncio
import platform

import pytest

from relay.intake.budget import COPIES, MemoryBudget, return_freed_memory

C = COPIES


async def test_grants_wait_in_order_and_are_served_on_release() -> None:
    budget = MemoryBudget(100 * C, wait=5)
    a = await budget.grant(60)
    assert a is not None and budget.used == 60 * C
    waiting = [asyncio.create_task(budget.grant(50)), asyncio.create_task(budget.grant(10))]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in waiting)  # 10 would fit, but it queues behind 50
    a.release()
    b, c = await asyncio.gather(*waiting)
    assert b is not None and c is not None and budget.used == 60 * C
    b.release()
    c.release()
    assert budget.used == 0 and budget.peak == 60 * C


async def test_a_grant_that_cannot_be_had_in_time_is_none() -> None:
    budget = MemoryBudget(100 * C, wait=0.1)
    held = await budget.grant(100)
    assert await budget.grant(1) is None
    assert budget.used == 100 * C and not budget._waiters
    assert held is not None
    held.release()
    assert (await budget.grant(1)) is not None


async def test_a_cancelled_waiter_takes_nothing() -> None:
    budget = MemoryBudget(100 * C, wait=5)
    held = await budget.grant(100)
    task = asyncio.create_task(budget.grant(50))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert held is not None
    held.release()
    assert budget.used == 0


async def test_grow_takes_from_the_budget_without_waiting() -> None:
    budget = MemoryBudget(100 * C, wait=5)
    g = await budget.grant(10)
    assert g is not None
    assert g.grow(8) and budget.used == 10 * C  # within what it holds
    assert g.grow(50) and budget.used == 58 * C
    other = await budget.grant(40)
    assert other is not None
    assert not g.grow(10)  # the budget is spent: refused at once
    g.shrink()
    g.release()
    other.release()
    assert budget.used == 0


async def test_an_oversized_ask_is_capped_at_the_limit() -> None:
    budget = MemoryBudget(100, wait=0.1)
    g = await budget.grant(10**9)
    assert g is not None and budget.used == 100
    g.release()


def test_return_freed_memory_on_glibc() -> None:
    assert return_freed_memory() in (True, False)  # never raises
    if platform.libc_ver()[0] == "glibc":
        assert return_freed_memory() is True
