"""SMTP smuggling: bare CR, bare LF or NUL in DATA are refused, nothing is queued.

Each case sends, in one write, a message whose body contains a *fake* end of data
followed by a complete second transaction, then the real end of data. A relay that
took the fake sequence for the end would run the second transaction and queue a
message for a recipient the client never named. Ours must answer exactly one reply
for the whole thing (550 5.5.2), queue nothing, and keep the session usable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.relayproc import Dialog, RelayProc, split_received, start_relay

FAKE_ENDS = {
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CRLF-NUL.CRLF": b"\r\n\x00.\r\n",
    "CRLF.NUL-CRLF": b"\r\n.\x00\r\n",
}

SMUGGLED = (b"MAIL FROM:<attacker@evil.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            b"From: ceo@example.org\r\nSubject: smuggled\r\n\r\nwire the money\r\n")


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProc]:
    with start_relay(tmp_path_factory.mktemp("smuggling")) as r:
        yield r


def _open_data(d: Dialog) -> None:
    assert d.cmd("EHLO client.test")[0] == 250
    assert d.cmd("MAIL FROM:<sender@example.org>")[0] == 250
    assert d.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
    assert d.cmd("DATA")[0] == 354


@pytest.mark.parametrize("fake", list(FAKE_ENDS), ids=list(FAKE_ENDS))
def test_fake_end_of_data_with_pipelined_transaction(relay: RelayProc, fake: str) -> None:
    before = set(relay.queue_ids())
    with Dialog(relay.host, relay.port) as d:
        sid = relay.session_for(d)
        _open_data(d)
        d.send(b"Subject: hello\r\n\r\nfirst part" + FAKE_ENDS[fake] + SMUGGLED + b"\r\n.\r\n")
        code, text = d.reply()
        assert (code, text[0][:5]) == (550, "5.5.2"), text
        # the next reply is for our NOOP: the smuggled commands were data, not commands
        assert d.cmd("NOOP") == (250, ["2.0.0 Ok"])
        # the session is still usable for an honest message
        assert d.cmd("MAIL FROM:<sender@example.org>")[0] == 250
        assert d.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        assert d.cmd("DATA")[0] == 354
        code, text = d.cmd(b"Subject: honest\r\n\r\nok\r\n.")
        assert code == 250 and "queued as" in text[0]
        honest_id = text[0].rsplit(" ", 1)[1]
        assert d.cmd("QUIT")[0] == 221
    after = set(relay.queue_ids()) - before
    assert after == {honest_id}
    assert relay.recipients(honest_id) == ["rcpt@example.com"]
    relay.wait_event("disconnect", session=sid)
    rejected = relay.events("rejected", session=sid)
    assert [(e["command"], e["reply"][:9]) for e in rejected] == [("DATA", "550 5.5.2")]
    assert [e["id"] for e in relay.events("received", session=sid)] == [honest_id]


@pytest.mark.parametrize("payload", [
    b"a bare\nLF inside a line\r\n",
    b"a bare\rCR inside a line\r\n",
    b"a NUL \x00 byte\r\n",
    b"ends with a bare LF\n",
    b"CR before CRLF\r\r\n",
])
def test_bare_characters_anywhere_are_refused(relay: RelayProc, payload: bytes) -> None:
    before = set(relay.queue_ids())
    with Dialog(relay.host, relay.port) as d:
        _open_data(d)
        d.send(b"Subject: x\r\n\r\nline one\r\n" + payload + b"last line\r\n.\r\n")
        code, text = d.reply()
        assert (code, text[0][:5]) == (550, "5.5.2"), text
        assert d.cmd("QUIT")[0] == 221
    assert set(relay.queue_ids()) == before


def test_dot_stuffing_and_clean_crlf_are_kept_exactly(relay: RelayProc) -> None:
    """The control case: a clean message with dot-stuffed lines is stored byte for byte."""
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\t.\r\nend\r\n"
    stuffed = b"".join(b"." + ln if ln.startswith(b".") else ln
                       for ln in body.splitlines(keepends=True))
    with Dialog(relay.host, relay.port) as d:
        _open_data(d)
        d.send(stuffed + b".\r\n")
        code, text = d.reply()
        assert code == 250, text
        qid = text[0].rsplit(" ", 1)[1]
    _, stored = relay.messages()[qid]
    assert stored is not None
    assert split_received(stored)[1] == body


def test_real_end_then_pipelined_transaction_is_two_honest_messages(
        relay: RelayProc) -> None:
    """CRLF.CRLF *is* the end: what follows is an ordinary pipelined second transaction."""
    with Dialog(relay.host, relay.port) as d:
        _open_data(d)
        d.send(b"Subject: one\r\n\r\nfirst\r\n.\r\n"
               b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<second@example.com>\r\nDATA\r\n")
        first = d.reply()
        assert first[0] == 250
        assert d.reply()[0] == 250 and d.reply()[0] == 250
        assert d.reply()[0] == 354
        code, text = d.cmd(b"Subject: two\r\n\r\nsecond\r\n.")
        assert code == 250
    ids = [first[1][0].rsplit(" ", 1)[1], text[0].rsplit(" ", 1)[1]]
    assert [relay.recipients(i) for i in ids] == [["rcpt@example.com"], ["second@example.com"]]


def test_swaks_sends_a_clean_message(relay: RelayProc, tmp_path: Path) -> None:
    """A real client's ordinary message passes the same reader."""
    result = relay.swaks("--to", "rcpt@example.com", "--from", "s@example.org",
                         "--body", "line 1\nline 2\n.\nafter a lone dot")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "queued as" in result.stdout
