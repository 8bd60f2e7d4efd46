"""Checking generated TLS reports against a JSON Schema written from RFC 8460 §4."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMA = Path(__file__).with_name("tlsrpt_schema.json")


@cache
def validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def validate_report(report: Any) -> None:
    """Raise AssertionError listing every way `report` breaks the schema."""
    errors = sorted(validator().iter_errors(report), key=lambda e: list(e.path))
    if errors:
        raise AssertionError("report does not match RFC 8460 §4:\n" + "\n".join(
            f"  {'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors))
