"""relay.intake.address: RFC 5321 path grammar, routing refusals, lengths, parameters."""

from __future__ import annotations

import pytest

from relay.intake.address import Path, Refusal, parse_path


def ok(text: str, role: str = "recipient") -> Path:
    result = parse_path(text, role=role)
    assert isinstance(result, Path), result
    return result


def refused(text: str, role: str = "recipient") -> str:
    result = parse_path(text, role=role)
    assert isinstance(result, Refusal), result
    return f"{result.code} {result.status}"


@pytest.mark.parametrize(("text", "address"), [
    ("<a@example.com>", "a@example.com"),
    ("a@example.com", "a@example.com"),  # no brackets: one token, as Postfix allows
    (" <a@example.com>", "a@example.com"),
    ('<"john doe"@example.com>', '"john doe"@example.com'),
    ('<"a\\"b"@example.com>', '"a\\"b"@example.com'),
    ('<"with>bracket"@example.com>', '"with>bracket"@example.com'),
    ("<o'brien+tag=x@sub-domain.example.com>", "o'brien+tag=x@sub-domain.example.com"),
    ("<jörg@bücher.example>", "jörg@bücher.example"),
    ("<a@xn--bcher-kva.example>", "a@xn--bcher-kva.example"),
    ("<a@[192.0.2.1]>", "a@[192.0.2.1]"),
    ("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
    ("<a@localhost>", "a@localhost"),
])
def test_valid_paths(text: str, address: str) -> None:
    assert ok(text).address == address


def test_null_path_only_for_the_sender() -> None:
    assert ok("<>", role="sender").mailbox is None
    assert refused("<>") == "501 5.1.3"
    assert refused("", role="sender") == "501 5.1.7"


@pytest.mark.parametrize("text", [
    "<@a.example:u@b.example>", "<@a.example,@b.example:u@c.example>",
    "<user%host@relay.example>", "<host!user@relay.example>", '<"a@b"@relay.example>',
    '<"a%b"@relay.example>', '<"a!b"@relay.example>', "<a@b@relay.example>",
])
def test_routing_forms_are_refused_with_553_5_1_3(text: str) -> None:
    assert refused(text) == "553 5.1.3"


@pytest.mark.parametrize("text", [
    "<a b@example.com>", "<a..b@example.com>", "<.a@example.com>", "<a.@example.com>",
    "<a@example..com>", "<a@.example.com>", "<a@example.com.>", "<a@-x.example>",
    "<a@x-.example>", "<a@ex_ample.com>", "<a@[1.2.3]>", "<a@[IPv6:zz::1]>", "<a@>",
    "<a>", "<a@example.com", '<"unterminated@example.com>', "<a@example.com>x",
    "<a\x01@example.com>", "<a@exam\x7fple.com>", "<a\u0085b@example.com>",
    "<\udcff@example.com>", '<"a\\\x01"@example.com>',
])
def test_garbage_is_a_syntax_error(text: str) -> None:
    assert refused(text).startswith("501 ")


def test_sender_syntax_errors_use_5_1_7() -> None:
    assert refused("<a b@example.com>", role="sender") == "501 5.1.7"


def test_lengths() -> None:
    assert ok("<" + "x" * 64 + "@example.com>")
    assert refused("<" + "x" * 65 + "@example.com>") == "553 5.1.3"
    assert refused("<" + "é" * 33 + "@example.com>") == "553 5.1.3"  # 66 octets
    label = "a" * 63
    assert ok(f"<x@{label}.example>")
    assert refused(f"<x@{'a' * 64}.example>").startswith("501")
    long_domain = ".".join([label] * 3) + "." + "b" * 58  # 250 octets: path 254
    assert ok(f"<x@{long_domain}>")
    assert refused(f"<x@{long_domain}.cc.dd>") == "553 5.1.3"  # 256 octets
    # the whole path: < 64 @ 200 > is 267 octets
    domain = ".".join(["c" * 49] * 4)
    assert refused(f"<{'y' * 64}@{domain}>") == "553 5.1.3"


def test_parameters() -> None:
    path = ok("<a@example.com> SIZE=100 body=8BITMIME SMTPUTF8", role="sender")
    assert path.params == {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}
    assert refused("<a@example.com> SIZE=1 SIZE=2") == "501 5.5.4"
    assert refused("<a@example.com> =x") == "501 5.5.4"
    assert refused("<a@example.com> A=b=c") == "501 5.5.4"
    assert refused("<a@example.com> A=") == "501 5.5.4"


def test_non_ascii_is_flagged_for_the_smtputf8_check() -> None:
    assert not ok("<jörg@example.com>").mailbox.ascii  # type: ignore[union-attr]
    assert ok("<j@example.com>").mailbox.ascii  # type: ignore[union-attr]


@pytest.mark.parametrize(("address", "domain"), [
    ("u@faß.de", "xn--fa-hia.de"),  # IDNA2008: not fass.de
    ("u@βόλος.gr", "xn--nxasmm1c.gr"),
    ("u@Bücher.example", "xn--bcher-kva.example"),
])
def test_internationalized_domains_use_idna2008(address: str, domain: str) -> None:
    from relay.store import recipient_domain

    assert recipient_domain(address) == domain


def test_a_zero_width_joiner_in_a_domain_is_refused() -> None:
    from relay.intake.address import parse_mailbox

    assert isinstance(parse_mailbox("u@a\u200db.example"), Refusal)
    assert not isinstance(parse_mailbox("u@ab.example"), Refusal)


@pytest.mark.parametrize("text", ["<postmaster>", "<Postmaster>", "<POSTMASTER> ", " <postMaster>"])
def test_postmaster_without_domain_for_recipients(text: str) -> None:
    path = parse_path(text, role="recipient")
    assert isinstance(path, Path) and path.postmaster and path.mailbox is None


@pytest.mark.parametrize(("text", "role"), [("<postmaster>", "sender"),
                                            ("postmaster", "recipient"),
                                            ("<postmasters>", "recipient")])
def test_postmaster_form_is_only_the_bracketed_recipient(text: str, role: str) -> None:
    assert isinstance(parse_path(text, role=role), Refusal)
    ordinary = parse_path("<postmaster@example.com>", role="recipient")
    assert isinstance(ordinary, Path) and not ordinary.postmaster
