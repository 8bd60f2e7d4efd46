"""The SQL of the store lives in `relay/store/sql/<backend>/*.sql`; this module reads it.

Per backend (`sqlite`, `pg`):
- `NNN_<name>.sql`: migrations, applied in order while the schema version < NNN;
- `queries.sql`: named queries, each introduced by a line `-- name: <query_name>`.
Both backends define the same query names with the same parameters and result columns,
so the store's code is shared (a test compares the two sets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

_MIGRATION = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
BACKENDS = ("sqlite", "pg")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def _sql_dir(backend: str) -> resources.abc.Traversable:
    if backend not in BACKENDS:
        raise ValueError(f"unknown store backend {backend!r}")
    return resources.files("relay.store").joinpath("sql").joinpath(backend)


@cache
def migrations(backend: str = "sqlite") -> tuple[Migration, ...]:
    found = []
    for entry in _sql_dir(backend).iterdir():
        m = _MIGRATION.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{backend} migrations must be numbered 001, 002, … without "
                           f"gaps: {versions}")
    return tuple(found)


def parse_queries(text: str) -> dict[str, str]:
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise RuntimeError(f"query {name!r} defined twice")
        lines = [ln for ln in body.strip().splitlines() if not ln.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


@cache
def queries(backend: str = "sqlite") -> dict[str, str]:
    return parse_queries(_sql_dir(backend).joinpath("queries.sql").read_text("utf-8"))


class Queries:
    """Attribute access to one backend's named queries: `q.insert_message`."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def __getattr__(self, name: str) -> str:
        try:
            return queries(self.backend)[name]
        except KeyError:
            raise AttributeError(
                f"no query named {name!r} in sql/{self.backend}/queries.sql") from None


def statements(script: str) -> list[str]:
    """Split a SQLite script into complete statements (comments and blank lines dropped)."""
    import sqlite3

    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        if not buf and (not line.strip() or line.lstrip().startswith("--")):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise RuntimeError(f"incomplete SQL statement at the end of a script: {buf[:60]!r}")
    return out
