"""The README and docs/: every relative link reaches a file and heading that exist, and the
README stays a few screens long."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


def test_slugs_follow_github():
    assert slug("Model-bound: a model that never waits") == "model-bound-a-model-that-never-waits"
    assert slug("Admission, busy and waiting") == "admission-busy-and-waiting"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_reaches_a_file_and_heading(page):
    assert links(page) or page.name != "README.md"
    for link in links(page):
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} names no file"
        if anchor:
            assert target.suffix == ".md", f"{page.name}: {link}"
            assert anchor in anchors(target), f"{page.name}: {link} names no heading"


def test_every_doc_is_linked_from_the_readme():
    linked = {link.partition("#")[0] for link in links(ROOT / "README.md")}
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= linked


def test_the_readme_is_a_few_screens():
    assert len((ROOT / "README.md").read_text().splitlines()) < 250
