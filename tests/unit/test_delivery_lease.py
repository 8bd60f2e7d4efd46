"""relay.delivery.scheduler's view of a job's lease (a fake monotonic clock): a job opens
no SMTP transaction once its lease is lost, nor when the lease was not renewed for most of
its length (it could run out before the transaction ends)."""

from __future__ import annotations

from relay.delivery.scheduler import SAFETY, _Lease, node_owner


def test_renewed_lease_allows_transactions_until_close_to_its_end() -> None:
    now = [100.0]
    lease = _Lease(100.0, 30.0, lambda: now[0])
    assert lease.may_send()
    now[0] = 100.0 + 30.0 * (1 - SAFETY) - 0.01
    assert lease.may_send()
    now[0] = 100.0 + 30.0 * (1 - SAFETY)
    assert not lease.may_send()  # not renewed: it may run out before the transaction ends
    lease.renewed_at = now[0]  # a heartbeat got through
    assert lease.may_send()


def test_a_lost_lease_allows_nothing() -> None:
    lease = _Lease(0.0, 30.0, lambda: 1.0)
    lease.lost = True
    assert not lease.may_send()


def test_owners_name_the_node_and_differ_per_start() -> None:
    a, b = node_owner("relay-1"), node_owner("relay-1")
    assert a.startswith("relay-1/") and b.startswith("relay-1/") and a != b
