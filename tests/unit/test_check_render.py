"""Pure parts of `relay check` and the per-host decisions it shares with delivery
(relay.check.render, relay.delivery.verdict): record status, chain facts, advice, rendering,
colour."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relay.check import render as checkfmt
from relay.cli.check import use_colour
from relay.dane.policy import DomainPlan, HostAddress, HostPlan, PlanAction
from relay.delivery import verdict
from relay.errors import SmtpClientError, TlsError
from relay.model import Action, Outcome, Scope, TlsaRecord
from relay.model import TlsRequirement as TR
from tests.unit.dane_helpers import DAY, NOW, ca, leaf

D32, D64 = b"\xab" * 32, b"\xcd" * 64


def host(tlsa: tuple[TlsaRecord, ...] = (), usable: tuple[TlsaRecord, ...] | None = None,
         req: TR | None = TR.DANE, name: str = "mx.example.test") -> HostPlan:
    usable = tlsa if usable is None else usable
    return HostPlan(name, 10, 25, (HostAddress("192.0.2.1", True),), True, name, (name,),
                    name if tlsa else None, tlsa, usable, req, None, "", (name, "example.test"))


# --- TLSA record status -----------------------------------------------------------------


@pytest.mark.parametrize(("rec", "why"), [
    (TlsaRecord(0, 0, 1, D32), "usage 0 (PKIX-TA) is not usable for SMTP"),
    (TlsaRecord(1, 1, 1, D32), "usage 1 (PKIX-EE) is not usable for SMTP"),
    (TlsaRecord(4, 1, 1, D32), "unknown usage 4: malformed"),
    (TlsaRecord(3, 2, 1, D32), "unknown selector 2: malformed"),
    (TlsaRecord(3, 1, 3, D32), "unknown matching type 3: malformed"),
    (TlsaRecord(3, 1, 1, D32[:31]), "SHA2-256 digest of 31 bytes (needs 32)"),
    (TlsaRecord(3, 1, 2, D32), "SHA2-512 digest of 32 bytes (needs 64)"),
    (TlsaRecord(3, 1, 0, b"not a key"), "the full public key data does not parse"),
    (TlsaRecord(2, 0, 0, b"not a cert"), "the full certificate data does not parse"),
])
def test_unusable_records_say_why(rec: TlsaRecord, why: str) -> None:
    (status,) = checkfmt.tlsa_status([rec], [])
    assert status["usable"] is False and why in status["why"] and status["text"] == str(rec)


def test_usable_records_and_digest_agility() -> None:
    weak, strong, ta = TlsaRecord(3, 1, 1, D32), TlsaRecord(3, 1, 2, D64), TlsaRecord(
        2, 0, 1, D32)
    out = checkfmt.tlsa_status([weak, strong, ta], [strong, ta])
    assert [s["usable"] for s in out] == [False, True, True]
    assert "stronger digest (SHA2-512)" in out[0]["why"] and "RFC 7671" in out[0]["why"]
    assert out[1]["why"] == "usable: DANE-EE SPKI SHA2-512"
    assert out[2]["why"] == "usable: DANE-TA Cert SHA2-256"


# --- chain facts ------------------------------------------------------------------------


def test_chain_facts_dates_names_and_matching_records() -> None:
    root = ca("Root")
    old = leaf(("mx.example.test", "alt.example.test"), issuer=root,
               not_after=NOW - DAY)  # expired: DANE-EE does not care
    ee = TlsaRecord(3, 1, 1, old.tlsa_data(1, 1))
    ta = TlsaRecord(2, 0, 1, root.tlsa_data(0, 1))
    h = host((ee, ta))
    judged = verdict.check_chain(h, [old.der, root.der], NOW)
    assert judged.ok and judged.security == "dane-authenticated"
    facts = checkfmt.chain_facts(h, [old.der, root.der], judged, NOW)
    c0, c1 = facts.certificates
    assert c0["validity"] == "expired" and c0["names"] == ["mx.example.test",
                                                           "alt.example.test"]
    assert c0["matches"] == [str(ee)] and c1["matches"] == [str(ta)]
    assert c0["spki_sha256"] == old.tlsa_data(1, 1).hex() and c1["ca"] and c1["self_signed"]
    assert c1["names"] == []  # a CA's CN is not a name anyone checks
    assert facts.dane["ok"] and facts.dane["depth"] == 0 and not facts.dane["ta_missing"]
    future = leaf(issuer=root, not_before=NOW + DAY)
    assert checkfmt.cert_facts(future.der, 0, (), NOW)["validity"] == "not yet valid"
    assert "does not parse" in checkfmt.cert_facts(b"\x30\x03junk", 0, (), NOW)["error"]


def test_trust_anchor_missing_is_detected() -> None:
    root = ca("Root")
    inter = ca("Inter", issuer=root)
    srv = leaf(issuer=inter)
    h = host((TlsaRecord(2, 0, 1, root.tlsa_data(0, 1)),))
    judged = verdict.check_chain(h, [srv.der, inter.der], NOW)
    assert not judged.ok and judged.code == "4.7.323" and judged.security == "failed"
    facts = checkfmt.chain_facts(h, [srv.der, inter.der], judged, NOW)
    assert facts.dane["ta_missing"] is True
    sent = checkfmt.chain_facts(h, [srv.der, inter.der, root.der], verdict.check_chain(
        h, [srv.der, inter.der, root.der], NOW), NOW)
    assert sent.dane["ok"] and sent.dane["ta_missing"] is False


# --- relay.delivery.verdict ------------------------------------------------------------


@pytest.mark.parametrize(("req", "offered", "use_tls", "step"), [
    (TR.DANE, True, True, verdict.TlsStep.STARTTLS),
    (TR.DANE, False, True, verdict.TlsStep.MISSING),
    (TR.ENCRYPT, False, True, verdict.TlsStep.MISSING),
    (TR.MAY, True, True, verdict.TlsStep.STARTTLS),
    (TR.MAY, False, True, verdict.TlsStep.SKIP),
    (TR.MAY, True, False, verdict.TlsStep.SKIP),  # the cleartext retry
    (TR.NONE, True, True, verdict.TlsStep.SKIP),
])
def test_tls_step(req: TR, offered: bool, use_tls: bool, step: verdict.TlsStep) -> None:
    assert verdict.tls_step(req, offered, use_tls) is step


def test_min_version_and_chain_without_dane() -> None:
    assert verdict.starttls_min_version(TR.DANE, "1.3") == "1.3"
    assert verdict.starttls_min_version(TR.MAY, "1.3") == "1.0"
    enc = verdict.check_chain(host(req=TR.ENCRYPT), [], NOW)
    assert enc.ok and enc.security == "tls" and "without authentication" in enc.dane_text
    assert verdict.check_chain(host(req=TR.MAY), [], NOW).dane_text == "not required"


@pytest.mark.parametrize(("exc", "req", "code", "ftype"), [
    (TlsError("handshake", phase="tls"), TR.DANE, "4.7.321", "starttls-not-supported"),
    (TlsError("refused", phase="starttls", code=454, reply="454 no"), TR.ENCRYPT, "4.7.321",
     "starttls-not-supported"),
    (TlsError("handshake", phase="tls"), TR.MAY, "4.4.1", None),
    (SmtpClientError("refused", phase="connect"), TR.DANE, "4.4.1", None),
    (SmtpClientError("eof", phase="ehlo"), TR.DANE, "4.4.2", None),
    (SmtpClientError("go away", phase="greeting", code=554, reply="554 5.7.1 go away"),
     TR.MAY, "5.7.1", None),
])
def test_session_failure(exc: SmtpClientError, req: TR, code: str, ftype: str | None) -> None:
    out, ft = verdict.session_failure(host(), "192.0.2.1", exc, req)
    assert (out.code, ft, out.scope) == (code, ftype, Scope.SITE)


def test_give_up_and_plan_outcomes() -> None:
    d = [Outcome(Action.DEFERRED, c) for c in ("4.4.1", "4.7.321", "4.7.323")]
    assert verdict.give_up(d).code == "4.7.323"
    hard = [Outcome(Action.BOUNCED, "5.7.1"), Outcome(Action.BOUNCED, "5.0.0")]
    assert verdict.give_up(hard).code == "5.7.1"
    assert verdict.give_up([*hard, d[0]]).code == "4.4.1"
    assert verdict.give_up([]).code == "4.4.312"
    bounce = DomainPlan("x.test", PlanAction.BOUNCE, "5.1.10", "null MX")
    assert verdict.plan_outcome(bounce).action is Action.BOUNCED
    defer = DomainPlan("x.test", PlanAction.DEFER, "4.7.324", "bogus")
    assert (verdict.plan_outcome(defer).action, verdict.plan_outcome(defer).code) == (
        Action.DEFERRED, "4.7.324")


def test_loops_back() -> None:
    own = frozenset({("127.0.0.1", 2525)})
    assert verdict.loops_back("127.0.0.1", 2525, own)
    assert not verdict.loops_back("127.0.0.1", 25, own)
    wild = frozenset({("*", 25)})
    assert verdict.loops_back("127.9.9.9", 25, wild) and not verdict.loops_back(
        "192.0.2.1", 25, wild)


# --- advice, summary, rendering ---------------------------------------------------------


def report(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "domain": "x.test", "verdict": "defer", "code": "4.4.312", "code_text": "DNS query "
        "failed", "reply": "DNS query failed (resolver down)", "deliverable": False,
        "connected": True, "checked_at": "2026-06-01T12:00:00+00:00",
        "resolver": {"nameservers": ["127.0.0.1:53"], "validating": False,
                     "reachable": False, "detail": "resolver 127.0.0.1:53 did not answer",
                     "required": True},
        "mx": {"queried": False, "security": None, "rcode": None, "records": [],
               "implicit": False, "null_mx": False, "route": None, "ede": [], "reason": "",
               "chain": []},
        "plan": {"action": "defer", "code": "4.4.312", "reason": "resolver down",
                 "dane_mode": "opportunistic", "route": None, "failure_type": None},
        "hosts": [], "decided_by": None}
    base.update(kw)
    base["summary"] = checkfmt.summary(base)
    base["advice"] = checkfmt.advice(base, 86400)
    return base


def test_relay_side_problem_is_the_operators() -> None:
    r = report()
    assert r["advice"]["who"] == "relay-operator" and r["advice"]["sender"] is None
    assert "dns.nameservers" in r["advice"]["operator"] and "5.4.312" in r["advice"]["retry"]
    assert r["summary"] == "would defer (and retry later): resolver down"
    text = checkfmt.render(r)
    assert "What the relay's operator should fix" in text and "DANE CANNOT BE ENFORCED" in text


def test_colour_and_ascii_rendering() -> None:
    r = report()
    coloured = checkfmt.render(r, colour=True)
    assert "\x1b[31m" in coloured and "\x1b[1m" in coloured
    plain = checkfmt.render(r, colour=False, unicode=False)
    assert "\x1b[" not in plain and plain.isascii()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_use_colour() -> None:
    assert use_colour(_Tty(), {}) is True
    assert use_colour(_Tty(), {"NO_COLOR": "1"}) is False
    assert use_colour(_Tty(), {"NO_COLOR": ""}) is True  # no-color.org: set and not empty
    assert use_colour(io.StringIO(), {}) is False


def test_pure_modules_import_no_io() -> None:
    # `socket` itself comes in with cryptography (relay.dane), so it is checked in the
    # modules' own imports; asyncio, ssl and aiosqlite must not be loaded at all.
    code = ("import sys; import relay.delivery.verdict, relay.check.render; "
            "bad = {'ssl', 'asyncio', 'aiosqlite'} & set(sys.modules); "
            "print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
    for mod in (verdict, checkfmt):
        tree = ast.parse(Path(str(mod.__file__)).read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names}
        names |= {str(n.module).split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom)}
        assert not names & {"socket", "ssl", "asyncio", "aiosqlite"}, (mod, names)
