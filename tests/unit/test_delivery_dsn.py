"""relay.delivery.dsn: NDRs and delay warnings, parsed back with the stdlib email package."""

from __future__ import annotations

import email
import email.policy
import quopri
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage, Message
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

import pytest

from relay import codes
from relay.delivery import dsn
from relay.delivery.dsn import FailedRecipient

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
ARRIVED = NOW - timedelta(hours=24, minutes=1)
LAST = NOW - timedelta(seconds=3)
ORIGINAL = (
    b"Received: from client.example ([192.0.2.1])\r\n\tby relay.example; Mon, 5 May 2024\r\n"
    b"From: Alice <alice@org.example>\r\n"
    b"To: bob@dest.example\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig-1@org.example>\r\n"
    b"\r\n"
    b"TOP SECRET BODY LINE\r\n"
    b"--BOUND\r\n"
)


def rcpt(address: str = "bob@dest.example", code: str = "5.7.323", **kw: Any) -> FailedRecipient:
    kw.setdefault("remote_mta", "mx1.dest.example")
    kw.setdefault("diagnostic", None)
    kw.setdefault("last_attempt", LAST)
    return FailedRecipient(address, code, **kw)


def ndr(failed: list[FailedRecipient] | None = None, **kw: Any) -> bytes:
    args: dict[str, Any] = dict(
        original_headers=ORIGINAL, envelope_sender="alice@org.example", envelope_id="ENV-42",
        arrival_date=ARRIVED, reporting_mta="relay.example",
        failed=failed if failed is not None else [rcpt()], now=NOW,
        message_id="<ndr-1@relay.example>", boundary="BOUND")
    args.update(kw)
    out = dsn.build_ndr(**args)
    assert out is not None
    return out


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    return msg


def parts(msg: EmailMessage) -> list[Message]:
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    found = list(msg.iter_parts())
    assert [p.get_content_type() for p in found] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    for p in found:
        assert not p.defects
    return found


def status_blocks(msg: EmailMessage) -> list[dict[str, str]]:
    """The delivery-status part as a list of field dicts: [per-message, per-recipient...]."""
    blocks = parts(msg)[1].get_payload()
    assert isinstance(blocks, list)
    out = []
    for block in blocks:
        names = [k.lower() for k in block.keys()]
        assert len(names) == len(set(names)), f"duplicate field in {names}"
        out.append({k: str(v) for k, v in block.items()})
    return out


def check_wire(raw: bytes, *, seven_bit: bool = True) -> None:
    """CRLF everywhere, no bare CR/LF/NUL, lines within 998 octets, 7-bit if asked."""
    assert raw.endswith(b"\r\n")
    assert b"\x00" not in raw
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    for line in raw.split(b"\r\n"):
        assert len(line) <= 998
    if seven_bit:
        assert raw.isascii()


# --- structure and headers ----------------------------------------------------------------


def test_top_level_headers() -> None:
    raw = ndr()
    check_wire(raw)
    msg = parse(raw)
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.example"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert msg["To"].addresses[0].addr_spec == "alice@org.example"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsedate_to_datetime(msg["Date"]) == NOW
    assert msg["Message-ID"] == "<ndr-1@relay.example>"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_boundary() == "BOUND"
    # header section is exactly these fields, once each
    names = [k.lower() for k in msg.keys()]
    assert sorted(names) == sorted(["from", "to", "subject", "date", "message-id",
                                    "mime-version", "auto-submitted", "content-type"])


def test_message_id_with_or_without_brackets() -> None:
    assert parse(ndr(message_id="x@y"))["Message-ID"] == "<x@y>"
    assert parse(ndr(message_id="<x@y>"))["Message-ID"] == "<x@y>"


def test_null_sender_never_gets_an_ndr() -> None:
    args = dict(original_headers=ORIGINAL, envelope_sender="", envelope_id=None,
                arrival_date=ARRIVED, reporting_mta="relay.example", now=NOW,
                message_id="m@r", boundary="b")
    assert dsn.build_ndr(failed=[rcpt()], **args) is None
    assert dsn.build_delay_warning(delayed=[rcpt(code="4.7.323")], will_retry_until=NOW,
                                   **args) is None


def test_no_recipients_no_ndr() -> None:
    assert dsn.build_ndr(original_headers=ORIGINAL, envelope_sender="a@b", envelope_id=None,
                         arrival_date=ARRIVED, reporting_mta="r", failed=[], now=NOW,
                         message_id="m@r", boundary="b") is None


def test_deterministic() -> None:
    assert ndr() == ndr()
    assert ndr(boundary="other") != ndr()


# --- the delivery-status part, field by field -------------------------------------------


def test_delivery_status_fields() -> None:
    raw = ndr([rcpt(diagnostic="550 5.7.1 go away")])
    blocks = status_blocks(parse(raw))
    assert blocks == [
        {"Reporting-MTA": "dns; relay.example",
         "Original-Envelope-Id": "ENV-42",
         "Arrival-Date": dsn.format_date(ARRIVED)},
        {"Final-Recipient": "rfc822; bob@dest.example",
         "Action": "failed",
         "Status": "5.7.323",
         "Remote-MTA": "dns; mx1.dest.example",
         "Diagnostic-Code": "smtp; 550 5.7.1 go away",
         "Last-Attempt-Date": dsn.format_date(LAST)},
    ]
    assert parsedate_to_datetime(blocks[0]["Arrival-Date"]) == ARRIVED
    assert parsedate_to_datetime(blocks[1]["Last-Attempt-Date"]) == LAST
    # The part itself is plain 7-bit text.
    part = parts(parse(raw))[1]
    assert part.get("Content-Transfer-Encoding", "7bit") == "7bit"


def test_optional_fields_are_omitted() -> None:
    raw = ndr([FailedRecipient("bob@dest.example", "5.1.10")], envelope_id=None)
    blocks = status_blocks(parse(raw))
    assert "Original-Envelope-Id" not in blocks[0]
    assert blocks[1] == {"Final-Recipient": "rfc822; bob@dest.example",
                         "Action": "failed", "Status": "5.1.10"}


def test_queue_id_and_original_recipient() -> None:
    raw = ndr([rcpt(original_recipient="Bob@Dest.Example")], queue_id="Q123")
    blocks = status_blocks(parse(raw))
    assert blocks[0]["X-Relay-Queue-ID"] == "Q123"
    assert blocks[1]["Original-Recipient"] == "rfc822; Bob@Dest.Example"


@pytest.mark.parametrize(("given", "written"),
                         [("4.7.323", "5.7.323"), ("5.1.1", "5.1.1"), ("4.4.312", "5.4.312"),
                          ("2.0.0", "5.0.0"), ("bogus", "5.0.0"), ("4.7", "5.0.0")])
def test_status_is_always_permanent_in_an_ndr(given: str, written: str) -> None:
    blocks = status_blocks(parse(ndr([rcpt(code=given)])))
    assert blocks[1]["Status"] == written
    assert blocks[1]["Action"] == "failed"


@pytest.mark.parametrize(
    ("diagnostic", "field"),
    [("550 5.1.1 unknown", "smtp; 550 5.1.1 unknown"),
     ("smtp; 550 5.1.1 unknown", "smtp; 550 5.1.1 unknown"),
     ("SMTP;550 x", "smtp; 550 x"),
     ("tlsa-invalid: The domain failed DANE validation. (mx1: no match)",
      "x-dane-relay; tlsa-invalid: The domain failed DANE validation. (mx1: no match)"),
     ("x-other; something", "x-other; something"),
     (b"421 4.3.2 busy", "smtp; 421 4.3.2 busy")],
)
def test_diagnostic_code_types(diagnostic: str | bytes, field: str) -> None:
    blocks = status_blocks(parse(ndr([rcpt(diagnostic=diagnostic)])))
    assert blocks[1]["Diagnostic-Code"] == field


def test_several_recipients_in_one_ndr_in_order() -> None:
    failed = [
        rcpt("a@dest.example", "5.7.323", diagnostic=None),
        rcpt("b@dest.example", "5.1.1", remote_mta="mx2.dest.example",
             diagnostic="550 5.1.1 no such user"),
        FailedRecipient("c@null.example", "5.1.10"),
    ]
    raw = ndr(failed)
    blocks = status_blocks(parse(raw))
    assert len(blocks) == 4
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; a@dest.example", "rfc822; b@dest.example", "rfc822; c@null.example"]
    assert [b["Status"] for b in blocks[1:]] == ["5.7.323", "5.1.1", "5.1.10"]
    assert blocks[2]["Remote-MTA"] == "dns; mx2.dest.example"
    assert "Remote-MTA" not in blocks[3] and "Diagnostic-Code" not in blocks[3]
    text = parts(parse(raw))[0].get_content()
    for r in failed:
        assert f"<{r.address}>" in text
    assert text.index("a@dest") < text.index("b@dest") < text.index("c@null")


# --- the readable part --------------------------------------------------------------------


def test_readable_part_explains_code_and_advice() -> None:
    text = parts(parse(ndr()))[0].get_content()
    assert "relay.example" in text
    assert "5.7.323 tlsa-invalid: The domain failed DANE validation." in text
    advice = " ".join(codes.info("5.7.323").sender_advice.split())  # type: ignore[union-attr]
    assert advice in " ".join(text.split())
    assert "mail administrator" in text
    assert "mx1.dest.example" in text
    assert all(len(line) <= 76 for line in text.splitlines())


@pytest.mark.parametrize("code", ["5.7.321", "5.7.322", "5.7.324", "5.4.312", "5.1.2"])
def test_readable_part_has_contract_text_for_every_spec_code(code: str) -> None:
    text = " ".join(parts(parse(ndr([rcpt(code=code)])))[0].get_content().split())
    assert f"{code} {codes.text(code)}" in text
    assert " ".join(codes.info(code).sender_advice.split()) in text  # type: ignore[union-attr]


def test_readable_part_for_remote_codes_uses_subject_advice() -> None:
    raw = ndr([rcpt(code="5.1.1", diagnostic="550 5.1.1 <bob@dest.example>: unknown")])
    text = " ".join(parts(parse(raw))[0].get_content().split())
    assert "The remote server replied: 550 5.1.1 <bob@dest.example>: unknown" in text
    assert "Check the recipient's address" in text


# --- original headers, never the body ----------------------------------------------------


def test_original_headers_without_body() -> None:
    raw = ndr()
    headers = parts(parse(raw))[2]
    content = headers.get_content()
    assert "Subject: quarterly numbers" in content
    assert "Message-ID: <orig-1@org.example>" in content
    assert "\tby relay.example" in content  # folded lines kept
    assert b"TOP SECRET BODY" not in raw


@pytest.mark.parametrize(("original", "expected"), [
    (ORIGINAL.replace(b"\r\n", b"\n"), ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"),
    (b"Subject: s\r\nFrom: a@b\r\n", b"Subject: s\r\nFrom: a@b\r\n"),  # no body
    (b"Subject: s\r\nFrom: a@b", b"Subject: s\r\nFrom: a@b\r\n"),  # no final CRLF
    (b"Subject: s\rFrom: a@b\r\n\r\nbody", b"Subject: s\r\nFrom: a@b\r\n"),  # bare CR
    (b"\r\nbody only", b""),
])
def test_header_section_variants(original: bytes, expected: bytes) -> None:
    raw = ndr(original_headers=original, smtputf8=False)  # 7-bit form (see global below)
    check_wire(raw)
    part = parts(parse(raw))[2]
    assert part.get_payload(decode=True) == expected
    assert b"TOP SECRET" not in raw and b"body" not in raw.lower().split(b"--bound")[3]


def test_non_ascii_or_long_original_headers_are_quoted_printable() -> None:
    long_value = b"x" * 3000
    original = ("Subject: Grüße\r\n".encode() + b"X-Long: " + long_value + b"\r\n"
                + b"X-Nul: a\x00b\r\n\r\nbody\r\n")
    raw = ndr(original_headers=original, smtputf8=False)  # 7-bit form (see global below)
    check_wire(raw)
    part = parts(parse(raw))[2]
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    decoded = part.get_payload(decode=True)
    assert decoded == original.split(b"\r\n\r\n")[0] + b"\r\n"


def test_boundary_collision_with_content_is_avoided() -> None:
    original = b"Subject: x\r\n--BOUND\r\nX-A: --BOUND--\r\n\r\nbody"
    raw = ndr(original_headers=original)
    msg = parse(raw)
    assert msg.get_boundary() not in ("BOUND", None)
    assert msg.get_boundary().startswith("BOUND")
    assert "--BOUND" in parts(msg)[2].get_content()


def test_invalid_boundary_characters_are_dropped() -> None:
    msg = parse(ndr(boundary='a"b\r\nc;d'))
    assert msg.get_boundary() == "abcd"
    parts(msg)


# --- sanitization --------------------------------------------------------------------------


INJECTIONS = ["550 no\r\nBcc: victim@evil.example",
              "550 no\nBcc: victim@evil.example",
              "550 no\rBcc: victim@evil.example",
              "550 no\r\n\r\n--BOUND\r\nContent-Type: text/html\r\n\r\n<b>x</b>",
              "550 no\x00\x1b[31m\x7f\x85\u2028Bcc: victim@evil.example"]


@pytest.mark.parametrize("reply", INJECTIONS)
def test_remote_reply_cannot_inject_headers_or_parts(reply: str) -> None:
    raw = ndr([rcpt(diagnostic=reply)])
    check_wire(raw)
    msg = parse(raw)
    assert msg["Bcc"] is None
    assert not re.search(rb"(?m)^Bcc:", raw)
    assert not re.search(rb"(?m)^Content-Type: text/html", raw)
    blocks = status_blocks(msg)
    assert all("Bcc" not in b for b in blocks)
    diag = blocks[1]["Diagnostic-Code"]
    assert diag.startswith("smtp; 550 no ")
    assert all(" " <= ch <= "~" for ch in diag)


@pytest.mark.parametrize("field", ["remote_mta", "address", "original_recipient"])
def test_other_recipient_fields_cannot_inject(field: str) -> None:
    value = "x@y.example\r\nBcc: victim@evil.example"
    raw = ndr([rcpt(**{field: value})])
    check_wire(raw)
    assert not re.search(rb"(?m)^Bcc:", raw)
    assert all("Bcc" not in b for b in status_blocks(parse(raw)))


@pytest.mark.parametrize("kw", [
    {"envelope_sender": "a@b\r\nBcc: victim@evil.example"},
    {"envelope_id": "ENV\r\nBcc: victim@evil.example"},
    {"reporting_mta": "relay\r\nBcc: victim@evil.example"},
    {"message_id": "<m@r>\r\nBcc: victim@evil.example"},
    {"queue_id": "Q\r\nBcc: victim@evil.example"},
])
def test_message_fields_cannot_inject(kw: dict[str, str]) -> None:
    raw = ndr(**kw)
    check_wire(raw)
    msg = parse(raw)
    assert msg["Bcc"] is None
    assert not re.search(rb"(?m)^Bcc:", raw)
    assert all("Bcc" not in b for b in status_blocks(msg))


def test_5000_character_reply_is_cut() -> None:
    reply = "550 5.7.1 " + "A" * 5000
    raw = ndr([rcpt(diagnostic=reply)])
    check_wire(raw)
    diag = status_blocks(parse(raw))[1]["Diagnostic-Code"]
    assert diag.startswith("smtp; 550 5.7.1 AAAA") and diag.endswith("...")
    assert len(f"Diagnostic-Code: {diag}") <= 998
    assert len(diag) <= dsn.MAX_DIAGNOSTIC + len("smtp; ")
    text = parts(parse(raw))[0].get_content()
    assert all(len(line) <= 76 for line in text.splitlines())


def test_long_reply_with_many_lines_is_one_field() -> None:
    reply = "\r\n".join(f"550-5.7.1 line {i} " + "b" * 80 for i in range(60))
    raw = ndr([rcpt(diagnostic=reply)])
    check_wire(raw)
    blocks = status_blocks(parse(raw))
    assert len(blocks) == 2 and blocks[1]["Diagnostic-Code"].endswith("...")


def test_8bit_and_invalid_utf8_reply() -> None:
    reply = "550 5.1.1 utilisateur inconnu é ".encode() + b"\xff\xfe\xc3(" + b" fin"
    raw = ndr([rcpt(diagnostic=reply)])
    check_wire(raw)
    msg = parse(raw)
    diag = status_blocks(msg)[1]["Diagnostic-Code"]
    assert diag.isascii()
    assert diag.startswith("smtp; 550 5.1.1 utilisateur inconnu ? ")
    assert diag.endswith(" fin") and "?" in diag
    text = parts(msg)[0].get_content()
    assert "utilisateur inconnu é" in text  # printable Unicode kept for people
    assert "\ufffd" not in text


def test_sanitize_text_unit() -> None:
    assert dsn.sanitize_text("a\r\nb\tc\x00d") == "a b c d"
    assert dsn.sanitize_text("  many   spaces  ") == "many spaces"
    assert dsn.sanitize_text("é\u202ex") == "??x"
    assert dsn.sanitize_text("é\u202ex", unicode=True) == "é?x"
    assert dsn.sanitize_text(b"\xff") == "?"
    assert dsn.sanitize_text(None) == ""
    assert dsn.sanitize_text("abcdef", limit=5) == "ab..."


# --- internationalized addresses -----------------------------------------------------------


def test_non_ascii_recipient_uses_utf8_address_type() -> None:
    addr = "jörg+tag=1@dömäin.example"
    raw = ndr([rcpt(addr)], smtputf8=False)  # the 7-bit form (the global one: below)
    check_wire(raw)  # still 7-bit: the sender is ASCII
    msg = parse(raw)
    field = status_blocks(msg)[1]["Final-Recipient"]
    kind, _, value = field.partition("; ")
    assert kind == "utf-8"
    assert value.isascii() and "\\x{F6}" in value and "\\x{2B}" in value
    assert dsn.decode_utf8_address(value) == addr
    part = parts(msg)[0]
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert f"<{addr}>" in part.get_content()


def test_utf8_address_encoding_roundtrip() -> None:
    for addr in ["a@b", "ñ@例え.jp", "x\\y=z+w@q", "😀@emoji.example"]:
        encoded = dsn.encode_utf8_address(addr)
        assert encoded.isascii() and " " not in encoded
        assert dsn.decode_utf8_address(encoded) == addr
    assert dsn.encode_utf8_address("é") == "\\x{E9}"
    assert dsn.address_field("a@b") == "rfc822; a@b"


def test_absurdly_long_non_ascii_address_stays_within_line_limit() -> None:
    raw = ndr([rcpt("é" * 500 + "@x.example")], smtputf8=False)
    check_wire(raw)
    check_wire(ndr([rcpt("é" * 500 + "@x.example")]), seven_bit=False)  # global form


def test_non_ascii_envelope_sender_goes_in_to_as_utf8() -> None:
    raw = ndr(envelope_sender="élise@exemple.fr")
    check_wire(raw, seven_bit=False)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert "To: <élise@exemple.fr>".encode() in head
    assert body.isascii()  # only the To: header is 8-bit
    # RFC 6532: read as UTF-8 text (the bytes parser would give surrogate escapes).
    msg = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert not msg.defects
    assert msg["To"].addresses[0].addr_spec == "élise@exemple.fr"


# --- dates -------------------------------------------------------------------------------


def test_dates_are_rfc5322_with_offsets() -> None:
    tz = timezone(timedelta(hours=2))
    raw = ndr(now=datetime(2024, 1, 2, 3, 4, 5, tzinfo=tz))
    assert parse(raw)["Date"] == "Tue, 02 Jan 2024 03:04:05 +0200"


def test_naive_datetimes_are_utc() -> None:
    assert dsn.format_date(datetime(2024, 1, 2, 3, 4, 5)) == "Tue, 02 Jan 2024 03:04:05 +0000"


# --- delay warnings ------------------------------------------------------------------------


def warning(delayed: list[FailedRecipient], **kw: Any) -> bytes:
    args: dict[str, Any] = dict(
        original_headers=ORIGINAL, envelope_sender="alice@org.example", envelope_id=None,
        arrival_date=ARRIVED, reporting_mta="relay.example", delayed=delayed,
        will_retry_until=ARRIVED + timedelta(hours=24), now=NOW,
        message_id="<w-1@relay.example>", boundary="WB")
    args.update(kw)
    out = dsn.build_delay_warning(**args)
    assert out is not None
    return out


def test_delay_warning_fields() -> None:
    until = ARRIVED + timedelta(hours=24)
    raw = warning([rcpt(code="4.7.323", diagnostic="tlsa-invalid: no match"),
                   rcpt("c@dest.example", code="5.4.312", remote_mta=None)])
    check_wire(raw)
    msg = parse(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert msg["Auto-Submitted"] == "auto-replied"
    blocks = status_blocks(msg)
    assert blocks[1] == {
        "Final-Recipient": "rfc822; bob@dest.example",
        "Action": "delayed",
        "Status": "4.7.323",
        "Remote-MTA": "dns; mx1.dest.example",
        "Diagnostic-Code": "x-dane-relay; tlsa-invalid: no match",
        "Last-Attempt-Date": dsn.format_date(LAST),
        "Will-Retry-Until": dsn.format_date(until),
    }
    assert blocks[2]["Status"] == "4.4.312" and blocks[2]["Action"] == "delayed"
    assert parsedate_to_datetime(blocks[2]["Will-Retry-Until"]) == until
    text = " ".join(parts(msg)[0].get_content().split())
    assert "not yet been delivered" in text and dsn.format_date(until) in text
    assert "4.7.323 tlsa-invalid: The domain failed DANE validation." in text


def test_explicit_actions_are_kept() -> None:
    raw = ndr([rcpt(action="delayed", code="4.4.1"), rcpt(action="nonsense")])
    blocks = status_blocks(parse(raw))
    assert (blocks[1]["Action"], blocks[1]["Status"]) == ("delayed", "4.4.1")
    assert "Will-Retry-Until" not in blocks[1]  # only warnings carry a retry deadline
    assert (blocks[2]["Action"], blocks[2]["Status"]) == ("failed", "5.7.323")


def test_qp_text_part_decodes_exactly() -> None:
    raw = ndr([rcpt("ü@x.example", diagnostic="550 nö " + "y" * 200)], smtputf8=False)
    part = parts(parse(raw))[0]
    body = raw.split(b"--BOUND\r\n")[1].split(b"\r\n\r\n", 1)[1]
    assert quopri.decodestring(body.replace(b"\r\n", b"\n")).decode() in (
        part.get_content().replace("\r\n", "\n") + "\n\n",
        part.get_content().replace("\r\n", "\n") + "\n",
        part.get_content().replace("\r\n", "\n"))


@pytest.mark.parametrize("when", [
    datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC),
    datetime(1999, 12, 31, 0, 0, 0, 999999, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
    datetime(2030, 7, 1, 12, 0, tzinfo=timezone(timedelta(hours=14))),
])
def test_format_date_matches_the_stdlib(when: datetime) -> None:
    assert dsn.format_date(when) == format_datetime(when)
    assert parsedate_to_datetime(dsn.format_date(when)) == when.replace(microsecond=0)


def test_pure_module_imports_no_io() -> None:
    code = ("import sys; import relay.delivery.dsn, relay.delivery.classify, relay.delivery.retry; "
            "bad = {'socket', 'ssl', 'asyncio', 'aiosqlite'} & set(sys.modules); "
            "print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
