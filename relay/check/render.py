"""Pure parts of `relay check`: TLSA record status, chain facts, advice, text rendering.

No I/O: relay.check.probe gathers the facts and builds a JSON-ready report; this module explains
records and certificates, says what the destination's administrator (or the relay's
operator) should fix, and renders the report as text (ANSI colour when asked).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from relay import codes as codetable
from relay import dane
from relay.check import stsview
from relay.config import format_duration
from relay.dane.policy import HostPlan, tlsa_qname
from relay.delivery.verdict import ChainCheck
from relay.model import TlsaRecord, TlsRequirement

USAGE = {0: "PKIX-TA", 1: "PKIX-EE", 2: "DANE-TA", 3: "DANE-EE"}
SELECTOR = {0: "Cert", 1: "SPKI"}
MTYPE = {0: "Full", 1: "SHA2-256", 2: "SHA2-512"}
_DIGEST_LEN = {1: 32, 2: 64}
_SHOW_HEX = 64  # hex digits of a record's data shown before "…" (Full records are long)


# --- TLSA records ---------------------------------------------------------------------------


def _short(text: str) -> str:
    """A record's presentation text with long data (Full records) cut."""
    head, _, data = text.rpartition(" ")
    if len(data) <= _SHOW_HEX:
        return text
    return f"{head} {data[:_SHOW_HEX]}… ({len(data) // 2} bytes)"


def _label(rec: TlsaRecord) -> str:
    return (f"{USAGE.get(rec.usage, f'usage {rec.usage}')} "
            f"{SELECTOR.get(rec.selector, f'selector {rec.selector}')} "
            f"{MTYPE.get(rec.mtype, f'matching type {rec.mtype}')}")


def why_unusable(rec: TlsaRecord) -> str:
    """Why relay.dane.usable() refuses a record (RFC 6698 §4.1, RFC 7672 §3.1.3)."""
    if rec.usage in (0, 1):
        return (f"usage {rec.usage} ({USAGE[rec.usage]}) is not usable for SMTP "
                "(RFC 7672 §3.1.3): ignored")
    if rec.usage not in (2, 3):
        return f"unknown usage {rec.usage}: malformed, ignored"
    if rec.selector not in SELECTOR:
        return f"unknown selector {rec.selector}: malformed, ignored"
    if rec.mtype not in MTYPE:
        return f"unknown matching type {rec.mtype}: malformed, ignored"
    if rec.mtype in _DIGEST_LEN and len(rec.data) != _DIGEST_LEN[rec.mtype]:
        return (f"malformed: {MTYPE[rec.mtype]} digest of {len(rec.data)} bytes (needs "
                f"{_DIGEST_LEN[rec.mtype]}): ignored")
    what = "certificate" if rec.selector == 0 else "public key"
    return f"malformed: the full {what} data does not parse: ignored"


def tlsa_status(records: Sequence[TlsaRecord], usable: Sequence[TlsaRecord]
                ) -> list[dict[str, Any]]:
    """Every published record: usable (what it is) or why not (including digest agility)."""
    chosen = set(usable)
    out = []
    for rec in records:
        if rec in chosen:
            ok, why = True, f"usable: {_label(rec)}"
        elif not dane.usable(rec):
            ok, why = False, why_unusable(rec)
        else:
            stronger = max((r.mtype for r in usable if (r.usage, r.selector) ==
                            (rec.usage, rec.selector) and r.mtype in _DIGEST_LEN), default=0)
            ok, why = False, (f"ignored: a stronger digest ({MTYPE.get(stronger, '?')}) is "
                              f"published for {USAGE[rec.usage]} {SELECTOR[rec.selector]} "
                              "(digest agility, RFC 7671 §9)")
        out.append({"text": str(rec), "usage": rec.usage, "selector": rec.selector,
                    "mtype": rec.mtype, "usable": ok, "why": why})
    return out


# --- the presented chain --------------------------------------------------------------------


@dataclass(frozen=True)
class ChainCheckFacts:
    certificates: list[dict[str, Any]]
    dane: dict[str, Any]


def _when(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%SZ")


def cert_facts(der: bytes, depth: int, records: Sequence[TlsaRecord], now: dt.datetime
               ) -> dict[str, Any]:
    """One certificate as the check shows it, with the published records it matches."""
    facts: dict[str, Any] = {"depth": depth, "cert_sha256": hashlib.sha256(der).hexdigest()}
    try:
        spki = dane.spki_der(der)
        facts["spki_sha256"] = hashlib.sha256(spki).hexdigest()
    except ValueError:
        spki = b""
        facts["spki_sha256"] = None
    facts["matches"] = [
        str(r) for r in records
        if r.selector in (0, 1) and r.mtype in (0, 1, 2) and (spki or r.selector == 0)
        and dane.association_data(der, r.selector, r.mtype) == r.data]
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        facts["error"] = f"does not parse: {exc}"
        return facts
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    validity = "expired" if now > na else "not yet valid" if now < nb else "valid"
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ca = bool(bc.ca)
    except x509.ExtensionNotFound:
        ca = False
    facts.update({
        "subject": cert.subject.rfc4514_string() or "(empty)",
        "issuer": cert.issuer.rfc4514_string() or "(empty)",
        "not_before": _when(nb), "not_after": _when(na), "validity": validity,
        "names": dane.leaf_names(cert) if depth == 0 else _san(cert), "ca": ca,
        "self_signed": cert.issuer == cert.subject,
    })
    return facts


def _san(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


def chain_facts(host: HostPlan, chain: Sequence[bytes], judged: ChainCheck,
                now: dt.datetime) -> ChainCheckFacts:
    certs = [cert_facts(der, i, host.tlsa, now) for i, der in enumerate(chain)]
    v = judged.result
    w = judged.webpki
    result: dict[str, Any] = {
        "webpki": {"ok": w.ok, "reason": w.reason, "result_type": w.result_type}
        if w else None,
        "required": host.requirement is TlsRequirement.DANE,
        "ok": judged.ok, "security": judged.security, "code": judged.code,
        "text": judged.dane_text, "reason": judged.reason,
        "depth": v.depth if v else None,
        "matched": str(v.matched) if v and v.matched else None,
    }
    usage2 = [r for r in host.usable_tlsa if r.usage == 2]
    # A DANE-TA record whose anchor is none of the certificates the server sent (and not
    # a full key/certificate in DNS): the server must send the chain up to that anchor.
    in_dns = [r for r in usage2 if r.mtype == 0]
    result["ta_missing"] = bool(usage2) and not in_dns and not any(
        str(r) in c.get("matches", []) for r in usage2 for c in certs[1:])
    return ChainCheckFacts(certs, result)


# --- summary and advice -----------------------------------------------------------------


def _decider(report: dict[str, Any]) -> dict[str, Any] | None:
    d = report.get("decided_by")
    if not d:
        return None
    return next((h for h in report["hosts"] if h["name"] == d["host"]), None)


def summary(report: dict[str, Any]) -> str:
    """One sentence: what the relay would do with mail for this domain."""
    kind, d = report["verdict"], report.get("decided_by")
    if kind in ("defer", "bounce"):
        when = "at once, no retries" if kind == "bounce" else "and retry later"
        return f"would {kind} ({when}): {_detail(report['code'], report['reply'])}"
    assert d is not None
    where = f"{d['host']} [{d['ip']}]" if d.get("ip") else d["host"]
    if not report["connected"]:
        need = {"dane": "DANE authentication required", "encrypt": "TLS required (no usable "
                "TLSA record)", "may": "opportunistic TLS", "none": "cleartext (route)",
                "sts": "MTA-STS: TLS and a web-PKI certificate required"}
        return (f"DNS allows delivery to {where}: {need.get(d['requirement'] or '', '?')} "
                "(not verified: --no-connect)")
    host = _decider(report)
    conn = next((c for c in host["connections"] if c["ip"] == d["ip"]), None) if host else None
    if kind == "dane-authenticated":
        why = f" ({conn['dane']['reason']})" if conn and conn.get("dane") else ""
        return f"would deliver to {where} with DANE authentication{why}"
    if kind == "sts-authenticated":
        st = report.get("mta_sts") or {}
        return (f"would deliver to {where} over TLS with a web-PKI certificate, as the "
                f"MTA-STS policy (enforce, id {st.get('id')}) demands")
    if kind == "tls":
        why = {"encrypt": "TLSA records exist but none is usable: TLS without authentication",
               "may": "no TLSA records apply: opportunistic TLS"}.get(d["requirement"], "")
        return f"would deliver to {where} over TLS" + (f" ({why})" if why else "")
    why = "STARTTLS not offered" if conn and not conn.get("starttls_offered") else \
        "TLS failed, opportunistic"
    if d["requirement"] == "none":
        why = "route tls = \"none\""
    return f"would deliver to {where} in CLEARTEXT ({why})"


def _owner(host: dict[str, Any]) -> str:
    return tlsa_qname(host["tlsa_base"] or host["name"], host["port"]) + "."


def _detail(code: str, reply: str | None) -> str:
    """The specific part of a reply built by relay.delivery.classify.local: "text (detail)"."""
    reply = reply or ""
    text = codetable.text(code)
    if text and reply.startswith(text + " (") and reply.endswith(")"):
        return reply[len(text) + 2:-1]
    return reply


def problems(report: dict[str, Any]) -> list[str]:
    """Each failing host/address with its code and the specific defect."""
    out: list[str] = []
    for h in report["hosts"]:
        if not h["usable"]:
            out.append(f"{h['name']}: {h['code']} {h['reason']}")
            continue
        for c in h["connections"]:
            if c["code"] is None:
                continue
            where = f"{h['name']} [{c['ip']}]"
            detail = _detail(c["code"], c["reply"])
            if detail.startswith(where):
                detail = detail[len(where):].lstrip(": ")
            line = f"{where}: {c['code']} {detail}"
            dane_facts = c.get("dane") or {}
            if dane_facts.get("ta_missing"):
                line += ("; no certificate in the chain it sends matches the DANE-TA record(s): "
                         "the server must send the whole chain up to that trust anchor "
                         "(RFC 7671 §5.2.2), or publish a record for its own key")
            out.append(line)
    return out


def advice(report: dict[str, Any], max_lifetime: float) -> dict[str, Any] | None:
    """Who should fix what; None when delivery is fine and nothing needs attention."""
    code, kind = report["code"], report["verdict"]
    suggested: list[dict[str, str]] = []
    for h in report["hosts"]:
        for c in h["connections"]:
            unauth = c["code"] in (codetable.TLSA_INVALID, codetable.CERT_EXPIRED) or (
                c["code"] is None and h["requirement"] == "encrypt")
            if unauth and c["chain"] and c["chain"][0].get("spki_sha256"):
                rec = f"3 1 1 {c['chain'][0]['spki_sha256']}"
                entry = {"host": h["name"], "owner": _owner(h), "record": rec,
                         "line": f"{_owner(h)} IN TLSA {rec}"}
                if entry not in suggested:
                    suggested.append(entry)
    found = problems(report)
    sts_fix = stsview.advice(report)
    if kind in ("dane-authenticated", "sts-authenticated", "plain") and not found \
            and not sts_fix:
        return None
    if kind == "tls" and not found and not suggested and not sts_fix:
        return None
    out: dict[str, Any] = {"who": None, "admin": None, "operator": None, "sender": None,
                           "problems": found, "suggested_tlsa": suggested, "retry": None,
                           "mta_sts": sts_fix}
    if code:
        info = codetable.info(code)
        resolver = report["resolver"]
        relay_side = code == codetable.DNS_FAILED and (
            not resolver["validating"] and resolver["required"])
        if relay_side:
            out["who"] = "relay-operator"
            out["operator"] = (
                "This is the relay's side, not the destination's: " + resolver["detail"]
                + ". Point dns.nameservers at a DNSSEC-validating resolver (Unbound with a "
                "root trust anchor) that the relay can reach; until then every delivery "
                "waits (dns.require_validating_resolver = true).")
        else:
            out["who"] = "destination"
            out["admin"] = info.admin_advice if info else None
        if not relay_side:
            out["sender"] = info.sender_advice if info else None
        if kind == "defer":
            out["retry"] = (f"the relay retries (delivery.retry_schedule); after "
                            f"{format_duration(max_lifetime)} (delivery.max_lifetime) it "
                            f"bounces with {codetable.permanent(code)}")
    elif suggested:
        out["who"] = "destination"
        out["admin"] = ("TLS is used but not authenticated: the published TLSA records are "
                        "all unusable. Publish a usable record (3 1 1 recommended).")
    return out


# --- text ------------------------------------------------------------------------------------


class _Paint:
    CODES = {"ok": "32", "fail": "31", "warn": "33", "info": "36", "bold": "1", "dim": "2"}

    def __init__(self, colour: bool, unicode: bool) -> None:
        self.colour = colour
        self.marks = ({"ok": "✓", "fail": "✗", "warn": "!", "info": "·"} if unicode else
                      {"ok": "+", "fail": "x", "warn": "!", "info": "-"})

    def __call__(self, style: str, text: str) -> str:
        if not self.colour or style not in self.CODES:
            return text
        return f"\x1b[{self.CODES[style]}m{text}\x1b[0m"

    def mark(self, status: str) -> str:
        return self(status, self.marks.get(status, " "))


def _answer_line(a: dict[str, Any]) -> tuple[str, str]:
    sec = a["security"]
    status = "fail" if sec == "bogus" else "ok" if sec == "secure" else "warn"
    what = f"{a['qname']} {a['type']}: "
    if a["rcode"] == "ok" and a["type"] == "TLSA":
        what += f"{len(a['records'])} record(s)"
    elif a["rcode"] == "ok":
        what += ", ".join(a["records"][:8]) + (" …" if len(a["records"]) > 8 else "")
    elif a["rcode"] in ("nodata", "nxdomain"):
        what += a["rcode"].upper()
        if a["type"] == "TLSA":
            what += " (authenticated denial)" if sec == "secure" else " (not signed)"
    else:
        what += f"{a['rcode'].upper()}"
        status = "fail"
    if a["rcode"] in ("ok", "nodata", "nxdomain") or sec == "bogus":
        what += f" [{sec}]"
    for link in a.get("chain") or []:
        what += f"; CNAME {link['owner']} → {link['target']} " \
                f"({'secure' if link['secure'] else 'insecure'})"
    if a.get("ede") and "EDE" not in (a.get("reason") or ""):
        what += "; EDE " + ", ".join(f"{e['code']} {e['text']}".strip() for e in a["ede"])
    if a["rcode"] not in ("ok", "nodata", "nxdomain") and a.get("reason"):
        what += f"; {a['reason']}"
    return status, what


def render(report: dict[str, Any], *, colour: bool = False, unicode: bool = True) -> str:
    p = _Paint(colour, unicode)
    lines: list[str] = []

    def head(text: str) -> None:
        lines.append("")
        lines.append(p("bold", text))

    def item(status: str, text: str, indent: int = 2) -> None:
        lines.append(" " * indent + f"{p.mark(status)} {text}")

    how = "no mail is sent: QUIT before MAIL FROM" if report["connected"] else \
        "DNS only: --no-connect"
    lines.append(p("bold", f"relay check {report['domain']}") + p(
        "dim", f"  ({report['checked_at']}; {how})"))
    r = report["resolver"]
    head("Resolver")
    item("ok" if r["validating"] else "fail", r["detail"])
    if not r["validating"]:
        loud = ("DANE CANNOT BE ENFORCED: deliveries wait (4.4.312) while "
                "dns.require_validating_resolver = true" if r["required"] else
                "DANE IS OFF: dns.require_validating_resolver = false, so every answer "
                "counts as unsigned and TLSA records are ignored")
        item("fail", p("fail", loud))

    mx = report["mx"]
    head(f"MX of {report['domain']}")
    if mx["route"]:
        item("info", f"route [[routes]] {mx['route']}: next hops "
             + ", ".join(mx["records"]) + " (no MX lookup)")
    elif not mx["queried"]:
        item("info", "not looked up")
    else:
        status, text = _answer_line({"qname": report["domain"], "type": "MX",
                                     "rcode": mx["rcode"], "security": mx["security"],
                                     "records": mx["records"], "chain": mx["chain"],
                                     "ede": mx["ede"], "reason": mx["reason"]})
        item(status, text)
        if mx["null_mx"]:
            item("fail", "null MX (RFC 7505): the domain accepts no mail")
        if mx["implicit"]:
            item("info", "no MX records: the domain itself is the mail host (implicit MX)")
    plan = report["plan"]
    if plan["dane_mode"] != "opportunistic":
        item("info", f"domains.\"{report['domain']}\".dane = \"{plan['dane_mode']}\"")
    if plan["action"] != "deliver" and not report["hosts"]:
        item("fail", f"{plan['code']}: {plan['reason']}")

    if report.get("mta_sts"):
        stsview.render(report["mta_sts"], item, head, _answer_line)

    for h in report["hosts"]:
        _render_host(h, report["connected"], item, head, lines, p)

    head("Verdict")
    v = report["verdict"]
    style = "ok" if report["deliverable"] else "fail"
    code = f" {report['code']} {report['code_text'] or ''}".rstrip() if report["code"] else ""
    lines.append("  " + p(style, p("bold", f"{v}{code}")) + p(
        "dim", f"  (exit {0 if report['deliverable'] else 1})"))
    lines.append(f"  {report['summary']}")
    adv = report.get("advice")
    if adv:
        _render_advice(adv, head, lines, p)
    return "\n".join(lines) + "\n"


def _render_host(h: dict[str, Any], connected: bool, item: Any, head: Any,
                 lines: list[str], p: _Paint) -> None:
    head(f"Host {h['name']} (preference {h['preference']}, port {h['port']})")
    for a in h["address_lookups"]:
        item(*_answer_line(a))
    if h["addresses"]:
        addrs = ", ".join(a["ip"] for a in h["addresses"])
        item("ok" if h["addresses_secure"] else "warn",
             f"addresses {addrs} ({'secure' if h['addresses_secure'] else 'insecure'})")
    for a in h["tlsa_lookups"]:
        item(*_answer_line(a))
    if not h["tlsa_lookups"] and h["usable"] and not h["tlsa_bases"]:
        item("info", "TLSA not looked up: " + h["reason"])
    if h["tlsa"]:
        item("info", f"TLSA records at {_owner(h)} ({len(h['tlsa'])}):")
        for t in h["tlsa"]:
            item("ok" if t["usable"] else "warn", f"{_short(t['text'])}  — {t['why']}", 6)
    if not h["usable"]:
        item("fail", f"unusable: {h['code']} {h['reason']}")
        return
    req = {"dane": "DANE: TLS + a certificate matching a usable TLSA record",
           "encrypt": "TLS mandatory, no authentication (no usable TLSA record)",
           "may": "opportunistic TLS (cleartext if STARTTLS is absent)",
           "none": "cleartext (route tls = \"none\")"}.get(h["requirement"], h["requirement"])
    item("info", f"policy: {req}; SNI {h['sni']}")
    if h["requirement"] == "dane":
        item("info", "reference names (DANE-TA): " + ", ".join(h["reference_names"]))
    if not connected:
        item("info", "not connecting (--no-connect)")
        return
    for c in h["connections"]:
        lines.append(f"    [{c['ip']}]:{c['port']}")
        for s in c["steps"]:
            if s["text"].startswith(("DANE:", "MTA-STS:")) and c["chain"]:
                _render_chain(c["chain"], lines, p)
            item(s["status"], s["text"], 6)


def _render_chain(chain: list[dict[str, Any]], lines: list[str], p: _Paint) -> None:
    lines.append("      chain presented:")
    for c in chain:
        pad = " " * 10
        if "subject" not in c:
            lines.append(f"        {c['depth']} {c.get('error', 'does not parse')}")
            continue
        lines.append(f"        {c['depth']} subject {c['subject']}")
        lines.append(f"{pad}issuer  {c['issuer']}" + (" (self-signed)" if c["self_signed"]
                                                       else ""))
        valid = f"{c['not_before']} → {c['not_after']}"
        style = "ok" if c["validity"] == "valid" else "warn"
        lines.append(f"{pad}valid   {valid} " + p(style, f"({c['validity']})"))
        if c["names"]:
            lines.append(f"{pad}names   {', '.join(c['names'])}")
        if c.get("spki_sha256"):
            lines.append(f"{pad}3 1 1   {c['spki_sha256']}" if c["depth"] == 0 else
                         f"{pad}2 1 1   {c['spki_sha256']}")
        for m in c["matches"]:
            lines.append(f"{pad}" + p("ok", f"matches TLSA {m[:40]}…"))


def _render_advice(adv: dict[str, Any], head: Any, lines: list[str], p: _Paint) -> None:
    if adv.get("problems"):
        head("Problems")
        for line in adv["problems"]:
            lines.append(f"  - {line}")
    if adv.get("operator"):
        head("What the relay's operator should fix")
        lines.append(f"  {adv['operator']}")
    if adv.get("admin") or adv.get("suggested_tlsa"):
        head("What the domain's administrator should fix")
        if adv.get("admin"):
            lines.append(f"  {adv['admin']}")
        for s in adv.get("suggested_tlsa") or []:
            lines.append(f"  A record that matches the certificate {s['host']} presents now:")
            lines.append("    " + p("bold", s["line"]))
    if adv.get("mta_sts"):
        head("MTA-STS: what the domain's administrator should fix")
        for line in adv["mta_sts"]:
            lines.append(f"  - {line}")
    if adv.get("sender"):
        lines.append("")
        lines.append(f"  For the sender: {adv['sender']}")
    if adv.get("retry"):
        lines.append(f"  Meanwhile {adv['retry']}.")
