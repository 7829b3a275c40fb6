"""The README's stage tables are generated from pbkv/stages.py and must not drift."""

from pathlib import Path

from pbkv.stages import with_tables

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_stage_tables_match_the_code():
    text = README.read_text()
    assert with_tables(text) == text, "run: python -m pbkv.stages --readme README.md"
