from __future__ import annotations

from pathlib import Path

from relay import config as cfgmod
from relay import configdoc

ROOT = Path(__file__).resolve().parents[2]


def test_readme_reference_matches_the_models() -> None:
    readme = (ROOT / "README.md").read_text()
    assert configdoc.splice(readme, configdoc.reference()) == readme, (
        "README.md's configuration reference is stale: run "
        "`python -m relay.configdoc --write README.md`"
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


def test_every_log_event_is_documented_in_the_readme() -> None:
    from relay.log import EVENTS

    readme = (ROOT / "README.md").read_text()
    for name in EVENTS:
        assert f"`{name}`" in readme, f"log event {name} is not in README.md"
