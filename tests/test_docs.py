"""The documentation says what the code does: the CLI's docstring and help, the pytest marker, the
README's test command, the settings the pages name, and every link between the pages (the record's
shape is checked in test_record_schema, the map in test_layout)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from typer.main import get_command

import buildq.cli
from buildq.config import ENV_PREFIX, STACK_VARIABLES, Settings, load_settings
from tests.harness import run_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
#: every page a reader may follow a link to or from
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
PAGES += [ROOT / "deploy" / "README.md", ROOT / "tests" / "standin" / "README.md"]
SETTINGS_PAGE = (DOCS / "settings.md").read_text()


def test_the_cli_docstring_names_every_command() -> None:
    commands = set(get_command(buildq.cli.app).commands)  # type: ignore[attr-defined]
    assert len(commands) == 9
    first_line = (buildq.cli.__doc__ or "").splitlines()[0]
    named = set(re.findall(r"[a-z]+", first_line.split(":", 1)[1]))
    assert commands <= named, commands - named


def test_the_docker_marker_points_to_the_script_that_starts_the_engine() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (marker,) = [m for m in config["tool"]["pytest"]["ini_options"]["markers"] if m.startswith("docker:")]
    scripts = re.findall(r"[\w./-]+\.sh\b", marker)
    assert scripts and all((ROOT / s).is_file() for s in scripts), marker


def test_the_readme_test_command_warns_of_the_root_docker_engine() -> None:
    intro = README.split("**Run the tests**", 1)[1].split("\n## ", 1)[0]
    assert ".ci/dockerd.sh" in intro and "as root" in intro and '-m "not docker"' in intro
    assert ".venv/bin/python -m pytest" in intro


def test_the_readme_is_one_page_that_links_every_docs_page() -> None:
    assert re.findall(r"^## (.+)$", README, re.M) == ["How it works", "Documentation", "Map"]
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", README))
    assert linked == {p.name for p in DOCS.glob("*.md")}


def test_every_setting_the_docs_name_exists() -> None:
    """Every ``BUILDQ_*`` name on a page (in a table, a command, ``${…}``) is a setting, one of the
    compose stack's variables or one of the test suite's; only the lines that show the message for
    an unknown name may name another."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | set(STACK_VARIABLES)
    known |= {"BUILDQ_TEST_BUILDKIT_BIN", "BUILDQ_TEST_REDIS"}  # the test suite's, not settings
    for page in [*PAGES, ROOT / "docker-compose.yml"]:
        lines = [line for line in page.read_text().splitlines() if "did you mean" not in line]
        named = set(re.findall(r"\bBUILDQ_[A-Z0-9_]*[A-Z0-9]\b(?!\*)", "\n".join(lines)))
        assert named - known == set(), page.relative_to(ROOT)
    (row,) = [line for line in SETTINGS_PAGE.splitlines() if line.startswith("| `BUILDQ_BUILDKIT_HOSTS`")]
    assert "replaces `BUILDQ_BUILDKIT_HOST`" in row


def test_the_timeout_help_gives_the_workers_limit() -> None:
    limit = load_settings({}).max_timeout_s
    assert limit == 14400
    out = run_cli({}, "submit", "--help")
    assert "BUILDQ_MAX_TIMEOUT_S" in out.stdout and str(limit) in out.stdout
    row = SETTINGS_PAGE.split("`BUILDQ_DEFAULT_TIMEOUT_S` / `BUILDQ_MAX_TIMEOUT_S`", 1)[1]
    assert f"`{limit}`" in row[:40]


def test_every_cli_option_and_argument_has_help() -> None:
    for name, command in get_command(buildq.cli.app).commands.items():  # type: ignore[attr-defined]
        for param in command.params:
            assert getattr(param, "help", None), f"buildq {name}: {param.name} has no help"


# ---- links between the pages ------------------------------------------------------------------


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor of a Markdown page: its headings (not inside code blocks) and ``<a id>`` tags."""
    found, in_code = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"#{1,6} (.+)", line)):
            found.add(slug(heading.group(1)))
    return found | set(re.findall(r'<a id="([^"]+)"></a>', text))


def links(text: str) -> list[str]:
    """The targets of a page's Markdown links that stay in this repository (no scheme)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


def test_the_slug_is_githubs() -> None:
    assert slug("Timings: why was this build slow?") == "timings-why-was-this-build-slow"
    assert slug("Is that unusual? `explain`") == "is-that-unusual-explain"


def test_every_link_between_the_pages_leads_somewhere() -> None:
    broken = []
    for page in PAGES:
        for target in links(page.read_text()):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and anchor not in anchors(dest.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such anchor)")
    assert broken == []


def test_every_setting_has_a_row() -> None:
    from buildq.config import ENV_PREFIX, Settings

    missing = [
        ENV_PREFIX + name.upper()
        for name in Settings.model_fields
        if not re.search(rf"^\|[^|]*`{ENV_PREFIX + name.upper()}`", SETTINGS_PAGE, re.MULTILINE)
    ]
    assert missing == []
