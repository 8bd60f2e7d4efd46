"""relay.intake.core.Intake's connection admission: the reserve for trusted clients and
stress (no sockets: sessions are stand-ins; the listener tests use real ones)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from relay import log
from relay.intake.core import Intake, IntakeSettings


@dataclass(eq=False)
class FakeSession:
    client_ip: str
    trusted: bool = False
    sid: str = "s"
    auth_user: str | None = None
    session: Any = None
    stressed: int = 0

    def under_stress(self) -> None:
        self.stressed += 1


@pytest.fixture
def intake() -> Intake:
    return Intake(IntakeSettings(hostname="relay.test", max_connections=10,
                                 max_connections_per_ip=10, reserved_connections=3),
                  sink=None)  # type: ignore[arg-type]


def test_untrusted_clients_share_what_is_not_reserved(intake: Intake) -> None:
    outsiders = [FakeSession(f"192.0.2.{i}") for i in range(8)]
    assert [intake.admit(s) for s in outsiders[:7]] == [None] * 7
    assert intake.stressed and intake.untrusted_limit == 7
    refusal = intake.admit(outsiders[7])
    assert refusal is not None and refusal.startswith("421 4.7.0")
    insiders = [FakeSession("10.0.0.1", trusted=True) for _ in range(4)]
    assert [intake.admit(s) for s in insiders[:3]] == [None] * 3  # the reserve
    assert intake.admit(insiders[3]) is not None  # max_connections in all
    intake.release(outsiders[0])
    assert not intake.stressed
    assert intake.admit(insiders[3]) is None  # a freed slot is anyone's


def test_authentication_moves_a_session_out_of_the_untrusted_share(intake: Intake) -> None:
    outsiders = [FakeSession(f"192.0.2.{i}") for i in range(7)]
    for s in outsiders:
        assert intake.admit(s) is None
    intake.promote(outsiders[0])
    assert outsiders[0].trusted and not intake.stressed
    assert intake.admit(FakeSession("192.0.2.99")) is None
    intake.release(outsiders[0])  # releasing a promoted session keeps the counts right
    assert len(intake.sessions) == 7 and intake.stressed


def test_a_refusal_under_stress_shortens_the_untrusted_sessions_once_a_second(
        intake: Intake) -> None:
    outsiders = [FakeSession(f"192.0.2.{i}") for i in range(7)]
    insider = FakeSession("10.0.0.1", trusted=True)
    for s in [*outsiders, insider]:
        assert intake.admit(s) is None
    assert all(s.stressed == 0 for s in outsiders)  # full, but nobody was turned away
    for _ in range(5):
        assert intake.admit(FakeSession("198.51.100.1")) is not None
    assert [s.stressed for s in outsiders] == [1] * 7  # at most once a second
    assert insider.stressed == 0


def test_a_limit_is_logged_once_a_minute(intake: Intake, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(log, "observers", [lambda name, f: seen.append((name, f))])
    for i in range(7):
        intake.admit(FakeSession(f"192.0.2.{i}"))
    for _ in range(3):
        intake.admit(FakeSession("198.51.100.1"))
    limits = [f for name, f in seen if name == "connection_limit"]
    assert limits == [{"limit": "untrusted", "connections": 7, "untrusted": 7, "total": 7}]


def test_an_address_locked_out_of_auth_is_turned_away_unless_trusted(intake: Intake) -> None:
    for _ in range(intake.settings.auth_failure_limit):
        intake.auth_failed(FakeSession("192.0.2.66"), "mallory")  # type: ignore[arg-type]
    refusal = intake.admit(FakeSession("192.0.2.66"))
    assert refusal is not None and "too many failed authentications" in refusal
    assert intake.admit(FakeSession("192.0.2.66", trusted=True)) is None  # may send mail
    assert intake.admit(FakeSession("192.0.2.67")) is None
