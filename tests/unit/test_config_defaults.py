"""Every default is the same value, of the same types, as the parsed form of the same
setting written out: a config file with any one key omitted loads exactly like the
file with that key written with its documented default (issue 10 item 3: a default of
strings where parsed values are networks made every unauthenticated RCPT fail)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from relay import config as cfgmod
from tests.support.relayproc import toml_dumps

# One per-domain policy and one route, so that the defaults of their keys are covered too.
SEED = {"domains": {"example.com": {}},
        "routes": [{"domain": "example.org", "hosts": ["mx.example.org"]}]}


def _full() -> dict[str, Any]:
    """Every key with its default, written the way an operator writes it (None: no TOML
    form, left out)."""
    def drop_none(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [drop_none(v) for v in value]
        return value
    return drop_none(cfgmod.dump(cfgmod.build(SEED, source="seed")))


def _paths(full: dict[str, Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for section, values in full.items():
        if section == "routes":  # a route's domain and hosts are required: no default
            out += [("routes", 0, k) for k in values[0] if k not in ("domain", "hosts")]
        elif section == "domains":
            out += [("domains", "example.com", k) for k in values["example.com"]]
        else:
            out += [(section, k) for k in values]
    return out


FULL = _full()
PATHS = _paths(FULL)


def _without(data: Any, path: tuple[Any, ...]) -> Any:
    if len(path) == 1:
        return {k: v for k, v in data.items() if k != path[0]}
    head, rest = path[0], path[1:]
    if isinstance(data, list):
        return [(_without(v, rest) if i == head else v) for i, v in enumerate(data)]
    return {k: (_without(v, rest) if k == head else v) for k, v in data.items()}


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        if isinstance(part, int):
            obj = obj[part]
        elif isinstance(obj, dict):
            obj = obj[part]
        else:
            obj = getattr(obj, part)
    return obj


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, BaseModel):
        return all(_same(getattr(a, k), getattr(b, k)) for k in type(a).model_fields)
    return bool(a == b)


def _load(tmp_path: Path, data: dict[str, Any]) -> cfgmod.Config:
    path = tmp_path / "relay.toml"
    path.write_text(toml_dumps(data), encoding="utf-8")
    return cfgmod.load(path, environ={})


def test_every_model_field_is_covered() -> None:
    """The omission test below reaches every key of every section that has a TOML form."""
    covered = {p[-1] for p in PATHS}
    sections = [f.annotation for f in cfgmod.Config.model_fields.values()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]
    assert cfgmod.ListenerConfig in sections and len(sections) >= 10
    for section in (*sections, cfgmod.DomainPolicy, cfgmod.RouteConfig):
        for name, field in section.model_fields.items():
            if field.default is None or field.is_required():
                continue  # an optional key (absent is its only default form), or required
            assert name in covered, f"{section.__name__}.{name}"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: ".".join(map(str, p)))
def test_a_key_left_out_loads_as_its_default_written_out(
        tmp_path: Path, path: tuple[Any, ...]) -> None:
    written = _get(_load(tmp_path, FULL), path)
    omitted = _get(_load(tmp_path, _without(FULL, path)), path)
    assert _same(omitted, written), (path, omitted, written)


def test_default_allowed_networks_are_networks() -> None:
    nets = cfgmod.build({}, source="defaults").listener.allowed_networks
    assert nets == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert ipaddress.ip_address("127.0.0.5") in nets[0]
