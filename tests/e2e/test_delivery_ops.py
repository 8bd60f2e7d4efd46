"""End to end, the operator's side of delivery: routes, `relay queue retry`, delay
warnings, an NDR that itself fails (to the postmaster, once), and `kill -9` while
deliveries are in flight (every accepted recipient still delivered at least once).

The schedule here is long (`1h`): a deferred recipient only moves again when a test
makes it due with `relay queue retry`.
"""

from __future__ import annotations

import email
import email.policy
import json
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.support.certs import make_ca, make_leaf
from tests.support.dnsbed import DnsBed, dnsbed_fixture
from tests.support.e2e import cli, delivering_relay, running, submit, wait_for
from tests.support.relayproc import RelayProc
from tests.support.smtpd import Destination, shared_port

IP = {name: f"127.25.7.{i}" for i, name in enumerate(
    ["corp", "routed", "later", "senderbox", "pmbox", "slow"], start=1)}
PORT = shared_port([*IP.values(), "127.0.0.1"])
CA = make_ca("Ops Root")
CERTS = {name: make_leaf([f"mx.{name}.test"], issuer=CA) for name in IP}
OTHER = make_leaf(["other.test"])


def world(bed: DnsBed) -> None:
    for name in ("later", "senderbox", "pmbox", "slow"):
        z = bed.zone(f"{name}.test")
        z.add("@", "MX", f"10 mx.{name}.test.").add("mx", "A", IP[name])
    # A route's host with a TLSA record that does not match: DANE applies on routes too.
    routed = bed.zone("routed.test")
    routed.add("mx", "A", IP["routed"])
    routed.add(f"_{PORT}._tcp.mx", "TLSA", "3 1 1 " + OTHER.tlsa_data(1, 1).hex())
    bed.zone("nullmx.test").add("@", "MX", "0 .")


dnsbed = dnsbed_fixture(world)


@pytest.fixture(scope="module")
def dests() -> Iterator[dict[str, Destination]]:
    made = {name: Destination(IP[name], PORT, tls=(CERTS[name], [CA])) for name in IP}
    made["later"].replies["rcpt:bob@later.test"] = (451, "4.3.0 try again later")
    with running(made):
        yield made


@pytest.fixture(scope="module")
def relay(dnsbed: DnsBed, dests: dict[str, Destination],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProc]:
    with delivering_relay(
        tmp_path_factory.mktemp("relay-ops"), dnsbed.nameserver, PORT,
        delivery={"retry_schedule": ["1h"], "max_lifetime": "1d", "lease": "3s"},
        ndr={"postmaster": "pm@pmbox.test", "delay_warning": "1s"},
        routes=[
            {"domain": "corp.test", "hosts": [f"{IP['corp']}:{PORT}"], "tls": "encrypt"},
            {"domain": ".dane-route.test", "hosts": [f"mx.routed.test:{PORT}"]},
        ],
    ) as proc:
        yield proc


def test_route_to_an_ip_hop_with_mandatory_tls(relay: RelayProc,
                                               dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["ceo@corp.test"])  # corp.test is not in DNS at all
    ev = relay.wait_event("delivered", id=qid, timeout=20)
    assert ev["recipient"] == "ceo@corp.test"
    msg = dests["corp"].wait_messages(1)[0]
    assert msg.tls and msg.rcpt_tos == ["ceo@corp.test"]


def test_route_host_with_secure_tlsa_still_gets_dane(relay: RelayProc,
                                                     dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["x@eu.dane-route.test"])
    ev = relay.wait_event("deferred", id=qid, timeout=20)
    assert ev["code"] == "4.7.323"
    assert not dests["routed"].messages


def test_delay_warning_then_queue_retry_delivers(relay: RelayProc,
                                                 dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@later.test"])
    ev = relay.wait_event("deferred", id=qid, timeout=20)
    assert ev["code"] == "4.3.0"
    # Second attempt after the warning time (1 s): the scheduler warns, once.
    time.sleep(1.2)
    assert cli(relay, "queue", "retry", qid).returncode == 0
    relay.wait_event("delay_warning", id=qid, timeout=20)
    warning = wait_for(lambda: [m for m in dests["senderbox"].messages
                                if qid.encode() in m.body and b"delayed" in m.body.lower()],
                       what="the delay warning")[0]
    parsed = email.message_from_bytes(warning.body, policy=email.policy.default)
    ds = next(p for p in parsed.iter_parts()
              if p.get_content_type() == "message/delivery-status")
    blocks = [{k.lower(): str(v) for k, v in b.items()} for b in ds.get_payload()]
    assert blocks[1]["action"] == "delayed" and blocks[1]["status"].startswith("4.")
    assert "will-retry-until" in blocks[1]
    # The destination recovers; the operator makes the work due now.
    dests["later"].replies.pop("rcpt:bob@later.test")
    r = cli(relay, "queue", "retry", qid)
    assert r.returncode == 0, r.stderr
    relay.wait_event("delivered", id=qid, timeout=20)
    info = json.loads(cli(relay, "queue", "show", qid, "--json").stdout)
    rec = info["recipients"][0]
    assert rec["status"] == "delivered" and rec["attempts"] == 3
    assert len(relay.events("delay_warning", id=qid)) == 1


def test_failed_ndr_goes_once_to_the_postmaster(relay: RelayProc,
                                                dests: dict[str, Destination]) -> None:
    # The sender's own domain has a null MX: its NDR cannot be delivered either.
    qid = submit(relay, ["bob@nullmx.test"], sender="alice@nullmx.test")
    first = relay.wait_event("ndr_sent", id=qid, timeout=20)
    ndr_id = first["ndr_id"]
    second = relay.wait_event("ndr_sent", id=ndr_id, timeout=20)
    assert second["to"] == "pm@pmbox.test" and second["kind"] == "ndr-postmaster"
    msg = wait_for(lambda: [m for m in dests["pmbox"].messages if m.rcpt_tos ==
                            ["pm@pmbox.test"]], what="the postmaster copy")[0]
    assert msg.mail_from == ""
    # The postmaster copy is not itself reported on (nothing further is queued for it).
    time.sleep(1.0)
    assert not relay.events("ndr_sent", id=second["ndr_id"])


def test_an_attempt_longer_than_the_lease_is_not_run_twice(
        relay: RelayProc, dests: dict[str, Destination]) -> None:
    slow = dests["slow"]
    slow.greeting_delay = 4.5  # longer than delivery.lease (3 s)
    try:
        tag = f"lease-{uuid.uuid4().hex[:6]}"
        qid = submit(relay, [f"{tag}@slow.test"], tag=tag)
        relay.wait_event("delivered", id=qid, timeout=30)
        time.sleep(4.0)  # a second claim at lease expiry (3 s) would have delivered by now
        copies = [m for m in slow.messages if tag.encode() in m.body]
        assert len(copies) == 1
        assert len(relay.events("attempt", id=qid)) == 1
    finally:
        slow.greeting_delay = 0.0


def test_kill_9_during_deliveries_loses_nothing(relay: RelayProc,
                                                dests: dict[str, Destination]) -> None:
    slow = dests["slow"]
    slow.greeting_delay = 0.4  # deliveries are in flight when the relay dies
    tags = [f"k9-{i}-{uuid.uuid4().hex[:6]}" for i in range(20)]
    with relay.smtp() as client:
        for tag in tags:
            client.sendmail("alice@senderbox.test", [f"{tag}@slow.test"],
                            f"Subject: {tag}\r\n\r\n{tag}\r\n".encode())
    wait_for(lambda: relay.events("attempt", domain="slow.test") or
             slow.connections, what="deliveries to start")
    relay.kill()
    slow.greeting_delay = 0.0
    relay.restart(keep_port=True)

    def delivered() -> bool:
        seen = {t for t in tags for m in slow.messages if t.encode() in m.body}
        return len(seen) == len(tags)

    wait_for(delivered, timeout=40, what="every message delivered after kill -9")
    listing = json.loads(cli(relay, "queue", "list", "--all", "--json").stdout)
    slow_rcpts = [r for m in listing for r in m["recipients"]
                  if r["address"].startswith("k9-")]
    assert len(slow_rcpts) == len(tags)
    wait_for(lambda: all(r["status"] == "delivered" for m in json.loads(
        cli(relay, "queue", "list", "--all", "--json").stdout) for r in m["recipients"]
        if r["address"].startswith("k9-")), what="all slow.test recipients delivered")
