"""`relay serve` with keys left to their defaults, against real clients."""

from __future__ import annotations

import tomllib
from pathlib import Path

from tests.support.relayproc import RelayProc, default_config


def test_without_allowed_networks_a_loopback_client_relays(tmp_path: Path) -> None:
    """The default `allowed_networks` (127.0.0.0/8, ::1) lets an unauthenticated
    loopback client relay (issue 10 item 3: it answered 421 4.3.0 to every RCPT)."""
    config = default_config(tmp_path)
    del config["listener"]["allowed_networks"]
    relay = RelayProc(tmp_path, config)
    assert "allowed_networks" not in tomllib.loads(relay.config_path.read_text())["listener"]
    relay.start()
    try:
        with relay.smtp(source="127.0.0.7") as client:
            refused = client.sendmail("a@example.org", ["b@example.com"],
                                      b"Subject: defaults\r\n\r\nhi\r\n")
            assert refused == {}
        ev = relay.wait_event("received")
        assert ev["client_ip"] == "127.0.0.7"
        assert relay.recipients(ev["id"]) == ["b@example.com"]
        assert not relay.events("internal_error")
    finally:
        relay.stop()
