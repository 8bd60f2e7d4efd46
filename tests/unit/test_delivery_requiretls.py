"""REQUIRETLS (RFC 8689), pure parts: the TLS-Required header field, which hosts a
REQUIRETLS message may use, the MAIL FROM parameter."""

from __future__ import annotations

import pytest

from relay import codes
from relay.dane.policy import HostAddress, HostPlan
from relay.delivery import requiretls
from relay.model import Action, TlsRequirement
from relay.smtp.protocol import mail_from


@pytest.mark.parametrize("body, found", [
    (b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n", True),
    (b"tls-required:no\r\n\r\n", True),
    (b"TLS-Required: No  \r\nX: y\r\n\r\n", True),
    (b"TLS-Required: Yes\r\n\r\n", False),
    (b"Subject: x\r\n\r\nTLS-Required: No\r\n", False),  # in the body, not a header
    (b"X-TLS-Required: No\r\n\r\n", False),
])
def test_tls_required_no(body: bytes, found: bool) -> None:
    assert requiretls.tls_required_no(body) is found


def _host(req: TlsRequirement | None) -> HostPlan:
    return HostPlan("mx.example", 10, 25, (HostAddress("192.0.2.1", False),), False,
                    "mx.example", (), None, (), (), req, None if req else "4.4.312", "why",
                    ("mx.example",))


def test_only_dane_or_mta_sts_hosts_remain() -> None:
    for ok in (TlsRequirement.DANE, TlsRequirement.STS):
        assert requiretls.host(_host(ok)).usable
    for bad in (TlsRequirement.MAY, TlsRequirement.ENCRYPT, TlsRequirement.NONE):
        h = requiretls.host(_host(bad))
        assert not h.usable and h.unusable_code == codes.REQUIRETLS_UNAUTHENTICATED
        assert "neither DANE" in h.reason
    unusable = _host(None)
    assert requiretls.host(unusable) is unusable  # its own failure stays


def test_missing_extension_bounces_this_host() -> None:
    out = requiretls.missing("mx.example", "192.0.2.1")
    assert out.action is Action.BOUNCED and out.code == "5.7.30"
    assert out.reply.startswith("REQUIRETLS support required")


def test_mail_from_passes_the_parameter_on() -> None:
    assert mail_from("a@b.example", requiretls=True) == b"MAIL FROM:<a@b.example> REQUIRETLS\r\n"
    assert b"REQUIRETLS" not in mail_from("a@b.example")
