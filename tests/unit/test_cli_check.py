from __future__ import annotations

import pytest

from relay.cli.check import domain_problem


@pytest.mark.parametrize("name", ["example.org", "Bücher.example", "ok.test.", "a-b.c"])
def test_valid_domains(name: str) -> None:
    assert domain_problem(name) is None


@pytest.mark.parametrize(("name", "why"), [
    ("", "give a domain name"), (".", "give a domain name"),
    ("[127.0.0.1]", "is an address"), ("192.0.2.1", "is an address"), ("::1", "is an address"),
    ("foo bar", "not a valid domain"), ("x..y", "not a valid domain"),
    ("*.example.com", "not a valid domain"), ("-a.example", "not a valid domain"),
    ("a" * 64 + ".com", "not a valid domain"), ("a\u200db.example", "not a valid domain"),
])
def test_invalid_domains_are_named(name: str, why: str) -> None:
    problem = domain_problem(name)
    assert problem is not None and why in problem
