"""The docs build, and every code block in README.md and docs/ runs.

`mkdocs build --strict` renders docs/ (broken links and missing pages fail). Each fenced block is run against the
demo bundle in a scratch directory that holds `bundle/` (the demo's Q4_K_M bundle), `photo.jpg` (a 4032x3024 scene),
`a.jpg`, `b.jpg` and the profile files the docs write (a ```toml block whose first line is `# NAME.toml`):

- ```python: executed in a fresh namespace; one that talks to `http://127.0.0.1:8080` gets a running
  `edgevlm serve bundle/ --api-key $EDGEVLM_API_KEY` at that address instead.
- ```bash: every line is an `edgevlm` command (run with this checkout, exit status 0).
- ```console: `$ edgevlm ...` lines run and their output must equal the block's (a line ending in `...`: its start).
- ```toml: a profile file, loaded by `edgevlm.profiles.load_profile`.

A block that cannot run here (a GPU, the model hub, a Jetson, installing packages) says why in an HTML comment on
the line before its fence, `<!-- not run: REASON -->`: it is reported as skipped with that reason.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import edgevlm_serve

from edgevlm.demo import demo_bundle
from edgevlm.demo.scenes import scene
from edgevlm.profiles import load_profile

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = ("python", "bash", "console", "toml")
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>.+?) -->")
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")
SERVER_URL = "http://127.0.0.1:8080"
API_KEY = "docs-snippet-key"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason, when marked

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, with the `not run` reason of the line before each."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = NOT_RUN.search(lines[i - 1]) if i > 0 else None
        code = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(path, i + 1, match["lang"], code, marker["reason"] if marker else None))
        i = end + 1
    return blocks


BLOCKS = [block for path in DOC_FILES for block in code_blocks(path) if block.lang in RUN_LANGUAGES]


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuations joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def edgevlm_cli(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEVLM_API_KEY": API_KEY}
    command = [sys.executable, "-m", "edgevlm.cli", *words[1:]]
    return subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def snippet_dir(tmp_path_factory, verified_files_cache) -> Path:
    """A directory with what the docs' snippets name: bundle/, photo.jpg, a.jpg, b.jpg and the docs' profile files."""
    pytest.importorskip("torch")  # the demo bundle is exported once per session
    work = tmp_path_factory.mktemp("docs-snippets")
    exported, _ = demo_bundle("Q4_K_M")  # in the session's cache, where `edgevlm demo` finds it
    shutil.copytree(exported, work / "bundle")  # a copy, not a link: the served model id is the folder's name
    scene(1).image.resize((4032, 3024)).save(work / "photo.jpg", quality=90)
    scene(2).image.save(work / "a.jpg")
    scene(3).image.save(work / "b.jpg")
    for block in BLOCKS:
        first = block.code.splitlines()[0]
        if block.lang == "toml" and (name := re.match(r"# (\S+\.toml)", first)):
            (work / name[1]).write_text(block.code)
    return work


@pytest.fixture(scope="session")
def snippet_server(snippet_dir):
    with edgevlm_serve(snippet_dir / "bundle", "--api-key", API_KEY) as (base, _):
        yield base


def run_python(block: Block, cwd: Path, request, monkeypatch) -> None:
    code = block.code
    if SERVER_URL in code:
        code = code.replace(SERVER_URL, request.getfixturevalue("snippet_server"))
        monkeypatch.setenv("EDGEVLM_API_KEY", API_KEY)
    monkeypatch.chdir(cwd)
    with redirect_stdout(io.StringIO()):
        exec(compile(code, block.id, "exec"), {"__name__": "__docs__"})  # noqa: S102  (the docs are this repo's own)


def run_bash(block: Block, cwd: Path) -> None:
    for words in shell_commands(block.code):
        assert words[0] == "edgevlm", f"{block.id}: {shlex.join(words)} is not an edgevlm command: mark the block"
        done = edgevlm_cli(words, cwd)
        assert done.returncode == 0, f"{block.id}: {shlex.join(words)} exited {done.returncode}:\n{done.stderr}"


def run_console(block: Block, cwd: Path) -> None:
    """`$ command` lines run; the lines up to the next `$` are the output they must print."""
    chunks = re.split(r"^\$ ", block.code, flags=re.MULTILINE)[1:]
    assert chunks, f"{block.id}: a console block without a `$ ` command line"
    for chunk in chunks:
        command, _, expected = chunk.partition("\n")
        done = edgevlm_cli(shlex.split(command), cwd)
        assert done.returncode == 0, f"{block.id}: {command} exited {done.returncode}:\n{done.stderr}"
        assert output_matches(done.stdout, expected), f"{block.id}: {command} now prints:\n{done.stdout}"


def output_matches(printed: str, expected: str) -> bool:
    """Line by line; an expected line ending in `...` matches any line that starts with what precedes it (for
    what depends on the machine, such as a RAM-based ceiling)."""
    got, want = printed.rstrip().splitlines(), expected.rstrip().splitlines()
    return len(got) == len(want) and all(
        g.startswith(w[:-3]) if w.endswith("...") else g.rstrip() == w.rstrip() for g, w in zip(got, want)
    )


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_code_block_runs(block: Block, snippet_dir: Path, request, monkeypatch) -> None:
    if block.not_run:
        pytest.skip(f"{block.id} not run: {block.not_run}")
    if block.lang == "python":
        run_python(block, snippet_dir, request, monkeypatch)
    elif block.lang == "bash":
        run_bash(block, snippet_dir)
    elif block.lang == "console":
        run_console(block, snippet_dir)
    else:
        load_profile(snippet_dir / re.match(r"# (\S+\.toml)", block.code)[1])


def test_blocks_are_found_and_most_run() -> None:
    """The extraction sees the docs' blocks (a changed fence syntax would silently run nothing)."""
    ran = [block for block in BLOCKS if not block.not_run]
    assert {block.lang for block in ran} == set(RUN_LANGUAGES)
    assert len(ran) >= 9, [block.id for block in ran]  # 9 when written, 13 marked


def test_mkdocs_builds_without_warnings(tmp_path) -> None:
    """docs/ renders with mkdocs (Material theme); --strict turns broken links and pages missing from nav into errors."""
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
               "-d", str(tmp_path / "site")]  # fmt: skip
    done = subprocess.run(
        command,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_a_first_page() -> None:
    """The README stays the page a new user reads first; the reference lives in docs/ (issue 23)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move a section into docs/"
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", "\n".join(lines)))
    assert linked >= {path.name for path in (ROOT / "docs").glob("*.md")} - {"index.md"}, (
        "a docs page the README misses"
    )
