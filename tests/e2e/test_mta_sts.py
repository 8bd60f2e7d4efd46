"""End to end, MTA-STS (RFC 8461): `relay serve` as a subprocess, a real validating
Unbound over test zones (unsigned, and signed for DANE beside MTA-STS), HTTPS policy
servers on port 443 of their own 127.x addresses and aiosmtpd destinations, both with
certificates from a test CA that the relay trusts through `mta_sts.ca_file`.

Schedule: retry every 1 s for 3 s, so a failing recipient sees 4 attempts and bounces.
"""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.delivery import retry
from tests.support.certs import Issued, make_ca, make_leaf, write_pair
from tests.support.dnsbed import DnsBed, dnsbed_fixture
from tests.support.e2e import (
    SENDER,
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
from tests.support.stsserver import PolicyServer, policy_text, sts_addr

SCHEDULE, LIFETIME = ["1s"], "3s"
ATTEMPTS = retry.planned_attempts([1.0], 3.0)
NAMES = ["enf", "selfsigned", "wrongname", "outside", "notls", "testing", "none", "p404",
         "p500", "drip", "recheck", "dane", "daneout", "senderbox", "rtls", "rtlsno",
         "danertls"]
IP = {n: f"127.25.12.{i}" for i, n in enumerate(NAMES, start=1)}
HTTPS = {n: sts_addr() for n in NAMES}
PORT = shared_port([*IP.values(), "127.0.0.1"])
CA = make_ca("MTA-STS E2E Root")
SIGNED = ("dane", "daneout", "danertls")
REQUIRETLS_DESTS = ("rtls", "danertls")


def domain(name: str) -> str:
    if name == "senderbox":
        return "senderbox.test"  # the submitting sender's domain (tests/support/e2e.py)
    return f"{name}.dane-sts.test" if name in SIGNED else f"{name}.sts.test"


def mx(name: str) -> str:
    return f"mx.{domain(name)}"


def cert(name: str) -> Issued:
    if name in ("selfsigned", "testing", "none", "p404", "p500", "drip", "dane", "daneout",
                "danertls"):
        return make_leaf([mx(name)])  # not web-PKI valid (self-signed)
    if name == "wrongname":
        return make_leaf(["other.sts.test"], issuer=CA)
    return make_leaf([mx(name)], issuer=CA)


CERTS = {n: cert(n) for n in NAMES}


def policy_for(name: str) -> str:
    if name == "testing":
        return policy_text("testing", mx(name))
    if name == "none":
        return policy_text("none")
    if name in ("outside", "recheck", "daneout"):
        return policy_text("enforce", f"mail.{domain(name)}")
    return policy_text("enforce", f"*.{domain(name)}")


def world(bed: DnsBed) -> None:
    plain = bed.zone("sts.test", signed=False)
    signed = bed.zone("dane-sts.test")
    box = bed.zone("senderbox.test", signed=False)
    for name in NAMES:
        z = signed if name in SIGNED else box if name == "senderbox" else plain
        d = domain(name)
        z.add(d, "MX", f"10 {mx(name)}.").add(mx(name), "A", IP[name])
        if name == "senderbox":
            continue
        z.add(f"_mta-sts.{d}", "TXT", '"v=STSv1; id=1;"').add(f"mta-sts.{d}", "A",
                                                               HTTPS[name])
        if name in SIGNED:
            z.add(f"_{PORT}._tcp.{mx(name)}", "TLSA",
                  "3 1 1 " + CERTS[name].tlsa_data(1, 1).hex())


dnsbed = dnsbed_fixture(world)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, PolicyServer]]:
    d = tmp_path_factory.mktemp("sts-e2e-certs")
    made = {n: PolicyServer(HTTPS[n], domain(n), ca=CA, policy=policy_for(n),
                            mode={"p404": "404", "p500": "500", "drip": "drip"}.get(n, "ok"),
                            directory=d)
            for n in NAMES if n != "senderbox"}
    for s in made.values():
        s.start()
    try:
        yield made
    finally:
        for s in made.values():
            s.stop()


@pytest.fixture(scope="module")
def dests() -> Iterator[dict[str, Destination]]:
    made = {n: Destination(IP[n], PORT, tls=(CERTS[n], []) if n != "senderbox" else None,
                           starttls=n != "notls", hostname=mx(n),
                           requiretls=n in REQUIRETLS_DESTS)
            for n in NAMES}
    with running(made):
        yield made


@pytest.fixture(scope="module")
def relay(dnsbed: DnsBed, dests: dict[str, Destination], servers: dict[str, PolicyServer],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProc]:
    work = tmp_path_factory.mktemp("relay-sts")
    ca_file = Path(work) / "ca.pem"
    ca_file.write_bytes(CA.pem)
    cert_file, key_file = write_pair(make_leaf(["relay.test"]), directory=Path(work))
    with delivering_relay(work, dnsbed.nameserver, PORT,
                          listener={"port": PORT, "tls_cert": str(cert_file),
                                    "tls_key": str(key_file)},
                          delivery={"retry_schedule": SCHEDULE, "max_lifetime": LIFETIME},
                          mta_sts={"ca_file": str(ca_file), "fetch_timeout": "2s",
                                   "connect_timeout": "2s"},
                          tlsrpt={"enabled": True}) as proc:
        yield proc


def history(relay: RelayProc, qid: str, rcpt: str) -> list[dict[str, str]]:
    return list(recipient(show(relay, qid), rcpt)["history"])


# --- enforce ---------------------------------------------------------------------------


def test_enforce_delivers_with_a_web_pki_certificate(relay: RelayProc,
                                                     dests: dict[str, Destination]) -> None:
    rcpt = f"bob@{domain('enf')}"
    qid = submit(relay, [rcpt])
    assert final(relay, qid, rcpt)["event"] == "delivered"
    msg = dests["enf"].wait_messages(1)[0]
    assert msg.tls and msg.sni == mx("enf")
    h = history(relay, qid, rcpt)[-1]
    assert h["policy"] == "mta-sts enforce id=1 (fetched)"
    assert h["dane"].startswith("MTA-STS: web-PKI valid")
    assert relay.events("attempt", id=qid)[-1]["security"] == "sts-authenticated"
    assert relay.events("sts_fetched", domain=domain("enf"))


@pytest.mark.parametrize("name, code, words", [
    ("selfsigned", "7.342", "no valid path to a trusted root"),
    ("wrongname", "7.342", "do not match mx.wrongname.sts.test"),
    ("outside", "7.343", "does not list mx.outside.sts.test"),
    ("notls", "7.341", "does not offer STARTTLS"),
])
def test_enforce_failures_defer_then_bounce_never_in_clear(
        relay: RelayProc, dests: dict[str, Destination], name: str, code: str,
        words: str) -> None:
    rcpt = f"bob@{domain(name)}"
    qid = submit(relay, [rcpt])
    ev = final(relay, qid, rcpt)
    assert ev["event"] == "expired" and ev["code"] == f"5.{code}"
    deferred = relay.events("deferred", id=qid)
    assert len(deferred) == ATTEMPTS - 1 and all(e["code"] == f"4.{code}" for e in deferred)
    assert "MTA-STS" in deferred[0]["reply"] and words in deferred[0]["reply"]
    assert not dests[name].messages  # never delivered, never in cleartext
    assert all("MAIL" not in c.verbs() for c in dests[name].connections)
    r = recipient(show(relay, qid), rcpt)
    assert r["code"] == f"5.{code}" and "MTA-STS" in r["reply"]
    assert r["history"][0]["policy"].startswith("mta-sts enforce id=1")
    ndr = message_for(dests["senderbox"], qid)
    block = delivery_status(ndr)[1]
    assert block["status"] == f"5.{code}" and "MTA-STS" in block["diagnostic-code"]


# --- testing, none, no policy -------------------------------------------------------------


def test_testing_delivers_and_records_the_failure(relay: RelayProc,
                                                  dests: dict[str, Destination]) -> None:
    rcpt = f"bob@{domain('testing')}"
    qid = submit(relay, [rcpt])
    assert final(relay, qid, rcpt)["event"] == "delivered"
    assert dests["testing"].wait_messages(1)[0].tls
    h = history(relay, qid, rcpt)[-1]
    assert h["policy"] == "mta-sts testing id=1 (fetched)"
    assert "MTA-STS testing, would fail" in h["dane"]


@pytest.mark.parametrize("name, why", [
    ("none", None), ("p404", "HTTP 404"), ("p500", "HTTP 500"), ("drip", "within 2s")])
def test_no_usable_policy_delivers_as_without_one(relay: RelayProc,
                                                  dests: dict[str, Destination],
                                                  servers: dict[str, PolicyServer],
                                                  name: str, why: str | None) -> None:
    rcpt = f"bob@{domain(name)}"
    qid = submit(relay, [rcpt])
    assert final(relay, qid, rcpt, timeout=30)["event"] == "delivered"
    assert dests[name].wait_messages(1)[0].tls  # opportunistic TLS, self-signed accepted
    h = history(relay, qid, rcpt)[-1]
    assert h["policy"].startswith("opportunistic")
    if why:
        failed = relay.events("sts_fetch_failed", domain=domain(name))
        assert failed and why in failed[0]["detail"]
        assert "mta-sts failed" in h["policy"]


# --- DANE beside MTA-STS (RFC 8461 §2) ------------------------------------------------------


def test_dane_wins_the_mx_cert_need_not_be_web_pki_valid(
        relay: RelayProc, dests: dict[str, Destination]) -> None:
    rcpt = f"bob@{domain('dane')}"
    qid = submit(relay, [rcpt])
    assert final(relay, qid, rcpt)["event"] == "delivered"
    assert relay.events("attempt", id=qid)[-1]["security"] == "dane-authenticated"
    h = history(relay, qid, rcpt)[-1]
    assert h["policy"] == "dane (mta-sts enforce id=1 (fetched): DANE takes precedence)"


def test_enforce_mx_filtering_applies_to_dane_hosts_too(
        relay: RelayProc, dests: dict[str, Destination]) -> None:
    rcpt = f"bob@{domain('daneout')}"
    qid = submit(relay, [rcpt])
    ev = final(relay, qid, rcpt)
    assert ev["code"] == "5.7.343"
    assert not dests["daneout"].connections


# --- RFC 8461 §5.1: a last look for a new policy before bouncing -----------------------------


def test_policy_is_checked_again_before_bouncing(relay: RelayProc,
                                                 dests: dict[str, Destination],
                                                 servers: dict[str, PolicyServer]) -> None:
    rcpt = f"bob@{domain('recheck')}"
    mark = relay.mark()
    qid = submit(relay, [rcpt])
    relay.wait_event("deferred", id=qid, after=mark, timeout=20)
    # The domain fixes its policy without changing the TXT id: the cached policy keeps
    # refusing the MX until the attempt that would bounce looks once more.
    servers["recheck"].policy = policy_text("enforce", mx("recheck"))
    ev = final(relay, qid, rcpt)
    assert ev["event"] == "delivered"
    deferred = relay.events("deferred", id=qid)
    assert deferred and all(e["code"] == "4.7.343" for e in deferred)
    assert len(relay.events("sts_fetched", domain=domain("recheck"))) == 2
    assert dests["recheck"].wait_messages(1)[0].tls


# --- TLS reporting (RFC 8460): what the sessions above added ---------------------------------


def test_tls_reports_count_sts_results(relay: RelayProc) -> None:
    data = json.loads(relay.cli("tlsrpt", "show", "--json").stdout)
    policies: dict[tuple[str, str], dict[str, Any]] = {}
    for period in data["open_periods"]:
        for rep in period["reports"]:
            for pol in rep["policies"]:
                p = pol["policy"]
                policies[(p["policy-domain"], p["policy-type"])] = pol

    def failures(dom: str) -> set[str]:
        pol = policies[(dom, "sts")]
        return {d["result-type"] for d in pol.get("failure-details", [])}

    ok = policies[(domain("enf"), "sts")]
    assert ok["summary"]["total-successful-session-count"] >= 1
    assert ok["policy"]["mx-host"] == [f"*.{domain('enf')}"]
    assert "mode: enforce" in ok["policy"]["policy-string"]
    assert failures(domain("selfsigned")) == {"certificate-not-trusted"}
    assert failures(domain("wrongname")) == {"certificate-host-mismatch"}
    assert failures(domain("notls")) == {"starttls-not-supported"}
    assert "validation-failure" in failures(domain("outside"))
    assert failures(domain("testing")) == {"certificate-not-trusted"}
    assert "sts-policy-fetch-error" in failures(domain("p500"))
    assert (mx("dane"), "tlsa") in policies  # DANE decided: a tlsa result


# --- relay check ------------------------------------------------------------------------


def test_check_shows_the_mta_sts_steps(relay: RelayProc) -> None:
    r = relay.cli("check", domain("enf"), "--json", check=False)
    rep = json.loads(r.stdout)
    assert r.returncode == 0, (rep["verdict"], rep["code"], rep["reply"], rep["summary"])
    assert rep["verdict"] == "sts-authenticated" and rep["code"] is None
    st = rep["mta_sts"]
    assert st["state"] == "policy" and st["mode"] == "enforce" and st["id"] == "1"
    assert st["txt"]["records"] == ["v=STSv1; id=1;"] and st["fetch"]["ok"]
    assert st["hosts"] == [{"name": mx("enf"), "sts": "enforce", "matches": True}]
    (conn,) = rep["hosts"][0]["connections"]
    assert conn["dane"]["webpki"]["ok"] and conn["security"] == "sts-authenticated"
    text = relay.cli("check", domain("enf"), check=False).stdout
    assert "MTA-STS (RFC 8461)" in text and "web-PKI" in text


@pytest.mark.parametrize("name, code, fix", [
    ("outside", "4.7.343", f'add "mx: {mx("outside")}"'),
    ("selfsigned", "4.7.342", "publicly trusted CA"),
    ("p404", None, "could not be fetched"),
])
def test_check_says_what_to_fix(relay: RelayProc, name: str, code: str | None,
                                fix: str) -> None:
    r = relay.cli("check", domain(name), "--json", check=False)
    rep = json.loads(r.stdout)
    assert rep["code"] == code
    assert r.returncode == (1 if code else 0)
    assert any(fix in line for line in rep["advice"]["mta_sts"]), rep["advice"]
    assert "administrator should fix" in relay.cli(
        "check", domain(name), check=False).stdout



# --- REQUIRETLS (RFC 8689) -----------------------------------------------------------------


def send_tls(relay: RelayProc, rcpt: str, *, requiretls: bool = True,
             headers: str = "") -> str:
    """Submit over STARTTLS, with MAIL FROM ... REQUIRETLS; the queue id."""
    mark = relay.mark()
    tag = uuid.uuid4().hex[:8]
    body = (f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: rtls {tag}\r\n{headers}"
            f"Message-ID: <{tag}@client.test>\r\n\r\nsecret {tag}\r\n")
    with relay.smtp() as client:
        client.ehlo()
        assert not client.has_extn("requiretls")  # never offered outside TLS
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo()
        assert client.has_extn("requiretls")
        client.sendmail(SENDER, [rcpt], body.encode(),
                        mail_options=["REQUIRETLS"] if requiretls else [])
    return str(relay.wait_event("received", after=mark)["id"])


@pytest.mark.parametrize("name, security", [("rtls", "sts-authenticated"),
                                            ("danertls", "dane-authenticated")])
def test_requiretls_goes_to_an_authenticated_next_hop_that_offers_it(
        relay: RelayProc, dests: dict[str, Destination], name: str, security: str) -> None:
    rcpt = f"bob@{domain(name)}"
    qid = send_tls(relay, rcpt)
    assert show(relay, qid)["requiretls"] is True
    assert "REQUIRETLS" in relay.cli("queue", "show", qid).stdout
    assert final(relay, qid, rcpt)["event"] == "delivered"
    msg = message_for(dests[name], qid)
    assert msg.tls and "REQUIRETLS" in msg.mail_options
    assert relay.events("attempt", id=qid)[-1]["security"] == security


@pytest.mark.parametrize("name, code", [("rtlsno", "5.7.30"), ("senderbox", "5.7.10")])
def test_requiretls_bounces_at_once_never_in_clear(relay: RelayProc,
                                                   dests: dict[str, Destination], name: str,
                                                   code: str) -> None:
    rcpt = f"carol@{domain(name)}"
    qid = send_tls(relay, rcpt)
    ev = final(relay, qid, rcpt)
    assert ev["event"] == "bounced" and ev["code"] == code
    assert not relay.events("deferred", id=qid)  # no retries
    assert not any(qid.encode() in m.body and m.rcpt_tos == [rcpt]
                   for m in dests[name].messages)
    ndr = message_for(dests["senderbox"], f"{qid}.ndr")
    assert delivery_status(ndr)[1]["status"] == code


def test_requiretls_needs_tls_at_intake(relay: RelayProc) -> None:
    with relay.smtp() as client:
        client.ehlo()
        code, text = client.mail(SENDER, ["REQUIRETLS"])
    assert code == 530 and b"5.7.10" in text


def test_tls_required_no_is_ignored_by_default(relay: RelayProc) -> None:
    rcpt = f"dave@{domain('selfsigned')}"
    mark = relay.mark()
    qid = send_tls(relay, rcpt, requiretls=False, headers="TLS-Required: No\r\n")
    ev = relay.wait_event("deferred", id=qid, after=mark, timeout=20)
    assert ev["code"] == "4.7.342"


def test_tls_required_no_is_honoured_when_configured(
        dnsbed: DnsBed, dests: dict[str, Destination], servers: dict[str, PolicyServer],
        tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(CA.pem)
    cert_file, key_file = write_pair(make_leaf(["relay.test"]), directory=tmp_path)
    with delivering_relay(tmp_path, dnsbed.nameserver, PORT,
                          listener={"tls_cert": str(cert_file), "tls_key": str(key_file)},
                          delivery={"honor_tls_required_no": True},
                          mta_sts={"ca_file": str(ca_file)}) as other:
        rcpt = f"erin@{domain('selfsigned')}"
        qid = send_tls(other, rcpt, requiretls=False, headers="TLS-Required: No\r\n")
        assert final(other, qid, rcpt)["event"] == "delivered"
        out = f"erin@{domain('outside')}"  # its MX is not in the enforce policy
        qid_out = send_tls(other, out, requiretls=False, headers="TLS-Required: No\r\n")
        assert final(other, qid_out, out)["event"] == "delivered"
        # REQUIRETLS wins over the header field: 5.7.x, never delivered
        rcpt2 = f"fred@{domain('selfsigned')}"
        qid2 = send_tls(other, rcpt2, headers="TLS-Required: No\r\n")
        ev = other.wait_event("deferred", id=qid2, timeout=20)
        assert ev["code"] == "4.7.342"
