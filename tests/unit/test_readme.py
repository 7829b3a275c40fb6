"""The README and docs/ stay true to the code: the stage tables are generated from
pbkv/stages.py, every setting is documented, every relative link and every
``python -m`` module named resolves, and the README stays a short first page."""

import dataclasses
import re
from pathlib import Path

import pytest

from pbkv.config import Settings
from pbkv.stages import BEGIN_MARK, END_MARK, STAGES_PAGE, describe, with_tables

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)
MODULE = re.compile(r"python -m ((?:pbkv|bench)\.[\w.]+)")


def prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.replace("`", "").strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(h) for h in HEADING.findall(FENCE.sub("", page.read_text()))}


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if "://" not in t]


def test_stage_tables_match_the_code() -> None:
    page = ROOT / STAGES_PAGE
    text = page.read_text()
    assert BEGIN_MARK in text and END_MARK in text
    assert describe() in text
    assert with_tables(text) == text, f"run: python -m pbkv.stages --write {STAGES_PAGE}"


def test_with_tables_replaces_only_the_generated_section() -> None:
    stale = f"head\n{BEGIN_MARK}\n| old | table |\n{END_MARK}\ntail\n"
    assert with_tables(stale) == f"head\n{BEGIN_MARK}\n{describe()}\n{END_MARK}\ntail\n"


def test_readme_is_a_short_first_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in relative_links(README), f"README does not link {page.name}"


def test_readme_keeps_the_two_commands() -> None:
    text = README.read_text()
    assert "./compile.sh && bin/start_server -b && bin/start_server -p" in text
    assert "\nbin/run_tests\n" in text
    scripts = ("compile.sh", "bin/start_server", "bin/stop_server", "bin/run_tests", "bin/test")
    for script in scripts:
        path = ROOT / script
        assert path.is_file() and path.stat().st_mode & 0o111, script


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    links = relative_links(page)
    for link in links:
        target, _, fragment = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link} names no file"
        if fragment and path.suffix == ".md":
            assert fragment in anchors(path), f"{page.name}: {link} names no heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_named_exists(page: Path) -> None:
    for module in MODULE.findall(page.read_text()):
        path = ROOT / module.replace(".", "/")
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), module


def test_every_setting_is_documented_with_its_default() -> None:
    text = (ROOT / "docs" / "settings.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert {field.name for field in dataclasses.fields(Settings)} <= documented


def test_anchor_follows_github() -> None:
    assert anchor("Refused requests: two modes") == "refused-requests-two-modes"
    assert anchor("`course` (the default)") == "course-the-default"
    assert anchor("Operations: scripts, status, metrics, logs") == (
        "operations-scripts-status-metrics-logs"
    )
