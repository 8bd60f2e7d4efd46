"""relay.delivery.verdict's address checks before a connection: loops and unroutable addresses."""

from __future__ import annotations

import pytest

from relay.dane.policy import HostAddress, HostPlan
from relay.delivery import verdict
from relay.delivery.attempt import own_endpoints
from relay.errors import SmtpClientError, TlsError, TlsInjection
from relay.model import Action, Scope, TlsRequirement


def host(port: int = 25) -> HostPlan:
    return HostPlan(name="mx.example.test", preference=10, port=port,
                    addresses=(HostAddress("192.0.2.1", True),), addresses_secure=True,
                    canonical_name="mx.example.test", tlsa_bases=(), tlsa_base=None, tlsa=(),
                    usable_tlsa=(), requirement=TlsRequirement.MAY, unusable_code=None,
                    reason="", reference_names=())


@pytest.mark.parametrize(("ip", "port", "listener", "local", "loop"), [
    ("127.0.0.1", 25, ("127.0.0.1", 25), (), True),
    ("127.0.0.1", 2525, ("127.0.0.1", 25), (), False),  # another port
    ("0.0.0.0", 25, ("127.0.0.1", 25), (), True),  # 0.0.0.0 reaches this machine
    ("127.0.0.2", 25, ("0.0.0.0", 25), (), True),  # wildcard: every loopback address
    ("192.0.2.7", 25, ("0.0.0.0", 25), ("192.0.2.7",), True),  # and our own addresses
    ("192.0.2.8", 25, ("0.0.0.0", 25), ("192.0.2.7",), False),
    ("::", 25, ("::", 25), (), True),
])
def test_loops_back(ip: str, port: int, listener: tuple[str, int], local: tuple[str, ...],
                    loop: bool) -> None:
    own = own_endpoints(*listener)
    assert verdict.loops_back(ip, port, own, frozenset(local)) is loop


@pytest.mark.parametrize(("ip", "code"), [
    ("0.0.0.0", "4.4.4"), ("224.0.0.1", "4.4.4"), ("255.255.255.255", "4.4.4"),
    ("240.0.0.1", "4.4.4"), ("ff02::1", "4.4.4"), ("192.0.2.1", None),
])
def test_unroutable_addresses_are_skipped(ip: str, code: str | None) -> None:
    gate = verdict.address_gate(host(), ip, own_endpoints("127.0.0.1", 2525))
    assert (gate.code if gate else None) == code


def test_greeting_with_our_own_name_is_a_loop() -> None:
    assert verdict.greeting_loops("relay.example.org ESMTP ready", ("relay.example.org",))
    assert verdict.greeting_loops("RELAY.example.org. ESMTP", ("relay.example.org",))
    assert not verdict.greeting_loops("mx.example.com ESMTP", ("relay.example.org",))
    assert not verdict.greeting_loops("", ("relay.example.org",))


INJECTED = TlsInjection("bytes buffered after the 220 reply to STARTTLS", phase="starttls")


@pytest.mark.parametrize(("req", "code", "ftype"), [
    (TlsRequirement.MAY, "4.7.0", None),
    (TlsRequirement.ENCRYPT, "4.7.321", "validation-failure"),
    (TlsRequirement.DANE, "4.7.321", "validation-failure"),
    (TlsRequirement.STS, "4.7.341", "validation-failure"),  # MTA-STS enforce: its own code
])
def test_starttls_injection_has_its_own_reason(req: TlsRequirement, code: str,
                                               ftype: str | None) -> None:
    out, got = verdict.session_failure(host(), "192.0.2.1", INJECTED, req)
    assert (out.action, out.code, out.scope, got) == (Action.DEFERRED, code, Scope.SITE, ftype)
    assert out.reply.startswith("STARTTLS response injection: mx.example.test [192.0.2.1] "
                                "sent data after its 220 reply to STARTTLS")
    assert "No answer" not in out.reply and "starttls-not-supported" not in out.reply


@pytest.mark.parametrize(("exc", "req", "code"), [
    (TlsError("STARTTLS refused: 454 no", phase="starttls"), TlsRequirement.DANE, "4.7.321"),
    (TlsError("TLS handshake failed", phase="tls"), TlsRequirement.MAY, "4.4.1"),
    (SmtpClientError("connect: refused", phase="connect"), TlsRequirement.MAY, "4.4.1"),
])
def test_other_session_failures_keep_their_codes(exc: SmtpClientError, req: TlsRequirement,
                                                 code: str) -> None:
    out, _ = verdict.session_failure(host(), "192.0.2.1", exc, req)
    assert out.code == code and "injection" not in out.reply
