from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay import config as cfgmod
from relay.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2s", 2.0), ("15m", 900.0), ("24h", 86400.0), ("7d", 604800.0), (30, 30.0), ("1.5s", 1.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert cfgmod.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["15 minutes", "-1s", -3, True, "", "m"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        cfgmod.parse_duration(bad)


def test_sizes() -> None:
    assert cfgmod.parse_size("10MB") == 10_000_000
    assert cfgmod.parse_size("512KiB") == 512 * 1024
    assert cfgmod.parse_size(42) == 42


def test_defaults_are_the_documented_ones() -> None:
    cfg = cfgmod.build({}, source="defaults")
    assert cfg.listener.port == 2525
    assert cfg.delivery.retry_schedule == (900.0,)
    assert cfg.delivery.max_lifetime == 86400.0
    assert cfg.delivery.port == 25
    assert cfg.ndr.enabled is True
    assert cfg.metrics.listen is None
    assert str(cfg.queue.path) == "queue/relay.db"


def test_unknown_key_names_key_and_file() -> None:
    with pytest.raises(ConfigError) as exc:
        cfgmod.build({"listener": {"prot": 25}}, source="my.toml")
    assert "my.toml" in str(exc.value)
    assert "listener.prot" in str(exc.value)
    assert "unknown key" in str(exc.value)


def test_unknown_section_is_rejected() -> None:
    with pytest.raises(ConfigError, match="lisener"):
        cfgmod.build({"lisener": {"port": 25}}, source="my.toml")


def test_env_overrides_and_names_env_in_errors() -> None:
    env = {
        "RELAY_LISTENER__PORT": "2600",
        "RELAY_DELIVERY__RETRY_SCHEDULE": '["1s", "2m"]',
        "RELAY_DNS__NAMESERVERS": '["127.0.0.1:5353"]',
    }
    cfg = cfgmod.build({"listener": {"port": 1}}, source="f.toml", environ=env)
    assert cfg.listener.port == 2600
    assert cfg.delivery.retry_schedule == (1.0, 120.0)
    assert cfg.dns.nameservers == ("127.0.0.1:5353",)
    with pytest.raises(ConfigError, match="environment RELAY_DNS__TIMEOUT"):
        cfgmod.build({}, source="f.toml", environ={"RELAY_DNS__TIMEOUT": "soon"})


def test_config_is_frozen() -> None:
    cfg = cfgmod.build({}, source="defaults")
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        cfg.listener.port = 1  # type: ignore[misc]


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        cfgmod.load(tmp_path / "none.toml", environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        cfgmod.load(None, environ={"RELAY_CONFIG": str(tmp_path / "none.toml")})


def test_bad_toml_names_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[listener\nport = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        cfgmod.load(f, environ={})


def _relay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_config_check_every_shipped_file() -> None:
    files = sorted((ROOT / "config").glob("*.toml"))
    assert files, "config/ has no TOML files"
    for f in files:
        r = _relay("config", "check", "-c", str(f))
        assert r.returncode == 0, (f, r.stderr)
        json.loads(r.stdout)


def test_cli_config_check_error(tmp_path: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text("[delivery]\nretry_schedul = ['1m']\n")
    r = _relay("config", "check", "-c", str(f))
    assert r.returncode == 2
    assert "delivery.retry_schedul" in r.stderr and "x.toml" in r.stderr
    r = _relay("config", "check", "-c", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "does not exist" in r.stderr
