"""The README as a user document: short (< 15 KB), its install line and commands, and every
figure it quotes found in a results file it links (links themselves: test_deploy.py)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_is_short_and_names_its_install_and_commands() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) < 15_000
    for needle in ('".[cpu,models]"', "download.pytorch.org/whl/cpu", "make serve", "make test",
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
    # a percentage also counts in the results' "change [95% interval]" cells, which drop "%"
    missing = sorted(f for f in figures if f not in sources
                     and not (f.endswith("%") and f"{f[:-1]} [" in sources))
    assert not missing, missing
