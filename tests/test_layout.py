"""The package layout keeps its promises: the README's map is the rule (every module under exactly
one row, imports only of the rows it names), no import cycle, ``buildkit/`` pure, the store and the
engine free of Celery, and a producer's ``import buildq.client`` loads neither Celery nor a worker
module."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "buildq"
WORKER_MODULES = ("buildq.engine", "buildq.celeryapp", "buildq.launchers", "buildq.store.janitor")


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


# -- the README's map --------------------------------------------------------------------------


def map_rows() -> list[tuple[list[str], set[str]]]:
    """(paths, names it may import) of each row of the README's "Map" table."""
    text = (ROOT / "README.md").read_text()
    table = text.split("\n## Map\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`buildq/"):
            continue
        paths = re.findall(r"`(buildq/[^`]*)`", cells[0])
        allowed_cell = cells[2].split("(")[0]  # a remark in parentheses names no rule
        allowed = set(re.findall(r"`([a-z_]+)`", allowed_cell))
        rows.append((paths, allowed))
    return rows


def row_key(path: str) -> str:
    """A map path as a module prefix: ``buildq/engine/`` → ``buildq.engine``;
    ``buildq/__init__.py`` → ``buildq`` (the package itself)."""
    return path.rstrip("/").removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def owner(module: str, rows: list[tuple[list[str], set[str]]]) -> int | None:
    """The row a module falls under (the longest matching path; the package's own ``__init__`` only
    by its exact row), or None."""
    best, best_len = None, -1
    for index, (paths, _) in enumerate(rows):
        for path in paths:
            key = row_key(path)
            inside = module.startswith(key + ".") and key != "buildq"
            if (module == key or inside) and len(key) > best_len:
                best, best_len = index, len(key)
    return best


def named(name: str) -> str:
    """A "may import" name as a module prefix: ``engine`` → ``buildq.engine``."""
    return f"buildq.{name}"


def test_the_map_names_files_that_exist_and_covers_every_module() -> None:
    rows = map_rows()
    assert len(rows) >= 8, "the README's Map table was not found"
    for paths, _ in rows:
        for path in paths:
            assert (ROOT / path).exists(), f"the map names {path}, which does not exist"
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        assert owner(module, rows) is not None, f"{module} is under no row of the README's map"


def test_every_module_imports_only_what_its_row_allows() -> None:
    rows = map_rows()
    problems = []
    for module, imports in sorted(graph().items()):
        own = owner(module, rows)
        assert own is not None
        allowed_rows = {own} | {
            i for i, (paths, _) in enumerate(rows) for name in rows[own][1] for p in paths
            if row_key(p) == named(name) or row_key(p).startswith(named(name) + ".")
            or (row_key(p).startswith("buildq.") and row_key(p)[7:] == name)
        }  # fmt: skip
        for target in sorted(imports):
            if owner(target, rows) not in allowed_rows:
                problems.append(f"{module} imports {target}")
    assert problems == [], "imports the README's map does not allow:\n" + "\n".join(problems)


# -- other promises ----------------------------------------------------------------------------


def test_a_producer_importing_the_client_imports_no_worker_code_and_no_celery() -> None:
    code = (
        "import sys, buildq.client, buildq.cli\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('buildq', 'celery', 'kombu')))\n"
        "print('\\n'.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = out.splitlines()
    assert "buildq.client" in loaded
    assert [m for m in loaded if m.startswith(WORKER_MODULES)] == []
    assert [m for m in loaded if m.startswith(("celery", "kombu"))] == []


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


def all_imports(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names, anywhere in it (relative ones resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            found.add(".".join([*base, node.module] if node.module else base))
    return found


def test_the_store_and_the_engine_know_nothing_of_celery() -> None:
    for path in [*PACKAGE.joinpath("store").rglob("*.py"), *PACKAGE.joinpath("engine").rglob("*.py")]:
        bad = {m for m in all_imports(path) if m.split(".")[0] in ("celery", "kombu")}
        bad |= {m for m in all_imports(path) if m.startswith("buildq.celeryapp")}
        assert bad == set(), f"{path}: {bad}"


def test_a_wrong_import_is_caught(tmp_path: Path) -> None:
    """The map check itself can fail: a row allowing nothing and a module importing another row."""
    rows = [(["buildq/contract/"], {"errors"}), (["buildq/engine/"], set()), (["buildq/errors.py"], set())]
    assert owner("buildq.contract.job", rows) == 0 and owner("buildq.engine.lifecycle", rows) == 1
    allowed = {0} | {i for i, (paths, _) in enumerate(rows) for p in paths if row_key(p) == "buildq.errors"}
    assert owner("buildq.engine.lifecycle", rows) not in allowed
