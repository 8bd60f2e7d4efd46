"""The one writer task of a store: every write of this process goes through it.

Group commit: callers put work on a queue and await a future; the writer takes
everything pending (up to `batch_max` items), runs it in ONE transaction, COMMITs, and
only then resolves the futures. While one COMMIT (an fsync) is in flight, new work
piles up and goes into the next transaction, so many concurrent callers share fsyncs.

Two kinds of work:
- inserts (enqueue): consecutive ones are written with `executemany`;
- operations (`async fn(conn) -> value`): each runs inside a SAVEPOINT, so a logical
  error in one (an IntegrityError, a RelayError) is rolled back alone.
A storage failure (disk full, I/O error, lock timeout, a database that went away) fails
the whole batch: every caller of it gets the StoreError and nothing of the batch is
committed. The writer itself survives, and the next batch tries again (reopening the
connection after I/O errors or a lost server), so intake resumes by itself when the
problem goes away.

The writer is the same for every backend; what differs (how to connect, BEGIN, how an
accepted message is inserted, what an error means) is the backend's `Dialect`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from relay import log
from relay.errors import RelayError, StorageUnavailable, StoreError
from relay.store.conn import Conn, Op

Operation = Op
T = TypeVar("T")


class Dialect(Protocol):
    """What the writer needs to know of a backend."""

    where: str  # the database, for messages: a path or a URL without password
    begin: str  # the statement that opens a write transaction

    async def connect(self) -> Any: ...

    def wrap(self, raw: Any) -> Conn: ...

    async def transaction(self, raw: Any, body: Callable[[Conn], Awaitable[T]]) -> T:
        """`body(conn)` over `raw` (SQLite: driven whole in the connection's thread, one
        hop; PostgreSQL: on the event loop, one round trip per statement)."""
        ...

    async def insert(self, conn: Conn, messages: list[tuple[Any, ...]],
                     recipients: list[tuple[Any, ...]]) -> None:
        """Insert accepted messages (and their bodies) and their recipients."""
        ...

    def logical(self, exc: BaseException) -> bool:
        """A failure of one operation's own (a constraint), rolled back alone."""
        ...

    def storage_error(self, exc: BaseException) -> StoreError: ...

    def is_full(self, exc: BaseException) -> bool: ...

    def needs_reopen(self, exc: BaseException) -> bool: ...

    async def rollback(self, raw: Any) -> bool:
        """Roll back an open transaction; False when the connection is unusable."""
        ...

    async def close(self, raw: Any) -> None: ...


class Turn(Protocol):
    """Whose turn it is to write, among the processes writing to one SQLite file (the
    intake workers of one relay: relay.workers). Taken before a batch is gathered, so
    that the work piling up while another process commits goes into one transaction
    (SQLite's own lock would let each process commit whatever it had when it began to
    wait, and wake it by polling); given back after the COMMIT."""

    async def acquire(self) -> None: ...

    def release(self) -> None: ...


@dataclass
class _Insert:
    message: tuple[Any, ...]
    recipients: list[tuple[Any, ...]]
    result: str
    future: asyncio.Future[Any]


@dataclass
class _Op:
    fn: Operation | None
    future: asyncio.Future[Any]
    prepare: Callable[[], Operation] | None = None


_STOP = object()


class Writer:
    def __init__(
        self,
        dialect: Dialect,
        conn: Any,
        *,
        batch_max: int,
        on_commit: Callable[[bool], None] | None = None,
        turn: Turn | None = None,
    ) -> None:
        self._dialect = dialect
        self._turn = turn
        self._conn: Any = conn
        self._batch_max = max(1, batch_max)
        self._on_commit = on_commit
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failing: str | None = None  # "full" | "unavailable" while writes fail
        self._fenced: StoreError | None = None  # set by fence(): every write fails
        self.commits = 0  # transactions committed (for tests and metrics)
        self.items = 0  # items committed

    @property
    def dialect(self) -> Dialect:
        return self._dialect

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="store-writer")

    def insert(self, message: tuple[Any, ...], recipients: list[tuple[Any, ...]],
               result: str) -> asyncio.Future[Any]:
        self._check_open()
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Insert(message, recipients, result, fut))
        return fut

    async def run(self, fn: Operation) -> Any:
        """Run `fn(conn)` inside the writer's next transaction; its value after COMMIT."""
        return await self.submit(fn)

    def submit(self, fn: Operation | None = None, *,
               prepare: Callable[[], Operation] | None = None) -> asyncio.Future[Any]:
        """Queue `fn(conn)` at once (not awaiting it): it shares the next group commit with
        whatever is submitted right after it; the future resolves after that COMMIT.

        `prepare()` instead of `fn`: called on the event loop just before the transaction
        that runs it begins, it returns the operation — so that an operation can take
        what was buffered until then (many jobs' results in one statement). The
        operation itself may run in another thread (SQLite): it must touch nothing of
        the event loop and no shared state."""
        if (fn is None) == (prepare is None):
            raise TypeError("submit() takes fn or prepare")
        self._check_open()
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(fn, fut, prepare))
        return fut

    def _check_open(self) -> None:
        if self._fenced is not None:
            raise self._fenced
        if self._closing:
            raise StorageUnavailable(f"queue database {self._dialect.where} is closing")

    def fence(self, error: StoreError) -> None:
        """From now on every write fails with `error`, also those already queued (the
        database was found damaged: nothing more goes into it)."""
        self._fenced = error

    async def close(self) -> None:
        """Finish everything already submitted, then close the connection."""
        if self._closing:
            return
        self._closing = True
        self._queue.put_nowait(_STOP)
        if self._task is not None:
            await self._task
        if self._conn is not None:
            await self._dialect.close(self._conn)
            self._conn = None

    async def _loop(self) -> None:
        stop = False
        while not stop:
            item = await self._queue.get()
            if item is _STOP:
                break
            turn = await self._take_turn()
            batch = [item]
            while len(batch) < self._batch_max and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            try:
                await self._run_batch(batch)
            except BaseException as exc:  # never let the writer die with futures pending
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(self._dialect.storage_error(exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                if turn is not None:
                    turn.release()

    async def _take_turn(self) -> Turn | None:
        """The write turn (if any), or None when it cannot be had: it only orders the
        processes; SQLite's own lock still keeps them apart."""
        if self._turn is None:
            return None
        try:
            await self._turn.acquire()
        except OSError:
            return None
        return self._turn

    async def _run_batch(self, batch: Sequence[_Insert | _Op]) -> None:
        live = [it for it in batch if not it.future.cancelled()]
        if not live:
            return
        if self._fenced is not None:
            for it in live:
                if not it.future.done():
                    it.future.set_exception(self._fenced)
            return
        d = self._dialect
        raw = None
        try:
            for it in live:  # on the event loop, just before the transaction
                if isinstance(it, _Op) and it.prepare is not None:
                    it.fn, it.prepare = it.prepare(), None
            if self._conn is None:
                self._conn = await d.connect()
            raw = self._conn

            async def body(conn: Conn) -> list[tuple[bool, Any]]:
                return await self._transaction(conn, live)

            results = await d.transaction(raw, body)
        except Exception as exc:
            await self._failed(raw, exc, live)
            return
        self.commits += 1
        self.items += len(live)
        if self._failing:
            self._failing = None
            log.event("storage_recovered", path=d.where)
        for it, (ok, value) in zip(live, results, strict=True):
            if it.future.done():
                continue
            if ok:
                it.future.set_result(value)
            else:
                it.future.set_exception(value)
        if self._on_commit is not None:
            self._on_commit(any(isinstance(it, _Insert) for it in live))

    async def _transaction(self, conn: Conn, live: Sequence[_Insert | _Op]
                           ) -> list[tuple[bool, Any]]:
        """BEGIN, every item, COMMIT (SQLite: in the connection's thread; touches no
        future and nothing of the event loop)."""
        d = self._dialect
        results: list[tuple[bool, Any]] = []
        await conn.execute(d.begin)
        i = 0
        while i < len(live):
            it = live[i]
            if isinstance(it, _Insert):
                j = i
                while j < len(live) and isinstance(live[j], _Insert):
                    j += 1
                inserts: list[_Insert] = live[i:j]  # type: ignore[assignment]
                await d.insert(conn, [x.message for x in inserts],
                               [r for x in inserts for r in x.recipients])
                results.extend((True, x.result) for x in inserts)
                i = j
                continue
            results.append(await self._run_op(conn, it))
            i += 1
        await conn.execute("COMMIT")
        return results

    async def _run_op(self, conn: Conn, it: _Op) -> tuple[bool, Any]:
        await conn.execute("SAVEPOINT op")
        try:
            assert it.fn is not None
            value = await it.fn(conn)
        except Exception as exc:
            if not (isinstance(exc, RelayError) or self._dialect.logical(exc)):
                raise
            await conn.execute("ROLLBACK TO SAVEPOINT op")
            await conn.execute("RELEASE SAVEPOINT op")
            if isinstance(exc, RelayError):
                return False, exc
            return False, self._dialect.storage_error(exc)
        await conn.execute("RELEASE SAVEPOINT op")
        return True, value

    async def _failed(self, raw: Any, exc: BaseException, live: Sequence[Any]) -> None:
        d = self._dialect
        err = d.storage_error(exc)
        kind = "full" if d.is_full(exc) else "unavailable"
        if self._failing != kind:  # log the change, not every failed batch
            log.event("storage_error", level="error", path=d.where, kind=kind,
                      detail=str(exc))
        self._failing = kind
        if raw is not None:
            reopen = d.needs_reopen(exc)
            try:
                if not await d.rollback(raw):
                    reopen = True
            except Exception:
                reopen = True
            if reopen:
                self._conn = None
                try:
                    await d.close(raw)
                except Exception:
                    pass
        for it in live:
            if not it.future.done():
                it.future.set_exception(err)
