"""relay.delivery.dsn for SMTPUTF8 messages (RFC 6533 global reports) and remote text
carrying RFC 2047 encoded-words (decoded, then sanitized: issue 10 item 9b and 9c)."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest

from relay.delivery import dsn, dsntext
from tests.unit.test_delivery_dsn import ORIGINAL, check_wire, ndr, parse, rcpt, status_blocks

UTF8_ORIGINAL = ("Received: from client.example\r\n\tby relay.example\r\n"
                 "From: Jörg <jörg@exämple.org>\r\nTo: 用户@例子.广告\r\n"
                 "Subject: Grüße\r\n\r\nbody\r\n").encode()


def raw_parts(raw: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The top-level MIME parts as (headers, body bytes), split on the boundary by hand
    (the stdlib reads message/global-delivery-status as one embedded message)."""
    msg = parse(raw)
    marker = b"\r\n--" + msg.get_boundary().encode()
    chunks = raw.split(marker)[1:-1]
    out = []
    for chunk in chunks:
        head, _, body = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        out.append((fields, body))
    return out


def global_blocks(raw: bytes) -> list[EmailMessage]:
    """Each block of the message/global-delivery-status part, parsed as header fields by
    the stdlib with its default policy (which decodes RFC 2047 encoded-words)."""
    [(_fields, body)] = [p for p in raw_parts(raw)
                         if p[0]["Content-Type"] == "message/global-delivery-status"]
    out = []
    for block in body.removesuffix(b"\r\n").split(b"\r\n\r\n"):
        msg = email.message_from_bytes(block + b"\r\n\r\n", policy=email.policy.default)
        assert isinstance(msg, EmailMessage) and not msg.defects
        out.append(msg)
    return out


# --- RFC 6533 global reports ---------------------------------------------------------------


def test_ndr_for_an_smtputf8_message_is_a_global_report() -> None:
    raw = ndr([rcpt("用户@例子.广告", diagnostic="550 5.1.1 用户不存在 (no such user)")],
              original_headers=UTF8_ORIGINAL, envelope_sender="jörg@exämple.org")
    check_wire(raw, seven_bit=False)
    msg = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert not msg.defects
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "global-delivery-status"
    parts = raw_parts(raw)
    assert [p[0]["Content-Type"] for p in parts] == [
        "text/plain; charset=utf-8", "message/global-delivery-status",
        "message/global-headers"]
    assert [p[0]["Content-Transfer-Encoding"] for p in parts] == ["8bit", "8bit", "8bit"]
    per_message, per_rcpt = global_blocks(raw)
    assert per_message["Reporting-MTA"] == "dns; relay.example"
    assert per_rcpt["Final-Recipient"] == "utf-8; 用户@例子.广告"  # utf-8-addr-unitext
    assert per_rcpt["Status"] == "5.7.323" and per_rcpt["Action"] == "failed"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 用户不存在 (no such user)"
    assert parts[2][1] == UTF8_ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"  # never the body
    assert "<用户@例子.广告>:" in parts[0][1].decode()


def test_global_report_escapes_plus_equals_backslash_in_addresses() -> None:
    raw = ndr([rcpt("jörg+tag=1@dömäin.example")], smtputf8=True)
    field = str(global_blocks(raw)[1]["Final-Recipient"])
    assert field == "utf-8; jörg\\x{2B}tag\\x{3D}1@dömäin.example"
    assert dsn.decode_utf8_address(field.partition("; ")[2]) == "jörg+tag=1@dömäin.example"


def test_smtputf8_flag_wins_over_detection() -> None:
    ascii_only = ndr(smtputf8=True)  # an SMTPUTF8 message may be all ASCII
    check_wire(ascii_only)  # nothing 8-bit to carry
    assert parse(ascii_only).get_param("report-type") == "global-delivery-status"
    assert [p[0]["Content-Transfer-Encoding"] for p in raw_parts(ascii_only)] == [
        "7bit", "7bit", "7bit"]
    downgraded = ndr([rcpt("用户@例子.广告")], smtputf8=False)
    check_wire(downgraded)
    assert parse(downgraded).get_param("report-type") == "delivery-status"


@pytest.mark.parametrize(("kw", "is_global"), [
    ({}, False),
    ({"failed": [rcpt("用户@例子.广告")]}, True),
    ({"failed": [rcpt(original_recipient="ü@x.example")]}, True),
    ({"envelope_sender": "élise@exemple.fr"}, True),
    ({"original_headers": "Subject: Grüße\r\n\r\nx".encode()}, True),
    ({"original_headers": b"Subject: Gr\xfc\xdfe latin-1, not UTF-8\r\n\r\nx"}, False),
])
def test_detection_without_the_flag(kw: dict[str, object], is_global: bool) -> None:
    raw = ndr(**kw)  # type: ignore[arg-type]
    report_type = parse(raw).get_param("report-type")
    assert report_type == ("global-delivery-status" if is_global else "delivery-status")


def test_long_or_nul_utf8_headers_are_quoted_printable_in_global_headers() -> None:
    original = "Subject: Grüße\r\n".encode() + b"X-Long: " + b"x" * 3000 + b"\r\n\r\nbody"
    raw = ndr(original_headers=original)
    check_wire(raw, seven_bit=False)
    fields, body = raw_parts(raw)[2]
    assert fields == {"Content-Description": "Undelivered message headers",
                      "Content-Type": "message/global-headers",
                      "Content-Transfer-Encoding": "quoted-printable"}
    import quopri
    assert quopri.decodestring(body.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n") \
        == original.split(b"\r\n\r\n")[0] + b"\r\n"


def test_global_diagnostic_stays_within_the_line_limit() -> None:
    raw = ndr([rcpt("用户@例子.广告", diagnostic="550 5.1.1 " + "用" * 2000)])
    check_wire(raw, seven_bit=False)
    diag = str(global_blocks(raw)[1]["Diagnostic-Code"])
    assert diag.startswith("smtp; 550 5.1.1 用用") and len(diag.encode()) <= 998


def test_delay_warning_for_an_smtputf8_message_is_global() -> None:
    from tests.unit.test_delivery_dsn import ARRIVED, NOW

    raw = dsn.build_delay_warning(
        original_headers=UTF8_ORIGINAL, envelope_sender="a@org.example", envelope_id=None,
        arrival_date=ARRIVED, reporting_mta="relay.example",
        delayed=[rcpt("用户@例子.广告", "4.4.1", action="delayed")],
        will_retry_until=NOW, now=NOW, message_id="<w@relay.example>", boundary="B")
    assert raw is not None
    assert parse(raw).get_param("report-type") == "global-delivery-status"
    blocks = global_blocks(raw)
    assert (blocks[1]["Action"], blocks[1]["Status"]) == ("delayed", "4.4.1")
    assert "Will-Retry-Until" in blocks[1]


# --- RFC 2047 encoded-words: decoded, then sanitized -------------------------------------


SMUGGLERS = [
    "550 5.1.1 =?utf-8?q?no_such_user=0D=0AX-Evil:_yes?=",
    "550 5.1.1 =?utf-8?b?bm8gc3VjaCB1c2VyDQpYLUV2aWw6IHllcw==?=",
    "550 5.1.1 =?iso-8859-1?q?no_such_user=0AX-Evil:_yes?=",
    "550 5.1.1 =?UTF-8*en?Q?no_such_user=0D=0AX-Evil:_yes?=",
    # an encoded-word that decodes to another one (a parser might decode twice)
    "550 5.1.1 =?utf-8?q?=3D=3Futf-8=3Fq=3Fno=5Fsuch=5Fuser=3D0D=3D0AX-Evil:=5Fyes=3F=3D?=",
    "550 5.1.1 =?unknown-charset?q?no_such_user=0D=0AX-Evil:_yes?=",
    "550 5.1.1 =?utf-8?q?no_such_user?= =?utf-8?q?=0D=0AX-Evil:_yes?=",
]


@pytest.mark.parametrize("reply", SMUGGLERS)
@pytest.mark.parametrize("smtputf8", [False, True])
def test_encoded_words_cannot_smuggle_a_line_break(reply: str, smtputf8: bool) -> None:
    raw = ndr([rcpt(diagnostic=reply)], smtputf8=smtputf8)
    check_wire(raw, seven_bit=not smtputf8)
    if smtputf8:
        block = global_blocks(raw)[1]
        diag = str(block["Diagnostic-Code"])
        keys = list(block.keys())
    else:
        blocks = status_blocks(parse(raw))  # the stdlib decodes encoded-words here
        diag, keys = blocks[1]["Diagnostic-Code"], list(blocks[1])
    assert "\r" not in diag and "\n" not in diag, diag
    assert "X-Evil" not in keys
    assert diag.startswith("smtp; 550 5.1.1 no such user")
    assert "X-Evil: yes" in diag  # the text is kept, on the one line
    assert "=?" not in diag
    assert b"=?" not in raw.split(b"Diagnostic-Code:")[1].split(b"\r\n")[0]


def test_encoded_words_in_addresses_and_host_names_are_not_decodable() -> None:
    evil = "=?utf-8?q?a=0D=0AX-Evil:_1?=@x.example"
    raw = ndr([rcpt(evil, remote_mta="=?utf-8?q?mx=0AX-Evil:_1?=.example",
                    original_recipient=evil)])
    check_wire(raw)
    block = status_blocks(parse(raw))[1]
    assert "X-Evil" not in block
    for name in ("Final-Recipient", "Original-Recipient", "Remote-MTA"):
        assert "\n" not in block[name] and "\r" not in block[name], block[name]
    final = block["Final-Recipient"]
    assert final.startswith("utf-8; ") and "=?" not in final
    assert dsn.decode_utf8_address(final.partition("; ")[2]) == evil  # nothing lost


def test_readable_part_shows_the_decoded_text() -> None:
    raw = ndr([rcpt(diagnostic="550 5.1.1 =?utf-8?q?Empf=C3=A4nger_unbekannt?=")])
    text = next(iter(parse(raw).iter_parts())).get_content()
    assert "550 5.1.1 Empfänger unbekannt" in text
    diag = status_blocks(parse(raw))[1]["Diagnostic-Code"]
    assert diag == "smtp; 550 5.1.1 Empf?nger unbekannt"  # ASCII in the 7-bit report


def test_decode_encoded_words_unit() -> None:
    d = dsntext.decode_encoded_words
    assert d("=?utf-8?q?a_b?= =?utf-8?b?Yw==?=") == "a bc"  # whitespace between is dropped
    assert d("plain =? text ?=") == "plain =? text ?="
    assert d("=?utf-8?b?!!!?=") == "=?utf-8?b?!!!?="  # undecodable: left for the breaker
    assert dsntext.break_encoded_words("a=?b==??c") == "a= ?b== ??c"
    assert dsntext.remote_text("x =?utf-8?b?!!!?= y") == "x = ?utf-8?b?!!!?= y"
    assert ORIGINAL  # the shared fixture is importable
