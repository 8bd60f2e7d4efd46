"""Stopping asyncio tasks for sure.

On Python 3.11 a cancellation can be lost (asyncio.wait_for swallows one that arrives
with the result, and code may catch CancelledError): `cancel_and_wait` cancels again
until each task has finished, so a stopping relay cannot hang on one of its tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object] | None], *,
                          patience: float = 0.5, attempts: int = 20) -> None:
    pending = {t for t in tasks if t is not None and not t.done()}
    for _ in range(attempts):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience)
    for task in pending:  # pragma: no cover - a task that refuses to end
        task.cancel()
