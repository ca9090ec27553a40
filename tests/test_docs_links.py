"""The repository stands alone: every relative link in README.md and docs/*.md resolves to a file
inside it (and, for `file.md#section` links, to a heading of that file), and no file points at
the project's internal notes outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_TITLE = r"""(?:\s+(?:"[^"]*"|'[^']*'))?"""
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?" + _TITLE + r"\s*\)")
_REF_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?" + _TITLE + r"\s*$", re.M)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _prose(text: str) -> str:
    """The text with fenced code blocks and code spans removed (links there are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Targets of the inline links, images and reference definitions of a Markdown text."""
    prose = _prose(text)
    return _INLINE_LINK.findall(prose) + _REF_DEFINITION.findall(prose)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, and
    -1, -2, ... appended to repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for title in _HEADING.findall(_FENCE.sub("", text)):
        title = re.sub(r"`([^`]*)`", r"\1", title)
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a linked heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(doc: Path) -> list[str]:
    """Relative links of `doc` that miss a file in the repository or a heading of it."""
    problems = []
    for target in links(doc.read_text(encoding="utf-8")):
        if _EXTERNAL.match(target):
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (doc.parent / path_part).resolve() if path_part else doc.resolve()
        if not resolved.is_relative_to(REPO):
            problems.append(f"{target}: outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{target}: {resolved.relative_to(REPO)} does not exist")
            continue
        if not (fragment and resolved.suffix == ".md"):
            continue
        if fragment not in anchors(resolved.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading with anchor #{fragment} in {resolved.relative_to(REPO)}")
    return problems


def test_the_docs_exist():
    assert (REPO / "docs" / "design.md").is_file()
    assert (REPO / "docs" / "algorithm.md").is_file()


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_relative_links_resolve(doc):
    assert broken_links(doc) == []


def test_the_checker_sees_links_only_outside_code():
    text = (
        "[a](docs/x.md) ![b](img.png 'title')\n`[c](not/a/link.md)`\n```\n[d](in/fence.md)\n```\n"
        "[e]: ref/target.md\n"
    )
    assert links(text) == ["docs/x.md", "img.png", "ref/target.md"]
    assert anchors("# Kernel math\n## What the official terms' gradients are\n## Kernel math\n") == {
        "kernel-math", "what-the-official-terms-gradients-are", "kernel-math-1"}


def test_nothing_points_outside_the_repository():
    # The project's internal notes live in a sibling folder that a clone does not have; what a
    # reader needs from them is in docs/. Neither the folder nor the notes' names may appear.
    # Spelled in pieces so that this file, which must name them, does not itself point outside.
    needles = ("../" + "shared", "DESIGN" + ".md", "PAPO_" + "SPEC", "MACHINE_" + "NOTES",
               "CONVENTIONS" + ".md", "METHOD" + ".md")
    suffixes = {".md", ".py", ".yaml", ".yml", ".json", ".toml", ".sh", ".cfg", ".txt", ".cpp", ".h",
                ".cu", ".cuh"}
    roots = ["README.md", "Makefile", "setup.py", "pyproject.toml", ".ci", "docs", "papo_kernels",
             "papo", "train", "benchmarks", "tests", "examples", "csrc", "experiments", "scripts",
             "CMakeLists.txt"]
    offenders = []
    for root in roots:
        base = REPO / root
        files = [base] if base.is_file() else [
            p for p in base.rglob("*") if p.is_file() and (p.suffix in suffixes or not p.suffix)]
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in needles if n in text]
    assert offenders == []
