"""buildctl stand-ins for tests: a Python one (fast, full scenarios) and a busybox-sh one (docker image).

:func:`write_standin_executable` writes an executable ``buildctl`` that runs the Python stand-in
with this interpreter (``sys.executable``), so a start costs tens of milliseconds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "buildctl_standin.py"
SH_STANDIN = HERE / "buildctl.sh"


def write_standin_executable(directory: str | os.PathLike[str]) -> Path:
    """Write ``<directory>/buildctl`` (mode 755) running the Python stand-in; return its path.

    ``-S`` skips site-packages (the stand-in needs only the standard library); bytecode caching
    is forced on so its modules are not recompiled at every start.
    """
    path = Path(directory) / "buildctl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"#!{sys.executable} -S\n"
        "import sys\n"
        "sys.dont_write_bytecode = False\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "from buildctl_standin import main\n"
        "sys.exit(main(sys.argv[1:]))\n",
        encoding="utf-8",
    )
    path.chmod(0o755)
    return path


FIXTURES = HERE.parent / "fixtures" / "buildkit"


def image_captures() -> list[str]:
    """Fixture paths (relative to tests/fixtures/buildkit) the sh stand-in reads, from its header."""
    for line in SH_STANDIN.read_text(encoding="utf-8").splitlines():
        if line.startswith("# image-captures: "):
            return line.split(": ", 1)[1].split()
    raise RuntimeError(f"{SH_STANDIN} has no '# image-captures:' line")


def flat_captures(directory: str | os.PathLike[str]) -> Path:
    """Copy the sh stand-in's captures flat into ``directory`` (its STANDIN_CAPTURES); return it."""
    import shutil

    dest = Path(directory)
    dest.mkdir(parents=True, exist_ok=True)
    for rel in image_captures():
        shutil.copyfile(FIXTURES / rel, dest / Path(rel).name)
    return dest
