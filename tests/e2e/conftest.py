"""Fixtures shared by the real compose stack tests (marker `compose`, scripts/compose-test):
one Docker engine and one world around it (tests/support/compose_world.py) for the whole
session, so that the default deployment (test_compose_stack.py) and the profile `cluster`
(test_compose_cluster.py) run one after the other on the same engine, images and DNS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.compose_world import HostNetwork, World

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile", "resolver.Dockerfile", "postgres.Dockerfile")


@pytest.fixture(scope="session")
def compose_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """dockerd (started if none runs, stopped only then), containers fenced off the
    outside, base images (stand-ins where no registry serves them), and the world."""
    from tests.support.docker_engine import DockerEngine

    work = tmp_path_factory.mktemp("compose-stack")
    engine = DockerEngine(work / "engine")
    net = HostNetwork()
    w = World(work / "world", net)
    try:
        engine.start()
        engine.ensure_base_images([ROOT / name for name in DOCKERFILES])
        w.start()
        yield w
    finally:
        w.stop()
        engine.stop()
        print("\n".join(["", *engine.notes]))
