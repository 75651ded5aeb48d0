"""The README and docs/ stay true to the tree: their `make` targets, their links, their length.

A newcomer copies commands from the docs and follows their links, so a renamed
Makefile target, a moved document or a renamed heading must fail here rather
than in a reader's shell. The README stays short enough to read to the end.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
# Makefile rule lines: "target other: prerequisites", not "VAR := value".
RULE = re.compile(r"^([A-Za-z0-9_.%/-]+(?:[ \t]+[A-Za-z0-9_.%/-]+)*)[ \t]*:(?![=:])")
# A `make` command inside code: at its start or after a shell separator.
MAKE_COMMAND = re.compile(r"(?:^|[\s;&|(])make[ \t]+((?:[A-Z_]+=\S*[ \t]+)*)([a-z][\w-]*)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def split_code(text: str) -> tuple[list[str], list[str]]:
    """The document's prose lines and its code (fenced blocks and inline spans)."""
    prose: list[str] = []
    code: list[str] = []
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            code.append(line)
            continue
        code.extend(match.group(2) for match in INLINE_CODE.finditer(line))
        prose.append(line)
    return prose, code


def makefile_targets() -> set[str]:
    targets: set[str] = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = RULE.match(line)
        if match and not line.startswith(("\t", "#")):
            targets.update(match.group(1).split())
    return targets


def make_targets_named(text: str) -> set[str]:
    _, code = split_code(text)
    return {match.group(2) for snippet in code for match in MAKE_COMMAND.finditer(snippet)}


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lowercase, punctuation
    dropped (letters, digits, '_', '-' and spaces kept), spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("`", "").lower()
    kept = "".join(
        char
        for char in text
        if char in " -_" or unicodedata.category(char)[0] in "LN" or char.isalnum()
    )
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 suffixes for repeats."""
    prose, _ = split_code(text)
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    prose, _ = split_code(path.read_text())
    problems: list[str] = []
    for line in prose:
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f"{target}: no file {linked.relative_to(ROOT)}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
                problems.append(f"{target}: no heading #{anchor} in {linked.name}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_make_target_a_doc_names_exists(doc: Path) -> None:
    missing = make_targets_named(doc.read_text()) - makefile_targets()
    assert not missing, f"{doc.name} names make targets the Makefile lacks: {sorted(missing)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(doc: Path) -> None:
    assert not broken_links(doc), f"{doc.name}: {broken_links(doc)}"


def test_the_readme_is_short_enough_to_read_to_the_end() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}"


def test_the_checks_see_what_they_check() -> None:
    """The helpers find a bogus target, a missing file and a missing heading."""
    assert "nope" in make_targets_named("run `make nope ARGS=1` or\n```sh\nmake  demo\n```")
    assert {"demo", "test", "lint"} <= makefile_targets()
    assert github_slug("What an update says (`make bench-privacy`)") == (
        "what-an-update-says-make-bench-privacy"
    )
    assert github_slug("Threat model: who learns what, 2.0") == "threat-model-who-learns-what-20"
    assert anchors("# A\n```sh\n# not a heading\n```\n## A\n") == {"a", "a-1"}
