"""The user documents: every relative link in README.md and docs/ points to a file that
exists, and the README stays a one-screen-per-section user document (< 15 KB)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, broken


def test_readme_is_short_and_names_its_install_and_commands() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) < 15_000
    for needle in ('pip install ".[cpu]"', "make serve", "make test",
                   "--attention-backend prescore", "docs/configuration.md", "LICENSE"):
        assert needle in text, needle


def test_readme_figures_come_from_its_linked_results() -> None:
    """Every percentage and speed ratio the README quotes appears in a results file it links:
    no number without its source."""
    text = (REPO / "README.md").read_text()
    linked = [REPO / t.split("#")[0] for t in LINK.findall(text)
              if t.startswith("docs/results/") and t.endswith(".md")]
    sources = "\n".join(p.read_text() for p in linked)
    figures = set(re.findall(r"[+-]?\d+\.\d+(?:%|x)", text))
    assert figures, "the README quotes no figure"
    missing = sorted(f for f in figures if f not in sources)
    assert not missing, missing
