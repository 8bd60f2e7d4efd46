"""`listener.workers` (relay.workers): the key's values, and each worker's share of the
listener's limits (the config's numbers are the relay's totals)."""

from __future__ import annotations

import os

import pytest

from relay import config as cfgmod
from relay.errors import ConfigError
from relay.intake.core import IntakeSettings
from relay.store.ids import IdGenerator, id_time
from relay.workers import share


def listener(**values: object) -> cfgmod.ListenerConfig:
    return cfgmod.build({"listener": values}, source="test").listener


def test_default_is_one_process_and_auto_is_the_usable_cpus() -> None:
    assert listener().workers == 1 and listener().effective_workers == 1
    assert listener(workers="auto").effective_workers == min(31, len(os.sched_getaffinity(0)))
    assert listener(workers=3).effective_workers == 3


@pytest.mark.parametrize("bad", [0, -1, 32, "many"])
def test_bad_worker_counts_name_the_key(bad: object) -> None:
    with pytest.raises(ConfigError, match="workers"):
        listener(workers=bad)


def test_one_worker_keeps_the_limits() -> None:
    lc = listener()
    assert share(lc, 1) is lc


def test_each_worker_enforces_its_share_of_the_totals() -> None:
    lc = listener(max_connections=201, max_connections_per_ip=51)
    s = IntakeSettings.from_config(share(lc, 2), "relay.test")
    assert s.max_connections == 101  # rounded up: 2 x 101 >= 201
    assert s.max_connections_per_ip == 26
    assert s.reserved_connections == 20  # a fifth of 201 (40), halved
    assert s.data_memory_limit == 64 * 2**20  # 128 MiB, halved


def test_a_share_of_memory_still_takes_the_largest_message() -> None:
    lc = listener(max_message_size="50MB", data_memory_limit="120MB")
    s = IntakeSettings.from_config(share(lc, 4), "relay.test")
    assert s.data_memory_limit == 100_000_000  # twice max_message_size, not 30 MB


def test_reserved_slots_stay_below_a_small_share() -> None:
    lc = listener(max_connections=4, reserved_connections=3)
    s = IntakeSettings.from_config(share(lc, 4), "relay.test")
    assert s.max_connections == 1 and s.reserved_connections == 0


def test_tagged_ids_of_two_workers_never_meet() -> None:
    """Two workers' ids in the same microsecond differ by their tag (random bits alone
    would meet once in 32,768 such pairs), and each still sorts by time."""
    a, b = IdGenerator(1), IdGenerator(2)
    ids_a = [a.next(1_700_000_000.0) for _ in range(2000)]
    ids_b = [b.next(1_700_000_000.0) for _ in range(2000)]
    assert not set(ids_a) & set(ids_b)
    assert ids_a == sorted(ids_a) and len(set(ids_a)) == 2000
    assert {i[13] for i in ids_a} == {"1"} and {i[13] for i in ids_b} == {"2"}
    assert id_time(ids_a[0]) == 1_700_000_000.0
