from __future__ import annotations

from pathlib import Path

from relay import config as cfgmod
from relay import configdoc

ROOT = Path(__file__).resolve().parents[2]


def test_reference_page_matches_the_models() -> None:
    page = (ROOT / "docs/configuration.md").read_text()
    assert configdoc.splice(page, configdoc.reference()) == page, (
        "docs/configuration.md is stale: run "
        "`python -m relay.configdoc --write docs/configuration.md`"
    )


def test_every_key_is_documented() -> None:
    ref = configdoc.reference()
    for section in (cfgmod.ListenerConfig, cfgmod.QueueConfig, cfgmod.DnsConfig,
                    cfgmod.DaneConfig, cfgmod.DeliveryConfig, cfgmod.NdrConfig,
                    cfgmod.MetricsConfig, cfgmod.LogConfig, cfgmod.RouteConfig):
        for name, field in section.model_fields.items():
            assert field.description, f"{section.__name__}.{name} has no docstring"
            assert f"| `{name}` |" in ref


def test_splice_detects_drift() -> None:
    readme = f"x\n{configdoc.START}\n\nold table\n{configdoc.END}\ny\n"
    assert configdoc.splice(readme, configdoc.reference()) != readme


def test_every_log_event_is_documented() -> None:
    from relay.log import EVENTS

    page = (ROOT / "docs/operate.md").read_text()
    for name in EVENTS:
        assert f"`{name}`" in page, f"log event {name} is not in docs/operate.md"
