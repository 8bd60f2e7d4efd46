"""The sans-I/O SMTP core: replies, EHLO keywords, commands, body encoding, states."""

from __future__ import annotations

import random
import re

import pytest

from relay.config import DeliveryConfig
from relay.smtp import protocol as p
from relay.smtp.client import Timeouts
from relay.smtp.protocol import (
    Event,
    LocalProtocolError,
    ProtocolViolation,
    Reply,
    ReplyParser,
    SessionState,
    State,
    TransactionResult,
)
from relay.smtp.tlscompat import peer_chain

# --- replies ---------------------------------------------------------------------------


def test_single_line_reply() -> None:
    [r] = ReplyParser().feed(b"250 ok then\r\n")
    assert r == Reply(250, None, "ok then", ("ok then",))
    assert r.ok and not r.transient and not r.permanent
    assert str(r) == "250 ok then"


def test_multiline_reply_and_following_reply_in_one_read() -> None:
    data = b"250-mx.test hello\r\n250-SIZE 100\r\n250 PIPELINING\r\n220 x\r\n"
    replies = ReplyParser().feed(data)
    assert [r.code for r in replies] == [250, 220]
    assert replies[0].lines == ("mx.test hello", "SIZE 100", "PIPELINING")
    assert replies[0].text == "mx.test hello\nSIZE 100\nPIPELINING"


def test_reply_split_across_reads_byte_by_byte() -> None:
    parser = ReplyParser()
    data = b"550-5.1.1 first\r\n550 5.1.1 second\r\n"
    out: list[Reply] = []
    for i in range(len(data)):
        out += parser.feed(data[i:i + 1])
        assert parser.buffered == (i < len(data) - 1)
    assert len(out) == 1 and out[0].lines == ("5.1.1 first", "5.1.1 second")


def test_enhanced_code_only_when_advertised() -> None:
    parser = ReplyParser()
    [plain] = parser.feed(b"550 5.1.1 no such user\r\n")
    assert plain.enhanced is None and plain.text == "5.1.1 no such user"
    parser.enhanced_codes = True
    [r] = parser.feed(b"550-5.1.1 no such\r\n550 5.1.1 user\r\n")
    assert r.enhanced == "5.1.1"
    assert r.text == "no such\nuser"
    assert str(r) == "550 5.1.1 no such user"


@pytest.mark.parametrize(
    ("line", "enhanced"),
    [
        (b"550 2.1.1 wrong class\r\n", None),  # class must match the reply code
        (b"451 4.3.0\r\n", "4.3.0"),
        (b"250 2.0.0Queued\r\n", None),  # not followed by space/end
        (b"250 2.999.999 x\r\n", "2.999.999"),
        (b"250 2.1000.1 x\r\n", None),
    ],
)
def test_enhanced_code_shapes(line: bytes, enhanced: str | None) -> None:
    parser = ReplyParser()
    parser.enhanced_codes = True
    [r] = parser.feed(line)
    assert r.enhanced == enhanced


def test_bare_code_and_lf_only_line_ends() -> None:
    replies = ReplyParser().feed(b"250\n354 go\n")
    assert [(r.code, r.text) for r in replies] == [(250, ""), (354, "go")]


def test_non_utf8_text_is_replaced_not_fatal() -> None:
    [r] = ReplyParser().feed(b"550 caf\xe9\r\n")
    assert r.code == 550 and "\ufffd" in r.text


@pytest.mark.parametrize(
    "data",
    [b"hello\r\n", b"25 x\r\n", b"2500 x\r\n", b"250x\r\n", b"650 x\r\n", b"199 x\r\n",
     b"\r\n", b"250-a\r\n251 b\r\n", b"2\xff0 x\r\n"],
)
def test_malformed_replies(data: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        ReplyParser().feed(data)


def test_oversize_line_is_refused_before_its_end_arrives() -> None:
    parser = ReplyParser(max_line=100)
    parser.feed(b"250 " + b"x" * 90)
    with pytest.raises(ProtocolViolation, match="longer than 100"):
        parser.feed(b"x" * 20)  # no line end yet: still refused, buffer stays bounded


def test_oversize_complete_line() -> None:
    with pytest.raises(ProtocolViolation):
        ReplyParser(max_line=100).feed(b"250 " + b"x" * 100 + b"\r\n")


def test_line_at_the_limit_is_fine() -> None:
    [r] = ReplyParser(max_line=100).feed(b"250 " + b"x" * 96 + b"\r\n")
    assert len(r.text) == 96


def test_too_many_lines() -> None:
    parser = ReplyParser(max_lines=5)
    parser.feed(b"250-x\r\n" * 5)
    with pytest.raises(ProtocolViolation, match="5 lines"):
        parser.feed(b"250-x\r\n")


def test_local_reply() -> None:
    r = p.local_reply(552, "5.3.4", "too big")
    assert (r.code, r.enhanced, r.text) == (552, "5.3.4", "too big")
    assert str(r) == "552 5.3.4 too big"


# --- EHLO ------------------------------------------------------------------------------


def _ehlo(*lines: str) -> p.Extensions:
    parser = ReplyParser()
    raw = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
    [reply] = parser.feed(raw.encode())
    return p.parse_ehlo(reply)


def test_ehlo_keywords() -> None:
    ext = _ehlo("mx.test greets you", "SIZE 35882577", "8BITMIME", "pipelining",
                "STARTTLS", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING", "AUTH PLAIN LOGIN")
    assert ext.esmtp
    assert ext.size == 35882577
    assert ext.pipelining and ext.starttls and ext.smtputf8 and ext.eightbitmime
    assert ext.enhanced_status_codes
    assert "CHUNKING" in ext and "chunking" in ext  # kept, never used
    assert ext.keywords["AUTH"] == "PLAIN LOGIN"
    assert "MX.TEST" not in ext  # the first line is the server's name, not a keyword


@pytest.mark.parametrize(("line", "size"), [("SIZE", None), ("SIZE 0", None), ("SIZE abc", None),
                                            ("SIZE 1000", 1000)])
def test_ehlo_size_forms(line: str, size: int | None) -> None:
    ext = _ehlo("mx.test", line)
    assert ext.size == size
    assert "SIZE" in ext


def test_ehlo_single_line_has_no_keywords() -> None:
    ext = _ehlo("mx.test hi")
    assert dict(ext.keywords) == {}
    assert not ext.pipelining and not ext.starttls and ext.size is None


# --- commands --------------------------------------------------------------------------


def test_mail_from_parameters() -> None:
    assert p.mail_from("a@b.test") == b"MAIL FROM:<a@b.test>\r\n"
    assert p.mail_from("") == b"MAIL FROM:<>\r\n"
    assert (p.mail_from("a@b.test", size=123, body_8bit=True, smtputf8=True)
            == b"MAIL FROM:<a@b.test> SIZE=123 BODY=8BITMIME SMTPUTF8\r\n")


def test_utf8_addresses_need_smtputf8() -> None:
    with pytest.raises(LocalProtocolError):
        p.mail_from("jörg@b.test")
    assert p.rcpt_to("jörg@b.test", smtputf8=True) == "RCPT TO:<jörg@b.test>\r\n".encode()
    assert p.needs_smtputf8("a@b", ["jörg@b.test"])
    assert not p.needs_smtputf8("a@b", ["c@d"])


@pytest.mark.parametrize("addr", ["a@b\r\nRCPT TO:<x@y>", "a@b\n", "a@b>", "<a@b", "a\x00@b"])
def test_command_injection_through_addresses_is_refused(addr: str) -> None:
    with pytest.raises(LocalProtocolError):
        p.rcpt_to(addr)
    with pytest.raises(LocalProtocolError):
        p.mail_from(addr)


def test_rcpt_and_hello() -> None:
    assert p.rcpt_to("x@y.test") == b"RCPT TO:<x@y.test>\r\n"
    with pytest.raises(LocalProtocolError):
        p.rcpt_to("")
    assert p.ehlo("relay.example") == b"EHLO relay.example\r\n"
    assert p.helo("relay.example") == b"HELO relay.example\r\n"
    for bad in ("", "a b", "a\r\nMAIL", "réla"):
        with pytest.raises(LocalProtocolError):
            p.ehlo(bad)


# --- body ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (b"", b".\r\n"),
        (b"hello\r\n", b"hello\r\n.\r\n"),
        (b"no final line end", b"no final line end\r\n.\r\n"),
        (b".leading\r\n", b"..leading\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),  # a bare '.' line must not end DATA
        (b"a\r\n..two\r\n", b"a\r\n...two\r\n.\r\n"),
        (b"a.b\r\nx .y\r\n", b"a.b\r\nx .y\r\n.\r\n"),  # dots not at a line start stay
        (b"a\r\n.", b"a\r\n..\r\n.\r\n"),  # ends with a bare dot, no CRLF
        (b"bare\nlf\n.x\n", b"bare\r\nlf\r\n..x\r\n.\r\n"),
        (b"bare\rcr", b"bare\r\ncr\r\n.\r\n"),
        (b"\r\n", b"\r\n.\r\n"),
        ("ü\r\n".encode(), "ü\r\n.\r\n".encode()),
    ],
)
def test_encode_body(body: bytes, wire: bytes) -> None:
    assert p.encode_body(body) == wire


def _unstuff(wire: bytes) -> bytes:
    """What a receiving server does (RFC 5321 §4.5.2)."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire[:-3].split(b"\r\n")[:-1] if wire != b".\r\n" else []
    assert all(line != b"." for line in lines)
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def test_encode_body_round_trip() -> None:
    rng = random.Random(7)
    pieces = [b".", b"..", b"a", b"\r\n", b" ", b".\r\n", b"x.y"]
    for _ in range(300):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 30)))
        wire = p.encode_body(body)
        assert not re.search(rb"\r\n\.\r\n", wire[:-3]), body  # no early end of data
        expected = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
        assert _unstuff(wire) == expected


# --- states ----------------------------------------------------------------------------


def test_state_table_happy_path_with_tls() -> None:
    s = SessionState()
    for event, state in [
        (Event.GREETING, State.GREETED), (Event.HELLO, State.READY),
        (Event.STARTTLS, State.TLS), (Event.TLS_DONE, State.GREETED),
        (Event.HELLO, State.READY), (Event.MAIL_OK, State.MAIL),
        (Event.RCPT_OK, State.RCPT), (Event.RCPT_OK, State.RCPT),
        (Event.DATA_GO, State.DATA), (Event.DATA_DONE, State.READY),
        (Event.MAIL_OK, State.MAIL), (Event.RESET, State.READY), (Event.CLOSE, State.CLOSED),
    ]:
        assert s.advance(event) is state
    assert s.tls


@pytest.mark.parametrize(
    ("events", "bad"),
    [
        ([], Event.HELLO),  # EHLO before the greeting
        ([Event.GREETING], Event.MAIL_OK),  # MAIL before EHLO
        ([Event.GREETING, Event.HELLO, Event.STARTTLS], Event.MAIL_OK),  # MAIL mid-handshake
        ([Event.GREETING, Event.HELLO, Event.STARTTLS, Event.TLS_DONE], Event.MAIL_OK),
        ([Event.GREETING, Event.HELLO, Event.STARTTLS, Event.TLS_DONE, Event.HELLO],
         Event.STARTTLS),  # a second STARTTLS
        ([Event.GREETING, Event.HELLO, Event.MAIL_OK], Event.DATA_GO),  # DATA without RCPT
        ([Event.GREETING, Event.HELLO, Event.CLOSE], Event.MAIL_OK),  # after giving up
    ],
)
def test_state_table_refuses_out_of_order(events: list[Event], bad: Event) -> None:
    s = SessionState()
    for e in events:
        s.advance(e)
    assert not s.can(bad)
    with pytest.raises(LocalProtocolError):
        s.advance(bad)


# --- transactions ----------------------------------------------------------------------


def _r(code: int, enhanced: str | None = None) -> Reply:
    return Reply(code, enhanced, "t", ("t",))


def test_transaction_reply_for() -> None:
    ok, later, bad = _r(250), _r(450), _r(550)
    res = TransactionResult(ok, {"a": ok, "b": later, "c": bad}, _r(250))
    assert [res.reply_for(x).code for x in "abc"] == [250, 450, 550]
    assert res.delivered == ("a",)
    failed_data = TransactionResult(ok, {"a": ok, "b": bad}, _r(451))
    assert failed_data.reply_for("a").code == 451 and failed_data.delivered == ()
    mail_refused = TransactionResult(_r(553), {"a": _r(503)}, None)
    assert mail_refused.reply_for("a").code == 553
    refused = TransactionResult(None, {}, None, refused=p.local_reply(552, "5.3.4", "big"))
    assert refused.reply_for("anyone").enhanced == "5.3.4" and refused.delivered == ()


def test_precheck() -> None:
    ext = _ehlo("mx", "SIZE 1000", "8BITMIME")
    assert p.precheck(ext, size=1000, smtputf8=False) is None
    big = p.precheck(ext, size=1001, smtputf8=False)
    assert big is not None and big.enhanced == "5.3.4" and big.permanent
    utf = p.precheck(ext, size=10, smtputf8=True)
    assert utf is not None and utf.enhanced == "5.6.7" and utf.permanent
    assert p.precheck(_ehlo("mx", "SMTPUTF8"), size=10**9, smtputf8=True) is None


# --- driver helpers that need no socket ------------------------------------------------


def test_timeouts_from_config() -> None:
    cfg = DeliveryConfig(connect_timeout="7s", greeting_timeout="5m", mail_timeout=200,
                         rcpt_timeout=201, data_init_timeout=202, data_block_timeout=203,
                         data_end_timeout="10m", tls_timeout=61)
    t = Timeouts.from_config(cfg)
    assert (t.connect, t.greeting, t.mail, t.rcpt) == (7.0, 300.0, 200.0, 201.0)
    assert (t.data_init, t.data_block, t.data_end, t.tls) == (202.0, 203.0, 600.0, 61.0)
    assert Timeouts.uniform(2.5).data_end == 2.5


class _Cert:
    def __init__(self, der: bytes) -> None:
        self.der = der

    def public_bytes(self, encoding: int) -> bytes:
        assert encoding == 2  # _ssl.ENCODING_DER
        return self.der


class _Old:  # Python 3.11/3.12: the chain is on the private _sslobj, as Certificate objects
    class _Inner:
        def get_unverified_chain(self) -> list[_Cert]:
            return [_Cert(b"leaf"), _Cert(b"ca")]

    _sslobj = _Inner()


class _New:  # Python 3.13: public, DER bytes
    def get_unverified_chain(self) -> list[bytes]:
        return [b"leaf", b"ca"]


class _LeafOnly:
    def getpeercert(self, binary_form: bool = False) -> bytes:
        assert binary_form
        return b"leaf"


class _Resumed(_LeafOnly):  # a resumed session: the chain getter exists but is empty
    def get_unverified_chain(self) -> None:
        return None


def test_peer_chain_variants() -> None:
    assert peer_chain(_Old()) == [b"leaf", b"ca"]  # type: ignore[arg-type]
    assert peer_chain(_New()) == [b"leaf", b"ca"]  # type: ignore[arg-type]
    assert peer_chain(_LeafOnly()) == [b"leaf"]  # type: ignore[arg-type]
    assert peer_chain(_Resumed()) == [b"leaf"]  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "size"), [
    ("SIZE 1000", 1000), ("SIZE", None), ("SIZE 0", None), ("SIZE \u00b2", None),
    ("SIZE \u0661\u0662", None), ("SIZE -5", None), ("SIZE 1e9", None), ("SIZE " + "9" * 21, None),
])
def test_ehlo_size_is_parsed_strictly(value: str, size: int | None) -> None:
    reply = p.Reply(250, None, f"mx.test\n{value}", ("mx.test", value))
    assert p.parse_ehlo(reply).size == size
