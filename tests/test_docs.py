"""The repository stands alone and its docs are complete: every public name documented, no citation of a file
the repository lacks, no tracker talk in the README and docs, source files of a readable size."""

import re
from pathlib import Path

import pytest

import svdiff_adapter

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
NOTES_OUTSIDE = re.compile(r"(method|integration-facts|toyworld-facts|style-anchors)\.md|\.\./shared")
TRACKER_TALK = re.compile(r"\bissues?\b|\bsessions?\b|work in progress", re.IGNORECASE)


def _text_files():
    sources = sorted((ROOT / "src").rglob("*.py"))
    return [*sources, *DOCS, ROOT / "README.md", *sorted((ROOT / "examples").rglob("*.py"))]


@pytest.mark.parametrize("name", svdiff_adapter.__all__)
def test_every_public_name_is_documented(name):
    pattern = re.compile(rf"`{re.escape(name)}[`(\[]")
    assert any(pattern.search(doc.read_text(encoding="utf-8")) for doc in DOCS), f"{name} is not in docs/"


def test_nothing_cites_notes_outside_the_repository():
    citing = [str(path.relative_to(ROOT)) for path in _text_files() if NOTES_OUTSIDE.search(path.read_text("utf-8"))]
    assert not citing


def test_readme_and_docs_describe_the_product_not_the_tracker():
    talking = {str(path.relative_to(ROOT)): TRACKER_TALK.findall(path.read_text("utf-8"))
               for path in [ROOT / "README.md", *DOCS]}
    assert not {path: words for path, words in talking.items() if words}


def test_source_files_stay_under_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "src").rglob("*.py")
            if (n := len(p.read_text("utf-8").splitlines())) > 600}
    assert not long
