"""RCPT TO:<postmaster> (RFC 5321 §4.5.1) against `relay serve`, with real clients."""

from __future__ import annotations

from pathlib import Path

from tests.support.relayproc import NOT_ALLOWED_IP, Dialog, start_relay


def test_postmaster_is_accepted_from_anyone_and_routed(tmp_path: Path) -> None:
    with start_relay(tmp_path, ndr={"postmaster": "pm@ops.example"}) as relay:
        # a client that may not relay: <postmaster> only, in any case
        with Dialog(relay.host, relay.port, source=NOT_ALLOWED_IP) as d:
            d.cmd("EHLO client.test")
            assert d.cmd("MAIL FROM:<someone@outside.example>")[0] == 250
            assert d.cmd("RCPT TO:<b@example.com>")[0] == 554  # still no open relay
            assert d.cmd("RCPT TO:<postmaster@example.com>")[0] == 554
            assert d.cmd("RCPT TO:<Postmaster>")[0] == 250
            assert d.cmd("DATA")[0] == 354
            code, text = d.cmd(b"Subject: hello postmaster\r\n\r\nyour relay...\r\n.")
            assert code == 250, text
            qid = text[0].rsplit(" ", 1)[1]
        assert relay.recipients(qid) == ["pm@ops.example"]
        stored = relay.messages()[qid][1] or b""
        assert b"for <pm@ops.example>;" in stored
        # smtplib, an allowed client: postmaster beside an ordinary recipient
        with relay.smtp() as c:
            c.ehlo()
            c.mail("a@example.org")
            assert c.rcpt("postmaster")[0] == 250  # smtplib sends RCPT TO:<postmaster>
            assert c.rcpt("b@example.com")[0] == 250
            code, msg = c.data(b"Subject: two\r\n\r\nx\r\n")
            assert code == 250
        qid2 = msg.decode().rsplit(" ", 1)[1]
        assert relay.recipients(qid2) == ["pm@ops.example", "b@example.com"]
        assert not relay.events("internal_error")


def test_postmaster_without_a_configured_address_is_refused_clearly(tmp_path: Path) -> None:
    with start_relay(tmp_path) as relay, Dialog(relay.host, relay.port) as d:
        d.cmd("EHLO client.test")
        d.cmd("MAIL FROM:<a@example.org>")
        code, text = d.cmd("RCPT TO:<postmaster>")
        assert code == 550 and text[0].startswith("5.1.1 <postmaster>: no postmaster")
        assert d.cmd("NOOP")[0] == 250
