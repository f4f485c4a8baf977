"""Every Python example in the documentation and the README runs, so the docs cannot rot.

Each page's ```python blocks run in order in one namespace (like a notebook), in a fresh working
directory. A block preceded by the line ``<!-- no-test -->`` is shown but not run (it needs data,
a GPU or several processes); shell blocks (```bash, ```console, ...) are never run. Tracebacks
point at the Markdown file and line of the failing example.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
SKIP_MARKER = "<!-- no-test -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*\{?\.?(?P<lang>[\w+-]*)")
RUNNABLE = {"python", "py"}


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the first code line in the Markdown file
    skipped: bool


def extract_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a Markdown text (also inside admonitions and tabs), in order."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m.group("indent"), m.group("fence")
        previous = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""
        ):
            body.append(
                lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip()
            )
            j += 1
        if j == len(lines):
            raise ValueError(f"Unclosed code fence opened on line {i + 1}.")
        blocks.append(
            Block(m.group("lang").lower(), "\n".join(body) + "\n", i + 2, previous == SKIP_MARKER)
        )
        i = j + 1
    return blocks


def runnable(page: Path) -> list[Block]:
    return [
        b
        for b in extract_blocks(page.read_text(encoding="utf-8"))
        if b.lang in RUNNABLE and not b.skipped
    ]


PAGES = sorted(p for p in DOCS.rglob("*.md") if runnable(p))


def test_extract_blocks_finds_indented_and_skipped_blocks() -> None:
    text = (
        "Intro\n\n```python\nx = 1\n```\n\n!!! note\n    ```py\n    y = 2\n    ```\n\n"
        "<!-- no-test -->\n```python\nraise SystemExit\n```\n\n````bash\nmake demo\n````\n"
    )
    blocks = extract_blocks(text)
    assert [(b.lang, b.code, b.line, b.skipped) for b in blocks] == [
        ("python", "x = 1\n", 4, False),
        ("py", "y = 2\n", 9, False),
        ("python", "raise SystemExit\n", 14, True),
        ("bash", "make demo\n", 18, False),
    ]


def test_every_page_with_python_is_collected() -> None:
    # Guards the harness itself: the core pages carry runnable examples, so finding none means the
    # extraction broke, not that the docs have no examples.
    names = {p.name for p in PAGES}
    assert {"getting-started.md", "estimators.md", "faq.md"} <= names


@pytest.mark.timeout(120)
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    run_examples(page, tmp_path, monkeypatch, request)


@pytest.mark.timeout(120)
def test_readme_examples_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    assert runnable(README), "the README's Python examples were not found"
    run_examples(README, tmp_path, monkeypatch, request)


def run_examples(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    # The examples' tensors are tiny: one thread avoids OpenMP spin-waiting on a busy 2-core box
    # (measured: 300 Adam steps of a small MLP took 36 s with 2 threads under load, 0.6 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    namespace: dict[str, object] = {"__name__": "__docs__"}
    source = str(page.relative_to(ROOT))
    with warnings.catch_warnings():
        # Lightning's advice about workers and logging intervals is noise for tiny examples.
        warnings.filterwarnings(
            "ignore", message=r".*(num_workers|many workers|logging interval).*"
        )
        for block in runnable(page):
            # Pad with blank lines so that tracebacks give the line number in the Markdown file.
            code = compile("\n" * (block.line - 1) + block.code, source, "exec")
            exec(code, namespace)


def test_benchmark_tables_come_from_results_or_say_they_are_missing(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hooks", DOCS / "_hooks" / "benchmarks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)

    missing = hooks.benchmark_table("reproduce_x", tmp_path)
    assert "Not run yet" in missing and "reproduce_x.md" in missing

    (tmp_path / "reproduce_x.md").write_text(
        "# Title\n\n| method | acc |\n|---|---|\n| EXACT | 99 |\n"
    )
    (tmp_path / "reproduce_x.json").write_text('{"command": "python -m recipes.reproduce"}')
    table = hooks.benchmark_table("reproduce_x", tmp_path)
    assert table.startswith("**Title**\n\n| method | acc |") and "| EXACT | 99 |" in table
    assert "`python -m recipes.reproduce`" in table

    assert hooks.benchmark_figure("reproduce_x_lambda", tmp_path) == ""
    (tmp_path / "reproduce_x_lambda.png").write_bytes(b"\x89PNG\r\n")
    assert 'src="data:image/png;base64,iVBORw0K' in hooks.benchmark_figure(
        "reproduce_x_lambda", tmp_path
    )


def test_api_reference_documents_every_public_name() -> None:
    import lightning_fisher as lf

    documented = {
        line.split("::: ", 1)[1].strip().rsplit(".", 1)[-1]
        for line in (DOCS / "api.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("::: ")
    }
    # METHODS and REGISTRY list the methods (the estimators page's table), __version__ a string.
    missing = set(lf.__all__) - documented - {"METHODS", "REGISTRY", "__version__"}
    assert not missing, f"docs/api.md has no entry for {sorted(missing)}"
