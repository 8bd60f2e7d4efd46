"""Delivery status notifications: the NDR (RFC 3464 / RFC 6522) and the delay warning.

Pure: the time, the Message-ID and the MIME boundary are passed in, so the output is the
same bytes for the same input. The result is a complete RFC 5322 message with CRLF line
ends, to be enqueued with the null envelope sender to the original envelope sender.

Layout (RFC 6522 multipart/report, report-type=delivery-status, or the global form below):

1. ``text/plain`` for people: per recipient the code, its contract text, the remote
   server and its reply, and what the sender should do (relay.codes sender advice, or a
   hint by the RFC 3463 subject of the code).
2. ``message/delivery-status`` for programs (RFC 3464): Reporting-MTA,
   Original-Envelope-Id (the field name RFC 3464 §2.2.1 defines), Arrival-Date; per
   recipient Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code,
   Last-Attempt-Date (and Will-Retry-Until in delay warnings).
3. ``text/rfc822-headers``: the original header section, never the body.

**SMTPUTF8 messages** (RFC 6533): the report about an SMTPUTF8 message (`smtputf8`, or
when the caller does not say, a non-ASCII envelope address or a UTF-8 header section)
is the global form: ``report-type=global-delivery-status``, part 2
``message/global-delivery-status`` (UTF-8 addresses as ``utf-8-addr-unitext``, UTF-8 in
the Diagnostic-Code), part 3 ``message/global-headers``; 8bit where it holds UTF-8.
Otherwise the report is 7-bit except the ``To:`` header when the envelope sender itself
is a UTF-8 address, and non-ASCII recipients are written with the ``utf-8`` address type
in its 7-bit form (``utf-8-addr-xtext``: ``\\x{HEX}`` for each non-ASCII character and
for ``+``, ``=``, ``\\``), which RFC 6533 requires inside message/delivery-status.

Safety of remote text (relay.delivery.dsntext): RFC 2047 encoded-words in the remote
reply are decoded first, then control characters (CR, LF, NUL, TAB, ESC ...) become
spaces and any ``=?`` left is broken, so no remote text can end a line and start a
header, not even in a parser that decodes encoded-words; the 7-bit report is ASCII only
(other characters become ``?``); long texts are cut so that no line exceeds 998 octets
(RFC 5322 §2.1.1).
"""

from __future__ import annotations

import quopri
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from relay import codes as codetable
from relay.delivery.dsntext import (
    MAX_DIAGNOSTIC,
    address_field,
    clean_address,
    cut_octets,
    decode_utf8_address,
    encode_utf8_address,
    remote_text,
    sanitize_text,
    token,
)

__all__ = [
    "MAX_DIAGNOSTIC", "FailedRecipient", "address_field", "build_delay_warning", "build_ndr",
    "decode_utf8_address", "encode_utf8_address", "format_date", "is_smtputf8",
    "sanitize_text",
]

MAX_LINE = 998  # RFC 5322 §2.1.1, octets without CRLF
WRAP = 76  # width of the readable part

ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")  # RFC 3464 §2.3.3

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_DIAG_TYPE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)\s*;\s*")
_BCHARS = re.compile(r"[^0-9A-Za-z'()+_,\-./:=? ]")
_SEVEN_BIT = re.compile(rb"[\t\x20-\x7e]*")
_REPLY_CODE = re.compile(r"^[2-5]\d\d(?:[ -]|$)")


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient in a report.

    `status_code` is the enhanced code (its class is made to match the action: 5 for
    failed, 4 for delayed). `action` is an RFC 3464 action; empty (the default) means the
    report's own: ``failed`` in an NDR, ``delayed`` in a delay warning. `diagnostic` is
    the remote reply (``"550 5.1.1 unknown"``, or with its type: ``"smtp; 550 5.1.1
    unknown"``) or our own explanation with a type such as ``"x-dane-relay;
    tlsa-invalid: ..."``; bytes are taken as UTF-8.
    """

    address: str
    status_code: str
    action: str = ""
    remote_mta: str | None = None
    diagnostic: str | bytes | None = None
    last_attempt: datetime | None = None
    original_recipient: str | None = None  # ORCPT (RFC 3461), when the client gave one


# --- sanitizing (relay.delivery.dsntext) -----------------------------------------------

_token = token
_address = clean_address


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_date(when: datetime) -> str:
    """RFC 5322 §3.3 date-time (``Mon, 06 May 2024 07:08:09 +0200``); naive = UTC.

    Written here rather than with email.utils, which imports socket (pure module rule).
    """
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    offset = when.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset else 0
    sign = "-" if minutes < 0 else "+"
    hh, mm = divmod(abs(minutes), 60)
    return (f"{_DAYS[when.weekday()]}, {when.day:02d} {_MONTHS[when.month - 1]} "
            f"{when.year:04d} {when.hour:02d}:{when.minute:02d}:{when.second:02d} "
            f"{sign}{hh:02d}{mm:02d}")


def _status_for(code: str, action: str) -> str:
    cls = {"failed": "5", "delayed": "4"}.get(action, "2")
    m = _STATUS.match(code.strip())
    if not m:
        return f"{cls}.0.0"
    return f"{cls}.{m.group(2)}.{m.group(3)}"


LOCAL_DIAGNOSTIC_TYPE = "x-dane-relay"


def _diagnostic(value: str | bytes | None, *, unicode: bool = False
                ) -> tuple[str, str] | None:
    """(type, text) of a Diagnostic-Code, decoded then sanitized (dsntext.remote_text).
    Without an explicit type: ``smtp`` when the text starts with a reply code, else our
    own `LOCAL_DIAGNOSTIC_TYPE`. `unicode`: printable non-ASCII kept (global reports)."""
    text = cut_octets(remote_text(value, unicode=unicode), MAX_DIAGNOSTIC)
    if not text:
        return None
    m = _DIAG_TYPE.match(text)
    if m:
        return m.group(1).lower(), text[m.end():] or "-"
    if _REPLY_CODE.match(text):
        return "smtp", text
    return LOCAL_DIAGNOSTIC_TYPE, text


# --- advice --------------------------------------------------------------------------------

# By RFC 3463 subject, for codes without an entry in relay.codes.
_SUBJECT_ADVICE = {
    "1": "Check the recipient's address for typing errors.",
    "2": "The recipient's mailbox cannot take the message (full, disabled or refusing); "
    "reach the recipient another way or try again later.",
    "3": "The destination's mail system has a problem; if it persists, tell the "
    "recipient's mail administrator.",
    "4": "The destination could not be reached; if it persists, tell the recipient's mail "
    "administrator.",
    "5": "The destination's mail server refused the mail transaction; tell the recipient's "
    "mail administrator.",
    "6": "The destination cannot accept the content of this message (its size or format); "
    "try sending it in another form.",
    "7": "The destination refused the message for security or policy reasons; see the "
    "reply above and contact the recipient's mail administrator.",
}
_DEFAULT_ADVICE = ("See the reply above. If the problem persists, contact the recipient's "
                   "mail administrator.")


def sender_advice(code: str) -> str:
    """What the sender should do about `code`."""
    entry = codetable.info(code)
    if entry:
        return entry.sender_advice
    m = _STATUS.match(code)
    return _SUBJECT_ADVICE.get(m.group(2), _DEFAULT_ADVICE) if m else _DEFAULT_ADVICE


def explanation(code: str) -> str:
    """The contract text of `code`, or a generic one."""
    return codetable.text(code) or {
        "5": "Delivery failed",
        "4": "Delivery delayed",
    }.get(code[:1], "Delivery status")


# --- building --------------------------------------------------------------------------


def _wrap(text: str, indent: str = "", hang: str = "") -> list[str]:
    return textwrap.wrap(text, width=WRAP, initial_indent=indent,
                         subsequent_indent=indent + hang, break_long_words=True,
                         break_on_hyphens=False) or [indent.rstrip()]


def _readable(kind: str, reporting_mta: str, recipients: Sequence[FailedRecipient],
              statuses: Sequence[str], until: datetime | None) -> str:
    """The text/plain part (lines of at most `WRAP` characters)."""
    lines = [f"This is the mail relay at {reporting_mta}.", ""]
    if kind == "failed":
        intro = ("Your message could not be delivered to the recipients listed below. "
                 "The relay has given up and will not send it again.")
    else:
        when = format_date(until) if until else "its delivery deadline"
        intro = ("Your message has not yet been delivered to the recipients listed below. "
                 f"The relay keeps trying until {when}; you do not need to send it "
                 "again. You will be told if it finally fails.")
    lines += [*_wrap(intro), ""]
    for r, status in zip(recipients, statuses, strict=True):
        lines += _wrap(f"<{_address(r.address)}>:")
        lines += _wrap(f"{status} {explanation(status)}", "    ", "  ")
        if r.remote_mta:
            lines += _wrap(f"Remote server: {_token(r.remote_mta)}", "    ", "  ")
        diag = _diagnostic(r.diagnostic)
        if diag:
            label = "The remote server replied" if diag[0] == "smtp" else "Details"
            detail = remote_text(r.diagnostic, unicode=True)
            m = _DIAG_TYPE.match(detail)
            if m:
                detail = detail[m.end():]
            if detail and detail != explanation(status):
                lines += _wrap(f"{label}: {detail}", "    ", "  ")
        if r.last_attempt:
            lines += _wrap(f"Last attempt: {format_date(r.last_attempt)}", "    ", "  ")
        lines += _wrap(f"What you can do: {sender_advice(status)}", "    ", "  ")
        lines.append("")
    lines += _wrap("A technical report (message/delivery-status) and the headers of your "
                   "message follow.")
    return "\r\n".join(lines) + "\r\n"


def _delivery_status(*, reporting_mta: str, envelope_id: str | None, queue_id: str | None,
                     arrival_date: datetime, recipients: Sequence[FailedRecipient],
                     actions: Sequence[str], statuses: Sequence[str],
                     until: datetime | None, utf8: bool = False) -> str:
    """The per-message and per-recipient fields. `utf8` (message/global-delivery-status,
    RFC 6533 §6.3): addresses as utf-8-addr-unitext and the Diagnostic-Code with its
    printable non-ASCII characters; otherwise all ASCII."""
    blocks = []
    head = [f"Reporting-MTA: dns; {reporting_mta}"]
    if envelope_id:
        head.append(f"Original-Envelope-Id: {_token(envelope_id, 100)}")
    if queue_id:
        head.append(f"X-Relay-Queue-ID: {_token(queue_id, 100)}")
    head.append(f"Arrival-Date: {format_date(arrival_date)}")
    blocks.append(head)
    for r, action, status in zip(recipients, actions, statuses, strict=True):
        block = []
        if r.original_recipient:
            block.append("Original-Recipient: "
                         + address_field(r.original_recipient, unitext=utf8))
        block.append(f"Final-Recipient: {address_field(r.address, unitext=utf8)}")
        block.append(f"Action: {action}")
        block.append(f"Status: {status}")
        if r.remote_mta:
            block.append(f"Remote-MTA: dns; {_token(r.remote_mta)}")
        diag = _diagnostic(r.diagnostic, unicode=utf8)
        if diag:
            block.append(f"Diagnostic-Code: {diag[0]}; {diag[1]}")
        if r.last_attempt:
            block.append(f"Last-Attempt-Date: {format_date(r.last_attempt)}")
        if until is not None and action == "delayed":
            block.append(f"Will-Retry-Until: {format_date(until)}")
        blocks.append(block)
    return "\r\n".join("\r\n".join(b) + "\r\n" for b in blocks)


def _headers_section(original: bytes) -> bytes:
    """The header section of `original` (cut at the first empty line), CRLF line ends."""
    text = original.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    head = text.split(b"\n\n", 1)[0] if not text.startswith(b"\n") else b""
    lines = head.split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def _qp(data: bytes) -> bytes:
    """Quoted-printable with CRLF line ends (lines of at most 76 characters)."""
    lf = data.replace(b"\r\n", b"\n")
    return quopri.encodestring(lf, quotetabs=False).replace(b"\n", b"\r\n")


def _text_part(text: str, utf8: bool = False) -> tuple[list[str], bytes]:
    raw = text.encode("utf-8")
    if text.isascii():
        return (["Content-Type: text/plain; charset=us-ascii",
                 "Content-Transfer-Encoding: 7bit"], raw)
    if utf8:  # an SMTPUTF8 report travels 8-bit anyway (lines are short: WRAP)
        return (["Content-Type: text/plain; charset=utf-8",
                 "Content-Transfer-Encoding: 8bit"], raw)
    return (["Content-Type: text/plain; charset=utf-8",
             "Content-Transfer-Encoding: quoted-printable"], _qp(raw))


def _short_lines(section: bytes) -> bool:
    return all(len(line) <= MAX_LINE for line in section.split(b"\r\n"))


def _headers_part(section: bytes, utf8: bool = False) -> tuple[list[str], bytes]:
    """text/rfc822-headers: 7bit when the headers are plain ASCII with short lines, else
    quoted-printable. With `utf8`, message/global-headers (RFC 6533 §6.4: UTF-8 header
    fields, no charset parameter): 7bit/8bit when the lines are short and valid UTF-8,
    else quoted-printable (which RFC 6532 §3.5 allows for it)."""
    lines = section.split(b"\r\n")
    plain = _short_lines(section) and all(_SEVEN_BIT.fullmatch(line) for line in lines)
    if utf8:
        head = ["Content-Type: message/global-headers"]
        if plain:
            return [*head, "Content-Transfer-Encoding: 7bit"], section
        if _short_lines(section) and b"\x00" not in section and _valid_utf8(section):
            return [*head, "Content-Transfer-Encoding: 8bit"], section
        return [*head, "Content-Transfer-Encoding: quoted-printable"], _qp(section)
    if plain:
        return (["Content-Type: text/rfc822-headers",
                 "Content-Transfer-Encoding: 7bit"], section)
    return (["Content-Type: text/rfc822-headers; charset=utf-8",
             "Content-Transfer-Encoding: quoted-printable"], _qp(section))


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def is_smtputf8(envelope_sender: str, recipients: Sequence[FailedRecipient],
                original_headers: bytes) -> bool:
    """Does this report concern an SMTPUTF8 message? Decided from what the report
    carries, when the caller does not say: a non-ASCII envelope sender or recipient
    (they need SMTPUTF8, RFC 6531), or a header section in UTF-8 (RFC 6532)."""
    addresses = [envelope_sender, *(r.address for r in recipients),
                 *(r.original_recipient or "" for r in recipients)]
    if not all(a.isascii() for a in addresses):
        return True
    section = _headers_section(original_headers)
    return not section.isascii() and _valid_utf8(section)


def _boundary(wanted: str, bodies: Sequence[bytes]) -> str:
    """A valid RFC 2046 boundary based on `wanted` that occurs in none of the bodies."""
    base = _BCHARS.sub("", wanted)[:60].rstrip() or "dane-relay-report"
    candidate, n = base, 0
    while any(b"--" + candidate.encode() in body for body in bodies):
        n += 1
        candidate = f"{base}.{n}"
    return candidate


def _build(*, kind: str, original_headers: bytes, envelope_sender: str,
           envelope_id: str | None, arrival_date: datetime, reporting_mta: str,
           recipients: Sequence[FailedRecipient], now: datetime, message_id: str,
           boundary: str, until: datetime | None, queue_id: str | None,
           smtputf8: bool | None) -> bytes | None:
    if not envelope_sender or not recipients:
        return None
    utf8 = is_smtputf8(envelope_sender, recipients, original_headers) if smtputf8 is None \
        else smtputf8
    report_type = "global-delivery-status" if utf8 else "delivery-status"
    mta = _token(reporting_mta) or "localhost"
    default_action = "failed" if kind == "failed" else "delayed"
    actions = [r.action if r.action in ACTIONS else default_action for r in recipients]
    statuses = [_status_for(r.status_code, a) for r, a in zip(recipients, actions, strict=True)]
    text = _readable(kind, mta, recipients, statuses, until)
    report = _delivery_status(reporting_mta=mta, envelope_id=envelope_id,
                              queue_id=queue_id, arrival_date=arrival_date,
                              recipients=recipients, actions=actions, statuses=statuses,
                              until=until, utf8=utf8)
    text_headers, text_body = _text_part(text, utf8)
    hdr_headers, hdr_body = _headers_part(_headers_section(original_headers), utf8)
    parts = [
        (["Content-Description: Notification", *text_headers], text_body),
        (["Content-Description: Delivery report", f"Content-Type: message/{report_type}",
          f"Content-Transfer-Encoding: {'7bit' if report.isascii() else '8bit'}"],
         report.encode("utf-8")),
        (["Content-Description: Undelivered message headers" if kind == "failed"
          else "Content-Description: Delayed message headers", *hdr_headers], hdr_body),
    ]
    b = _boundary(boundary, [body for _, body in parts])
    msgid = _token(message_id).strip("<>") or "ndr@" + mta
    subject = ("Undelivered Mail Returned to Sender" if kind == "failed"
               else "Delayed Mail (still being retried)")
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{_address(envelope_sender, MAX_LINE - 8)}>",
        f"Subject: {subject}",
        f"Date: {format_date(now)}",
        f"Message-ID: <{msgid}>",
        "MIME-Version: 1.0",
        "Auto-Submitted: auto-replied",
        f"Content-Type: multipart/report; report-type={report_type};",
        f' boundary="{b}"',
    ]
    out = [("\r\n".join(head) + "\r\n\r\n").encode("utf-8"),
           b"This is a MIME-encapsulated delivery status notification.\r\n"]
    for headers, body in parts:
        out.append(f"\r\n--{b}\r\n".encode())
        out.append(("\r\n".join(headers) + "\r\n\r\n").encode("ascii"))
        out.append(body)
        if body and not body.endswith(b"\r\n"):
            out.append(b"\r\n")
    out.append(f"\r\n--{b}--\r\n".encode())
    return b"".join(out)


def build_ndr(*, original_headers: bytes, envelope_sender: str, envelope_id: str | None,
              arrival_date: datetime, reporting_mta: str, failed: list[FailedRecipient],
              now: datetime, message_id: str, boundary: str,
              queue_id: str | None = None, smtputf8: bool | None = None) -> bytes | None:
    """The non-delivery report for `failed` recipients of one message, or None.

    None when `envelope_sender` is empty (never an NDR for the null sender) or nothing
    failed. Recipients' codes are put in the 5.x.x class (``4.7.323`` → ``5.7.323``).
    `original_headers` may be the whole message: everything from the first empty line on
    is dropped. `message_id` is written in angle brackets (given with or without them);
    `boundary` is used as given unless it is not a valid MIME boundary or occurs in the
    content (then characters are dropped or a suffix ``.N`` is added, deterministically).
    `smtputf8`: the original message was an SMTPUTF8 one, so the report is the RFC 6533
    global form; None decides from the addresses and headers (`is_smtputf8`).
    """
    return _build(kind="failed", original_headers=original_headers,
                  envelope_sender=envelope_sender, envelope_id=envelope_id,
                  arrival_date=arrival_date, reporting_mta=reporting_mta, recipients=failed,
                  now=now, message_id=message_id, boundary=boundary, until=None,
                  queue_id=queue_id, smtputf8=smtputf8)


def build_delay_warning(*, original_headers: bytes, envelope_sender: str,
                        envelope_id: str | None, arrival_date: datetime, reporting_mta: str,
                        delayed: list[FailedRecipient], will_retry_until: datetime,
                        now: datetime, message_id: str, boundary: str,
                        queue_id: str | None = None, smtputf8: bool | None = None
                        ) -> bytes | None:
    """A delay warning (Action: delayed, Status 4.x.x, Will-Retry-Until), or None for the
    null sender. Recipients' `action` defaults to ``delayed`` when not a valid RFC 3464
    action; pass ``FailedRecipient(..., action="delayed")``. `smtputf8`: as in
    `build_ndr`.
    """
    return _build(kind="delayed", original_headers=original_headers,
                  envelope_sender=envelope_sender, envelope_id=envelope_id,
                  arrival_date=arrival_date, reporting_mta=reporting_mta, recipients=delayed,
                  now=now, message_id=message_id, boundary=boundary, until=will_retry_until,
                  queue_id=queue_id, smtputf8=smtputf8)
