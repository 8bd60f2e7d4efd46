"""A STARTTLS response injection (bytes after the server's 220 to STARTTLS) through the
real delivery path: Deliverer → SmtpSession → a hostile aiosmtpd destination on
loopback. It is reported as what it is, never as "No answer from host"."""

from __future__ import annotations

import pytest

from relay.config import build
from relay.delivery.attempt import Deliverer, DeliverySettings
from relay.dns.resolve import Resolver
from relay.model import Action
from tests.support import certs
from tests.support.smtpd import Destination

BODY = b"Subject: injection\r\n\r\nbody\r\n"


@pytest.mark.parametrize(("tls", "code", "required"), [
    ("may", "4.7.0", False),      # opportunistic: a security failure of its own
    ("encrypt", "4.7.321", True),  # TLS mandatory: the SPEC's code, the honest text
])
async def test_injection_gets_its_own_reason(tls: str, code: str, required: bool) -> None:
    leaf = certs.make_leaf(["mx.inject.example"])
    async with Destination("127.25.21.1", tls=(leaf, []),
                           inject_after_starttls=b"250 injected\r\n") as dest:
        cfg = build({"listener": {"hostname": "relay.test"},
                     "dns": {"nameservers": ["127.0.0.1:9"], "timeout": "1s",
                             "require_validating_resolver": False},
                     "delivery": {"connect_timeout": "5s", "tls_timeout": "5s"},
                     "routes": [{"domain": "inject.example",
                                 "hosts": [f"{dest.host_ip}:{dest.port}"], "tls": tls}]},
                    source="test")
        deliverer = Deliverer(Resolver.from_config(cfg.dns), cfg,
                              DeliverySettings.from_config(cfg, "relay.test"))
        report = await deliverer.deliver("inject.example", "s@relay.test",
                                         ["r@inject.example"], BODY)
        out = report.outcomes["r@inject.example"]
        assert out.action is Action.DEFERRED and out.code == code, out
        assert out.reply.startswith("STARTTLS response injection: "), out.reply
        assert "No answer" not in out.reply and "not-supported" not in out.reply
        assert ("TLS is required" in out.reply) is required
        [trace] = report.hosts
        assert trace.code == code and trace.reply == out.reply
        assert trace.failure_type == ("validation-failure" if required else None)
        # aborted before the handshake: one session, nothing after STARTTLS, no mail
        assert [c.verbs() for c in dest.connections] == [["EHLO", "STARTTLS"]]
        assert dest.messages == []
