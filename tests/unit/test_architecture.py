"""The package's import rules, read from the source (no imports run): models/ knows no
parallelism, config/ knows nothing of distrib beyond its errors, and no two subpackages import
each other, directly or around a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "distrib"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _files(part: str) -> list[Path]:
    return sorted((PACKAGE / part).rglob("*.py"))


def _part(module: str) -> str | None:
    """The subpackage (or root module) of distrib that `module` belongs to."""
    pieces = module.split(".")
    if pieces[0] != "distrib" or len(pieces) < 2:
        return None
    return pieces[1]


def test_models_never_import_torch_distributed() -> None:
    for path in _files("models"):
        bad = sorted(m for m in _imports(path) if m.startswith("torch.distributed"))
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"
        parts = {_part(m) for m in _imports(path)} - {None, "models", "config", "errors"}
        assert not parts, f"{path.relative_to(PACKAGE)} imports distrib.{parts}"


def test_config_imports_nothing_of_distrib_but_errors() -> None:
    for path in _files("config"):
        parts = {_part(m) for m in _imports(path)} - {None, "config", "errors"}
        assert not parts, f"{path.relative_to(PACKAGE)} imports distrib.{parts}"
        assert not any(m.startswith("torch") for m in _imports(path)), path


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        me = rel.parts[0].removesuffix(".py")
        deps = {_part(m) for m in _imports(path)} - {None, me}
        graph.setdefault(me, set()).update(d for d in deps if d is not None)
    return graph


def test_no_import_cycles_between_subpackages() -> None:
    graph = _graph()

    def reaches(start: str, goal: str, seen: set[str]) -> list[str] | None:
        for nxt in sorted(graph.get(start, ())):
            if nxt == goal:
                return [start, goal]
            if nxt not in seen:
                seen.add(nxt)
                path = reaches(nxt, goal, seen)
                if path:
                    return [start, *path]
        return None

    for part in sorted(graph):
        cycle = reaches(part, part, set())
        assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("part", ["train", "commands"])
def test_the_loop_and_the_commands_never_touch_fsdp_or_deepspeed(part: str) -> None:
    """The training loop talks to an Engine, never to FSDP or DeepSpeed directly."""
    for path in _files(part):
        bad = sorted(
            m
            for m in _imports(path)
            if m.startswith(("deepspeed", "torch.distributed.fsdp", "distrib.parallel"))
        )
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"
