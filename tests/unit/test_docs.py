"""The documentation is one connected, self-contained set (issue 21 §5): every relative link in
the repository's markdown resolves to a file in the repository (and to a heading, for ``#...``
links into our markdown, with GitHub's slugs), every ``docs/*.md`` is reachable from README.md,
and no markdown names a file that lives outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Files kept outside the repository (a shared folder): their facts may be stated in our own
# words, the files themselves never named or linked.
OUTSIDE_NAMES = re.compile(
    r"MEASURED\.md|METHOD\.md|ARCHITECTURE\.md|\.\./shared|shared/docs|/work/"
)

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
_REF_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    """Every markdown file git tracks (untracked scratch files are not documentation)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.md"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(ROOT / p for p in out.split("\0") if p)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks, code spans removed."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, _CODE_SPAN.sub("", line)))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: rendered text, lower case, punctuation other than
    ``-`` and ``_`` dropped, each space a ``-``."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text (repeats get ``-1``, ``-2``)."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    """``(line, target)`` of every inline link, image and reference definition in prose."""
    found = []
    for number, line in prose_lines(text):
        found.extend((number, m.group(1)) for m in _INLINE_LINK.finditer(line))
        found.extend((number, m.group(1)) for m in _REF_DEFINITION.finditer(line))
    return found


def broken_links(path: Path, root: Path) -> list[str]:
    """Why each relative link of ``path`` does not resolve inside ``root`` (empty: all do)."""
    problems = []
    for number, target in links(path.read_text(encoding="utf-8")):
        if _EXTERNAL.match(target):
            continue
        file_part, _, fragment = unquote(target).partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number} {target}"
        if not resolved.is_relative_to(root):
            problems.append(f"{where}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{where}: no such file")
        elif (
            fragment
            and resolved.suffix == ".md"
            and fragment not in anchors(resolved.read_text(encoding="utf-8"))
        ):
            problems.append(f"{where}: no heading with that anchor")
    return problems


def reachable(start: Path, root: Path) -> set[Path]:
    """Markdown files reachable from ``start`` by relative links."""
    seen, todo = {start.resolve()}, [start.resolve()]
    while todo:
        page = todo.pop()
        for _, target in links(page.read_text(encoding="utf-8")):
            file_part = unquote(target).partition("#")[0]
            if _EXTERNAL.match(target) or not file_part.endswith(".md"):
                continue
            linked = (page.parent / file_part).resolve()
            if linked.is_relative_to(root) and linked.exists() and linked not in seen:
                seen.add(linked)
                todo.append(linked)
    return seen


def outside_mentions(path: Path, root: Path) -> list[str]:
    """Lines of ``path`` (code included) naming a file outside the repository."""
    return [
        f"{path.relative_to(root)}:{number}: {m.group(0)}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        for m in OUTSIDE_NAMES.finditer(line)
    ]


def undocumented_modules(doc: str, package: Path) -> list[str]:
    """Modules of ``package`` (``__init__.py`` and generated ``_pb`` aside) that ``doc`` names
    neither by path (``rerank/cache.py``, ``tb_reranker/rerank/cache.py``), file name
    (``cache.py``) nor dotted name (``rerank.cache``): for docs/architecture.md, which names every
    module of ``tb_reranker`` (``test_architecture_names_every_module``)."""
    missing = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if relative.parts[0] == "_pb" or path.name == "__init__.py":
            continue
        dotted = ".".join(relative.with_suffix("").parts)
        names = (relative.as_posix(), path.name, dotted)
        if not any(name in doc for name in names):
            missing.append(relative.as_posix())
    return missing


# The checks themselves see what they are meant to (on files written here).


def test_slugs_follow_github() -> None:
    assert slug("Why Milvus Lite 3.2.2 is the embedded default") == (
        "why-milvus-lite-322-is-the-embedded-default"
    )
    assert slug("Text encoding: `python -m benchmarks.text_encode --threads 2`") == (
        "text-encoding-python--m-benchmarkstext_encode---threads-2"
    )
    assert slug("**Bold** and [a link](x.md) — dash") == "bold-and-a-link--dash"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_the_checks_see_broken_and_outside_links(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.md").write_text("# Title\n\n## Some part\n", encoding="utf-8")
    (root / "docs" / "orphan.md").write_text("# Orphan\n", encoding="utf-8")
    (root / "README.md").write_text(
        "[ok](docs/a.md) [ok anchor](docs/a.md#some-part) [self](#top)\n"
        "[gone](docs/missing.md) [bad anchor](docs/a.md#no-part)\n"
        "[out](../outside.md) ![img](docs/none.png) [web](https://example.org/x.md)\n"
        "`[code](not/a/link.md)`\n```\n[fenced](not/a/link.md)\n```\n"
        "[ref]: docs/gone-too.md\n\n# Top\nsee MEASURED.md\n",
        encoding="utf-8",
    )
    problems = broken_links(root / "README.md", root)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "no such file",
        "no heading with that anchor",
        "outside the repository",
        "no such file",
        "no such file",
    ]
    assert [p.split(": ")[0].split()[1] for p in problems] == [
        "docs/missing.md",
        "docs/a.md#no-part",
        "../outside.md",
        "docs/none.png",
        "docs/gone-too.md",
    ]
    assert reachable(root / "README.md", root) == {root / "README.md", root / "docs" / "a.md"}
    assert outside_mentions(root / "README.md", root) == ["README.md:11: MEASURED.md"]


def test_the_module_check_sees_an_undocumented_module(tmp_path: Path) -> None:
    for name in ("__init__.py", "a/__init__.py", "a/cache.py", "a/pipe.py", "b.py", "_pb/x.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("", encoding="utf-8")
    assert undocumented_modules("`a/cache.py` and `b.py`", tmp_path) == ["a/pipe.py"]
    assert undocumented_modules("a.cache, a.pipe; b.py", tmp_path) == []


# The repository's documentation.


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path, ROOT) == []


def test_every_doc_is_reachable_from_the_readme() -> None:
    pages = set((ROOT / "docs").glob("*.md")) | {ROOT / "docker" / "README.md"}
    missing = sorted(str(p.relative_to(ROOT)) for p in pages - reachable(ROOT / "README.md", ROOT))
    assert missing == [], f"not reachable by links from README.md: {missing}"


def test_architecture_names_every_module() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert undocumented_modules(doc, ROOT / "tb_reranker") == []


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_outside_the_repository_is_named(path: Path) -> None:
    assert outside_mentions(path, ROOT) == []


def _code_files() -> list[Path]:
    """Our code, scripts and build files (this test file, which spells the names, aside)."""
    found = []
    for folder in ("tb_reranker", "milvus_setup", "benchmarks", "experiments", "tests", "docker"):
        found += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh", ".yml")]
    found += [ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / ".ci" / "run"]
    here = Path(__file__).resolve()
    return sorted(p for p in found if p.is_file() and p.resolve() != here and "_pb" not in p.parts)


def test_no_code_names_a_file_outside_the_repository() -> None:
    """Comments and docstrings cite docs/method.md, never the shared folder's files (issue 21)."""
    files = _code_files()
    assert len(files) > 100
    assert [hit for path in files for hit in outside_mentions(path, ROOT)] == []
