"""The package layout keeps its promises: producers import no worker code, no import cycles,
``buildkit/`` is pure, and every class stays small (README: "map")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "buildq"
WORKER_MODULES = (
    "buildq.engine",
    "buildq.celeryapp.task",
    "buildq.celeryapp.worker",
    "buildq.celeryapp.task",
    "buildq.launchers",
    "buildq.store.claim",
    "buildq.store.janitor",
    "buildq.store.slots",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """buildq modules imported at module level (not inside functions, not under TYPE_CHECKING)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("buildq")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("buildq"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): top_level_imports(p) for p in PACKAGE.rglob("*.py")}


def test_a_producer_importing_the_client_imports_no_worker_code() -> None:
    code = (
        "import sys, buildq.client, buildq.cli\n"
        "from celery.signals import worker_ready, worker_process_shutdown, worker_shutting_down\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('buildq'))\n"
        "handlers = [r for s in (worker_ready, worker_process_shutdown, worker_shutting_down)"
        " for r in s.receivers]\n"
        "print('\\n'.join(loaded)); print('HANDLERS', len(handlers))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = out.splitlines()[:-1]
    assert "buildq.client" in loaded
    assert [m for m in loaded if m.startswith(WORKER_MODULES)] == []
    assert out.splitlines()[-1] == "HANDLERS 0"


def test_there_is_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_buildkit_is_pure() -> None:
    for name, imports in graph().items():
        if name.startswith("buildq.buildkit"):
            outside = {m for m in imports if not m.startswith("buildq.buildkit")}
            outside -= {"buildq.contract.reference"}
            assert outside == set(), f"{name} imports {outside}"


def test_the_store_and_the_engine_know_nothing_of_celery() -> None:
    for path in [*PACKAGE.joinpath("store").rglob("*.py"), *PACKAGE.joinpath("engine").rglob("*.py")]:
        text = path.read_text()
        assert "import celery" not in text and "from celery" not in text, path
        assert "buildq.celeryapp" not in text and "..celeryapp" not in text, path


def test_classes_stay_small() -> None:
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                assert size <= 150, f"{path.relative_to(PACKAGE)}:{node.name}: {size} lines"
