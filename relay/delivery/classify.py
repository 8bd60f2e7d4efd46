"""Failures and replies → outcomes (relay.model.Outcome): action, scope, enhanced code.

Pure. The rules, after Postfix's `smtp_trouble.c`:

* **Action** from the reply's class: 2xx delivered (per RCPT it means "accepted", the
  DATA reply decides), 4xx deferred, 5xx bounced. Any other code (1xx, 3xx where a final
  reply was expected, garbage) is a protocol error: deferred with ``4.5.0``.
* **Scope** from the phase the reply answered: connect / greeting / EHLO / STARTTLS →
  the whole site; MAIL and DATA (and the end of data) → the message; RCPT → that
  recipient. A ``421`` always reaches the site: the server is closing the session.
* **Enhanced code**: the one in the reply when there is a valid one (RFC 3463 syntax),
  either passed as `enhanced` or leading the reply text. Its class is forced to the
  reply's class (``550 4.1.1`` → ``5.1.1``), as Postfix does, because the basic code is
  what the server commits to. Without one, a default by phase: RCPT and MAIL → ``X.1.0``
  ("other address status": the reply concerns an address), everything else → ``X.0.0``
  (undefined: at DATA the cause may be content, policy or size; at the greeting
  anything). Delivered recipients get ``2.1.5`` at RCPT, ``2.1.0`` at MAIL, ``2.0.0``
  otherwise.

Failures that are ours, not the server's (DANE, TLS, DNS, connection), are built by
`local` and its named wrappers: the code comes from relay.codes and the outcome's `reply`
is our explanation, the contract text, with the detail (e.g. the server's answer to
STARTTLS) in parentheses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from relay import codes as codetable
from relay.model import Action, Outcome, Scope

# Phase names (lower case) → scope. Unknown phases are treated as site-wide.
PHASES: dict[str, Scope] = {
    "connect": Scope.SITE,
    "greeting": Scope.SITE,
    "banner": Scope.SITE,
    "ehlo": Scope.SITE,
    "helo": Scope.SITE,
    "lhlo": Scope.SITE,
    "starttls": Scope.SITE,
    "tls": Scope.SITE,
    "auth": Scope.SITE,
    "quit": Scope.SITE,
    "mail": Scope.MESSAGE,
    "data": Scope.MESSAGE,
    "bdat": Scope.MESSAGE,
    "dot": Scope.MESSAGE,
    "data_end": Scope.MESSAGE,
    "end_of_data": Scope.MESSAGE,
    "body": Scope.MESSAGE,
    "rset": Scope.MESSAGE,
    "rcpt": Scope.RECIPIENT,
}

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_LEADING_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")

# Texts for codes we produce that relay.codes has no contract text for.
_LOCAL_TEXT = {
    "4.4.1": "No answer from host (connection refused or timed out)",
    "4.4.2": "Connection dropped",
    "4.4.4": "Unable to route: no usable address for the destination",
    "4.5.0": "Protocol error: unexpected reply",
}


def valid_enhanced(code: str | None) -> bool:
    """True for an RFC 3463 status code such as ``5.1.1`` or ``4.7.323``."""
    return bool(code) and _ENHANCED.match(code or "") is not None


def scope_of(phase: str, code: int | None = None) -> Scope:
    """The scope of a reply to `phase`; a 421 always reaches the whole site."""
    if code == 421:
        return Scope.SITE
    return PHASES.get(phase.strip().lower(), Scope.SITE)


def _default_enhanced(cls: str, phase: str, code: int = 0) -> str:
    phase = phase.strip().lower()
    if code == 421:  # the server is closing the channel, whatever the command
        return "4.3.0"
    if cls == "2":
        return {"rcpt": "2.1.5", "mail": "2.1.0"}.get(phase, "2.0.0")
    if phase in ("rcpt", "mail"):
        return f"{cls}.1.0"
    return f"{cls}.0.0"


def _one_line(text: str) -> str:
    """Lines of a (multi-line) reply joined by single spaces."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def from_reply(phase: str, code: int, enhanced: str | None, text: str) -> Outcome:
    """The outcome of an SMTP reply `code` (+ `enhanced`, `text`) to the command `phase`.

    `text` is the reply text after the code (a full line such as ``"550 5.1.1 no"`` is
    accepted too); multi-line texts are joined with spaces. The outcome's `reply` is
    ``"<code> <text>"``.
    """
    line = _one_line(text)
    prefix = re.match(rf"^{code:d}(?:[ -]|$)", line) if 100 <= code <= 999 else None
    if prefix:
        line = line[prefix.end():].lstrip()
    reply = f"{code} {line}".rstrip() if line else str(code)

    cls = str(code // 100) if 200 <= code <= 599 else ""
    if cls not in ("2", "4", "5"):
        return Outcome(Action.DEFERRED, "4.5.0", reply or _LOCAL_TEXT["4.5.0"], Scope.SITE)

    found = enhanced.strip() if enhanced else None
    if not valid_enhanced(found):
        m = _LEADING_ENHANCED.match(line)
        found = m.group(0) if m else None
    if found:
        status = f"{cls}.{found.partition('.')[2]}"
    else:
        status = _default_enhanced(cls, phase, code)

    action = {"2": Action.DELIVERED, "4": Action.DEFERRED, "5": Action.BOUNCED}[cls]
    return Outcome(action, status, reply, scope_of(phase, code))


def _action_for(code: str) -> Action:
    return {"2": Action.DELIVERED, "5": Action.BOUNCED}.get(code[:1], Action.DEFERRED)


def local(code: str, detail: str = "", *, scope: Scope = Scope.SITE) -> Outcome:
    """An outcome for a failure of our own (DANE, TLS, DNS, connection, routing).

    `reply` is the contract text of `code` (relay.codes), or a short description for
    codes without one, followed by `detail` in parentheses when given. The action follows
    the code's class: 4 → deferred, 5 → bounced.
    """
    base = codetable.text(code) or _LOCAL_TEXT.get(codetable.temporary(code), "")
    detail = _one_line(detail)
    if base and detail:
        reply = f"{base} ({detail})"
    else:
        reply = base or detail
    return Outcome(_action_for(code), code, reply, scope)


def starttls_not_supported(detail: str = "") -> Outcome:
    """4.7.321: TLS is mandatory (TLSA present) but STARTTLS is absent or fails."""
    return local(codetable.STARTTLS_NOT_SUPPORTED, detail)


def certificate_expired(detail: str = "") -> Outcome:
    """4.7.322: a certificate on the DANE path is past its validity."""
    return local(codetable.CERT_EXPIRED, detail)


INJECTION = "STARTTLS response injection"
STARTTLS_INJECTION_MAY = "4.7.0"  # RFC 3463 X.7.0: other or undefined security status


def starttls_injection(where: str, *, mandatory: bool, code: str | None = None) -> Outcome:
    """The server (or something on the path) sent data after its 220 reply to STARTTLS,
    before the TLS handshake: the session was aborted and nothing was sent.

    Where TLS was mandatory the code stays ``4.7.321`` (the SPEC's code for "TLS is
    required and STARTTLS fails": the TLS-RPT and DANE code sets are unchanged); elsewhere
    it is ``4.7.0``, a security failure, not a transport one (``4.4.1`` would say the host
    did not answer). Either way the reply names the injection, never "not supported"
    alone. `where`: ``"mx.example.com [192.0.2.1]"``; `code`: the mandatory-TLS code to
    use instead of ``4.7.321`` (MTA-STS enforce: ``4.7.341``)."""
    if not mandatory:
        code = STARTTLS_INJECTION_MAY
    elif code is None:
        code = codetable.STARTTLS_NOT_SUPPORTED
    reply = (f"{INJECTION}: {_one_line(where)} sent data after its 220 reply to STARTTLS, "
             "before the TLS handshake; the session was aborted and nothing was sent")
    if mandatory:
        reply += " (TLS is required for this host)"
    return Outcome(Action.DEFERRED, code, reply, Scope.SITE)


def tlsa_invalid(detail: str = "") -> Outcome:
    """4.7.323: usable TLSA records exist and no presented certificate matches."""
    return local(codetable.TLSA_INVALID, detail)


def dnssec_invalid(detail: str = "") -> Outcome:
    """4.7.324: a signed record was bogus, or the TLSA query failed (SERVFAIL)."""
    return local(codetable.DNSSEC_INVALID, detail)


def dns_failed(detail: str = "") -> Outcome:
    """4.4.312: any other DNS failure (timeout, SERVFAIL not known to be DNSSEC)."""
    return local(codetable.DNS_FAILED, detail)


def connection_failed(detail: str = "") -> Outcome:
    """4.4.1: the TCP connection was refused or not answered (connect timeout)."""
    return local("4.4.1", detail)


def connection_lost(detail: str = "") -> Outcome:
    """4.4.2: the connection dropped or a read timed out in the middle of a session."""
    return local("4.4.2", detail)


def no_route(detail: str = "") -> Outcome:
    """4.4.4: no usable address for the destination (e.g. every address family is off)."""
    return local("4.4.4", detail)


# --- choosing among the failures of several MX hosts ---------------------------------------

# Most specific first. Ranks are compared on the part after the class digit.
_PRECEDENCE = ("7.324", "7.322", "7.323", "7.321", "7.342", "7.341", "7.343", "7.30",
               "7.10", "4.312")
_RANK_SPECIFIC = len(_PRECEDENCE)  # any other code with a specific subject/detail
_RANK_NETWORK = _RANK_SPECIFIC + 1  # x.4.* transport failures
_RANK_GENERIC = _RANK_SPECIFIC + 2  # x.0.0, x.N.0 and anything unparseable


def specificity(code: str) -> int:
    """The rank of `code` in `most_specific` (lower = more specific)."""
    if not valid_enhanced(code):
        return _RANK_GENERIC
    detail = code.partition(".")[2]
    if detail in _PRECEDENCE:
        return _PRECEDENCE.index(detail)
    subject, _, rest = detail.partition(".")
    if rest == "0":
        return _RANK_GENERIC
    if subject == "4":
        return _RANK_NETWORK
    return _RANK_SPECIFIC


def most_specific(codes: Iterable[str]) -> str:
    """The code to defer a domain with when every MX host failed (SPEC: "When no host is
    left, defer with the code of the most specific failure").

    Precedence, most specific first:

    1. ``X.7.324`` dnssec-invalid: a signed record was bogus. It is a security signal (a
       possible forgery) and it blocks the mail whatever the other hosts did.
    2. ``X.7.322`` certificate-expired: a DANE failure with a precise, fixable cause.
    3. ``X.7.323`` tlsa-invalid: the host was reached, presented certificates, and none
       matched; a more precise statement than "no TLS".
    4. ``X.7.321`` starttls-not-supported: reached, but no TLS where it was mandatory.
    5. The MTA-STS codes (``X.7.342`` certificate, ``X.7.341`` no STARTTLS, ``X.7.343``
       MX not in the policy, in that order) and REQUIRETLS's ``X.7.30``/``X.7.10``: the
       same defects where a policy rather than DNSSEC demands TLS.
    6. ``X.4.312`` DNS query failed: the host's records could not be fetched at all.
    7. Any other code with a specific subject and detail (a server's own ``4.2.2``,
       ``4.7.1`` ...): the destination said something about this mail.
    8. Transport failures ``X.4.*`` (``4.4.1`` no answer, ``4.4.2`` connection
       dropped): they say the least about the destination and may be ours.
    9. Generic codes (``X.0.0``, ``X.N.0``) and anything unparseable.

    Ranks 1-4 and 6 are the contract codes of SPEC.md, rank 5 the relay's MTA-STS and
    REQUIRETLS codes: they name a defect in the
    destination's DNS or TLS set-up that its administrator can fix, which is what the
    sender and the operator need to see; the later ranks order the rest by how much they
    tell. Ties keep the first one given (MX order). With no codes at all (no host could
    be tried) the result is ``4.4.0``.
    """
    best: str | None = None
    best_rank = _RANK_GENERIC + 1
    for code in codes:
        rank = specificity(code)
        if rank < best_rank:
            best, best_rank = code, rank
    return best if best is not None else "4.4.0"


def most_specific_outcome(outcomes: Iterable[Outcome]) -> Outcome | None:
    """The outcome carrying `most_specific` of the outcomes' codes (its reply kept)."""
    best: Outcome | None = None
    best_rank = _RANK_GENERIC + 1
    for outcome in outcomes:
        rank = specificity(outcome.code)
        if rank < best_rank:
            best, best_rank = outcome, rank
    return best


def expire(outcome: Outcome) -> Outcome:
    """The final outcome of a deferred recipient whose lifetime is over: bounced with the
    5.x.x form of its last code (``4.7.323`` → ``5.7.323``), reply and scope kept.
    Outcomes already final are returned unchanged.
    """
    if outcome.action is not Action.DEFERRED:
        return outcome
    code = codetable.permanent(outcome.code) if valid_enhanced(outcome.code) else "5.4.7"
    return Outcome(Action.BOUNCED, code, outcome.reply, outcome.scope)
