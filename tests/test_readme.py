"""The README stays a short reference that matches the tree, and the docs' links and tables stay usable."""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 200
MAX_TABLE_CELL = 300  # longer than this reads better as a bullet list


def layout_paths() -> list[str]:
    """Every path the README's Layout table names in its first column."""
    section = README.read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return [path for row in rows for path in re.findall(r"`([^`]+)`", row)]


def ignored_by_git(name: str) -> bool:
    patterns = [line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return any(fnmatch(name, pattern) for pattern in patterns)


def test_the_readme_is_a_short_reference():
    assert len(README.read_text().splitlines()) <= MAX_README_LINES


def test_every_path_in_the_layout_table_exists():
    named = layout_paths()
    assert len(named) > 20
    missing = [path for path in named if not (ROOT / path).exists()]
    assert not missing, f"the README's Layout table names paths that do not exist: {missing}"


def test_the_layout_table_names_every_folder_and_engine_subpackage():
    folders = {f"{path.name}/" for path in ROOT.iterdir()
               if path.is_dir() and not path.name.startswith(".") and not ignored_by_git(path.name)}
    subpackages = {f"engine/{path.parent.name}/" for path in (ROOT / "engine").glob("*/__init__.py")}
    named = layout_paths()
    # a top-level folder may be described by its modules' rows (engine/ is); each subpackage has its own row
    unnamed = {folder for folder in folders if not any(path.startswith(folder) for path in named)}
    unnamed |= subpackages - set(named)
    assert not unnamed, f"add these to the README's Layout table: {sorted(unnamed)}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a `# comment` in a code block is no heading
    return {github_anchor(heading) for heading in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", DOC_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_local_links_point_at_files_and_headings_that_exist(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name} links to {target}: no such heading"


@pytest.mark.parametrize("page", DOC_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_table_cells_stay_short(page):
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("|"):
            longest = max(len(cell.strip()) for cell in line.strip("|").split("|"))
            assert longest <= MAX_TABLE_CELL, f"{page.name}:{number}: a table cell of {longest} characters"


def test_the_readme_shows_the_test_command_ci_runs():
    ci_commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == ["make test"]
    assert re.search(r"```bash\n(?:.*\n)*?make test\b", README.read_text())
