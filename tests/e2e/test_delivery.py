"""End to end: `relay serve` as a subprocess, a real validating Unbound over signed test
zones, real aiosmtpd destinations with generated certificates on loopback.

Mail goes in through smtplib; each test waits for the relay's log events and checks the
final recipient status, code and trace (`relay queue show --json`), what the destination
received (and how: TLS, SNI), and the NDR that reached the sender's mailbox.

Schedule: retry every 1 s for 3 s, so a failing recipient sees 4 attempts (at 0, 1, 2
and 3 s after arrival: relay.delivery.retry.planned_attempts) and then bounces with an NDR.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import time
from collections.abc import Iterator
from typing import Any

import pytest

from relay.delivery import retry
from tests.support.certs import Issued, make_ca, make_leaf
from tests.support.dnsbed import DnsBed, dnsbed_fixture
from tests.support.e2e import (
    delivering_relay,
    delivery_status,
    final,
    message_for,
    recipient,
    running,
    show,
    submit,
)
from tests.support.relayproc import RelayProc
from tests.support.smtpd import Destination, shared_port

SCHEDULE, LIFETIME = ["1s"], "3s"
ATTEMPTS = retry.planned_attempts([1.0], 3.0)

IP = {name: f"127.25.9.{i}" for i, name in enumerate(
    ["ok", "mismatch", "notls", "plain", "fb2", "mixed", "inject", "drop", "senderbox",
     "ta", "bogus", "fb1", "pkix", "postmaster", "expired", "early", "ascii"], start=1)}
PORT = shared_port([*IP.values(), "127.0.0.1"])

CA = make_ca("E2E Root")
INTER = make_ca("E2E Intermediate", issuer=CA)


def leaf(name: str) -> Issued:
    return make_leaf([name], issuer=INTER)


CERTS = {name: leaf(f"mx.{name}.test") for name in IP}
_DAY = dt.timedelta(days=1)
_NOW = dt.datetime.now(dt.UTC)
CERTS["expired"] = make_leaf(["mx.expired.test"], issuer=INTER, not_before=_NOW - 30 * _DAY,
                             not_after=_NOW - _DAY)
CERTS["early"] = make_leaf(["mx.early.test"], issuer=INTER, not_before=_NOW + _DAY,
                           not_after=_NOW + 30 * _DAY)
OTHER = make_leaf(["someone.else.test"])


def tlsa311(cert: Issued) -> str:
    return "3 1 1 " + cert.tlsa_data(1, 1).hex()


def host(bed: DnsBed, zone: str, ip: str, *, tlsa: str | None = None, signed: bool = True,
         mx: str = "mx") -> None:
    z = bed.zone(zone, signed=signed)
    z.add("@", "MX", f"10 {mx}.{zone}.").add(mx, "A", ip)
    if tlsa:
        z.add(f"_{PORT}._tcp.{mx}", "TLSA", tlsa)


def world(bed: DnsBed) -> None:
    host(bed, "ok.test", IP["ok"], tlsa=tlsa311(CERTS["ok"]))
    host(bed, "mismatch.test", IP["mismatch"], tlsa=tlsa311(OTHER))
    host(bed, "notls.test", IP["notls"], tlsa=tlsa311(CERTS["notls"]))
    host(bed, "plain.test", IP["plain"], tlsa=tlsa311(OTHER), signed=False)
    host(bed, "mixed.test", IP["mixed"], tlsa=tlsa311(CERTS["mixed"]))
    host(bed, "inject.test", IP["inject"], tlsa=tlsa311(CERTS["inject"]))
    host(bed, "drop.test", IP["drop"], tlsa=tlsa311(CERTS["drop"]))
    host(bed, "senderbox.test", IP["senderbox"])
    host(bed, "postmaster.test", IP["postmaster"])
    host(bed, "pkix.test", IP["pkix"], tlsa="1 1 1 " + "ab" * 32)
    # DANE-TA: 2 0 1 names the intermediate the destination sends.
    host(bed, "ta.test", IP["ta"], tlsa="2 0 1 " + INTER.tlsa_data(0, 1).hex())
    host(bed, "bogus.test", IP["bogus"], tlsa=tlsa311(CERTS["bogus"]))
    bed.zone("bogus.test").break_rrsig(f"_{PORT}._tcp.mx", "TLSA")
    # Two MX: the first has no server (connection refused), the second works.
    fb = bed.zone("fallback.test")
    fb.add("@", "MX", "10 mx1.fallback.test.").add("@", "MX", "20 mx2.fallback.test.")
    fb.add("mx1", "A", IP["fb1"]).add(f"_{PORT}._tcp.mx1", "TLSA", tlsa311(CERTS["fb1"]))
    fb.add("mx2", "A", IP["fb2"]).add(f"_{PORT}._tcp.mx2", "TLSA", tlsa311(CERTS["fb2"]))
    bed.zone("nullmx.test").add("@", "MX", "0 .")
    # DANE-TA with a leaf past / before its validity period.
    ta_record = "2 0 1 " + INTER.tlsa_data(0, 1).hex()
    host(bed, "expired.test", IP["expired"], tlsa=ta_record)
    host(bed, "early.test", IP["early"], tlsa=ta_record)
    host(bed, "ascii.test", IP["ascii"])
    # The MX is this relay itself (its listener is on 127.0.0.1:PORT), also as 0.0.0.0.
    host(bed, "loop.test", "127.0.0.1")
    host(bed, "zero.test", "0.0.0.0")


dnsbed = dnsbed_fixture(world)


@pytest.fixture(scope="module")
def dests() -> Iterator[dict[str, Destination]]:
    chain = [INTER]
    made = {
        "ok": Destination(IP["ok"], PORT, tls=(CERTS["ok"], chain)),
        "mismatch": Destination(IP["mismatch"], PORT, tls=(CERTS["mismatch"], chain)),
        "notls": Destination(IP["notls"], PORT, starttls=False),
        "plain": Destination(IP["plain"], PORT),
        "fb2": Destination(IP["fb2"], PORT, tls=(CERTS["fb2"], chain)),
        "mixed": Destination(IP["mixed"], PORT, tls=(CERTS["mixed"], chain), replies={
            "rcpt:soft@mixed.test": (450, "4.2.1 mailbox busy"),
            "rcpt:hard@mixed.test": (550, "5.1.1 no such user")}),
        "inject": Destination(IP["inject"], PORT, tls=(CERTS["inject"], chain),
                              inject_after_starttls=b"250 injected\r\n"),
        "drop": Destination(IP["drop"], PORT, tls=(CERTS["drop"], chain), drop_in_data=1),
        "senderbox": Destination(IP["senderbox"], PORT),
        "postmaster": Destination(IP["postmaster"], PORT),
        "ta": Destination(IP["ta"], PORT, tls=(CERTS["ta"], chain)),
        "pkix": Destination(IP["pkix"], PORT, tls=(CERTS["pkix"], chain)),
        "bogus": Destination(IP["bogus"], PORT, tls=(CERTS["bogus"], chain)),
        "expired": Destination(IP["expired"], PORT, tls=(CERTS["expired"], chain)),
        "early": Destination(IP["early"], PORT, tls=(CERTS["early"], chain)),
        "ascii": Destination(IP["ascii"], PORT, smtputf8=False),
    }
    with running(made):
        yield made


@pytest.fixture(scope="module")
def relay(dnsbed: DnsBed, dests: dict[str, Destination],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProc]:
    with delivering_relay(tmp_path_factory.mktemp("relay-e2e"), dnsbed.nameserver, PORT,
                          listener={"port": PORT},
                          delivery={"retry_schedule": SCHEDULE, "max_lifetime": LIFETIME},
                          ndr={"postmaster": "pm@postmaster.test"},
                          metrics={"listen": "127.0.0.1:0"}) as proc:
        yield proc


def ndr_for(dests: dict[str, Destination], qid: str, box: str = "senderbox") -> Any:
    return message_for(dests[box], qid)


# --- the scenarios ----------------------------------------------------------------------


def test_dane_311_match_delivers_over_tls_with_sni(relay: RelayProc,
                                                   dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@ok.test"])
    ev = final(relay, qid, "bob@ok.test")
    assert ev["event"] == "delivered"
    msg = dests["ok"].wait_messages(1)[0]
    assert msg.tls and msg.tls_version in ("TLSv1.2", "TLSv1.3")
    assert msg.sni == "mx.ok.test"
    assert msg.mail_from == "alice@senderbox.test" and msg.rcpt_tos == ["bob@ok.test"]
    assert b"\r\n.leading dot\r\n" in msg.body  # dot-stuffing undone by the server
    info = show(relay, qid)
    r = recipient(info, "bob@ok.test")
    assert r["status"] == "delivered" and r["attempts"] == 1
    h = r["history"][-1]
    assert h["mx"] == "mx.ok.test" and h["ip"] == IP["ok"] and h["dnssec"] == "secure"
    assert h["dane"].startswith("authenticated") and "TLSv1" in h["tls"]
    att = relay.events("attempt", id=qid)
    assert att and att[-1]["security"] == "dane-authenticated"


def test_dane_ta_201_with_intermediate_in_chain(relay: RelayProc,
                                               dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@ta.test"])
    assert final(relay, qid, "bob@ta.test")["event"] == "delivered"
    assert dests["ta"].wait_messages(1)[0].tls


def test_mismatch_is_retried_then_bounced_with_one_ndr(relay: RelayProc,
                                                       dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@mismatch.test"])
    ev = final(relay, qid, "bob@mismatch.test")
    assert ev["event"] == "expired" and ev["code"] == "5.7.323"
    deferred = relay.events("deferred", id=qid)
    assert len(deferred) == ATTEMPTS - 1
    assert all(e["code"] == "4.7.323" for e in deferred)
    assert "tlsa-invalid: The domain failed DANE validation." in deferred[0]["reply"]
    info = show(relay, qid)
    r = recipient(info, "bob@mismatch.test")
    assert r["status"] == "bounced" and r["code"] == "5.7.323" and r["attempts"] == ATTEMPTS
    assert len(r["history"]) == ATTEMPTS
    # Nothing reached the destination: the handshake happened, no MAIL was sent.
    assert not dests["mismatch"].messages
    assert all("MAIL" not in c.verbs() for c in dests["mismatch"].connections)
    ndr = ndr_for(dests, qid)
    assert ndr.mail_from == "" and ndr.rcpt_tos == ["alice@senderbox.test"]
    blocks = delivery_status(ndr)
    assert blocks[0]["reporting-mta"] == "dns; relay.test"
    assert "arrival-date" in blocks[0]
    rcpt = blocks[1]
    assert rcpt["final-recipient"] == "rfc822; bob@mismatch.test"
    assert rcpt["remote-mta"] == "dns; mx.mismatch.test"
    assert rcpt["action"] == "failed" and rcpt["status"] == "5.7.323"
    assert "tlsa-invalid" in rcpt["diagnostic-code"]
    assert "last-attempt-date" in rcpt
    # Exactly one NDR for this message.
    time.sleep(1.5)
    assert sum(qid.encode() in m.body for m in dests["senderbox"].messages) == 1


def test_starttls_missing_where_tlsa_demands_it(relay: RelayProc,
                                                dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@notls.test"])
    ev = final(relay, qid, "bob@notls.test")
    assert ev["code"] == "5.7.321"
    assert not dests["notls"].messages  # never in cleartext


def test_only_pkix_usages_require_tls_without_authentication(
        relay: RelayProc, dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@pkix.test"])
    assert final(relay, qid, "bob@pkix.test")["event"] == "delivered"
    assert dests["pkix"].wait_messages(1)[0].tls


def test_insecure_zone_delivers_opportunistically(relay: RelayProc,
                                                  dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@plain.test"])
    assert final(relay, qid, "bob@plain.test")["event"] == "delivered"
    msg = dests["plain"].wait_messages(1)[0]
    assert not msg.tls  # the destination has no certificate: plain, as policy allows
    h = recipient(show(relay, qid), "bob@plain.test")["history"][-1]
    assert h["dnssec"] == "insecure"


def test_bogus_tlsa_defers_with_dnssec_invalid(relay: RelayProc,
                                               dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@bogus.test"])
    ev = final(relay, qid, "bob@bogus.test")
    assert ev["code"] == "5.7.324"
    assert not dests["bogus"].connections  # no connection to a host with bogus TLSA


def test_fallback_to_second_mx(relay: RelayProc, dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@fallback.test"])
    assert final(relay, qid, "bob@fallback.test")["event"] == "delivered"
    assert dests["fb2"].wait_messages(1)[0].tls
    hist = recipient(show(relay, qid), "bob@fallback.test")["history"]
    assert [h["mx"] for h in hist] == ["mx1.fallback.test", "mx2.fallback.test"]
    assert hist[0]["code"] == "4.4.1"


def test_per_recipient_mix_in_one_transaction(relay: RelayProc,
                                              dests: dict[str, Destination]) -> None:
    rcpts = ["ok@mixed.test", "soft@mixed.test", "hard@mixed.test"]
    qid = submit(relay, rcpts)
    assert final(relay, qid, "ok@mixed.test")["event"] == "delivered"
    hard = final(relay, qid, "hard@mixed.test")
    assert hard["event"] == "bounced" and hard["code"] == "5.1.1"
    soft = final(relay, qid, "soft@mixed.test")
    assert soft["event"] == "expired" and soft["code"] == "5.2.1"
    first = dests["mixed"].messages[0]
    assert first.rcpt_tos == ["ok@mixed.test"]
    # One NDR for the message, covering both failed recipients.
    blocks = delivery_status(ndr_for(dests, qid))
    finals = sorted(b["final-recipient"] for b in blocks[1:])
    assert finals == ["rfc822; hard@mixed.test", "rfc822; soft@mixed.test"]


def test_injection_after_starttls_is_never_read_as_tls(relay: RelayProc,
                                                       dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@inject.test"])
    ev = final(relay, qid, "bob@inject.test")
    assert ev["event"] == "expired" and ev["code"] == "5.7.321"
    # the code of "TLS required", the text of what happened (issue 10 item 9a)
    history = recipient(show(relay, qid), "bob@inject.test")["history"]
    assert history and all(h["reply"].startswith("STARTTLS response injection: ")
                           for h in history), history
    conns = dests["inject"].connections
    assert conns and all("MAIL" not in c.verbs() for c in conns)


def test_connection_dropped_mid_data_is_retried(relay: RelayProc,
                                                dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@drop.test"])
    assert final(relay, qid, "bob@drop.test")["event"] == "delivered"
    r = recipient(show(relay, qid), "bob@drop.test")
    assert r["attempts"] == 2
    assert r["history"][0]["code"] == "4.4.2"


def test_null_mx_bounces_at_once(relay: RelayProc, dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@nullmx.test"])
    ev = final(relay, qid, "bob@nullmx.test", timeout=10)
    assert ev["event"] == "bounced" and ev["code"] == "5.1.10"
    assert recipient(show(relay, qid), "bob@nullmx.test")["attempts"] == 1
    ndr_for(dests, qid)


def test_nxdomain_bounces_at_once(relay: RelayProc) -> None:
    qid = submit(relay, ["bob@no-such-domain.test"])
    ev = final(relay, qid, "bob@no-such-domain.test", timeout=10)
    assert ev["event"] == "bounced" and ev["code"] == "5.1.2"


def test_null_sender_is_never_sent_an_ndr(relay: RelayProc,
                                          dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@nullmx.test"], sender="")
    assert final(relay, qid, "bob@nullmx.test", timeout=10)["code"] == "5.1.10"
    time.sleep(1.0)
    assert not relay.events("ndr_sent", id=qid)
    boxes = dests["senderbox"].messages + dests["postmaster"].messages
    assert not [m for m in boxes if qid.encode() in m.body]


@pytest.mark.parametrize("domain", ["loop.test", "zero.test"])
def test_mx_pointing_at_the_relay_itself_is_a_loop(relay: RelayProc, domain: str) -> None:
    qid = submit(relay, [f"bob@{domain}"])
    ev = final(relay, qid, f"bob@{domain}", timeout=10)
    assert ev["event"] == "bounced" and ev["code"] == "5.4.6"
    assert len(relay.events("received")) < 200  # no copy of it came back in


def test_metrics_count_what_happened_and_nothing_failed_inside(relay: RelayProc) -> None:
    """Runs last: the Prometheus counters, read over HTTP, equal the events logged."""
    import urllib.request

    port = relay.wait_event("listening", service="metrics")["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()

    def value(metric: str) -> float:
        for line in text.splitlines():
            if line.startswith(metric + " "):
                return float(line.split()[-1])
        return 0.0

    assert value("relay_received_total") == len(relay.events("received")) > 10
    assert value("relay_delivered_total") == len(relay.events("delivered")) > 5
    assert value('relay_bounced_total{code="5.1.10"}') == len(
        relay.events("bounced", code="5.1.10")) >= 2
    assert value('relay_expired_total{code="5.7.323"}') >= 1
    authenticated = len(relay.events("attempt", security="dane-authenticated"))
    assert value('relay_dane_outcomes_total{code="",outcome="dane-authenticated"}') \
        == authenticated > 0
    assert value('relay_queue_recipients{status="delivered"}') >= 5
    assert not relay.events("internal_error")


def test_a_verified_connection_is_reused_for_the_next_message(
        relay: RelayProc, dests: dict[str, Destination]) -> None:
    first = submit(relay, ["reuse1@ta.test"])
    assert final(relay, first, "reuse1@ta.test")["event"] == "delivered"
    second = submit(relay, ["reuse2@ta.test"])  # within delivery.connection_cache_time
    assert final(relay, second, "reuse2@ta.test")["event"] == "delivered"
    conns = [c for c in dests["ta"].connections
             if any("reuse1@ta.test" in cmd for cmd in c.commands)]
    assert len(conns) == 1
    assert conns[0].verbs().count("MAIL") == 2  # one TLS session, two transactions
    assert conns[0].verbs().count("STARTTLS") == 1
    h2 = recipient(show(relay, second), "reuse2@ta.test")["history"][-1]
    assert h2["dane"].startswith("authenticated")  # the verdict the session was opened with


def test_dane_ta_leaf_expired_is_certificate_expired(relay: RelayProc,
                                                     dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@expired.test"])
    ev = final(relay, qid, "bob@expired.test")
    assert ev["event"] == "expired" and ev["code"] == "5.7.322"
    assert "certificate-expired" in relay.events("deferred", id=qid)[0]["reply"]
    assert not dests["expired"].messages


def test_dane_ta_leaf_not_yet_valid_is_tlsa_invalid(relay: RelayProc,
                                                    dests: dict[str, Destination]) -> None:
    qid = submit(relay, ["bob@early.test"])
    ev = final(relay, qid, "bob@early.test")
    assert ev["event"] == "expired" and ev["code"] == "5.7.323"
    assert not dests["early"].messages


def test_smtputf8_message_to_a_server_without_it_bounces_5_6_7(
        relay: RelayProc, dests: dict[str, Destination]) -> None:
    mark = relay.mark()
    with relay.smtp() as client:
        client.sendmail("alice@senderbox.test", ["bj\u00f6rn@ascii.test"],
                        b"Subject: utf8\r\n\r\nhej\r\n",
                        mail_options=["SMTPUTF8"])
    qid = str(relay.wait_event("received", after=mark)["id"])
    ev = final(relay, qid, "bj\u00f6rn@ascii.test")
    assert ev["event"] == "bounced" and ev["code"] == "5.6.7"
    assert not dests["ascii"].messages
    # The NDR about an SMTPUTF8 message is an RFC 6533 global report (issue 10 item 9b).
    report = ndr_for(dests, qid)
    parsed = email.message_from_bytes(report.body, policy=email.policy.default)
    assert parsed.get_param("report-type") == "global-delivery-status"
    assert [p.get_content_type() for p in parsed.iter_parts()] == [
        "text/plain", "message/global-delivery-status", "message/global-headers"]
    status = report.body.split(b"Content-Type: message/global-delivery-status")[1]
    assert "Final-Recipient: utf-8; bj\u00f6rn@ascii.test\r\n".encode() in status
    assert b"Status: 5.6.7\r\n" in status
