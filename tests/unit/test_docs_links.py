"""Every relative link of the README and docs/ points at a file of the checkout, and every #anchor at a
heading of that file (GitHub's anchors: lower case, punctuation dropped, spaces as hyphens)."""
from __future__ import annotations

import pathlib
import re

import pytest

from helpers import ROOT

PAGES = [pathlib.Path(ROOT) / "README.md", *sorted((pathlib.Path(ROOT) / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    heads = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            bad.append(target)
    assert not bad, f"{page.name}: broken links {bad}"


def test_the_readme_is_a_short_manual():
    assert len((pathlib.Path(ROOT) / "README.md").read_text().splitlines()) <= 250
