"""The documentation: every relative link resolves, and the README stays a short front door.

Catches a link to a file that was moved or renamed (README.md, docs/*.md, the trainers' READMEs
and bench/results/README.md), a link to a heading of another page that no longer exists, and a
README.md that grows back into a lab notebook (>= 250 lines). Reads files only: no subprocess.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Iterator, List, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 250

# [text](target) and ![alt](target), with an optional "title"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def doc_files() -> List[str]:
    """The pages whose links are checked, relative to the repository root."""
    patterns = ["README.md", "docs/*.md", "ToE/*/README.md", "bench/results/README.md"]
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join(ROOT, pattern)))
    return [os.path.relpath(path, ROOT) for path in found]


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def links(text: str) -> Iterator[str]:
    """Link targets outside code blocks and inline code (a `[a](b)` in code is not a link)."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    for match in LINK.finditer(prose):
        yield match.group(1)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set:
    """Every heading anchor of a Markdown page, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", read(path))):
        base = slug(heading)
        count = seen.get(base, 0)
        result.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return result


def relative_links() -> List[Tuple[str, str]]:
    pairs = []
    for page in doc_files():
        for target in links(read(page)):
            if not target.startswith(EXTERNAL):
                pairs.append((page, target))
    return pairs


def test_the_pages_exist():
    pages = doc_files()
    for required in ("README.md", "docs/clusters.md", "docs/outputs.md", "docs/departures.md",
                     "ToE/deit/README.md", "ToE/lvvit/README.md", "ToE/EfficientTrain/README.md",
                     "ToE/yolos/README.md"):
        assert required in pages, f"{required} is missing"


def test_readme_is_short():
    lines = read("README.md").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; keep it under {README_MAX_LINES}"


@pytest.mark.parametrize("page,target", relative_links())
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    if path:
        resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path))
        assert resolved.startswith(ROOT + os.sep) or resolved == ROOT, f"{page}: {target} leaves the repository"
        assert os.path.exists(resolved), f"{page}: link {target} points to {os.path.relpath(resolved, ROOT)}, " \
                                         "which does not exist"
    else:
        resolved = os.path.join(ROOT, page)
    if anchor and resolved.endswith(".md"):
        assert anchor in anchors(os.path.relpath(resolved, ROOT)), \
            f"{page}: link {target}: no heading with the anchor #{anchor}"


def test_the_link_check_sees_links():
    """The checker itself: finds links and images, skips code, and slugs like GitHub."""
    text = "See [a](docs/a.md#x) and ![b](Figs/b.png).\n```\n[c](nowhere.md)\n```\n`[d](no.md)`\n"
    assert list(links(text)) == ["docs/a.md#x", "Figs/b.png"]
    assert slug("EfficientTrain + ToE") == "efficienttrain--toe"
    assert slug("LV-ViT") == "lv-vit"
    assert slug("The operator: `token_select.py`") == "the-operator-token_selectpy"
