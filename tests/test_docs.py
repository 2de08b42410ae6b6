"""The README and docs/ point only at things that exist: relative links (and their #anchors), file
paths like `preprocess/shards.py` and module paths like `trainer.masking.MaskingConfig`, inline or
in code blocks.  Also: the README stays a short door (size limit)."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 12 * 1024

# Pages other work in progress is writing; links to them are allowed until they land (then this
# set is emptied and the links are checked like any other).
PENDING: set[str] = set()

PACKAGES = ("preprocess", "trainer", "evaluation", "tasks", "launch")
TOP_DIRS = PACKAGES + ("ds_configs", "benchmarks", "tests", "docs")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_INLINE = re.compile(r"`([^`\n]+)`")
_PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP_DIRS)})/[\w./*-]*\w)")
_FILE_SUFFIXES = {"py", "md", "json", "jsonl", "sbatch", "sh", "toml", "gz", "zst", "bin", "idx"}
_DOTTED = re.compile(rf"(?<![\w./-])((?:{'|'.join(PACKAGES)})(?:\.\w+)+)")
_FROM_IMPORT = re.compile(rf"\s*from ((?:{'|'.join(PACKAGES)})[\w.]*) import (.+)")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _split_fences(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, code-block lines), each as (line number, text)."""
    prose: list[tuple[int, str]] = []
    code: list[tuple[int, str]] = []
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        (code if fenced else prose).append((n, line))
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    prose, _ = _split_fences(path.read_text(encoding="utf-8"))
    return frozenset(slug(line.lstrip("#")) for _, line in prose if re.match(r"#{1,6} ", line))


def _module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


@cache
def top_level_names(path: Path) -> frozenset[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def dotted_problem(name: str) -> str | None:
    """None if ``name`` is a module, or a module plus a name defined at its top level."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        mod = _module_file(".".join(parts[:k]))
        if mod is None:
            continue
        rest = parts[k:]
        if not rest or rest[0] in top_level_names(mod) or _module_file(".".join(parts[: k + 1])):
            return None
        return f"{'.'.join(parts[:k])} has no {rest[0]!r}"
    return "no such module"


def path_problem(rel: str) -> str | None:
    rel = rel.rstrip(".")
    if "*" in rel:
        return None if any(REPO.glob(rel)) else "matches no file"
    return None if (REPO / rel).exists() else "does not exist"


def problems(path: Path, text: str) -> list[str]:
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    out: list[str] = []
    prose, code = _split_fences(text)
    for n, line in prose:
        for target in _LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            rel = dest.relative_to(REPO).as_posix() if dest.is_relative_to(REPO) else str(dest)
            if rel in PENDING:
                continue
            if not dest.exists():
                out.append(f"{where}:{n}: link {target} -> {rel} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                out.append(f"{where}:{n}: link {target}: no heading #{anchor} in {rel}")
    spans = [(n, s) for n, line in prose for s in _INLINE.findall(line)] + code
    for n, s in spans:
        for rel in _PATH.findall(s):
            if rel not in PENDING and (why := path_problem(rel)):
                out.append(f"{where}:{n}: `{rel}` {why}")
        for name in _DOTTED.findall(s):
            if name.rpartition(".")[2] in _FILE_SUFFIXES:
                continue  # a file name such as `preprocess.py`, not a module path
            if why := dotted_problem(name):
                out.append(f"{where}:{n}: `{name}`: {why}")
        m = _FROM_IMPORT.match(s)
        if m:
            for imported in (x.strip().split(" as ")[0] for x in m.group(2).strip("()").split(",")):
                if imported and (why := dotted_problem(f"{m.group(1)}.{imported}")):
                    out.append(f"{where}:{n}: from {m.group(1)} import {imported}: {why}")
    return out


def test_checker_finds_what_it_should():
    fake = REPO / "docs" / "fake.md"
    text = ("# Title\n[ok](preprocess.md) [gone](nope.md) [anchor](preprocess.md#no-such-heading)\n"
            "[pending](sandbox.md) `preprocess/shards.py` `preprocess/spans.py` `trainer.masking` "
            "`trainer.masking.MaskingConfig` `preprocess.spans.Domain` `preprocess.shards.Nope`\n"
            "```python\nfrom preprocess.pipeline import PreprocessConfig, nothing_here\n```\n")
    found = problems(fake, text)
    assert len(found) == 6, found
    for bad in ("nope.md", "#no-such-heading", "preprocess/spans.py", "preprocess.spans.Domain",
                "'Nope'", "nothing_here"):
        assert any(bad in f for f in found), (bad, found)


def test_links_and_module_paths_exist():
    found = [p for f in doc_files() for p in problems(f, f.read_text(encoding="utf-8"))]
    assert not found, "\n".join(found)


def test_readme_is_a_short_door():
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move manual content to docs/"


def test_source_cites_only_existing_docs():
    """Docstrings and comments that name a docs/ page name one that exists."""
    found = []
    for path in sorted(REPO.rglob("*.py")):
        if any(part.startswith(".") or part.endswith("venv") for part in path.relative_to(REPO).parts):
            continue  # .git, .venv (CI's), venv
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for rel in re.findall(r"(?<![\w/])docs/[\w./-]*\w\.md", line):
                if rel not in PENDING and not (REPO / rel).is_file():
                    found.append(f"{path.relative_to(REPO)}:{n}: {rel} does not exist")
    assert not found, "\n".join(found)


def test_no_merge_conflict_markers():
    """No tracked text file carries a leftover merge conflict (`<<<<<<<` / `>>>>>>>` lines)."""
    import subprocess

    out = subprocess.run(
        ["git", "grep", "-nE", "^(<<<<<<< |>>>>>>> )", "--", "."],
        cwd=REPO, capture_output=True, text=True,
    )
    if out.returncode == 128:  # not a git checkout (sdist): check the docs at least
        hits = [f"{p}:{n}" for p in doc_files()
                for n, line in enumerate(p.read_text().splitlines(), 1)
                if line.startswith(("<<<<<<< ", ">>>>>>> "))]
    else:
        hits = out.stdout.splitlines()
    assert not hits, "merge conflict markers:\n" + "\n".join(hits)
