"""`relay serve`: the composition root. Builds everything from the config, runs it, drains.

Long-running parts are *components* (`Component`): started in order, watched while they
run (one ending on its own is fatal: the relay drains and exits 1), drained together on
the first SIGTERM/SIGINT with one deadline, then stopped in reverse order. The queue
store is opened before any component and closed after all of them, so every
transaction that was answered, or is still being answered, reaches its COMMIT first.
Adding the delivery scheduler or another server is one more entry in `components`.

Exit status: 0 after a clean stop, 1 on a runtime failure (store corrupt, port taken,
a component died), 2 on a configuration error; a second signal exits at once with 1.
Whatever stops the relay from starting or running is one `fatal` log event (a JSON line
like every other, naming the problem: the file, the folder and the uid, the key), never
a traceback on stderr: an operator tailing `docker compose logs -f relay` sees why.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import traceback
from collections.abc import Sequence
from typing import Protocol

from relay import __version__
from relay import config as configmod
from relay import log as relay_log
from relay.config import Config, QueueConfig
from relay.delivery.attempt import Deliverer, DeliverySettings
from relay.delivery.scheduler import Scheduler, node_owner
from relay.dns.resolve import Resolver
from relay.errors import ConfigError, CorruptDatabase, RelayError, StorageUnavailable
from relay.intake.auth import UserDb
from relay.intake.core import Intake, IntakeSettings
from relay.intake.listener import Listener, load_tls, load_users
from relay.log import event
from relay.ops.components import MetricsComponent, ResolverProbe
from relay.ops.preflight import default_gateways, gateway_warnings, queue_folder_problem
from relay.store import Store, open_store
from relay.sts.fetch import Trust, load_trust
from relay.sts.source import StsRefresher, StsSource
from relay.workers import WorkerPool

DRAIN_TIMEOUT = 30.0  # seconds the first signal waits for open work before stopping
STOP_TIMEOUT = 5.0  # seconds one component may take to stop after the drain
EXIT_GRACE = 2.0  # seconds left-over tasks get to end after their cancellation
RESOLVER_WAIT = 60.0  # seconds deliveries wait at start-up for a validating resolver
QUEUE_WAIT = 120.0  # seconds `serve` waits at start-up for a shared queue that does not answer
QUEUE_RETRY = 5.0  # seconds between its tries


class Component(Protocol):
    """A long-running part of the relay.

    - `start()`: bind, spawn, get ready; raises RelayError when it cannot.
    - `wait()`: returns (or raises) only if the component stops on its own, which the
      app treats as fatal; components without background work wait forever.
    - `drain(deadline)`: stop taking new work, finish what is in flight by `deadline`
      (event-loop time).
    - `stop()`: release everything at once; idempotent.
    """

    name: str

    async def start(self) -> None: ...

    async def wait(self) -> None: ...

    async def drain(self, deadline: float) -> None: ...

    async def stop(self) -> None: ...


class StartupError(RelayError):
    """A deployment problem found before anything starts; `fields` go into the `fatal`
    event (path, uid, ...)."""

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.fields = fields


class App:
    """Runs components until asked to stop (or one of them fails), then drains them."""

    def __init__(self, components: Sequence[Component], *,
                 drain_timeout: float = DRAIN_TIMEOUT) -> None:
        self.components = list(components)
        self.drain_timeout = drain_timeout
        self.stopping = False
        self._stop = asyncio.Event()
        self._reason = ""

    def request_stop(self, reason: str) -> None:
        if not self.stopping:
            self.stopping = True
            self._reason = reason
            self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        started: list[Component] = []
        watchers: dict[asyncio.Task[None], Component] = {}
        code = 0
        try:
            for component in self.components:
                await component.start()
                started.append(component)
            for component in started:
                watchers[loop.create_task(component.wait(), name=component.name)] = component
            stop_wait = loop.create_task(self._stop.wait())
            done, _ = await asyncio.wait([stop_wait, *watchers],
                                         return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            for task in done:
                if task in watchers:
                    exc = task.exception()
                    detail = f"{type(exc).__name__}: {exc}" if exc else "ended"
                    event("draining", level="error", reason=f"{watchers[task].name} {detail}")
                    self.stopping, code = True, 1
                    break
            else:
                event("draining", reason=self._reason, timeout=self.drain_timeout)
            deadline = loop.time() + self.drain_timeout
            await asyncio.gather(*(c.drain(deadline) for c in started), return_exceptions=True)
        finally:
            for task in watchers:
                task.cancel()
            for component in reversed(started):
                if not await _stop_one(component):
                    code = code or 1
        return code


class AfterResolver:
    """Starts a component (the delivery scheduler) once the resolver probe has found the
    resolver validating, or after `limit` seconds, whichever comes first.

    When the relay and its resolver start together (docker-compose starts both at once,
    and the relay does not wait for the resolver: intake never waits for DNS), the first
    deliveries would otherwise meet a resolver that is not answering yet and be deferred
    with 4.4.312 for a whole retry interval. Mail accepted meanwhile waits in the queue.
    A resolver that does not validate after `limit` seconds is an outage: deliveries then
    run and are deferred, visibly, as ever."""

    def __init__(self, inner: Component, probe: ResolverProbe,
                 limit: float = RESOLVER_WAIT) -> None:
        self.inner, self.probe, self.limit = inner, probe, limit
        self.name = inner.name
        self._starting: asyncio.Task[None] | None = None
        self._started = False

    async def start(self) -> None:
        self._starting = asyncio.create_task(self._start_later(), name=f"{self.name}-start")

    async def _start_later(self) -> None:
        try:
            await asyncio.wait_for(self.probe.validated.wait(), self.limit)
        except TimeoutError:
            pass
        await self.inner.start()
        self._started = True

    async def wait(self) -> None:
        assert self._starting is not None
        await self._starting  # a failed start is a failure of the component
        await self.inner.wait()

    async def drain(self, deadline: float) -> None:
        if self._started:
            await self.inner.drain(deadline)

    async def stop(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._started:
            await self.inner.stop()


class QueueWatch:
    """Ends (fatally: the relay drains and exits 1) when the background integrity check
    of the queue finds its file damaged (relay.store.sqlite.integrity; the store refuses
    every write from that moment, so intake answers 451 meanwhile). The check runs only
    after an unclean stop, beside the listener: start-up does not wait for it."""

    name = "queue"

    def __init__(self, store: Store) -> None:
        self.store = store

    async def start(self) -> None:
        return None

    async def wait(self) -> None:
        detail = await self.store.damaged()
        raise CorruptDatabase(f"queue database {self.store.backend.where} is damaged "
                              f"({detail})")

    async def drain(self, deadline: float) -> None:
        return None

    async def stop(self) -> None:
        return None


async def _stop_one(component: Component) -> bool:
    """`component.stop()`, bounded: a component that hangs (say, one that swallowed its
    cancellation) is logged and left behind rather than keeping the relay up."""
    task = asyncio.ensure_future(component.stop())
    done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
    if not done:
        # Cancelling stop() cancels what it awaits once more (asyncio.wait_for in 3.11
        # can lose a cancellation that races with a result).
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=EXIT_GRACE)
        event("internal_error", level="error", component=component.name,
              error=f"stop() did not return within {STOP_TIMEOUT:g}s"
                    + ("; it ended when cancelled" if done else ""))
        return bool(done) and (task.cancelled() or task.exception() is None)
    if task.cancelled() or task.exception() is None:
        return True
    exc = task.exception()
    event("internal_error", level="error", component=component.name,
          error=f"{type(exc).__name__}: {exc}")
    return False


def build_components(cfg: Config, store: Store, *, tls: ssl.SSLContext | None,
                     users: UserDb | None, trust: Trust | None = None) -> list[Component]:
    """Everything `relay serve` runs, from the config."""
    lc = cfg.listener
    hostname = lc.hostname or socket.getfqdn()
    owner = node_owner(cfg.queue.node or socket.gethostname())  # leases of this process
    listener: Listener | WorkerPool
    if lc.effective_workers > 1:  # intake in worker processes (relay.workers)
        listener = WorkerPool(cfg, store, lc.effective_workers, tls=tls is not None,
                              auth=users is not None and tls is not None)
    else:
        intake = Intake(IntakeSettings.from_config(lc, hostname,
                                                   postmaster=cfg.ndr.postmaster),
                        store, tls_context=tls, users=users)
        listener = Listener(intake, lc.host, lc.port)
    components: list[Component] = [listener]
    resolver = Resolver.from_config(cfg.dns)
    reporter = None
    if cfg.tlsrpt.enabled:
        from relay.tlsrpt.reporter import TlsReporter

        reporter = TlsReporter(store, resolver, cfg, hostname=hostname, owner=owner)
    sts: StsSource | None = None
    if cfg.mta_sts.enabled and cfg.delivery.enabled:
        sts = StsSource(resolver, cfg, store, trust=trust or load_trust(cfg.mta_sts.ca_file))
    probe = ResolverProbe(resolver)
    if cfg.delivery.enabled:
        settings = DeliverySettings.from_config(cfg, hostname,
                                                roots=sts.trust.roots if sts else None)
        scheduler: Component = Scheduler(
            store, Deliverer(resolver, cfg, settings, sts=sts), cfg, hostname=hostname,
            own_endpoints=lambda: listener.bound,
            tlsrpt_record=reporter.record if reporter else None, owner=owner)
        if cfg.dns.require_validating_resolver:
            scheduler = AfterResolver(scheduler, probe)
        components.append(scheduler)
    if sts is not None:
        components.append(StsRefresher(sts, store, owner=owner))
    if reporter is not None:
        components.append(reporter)
    components.append(probe)
    if cfg.metrics.listen:
        components.append(MetricsComponent(cfg, store, listener, resolver, owner=owner))
    components.append(QueueWatch(store))
    return components


def _install_signals(app: App) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if app.stopping:
            for component in app.components:  # intake workers go with the main process
                if isinstance(component, WorkerPool):
                    component.kill_now()
            event("stopped", level="warning", signal=name, forced=True)
            os._exit(1)
        app.request_stop(name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)


async def serve(cfg: Config, source: str) -> int:
    event("starting", config=source, version=__version__, pid=os.getpid())
    for warning in gateway_warnings(cfg.listener.allowed_networks, default_gateways()):
        event("gateway_allowed", level="warning", **warning)
    # Checked before the store is touched: a bad TLS or users file is a config error.
    tls = load_tls(cfg.listener)
    users = load_users(cfg.listener, tls)
    trust = load_trust(cfg.mta_sts.ca_file) \
        if cfg.mta_sts.enabled and cfg.delivery.enabled else None
    problem = None if cfg.queue.url else queue_folder_problem(cfg.queue.path)
    if problem is not None:
        message = problem.pop("error")
        raise StartupError(message, **problem)
    # The queue's integrity check runs only after an unclean stop, and then in the
    # background (QueueWatch stops the relay if it finds damage): start-up time does not
    # grow with the depth of the queue.
    store = await open_queue(cfg.queue, write_turns=cfg.listener.effective_workers > 1)
    try:
        app = App(build_components(cfg, store, tls=tls, users=users, trust=trust),
                  drain_timeout=cfg.listener.drain_timeout)
        _install_signals(app)
        code = await app.run()
    finally:
        await store.close()
    event("stopped", code=code)
    return code


async def open_queue(queue: QueueConfig, *, wait: float = QUEUE_WAIT,
                     every: float = QUEUE_RETRY, write_turns: bool = False) -> Store:
    """The configured queue for `serve`. A shared queue (PostgreSQL) that does not answer
    at start-up is tried again every `every` seconds for `wait` seconds, each failure one
    `queue_wait` warning naming it, before it is fatal: the database may be starting
    beside the relay (compose starts both at once), failing over, or coming back with a
    host that restarts all its containers at once and in no order. A SQLite queue is
    opened once (nothing to wait for); an error that is not unavailability (a schema
    newer than this relay) is fatal at once."""
    if not queue.url:
        return await open_store(queue, check="auto", write_turns=write_turns)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        try:
            return await open_store(queue)
        except StorageUnavailable as exc:
            left = deadline - loop.time()
            if left <= 0:
                raise
            pause = min(every, left)
            event("queue_wait", level="warning", error=str(exc), retry_in=round(pause, 1),
                  gives_up_in=round(left))
            await asyncio.sleep(pause)


def cmd_serve(args: argparse.Namespace) -> int:
    log_format = getattr(args, "log_format", None)
    try:
        path, explicit = configmod.resolve_path(getattr(args, "config", None), os.environ)
        cfg = configmod.load(getattr(args, "config", None))
    except ConfigError as exc:
        relay_log.configure(fmt=log_format or "json")
        return fatal(exc)
    relay_log.configure(fmt=log_format or cfg.log.format, level=cfg.log.level)
    source = str(path) if (explicit or path.exists()) else "defaults"
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(serve(cfg, source))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return fatal(exc)
    finally:
        _close_loop(loop)


def fatal(exc: BaseException) -> int:
    """Log why `relay serve` cannot go on as one `fatal` event; returns the exit status
    (2 for a configuration error, else 1). Only an unforeseen exception (a bug) carries
    its traceback, inside the event."""
    fields: dict[str, object] = {}
    if isinstance(exc, ConfigError):
        code, fields = 2, {"key": exc.key, "source": exc.source}
    elif isinstance(exc, StartupError):
        code, fields = 1, dict(exc.fields)
    elif isinstance(exc, RelayError):
        code = 1
    else:
        code = 1
        fields = {"traceback": "".join(traceback.format_exception(exc)).rstrip()}
    message = str(exc) if isinstance(exc, RelayError) else f"{type(exc).__name__}: {exc}"
    event("fatal", level="error", error=message, exit=code, **fields)
    return code


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Like asyncio.run's clean-up, but bounded: a task that ignores its cancellation
    cannot keep a stopped relay from exiting."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=EXIT_GRACE))
    loop.run_until_complete(loop.shutdown_asyncgens())
    asyncio.set_event_loop(None)
    loop.close()
