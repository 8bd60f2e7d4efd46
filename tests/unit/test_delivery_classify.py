"""relay.delivery.classify: SMTP replies and local failures → outcomes; MX aggregation; expiry."""

from __future__ import annotations

import itertools

import pytest

from relay import codes
from relay.delivery import classify
from relay.model import Action, Outcome, Scope

# --- from_reply: action -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "action"),
    [(250, Action.DELIVERED), (251, Action.DELIVERED), (421, Action.DEFERRED),
     (450, Action.DEFERRED), (452, Action.DEFERRED), (550, Action.BOUNCED),
     (554, Action.BOUNCED), (552, Action.BOUNCED)],
)
def test_action_follows_reply_class(code: int, action: Action) -> None:
    assert classify.from_reply("rcpt", code, None, "whatever").action is action


@pytest.mark.parametrize("code", [354, 334, 199, 600, 0, 99, 1000, -1])
def test_unexpected_codes_are_protocol_errors(code: int) -> None:
    out = classify.from_reply("rcpt", code, "5.1.1", "odd")
    assert out == Outcome(Action.DEFERRED, "4.5.0", out.reply, Scope.SITE)
    assert "odd" in out.reply


# --- from_reply: scope ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "scope"),
    [("connect", Scope.SITE), ("greeting", Scope.SITE), ("ehlo", Scope.SITE),
     ("helo", Scope.SITE), ("starttls", Scope.SITE), ("mail", Scope.MESSAGE),
     ("data", Scope.MESSAGE), ("dot", Scope.MESSAGE), ("data_end", Scope.MESSAGE),
     ("bdat", Scope.MESSAGE), ("rcpt", Scope.RECIPIENT), ("RCPT", Scope.RECIPIENT),
     (" Mail ", Scope.MESSAGE), ("no-such-phase", Scope.SITE)],
)
def test_scope_by_phase(phase: str, scope: Scope) -> None:
    assert classify.from_reply(phase, 550, None, "no").scope is scope
    assert classify.from_reply(phase, 450, None, "later").scope is scope


@pytest.mark.parametrize("phase", ["rcpt", "mail", "data", "ehlo"])
def test_421_always_reaches_the_site(phase: str) -> None:
    out = classify.from_reply(phase, 421, "4.3.2", "shutting down")
    assert out.scope is Scope.SITE and out.action is Action.DEFERRED
    assert out.code == "4.3.2"


# --- from_reply: enhanced codes ---------------------------------------------------------


def test_enhanced_code_from_argument() -> None:
    out = classify.from_reply("rcpt", 550, "5.1.1", "user unknown")
    assert out == Outcome(Action.BOUNCED, "5.1.1", "550 user unknown", Scope.RECIPIENT)


def test_enhanced_code_from_leading_text() -> None:
    out = classify.from_reply("rcpt", 550, None, "5.2.2 mailbox full")
    assert out.code == "5.2.2"
    assert out.reply == "550 5.2.2 mailbox full"


def test_three_digit_detail_from_text() -> None:
    assert classify.from_reply("data", 450, None, "4.7.323 nope").code == "4.7.323"


@pytest.mark.parametrize(
    ("code", "enhanced", "expected"),
    [(550, "4.1.1", "5.1.1"), (450, "5.7.1", "4.7.1"), (250, "5.0.0", "2.0.0")],
)
def test_enhanced_class_is_forced_to_the_reply_class(code: int, enhanced: str,
                                                     expected: str) -> None:
    assert classify.from_reply("rcpt", code, enhanced, "x").code == expected


@pytest.mark.parametrize("bad", ["5.1", "5.1.1.1", "6.1.1", "5.1234.1", "x.1.1", "", " "])
def test_invalid_enhanced_falls_back_to_default(bad: str) -> None:
    assert classify.from_reply("rcpt", 550, bad, "no").code == "5.1.0"


def test_text_that_only_looks_like_a_code_is_not_taken() -> None:
    assert classify.from_reply("rcpt", 550, None, "5.1.1x no").code == "5.1.0"
    assert classify.from_reply("rcpt", 550, None, "see 5.1.1").code == "5.1.0"


@pytest.mark.parametrize(
    ("phase", "code", "expected"),
    [("rcpt", 550, "5.1.0"), ("rcpt", 450, "4.1.0"), ("mail", 553, "5.1.0"),
     ("data", 554, "5.0.0"), ("dot", 451, "4.0.0"), ("greeting", 554, "5.0.0"),
     ("ehlo", 421, "4.3.0"), ("rcpt", 421, "4.3.0"), ("rcpt", 250, "2.1.5"),
     ("mail", 250, "2.1.0"),
     ("dot", 250, "2.0.0")],
)
def test_default_enhanced_by_phase(phase: str, code: int, expected: str) -> None:
    assert classify.from_reply(phase, code, None, "text").code == expected


def test_reply_text_full_line_and_multiline() -> None:
    out = classify.from_reply("rcpt", 550, None, "550 5.1.1 <a@b>: unknown")
    assert out.reply == "550 5.1.1 <a@b>: unknown" and out.code == "5.1.1"
    out = classify.from_reply("data", 554, "5.7.1", "rejected\r\nsee https://x/\n  bye ")
    assert out.reply == "554 rejected see https://x/ bye"
    assert classify.from_reply("dot", 250, None, "").reply == "250"
    # "5500" is not the code 550 repeated
    assert classify.from_reply("rcpt", 550, None, "5500 x").reply == "550 5500 x"


def test_delivered_at_end_of_data() -> None:
    out = classify.from_reply("dot", 250, "2.0.0", "ok queued as X")
    assert out.action is Action.DELIVERED and out.final and out.scope is Scope.MESSAGE


# --- local failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("helper", "code"),
    [(classify.starttls_not_supported, "4.7.321"), (classify.certificate_expired, "4.7.322"),
     (classify.tlsa_invalid, "4.7.323"), (classify.dnssec_invalid, "4.7.324"),
     (classify.dns_failed, "4.4.312")],
)
def test_spec_failures_defer_with_contract_text(helper, code: str) -> None:
    out = helper()
    assert out == Outcome(Action.DEFERRED, code, codes.text(code), Scope.SITE)
    assert out.reply  # every SPEC code has its contract text
    detailed = helper("mx1.example: 454 4.7.0 TLS not available\r\nnow")
    assert detailed.reply == (f"{codes.text(code)} "
                              "(mx1.example: 454 4.7.0 TLS not available now)")


def test_contract_texts_are_the_spec_ones() -> None:
    assert classify.tlsa_invalid().reply == "tlsa-invalid: The domain failed DANE validation."
    assert classify.starttls_not_supported().reply == (
        "starttls-not-supported: Destination mail server must support TLS to receive mail.")
    assert classify.dnssec_invalid().reply == (
        "dnssec-invalid: Destination domain returned invalid DNSSEC records.")
    assert classify.certificate_expired().reply == (
        "certificate-expired: Destination mail server's certificate is expired.")
    assert classify.dns_failed().reply == "DNS query failed"


def test_connection_failures() -> None:
    assert classify.connection_failed("refused").code == "4.4.1"
    assert "refused" in classify.connection_failed("refused").reply
    assert classify.connection_lost().code == "4.4.2"
    assert classify.connection_lost().reply == "Connection dropped"
    assert classify.no_route().code == "4.4.4"


def test_local_permanent_codes_bounce() -> None:
    out = classify.local(codes.NULL_MX)
    assert out.action is Action.BOUNCED and out.code == "5.1.10"
    assert out.reply == codes.text("5.1.10")
    out = classify.local(codes.NO_SUCH_DOMAIN, "example.invalid", scope=Scope.RECIPIENT)
    assert out.scope is Scope.RECIPIENT and out.reply.endswith("(example.invalid)")


def test_local_unknown_code_keeps_detail() -> None:
    assert classify.local("4.3.0", "disk").reply == "disk"
    assert classify.local("4.3.0").reply == ""


# --- most_specific ------------------------------------------------------------------------

ORDER = ["4.7.324", "4.7.322", "4.7.323", "4.7.321", "4.4.312", "4.2.2", "4.4.1", "4.0.0"]


def test_precedence_is_total_over_the_documented_order() -> None:
    for a, b in itertools.combinations(ORDER, 2):
        assert classify.most_specific([a, b]) == a
        assert classify.most_specific([b, a]) == a
    for perm in itertools.permutations(ORDER[:6]):
        assert classify.most_specific(perm) == "4.7.324"


def test_remote_specific_code_beats_network_and_generic() -> None:
    assert classify.most_specific(["4.4.1", "4.7.1", "4.4.2"]) == "4.7.1"
    assert classify.most_specific(["4.0.0", "4.4.2"]) == "4.4.2"
    assert classify.most_specific(["4.1.0", "4.4.1"]) == "4.4.1"
    assert classify.most_specific(["garbage", "4.0.0"]) == "garbage"  # first of equals


def test_ties_keep_mx_order() -> None:
    assert classify.most_specific(["4.4.1", "4.4.2"]) == "4.4.1"
    assert classify.most_specific(["4.2.2", "4.7.1"]) == "4.2.2"


def test_class_is_kept_and_ignored_for_ranking() -> None:
    assert classify.most_specific(["5.0.0", "4.7.323"]) == "4.7.323"
    assert classify.most_specific(["4.4.1", "5.7.1"]) == "5.7.1"


def test_most_specific_empty_and_generator() -> None:
    assert classify.most_specific([]) == "4.4.0"
    assert classify.most_specific(c for c in ["4.4.1", "4.7.321"]) == "4.7.321"


def test_most_specific_outcome_keeps_the_reply() -> None:
    outs = [classify.connection_failed("mx1 refused"),
            classify.tlsa_invalid("mx2: no match for 3 1 1"),
            classify.starttls_not_supported("mx3")]
    best = classify.most_specific_outcome(outs)
    assert best is outs[1]
    assert classify.most_specific_outcome([]) is None


# --- expire ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [("4.7.323", "5.7.323"), ("4.7.324", "5.7.324"), ("4.4.312", "5.4.312"),
     ("4.2.2", "5.2.2"), ("4.4.1", "5.4.1")],
)
def test_expire_gives_the_5xx_form(code: str, expected: str) -> None:
    before = Outcome(Action.DEFERRED, code, "the last reply", Scope.SITE)
    after = classify.expire(before)
    assert after == Outcome(Action.BOUNCED, expected, "the last reply", Scope.SITE)
    assert after.final


def test_expire_of_spec_failure_keeps_contract_text() -> None:
    after = classify.expire(classify.tlsa_invalid("mx1"))
    assert after.code == "5.7.323"
    assert after.reply.startswith("tlsa-invalid: The domain failed DANE validation.")
    assert codes.text(after.code) == codes.text("4.7.323")


def test_expire_leaves_final_outcomes_alone() -> None:
    bounced = Outcome(Action.BOUNCED, "5.1.1", "550 no", Scope.RECIPIENT)
    delivered = Outcome(Action.DELIVERED, "2.0.0", "250 ok")
    assert classify.expire(bounced) is bounced
    assert classify.expire(delivered) is delivered


def test_expire_with_unparseable_code() -> None:
    assert classify.expire(Outcome(Action.DEFERRED, "weird", "x")).code == "5.4.7"


def test_valid_enhanced() -> None:
    assert classify.valid_enhanced("4.7.323")
    assert classify.valid_enhanced("2.0.0")
    assert not classify.valid_enhanced(None)
    assert not classify.valid_enhanced("3.0.0")
    assert not classify.valid_enhanced("4.7.3234")
