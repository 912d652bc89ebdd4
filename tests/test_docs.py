"""Every runnable example in the docs runs.

Each ```python block of README.md and docs/*.md is executed; the blocks of one
file run in order in one namespace (later blocks build on earlier ones), in a
fresh interpreter per file, since models register on SQLAlchemy metadata.
Blocks marked ```python file=NAME form a small project instead: they are written
to files of those names and ``pytest`` runs there (docs/testing.md).
Fragments are marked ```python-snippet (or ```text) and are not run.
Pages whose blocks read ``DATABASE_URL`` are PostgreSQL examples: they run with it
set to the tests' PostgreSQL (``TEST_POSTGRES_URL``). Pages whose blocks read
``REDIS_URL`` are Redis examples: they run with it set to database
``TEST_DOCS_REDIS_DB`` (default 12) of the tests' Redis, flushed before and after.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REDIS_DB = int(os.environ.get("TEST_DOCS_REDIS_DB", "12"))
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)

# Runs the blocks of one file in order; reports the failing block's number and line.
RUNNER = r"""
import json, sys, traceback
blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for number, (line, source) in enumerate(blocks, 1):
    try:
        exec(compile(source, f"{sys.argv[1]} block {number} (line {line})", "exec"), namespace)
    except BaseException:
        print(f"{sys.argv[1]}: block {number} (line {line}) failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
"""


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """The ```python blocks of ``path`` with the line each starts on."""
    text = path.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, match.start()) + 2, match.group(2))
        for match in FENCE.finditer(text)
        if match.group(1).strip() == "python"
    ]


def project_files(path: Path) -> dict[str, str]:
    """The ```python file=NAME blocks of ``path``: file name -> source."""
    files = {}
    for match in FENCE.finditer(path.read_text(encoding="utf-8")):
        info = match.group(1).split()
        if len(info) == 2 and info[0] == "python" and info[1].startswith("file="):
            files[info[1].removeprefix("file=")] = match.group(2)
    return files


def test_docs_exist() -> None:
    names = {path.name for path in DOC_FILES}
    for name in ("README.md", "index.md", "getting-started.md", "configuration.md",
                 "requests.md", "column-strategy.md", "errors.md", "signals.md",
                 "fairness.md"):
        assert name in names


RUNNABLE = [path for path in DOC_FILES if python_blocks(path)]
PROJECTS = [path for path in DOC_FILES if project_files(path)]


def test_every_page_with_code_has_runnable_examples() -> None:
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        if "```python" in text.replace("```python-snippet", ""):
            assert path in RUNNABLE or path in PROJECTS, path.name


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda path: str(path.relative_to(ROOT)))
def test_python_blocks_run(path: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = python_blocks(path)
    name = str(path.relative_to(ROOT))
    env = dict(os.environ)
    if any("DATABASE_URL" in source for _, source in blocks):
        env["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    with _redis_for(blocks, request) as redis_url:
        if redis_url:
            env["REDIS_URL"] = redis_url
        done = subprocess.run(
            [sys.executable, "-c", RUNNER, name],
            input=json.dumps(blocks), cwd=tmp_path, capture_output=True, text=True,
            timeout=300, check=False, env=env,
        )
    assert done.returncode == 0, f"{name}: {len(blocks)} blocks\n{done.stderr}{done.stdout[-2000:]}"


@contextmanager
def _redis_for(blocks: list[tuple[int, str]], request: pytest.FixtureRequest) -> Iterator[str]:
    """The Redis URL for a page whose blocks read ``REDIS_URL`` ("" for others), its
    database flushed before and after."""
    if not any("REDIS_URL" in source for _, source in blocks):
        yield ""
        return
    from tests.worker_processes import flushed_redis_db

    with flushed_redis_db(request.getfixturevalue("redis_url"), REDIS_DB) as url:
        yield url


@pytest.mark.parametrize("path", PROJECTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_project_examples_pass_their_own_tests(path: Path, tmp_path: Path) -> None:
    for name, source in project_files(path).items():
        (tmp_path / name).write_text(source, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, f"{path.name}:\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
    assert " passed" in done.stdout and "failed" not in done.stdout, done.stdout


def test_docs_link_to_existing_pages() -> None:
    link = re.compile(r"\]\(([^)#:\s]+\.md)(?:#[^)]*)?\)")
    for path in DOC_FILES:
        for target in link.findall(path.read_text(encoding="utf-8")):
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
