"""Every relative link in README.md and docs/, and every ``docs/NAME.md#anchor`` named in
the code, leads somewhere: the file exists, and the anchor (``#section``) is a heading of
that file, as GitHub renders it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def prose(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if not count else f"{base}-{count}")
    return out


def links() -> list[tuple[Path, str]]:
    found = []
    for path in DOCS:
        for line in prose(path):
            for target in LINK.findall(line):
                if not re.match(r"^[a-z]+:", target):  # http:, https:, mailto: ...
                    found.append((path, target))
    return found


CODE_REFERENCE = re.compile(r"\bdocs/([\w.-]+\.md)(#[\w-]+)?")


def code_references() -> list[tuple[Path, str]]:
    """``docs/x.md#y`` in the code, tests and scripts, as links from the repository root."""
    found = []
    files = [p for folder in ("broker", "keystore", "tests", "scripts")
             for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in ("", ".py",
                                                                               ".html", ".toml")
             and p != Path(__file__).resolve()]
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for name, anchor in CODE_REFERENCE.findall(text):
            found.append((ROOT / path.relative_to(ROOT), f"docs/{name}{anchor}"))
    return found


@pytest.mark.parametrize(("source", "target"), code_references(),
                         ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_docs_reference_in_the_code_exists(source: Path, target: str) -> None:
    file_part, _, anchor = target.partition("#")
    destination = ROOT / file_part
    assert destination.exists(), f"{source.relative_to(ROOT)}: {target}: no such file"
    if anchor:
        assert anchor in anchors(destination), (
            f"{source.relative_to(ROOT)}: {target}: no heading '#{anchor}' in {file_part}")


@pytest.mark.parametrize(("source", "target"), links(),
                         ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_relative_link_and_anchor_exists(source: Path, target: str) -> None:
    file_part, _, anchor = target.partition("#")
    destination = (source.parent / file_part).resolve() if file_part else source
    assert destination.exists(), f"{source.name}: {target}: no such file"
    if anchor:
        assert destination.suffix == ".md", f"{source.name}: {target}: anchor in a non-doc"
        assert anchor in anchors(destination), (
            f"{source.name}: {target}: no heading '#{anchor}' in {destination.name}")


def test_the_slugs_follow_github() -> None:
    assert slug("What differs from the daemon") == "what-differs-from-the-daemon"
    assert slug("`keybroker authsvc`") == "keybroker-authsvc"
    assert slug("Bounds (and more)!") == "bounds-and-more"
    assert len(links()) > 20  # the scan found the links
