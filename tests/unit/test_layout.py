"""The house rules of relay/ (README "Development"): imports run one way between the
packages, no import circle anywhere (type-only and function-level imports count), and
the pure modules import no I/O and read no clock."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "relay"

BASE = {"relay", "relay.codes", "relay.config", "relay.configdoc",
        "relay.errors", "relay.idn", "relay.log", "relay.model", "relay.tasks"}
PACKAGES = ("cli", "check", "dane", "delivery", "dns", "intake", "ops", "smtp", "store",
            "sts", "tlsrpt")
# Which parts each part may import (besides itself). "app" is relay/app.py.
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "dane": {"base"},
    "smtp": {"base"},
    "store": {"base"},
    "intake": {"base"},
    "dns": {"base", "dane"},
    "sts": {"base", "dane", "dns", "store"},
    "delivery": {"base", "dane", "dns", "smtp", "store", "sts"},
    "tlsrpt": {"base", "dane", "dns", "smtp", "store", "sts", "delivery"},
    "check": {"base", "dane", "dns", "smtp", "sts", "delivery"},
    "ops": {"base", "dns", "store"},
    "app": {"base", "dane", "dns", "smtp", "store", "intake", "sts", "delivery", "tlsrpt",
            "ops"},
    "cli": {"base", "dane", "dns", "smtp", "store", "intake", "sts", "delivery", "tlsrpt",
            "check", "ops", "app"},
}
PURE = [
    "relay.codes", "relay.model", "relay.errors",
    "relay.dane.tlsa", "relay.dane.names", "relay.dane.match", "relay.dane.policy",
    "relay.dns.wire", "relay.smtp.protocol", "relay.store.periods",
    "relay.delivery.classify", "relay.delivery.retry", "relay.delivery.dsn",
    "relay.delivery.dsntext",
    "relay.delivery.verdict", "relay.delivery.trace", "relay.tlsrpt.report", "relay.intake.address",
    "relay.intake.received", "relay.intake.throttle", "relay.delivery.requiretls",
    "relay.sts.record", "relay.sts.webpki", "relay.sts.decide", "relay.check.stsview",
    "relay.delivery.destinations",
]
IO_MODULES = {"asyncio", "socket", "ssl", "aiosqlite", "sqlite3", "selectors", "subprocess",
              "time", "http", "urllib.request", "aiosmtpd"}
CLOCK_CALLS = {"now", "utcnow", "today", "time", "monotonic", "perf_counter"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """relay modules imported anywhere in the file (top level, functions, TYPE_CHECKING)."""
    known = set(known)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "relay"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            if base.split(".")[0] != "relay":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    # importing a.b.c runs a/__init__ and a/b/__init__ too
    closed = set(out)
    for mod in out:
        parts = mod.split(".")
        closed |= {".".join(parts[:i]) for i in range(2, len(parts))}
    own = name.split(".")  # a module's own packages are already being imported
    closed -= {".".join(own[:i]) for i in range(1, len(own) + 1)}
    return {m for m in closed if m in known and m != "relay"}


def part_of(mod: str) -> str:
    if mod in BASE:
        return "base"
    if mod == "relay.__main__":  # `python -m relay` is the command line
        return "cli"
    second = mod.split(".")[1]
    if second in ("app", "workers"):  # relay.workers: intake worker processes of `serve`
        return "app"
    assert second in PACKAGES, f"{mod}: a module outside the documented packages"
    return second


def graph() -> dict[str, set[str]]:
    mods = all_modules()
    return {m: imports_of(m, p, mods) for m, p in mods.items()}


def find_cycle(edges: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import circle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_circle() -> None:
    # the check below must be able to fail: a type-only circle like the old
    # listener <-> session <-> tlsauth is found
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_of_sees_type_only_and_late_imports(tmp_path: Path) -> None:
    src = tmp_path / "x.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                   "    from relay.delivery.attempt import HostAttempt\n"
                   "def f():\n    from relay.dns import wire\n")
    known = {"relay.delivery", "relay.delivery.attempt", "relay.dns", "relay.dns.wire"}
    assert imports_of("relay.x", src, known) == known


def test_no_import_circle_in_relay() -> None:
    assert find_cycle(graph()) is None, "import circle: " + " -> ".join(find_cycle(graph()) or [])


def test_no_circle_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for mod, deps in graph().items():
        edges.setdefault(part_of(mod), set()).update(
            part_of(d) for d in deps if part_of(d) != part_of(mod))
    assert find_cycle(edges) is None


def test_imports_run_one_way() -> None:
    wrong = []
    for mod, deps in graph().items():
        part = part_of(mod)
        for dep in deps:
            other = part_of(dep)
            if other != part and other not in ALLOWED[part]:
                wrong.append(f"{mod} ({part}) imports {dep} ({other})")
    assert not wrong, "\n".join(wrong)


def test_every_package_says_its_job_and_what_it_may_import() -> None:
    for pkg in PACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text()))
        assert doc and "May import" in doc, pkg


@pytest.mark.parametrize("mod", PURE)
def test_pure_module_does_no_io_and_reads_no_clock(mod: str) -> None:
    path = all_modules()[mod]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        for n in names:
            assert not any(n == io or n.startswith(io + ".") for io in IO_MODULES), \
                f"{mod} imports {n}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            assert node.func.attr not in CLOCK_CALLS, \
                f"{mod}:{node.lineno} reads the clock ({node.func.attr}())"
    # and nothing it imports from relay does I/O either
    for dep in graph()[mod]:
        assert part_of(dep) == "base" or dep in PURE or dep.count(".") == 1, \
            f"{mod} imports {dep}, which is not pure"


def test_no_module_is_named_after_the_standard_library() -> None:
    import sys

    clash = [m for m in all_modules() if m.rsplit(".", 1)[-1] in sys.stdlib_module_names
             and m.count(".") == 1]
    assert not clash, clash
