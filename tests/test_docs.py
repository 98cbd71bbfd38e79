"""The documentation site (mkdocs.yml, built with `mkdocs build --strict` in CI): every page of docs/ and every
notebook is in the nav, every nav entry exists, and every so3lib command line the pages show parses."""

from __future__ import annotations

import yaml
from conftest import ROOT
from test_readme import command_lines

from so3lib.cli import parse

DOCS = ROOT / "docs"


def nav_entries(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [p for v in node.values() for p in nav_entries(v)]
    return [p for v in node for p in nav_entries(v)]


def test_the_nav_lists_every_page_and_notebook():
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = nav_entries(cfg["nav"])
    assert len(nav) == len(set(nav))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    notebooks = {f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert set(nav) == pages | notebooks, "add new pages to (or remove old ones from) the nav in mkdocs.yml"


def test_command_lines_of_the_pages_parse():
    lines = [argv for page in sorted(DOCS.glob("*.md")) for argv in command_lines(page.read_text())]
    assert len(lines) >= 8
    for argv in lines:
        assert parse(argv).command.name == argv[0], argv
