"""The report message of RFC 8460 §5.3: multipart/report; report-type="tlsrpt".

Pure: the time, the Message-ID and the boundary come in, bytes go out (CRLF line ends,
7-bit). DKIM signing is done on these bytes by relay.tlsrpt.reporter (it is I/O-free too,
but its library pulls in a DNS resolver).

    From: <from>                       To: <rua address(es)>
    Subject: Report Domain: <policy-domain> Submitter: <submitter> Report-ID: <<id>>
    TLS-Report-Domain: <policy-domain>  TLS-Report-Submitter: <submitter>
    Content-Type: multipart/report; report-type="tlsrpt"; boundary="..."
      1. text/plain: a line for people
      2. application/tlsrpt+gzip, base64, attachment "<submitter>!<domain>!<begin>!<end>.json.gz"
"""

from __future__ import annotations

import base64
import hashlib
import textwrap
from collections.abc import Sequence
from datetime import datetime

from relay.delivery import dsn
from relay.tlsrpt import report as rpt

# Signed by DKIM (§5.3: the two report headers SHOULD be covered).
SIGNED_HEADERS = ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version",
                  "Content-Type", "TLS-Report-Domain", "TLS-Report-Submitter")


def _b64_lines(data: bytes) -> list[str]:
    text = base64.b64encode(data).decode("ascii")
    return [text[i:i + 76] for i in range(0, len(text), 76)] or [""]


def _fold_addresses(name: str, addresses: Sequence[str]) -> list[str]:
    lines = [f"{name}: {addresses[0]}"]
    for a in addresses[1:]:
        lines[-1] += ","
        lines.append(f" {a}")
    return lines


def _fold(line: str, limit: int = 78) -> list[str]:
    """Fold a long header line at spaces (RFC 5322 §2.2.3); no word is cut."""
    out: list[str] = []
    while len(line) > limit and " " in line[1:limit]:
        cut = line.rfind(" ", 1, limit)
        out.append(line[:cut])
        line = line[cut:]
    out.append(line)
    return out


def readable_text(report: dict[str, object], policy_domain: str, submitter: str) -> str:
    ok, bad = rpt.totals(report)  # type: ignore[arg-type]
    dr = report["date-range"]
    assert isinstance(dr, dict)
    return (f"This is an aggregate TLS report (RFC 8460) from {submitter} for the policy "
            f"domain {policy_domain}, {dr['start-datetime']} to {dr['end-datetime']}: "
            f"{ok} successful and {bad} failed TLS session(s). The report is attached "
            "as gzip-compressed JSON.")


def build_mail(*, report: dict[str, object], report_gz: bytes, policy_domain: str,
               submitter: str, from_address: str, to: Sequence[str], begin: float,
               end: float, now: datetime, message_id: str | None = None) -> bytes:
    """The report message (without DKIM-Signature). `to`: the mailto addresses."""
    if not to:
        raise ValueError("a report message needs a recipient")
    rid = str(report["report-id"])
    domain = policy_domain.lower().rstrip(".")
    name = rpt.filename(submitter, domain, begin, end)
    boundary = "tlsrpt-" + hashlib.sha256(report_gz).hexdigest()[:32]
    headers = [
        f"From: {from_address}",
        f"Date: {dsn.format_date(now)}",
        *_fold_addresses("To", list(to)),
        *_fold(f"Subject: {rpt.subject(domain, submitter, rid)}"),
        f"Message-ID: <{message_id or rid}>",
        f"TLS-Report-Domain: {domain}",
        f"TLS-Report-Submitter: {submitter.lower().rstrip('.')}",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=\"tlsrpt\";",
        f" boundary=\"{boundary}\"",
    ]
    text = readable_text(report, domain, submitter)
    body = [
        "This is a multipart message in MIME format.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=\"us-ascii\"",
        "Content-Transfer-Encoding: 7bit",
        "",
        *textwrap.wrap(text, 76, break_on_hyphens=False),
        "",
        f"--{boundary}",
        f"Content-Type: {rpt.MEDIA_TYPE_GZIP}",
        "Content-Transfer-Encoding: base64",
        "Content-Disposition: attachment;",
        f" filename=\"{name}\"",
        "",
        *_b64_lines(report_gz),
        "",
        f"--{boundary}--",
        "",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + "\r\n".join(body)).encode("ascii")
