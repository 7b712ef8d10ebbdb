"""The README and docs/ match the code: links resolve, every command and flag they show exists, the exit-status
table is runtime/errors.py's, and the files they say the export writes are the files it writes."""

from __future__ import annotations

import importlib
import re
import shlex
import signal
from pathlib import Path

import pytest

import runtime.errors as errors
from runtime.artifact import INT8_CPU_FILE, MODEL_FILES, ORT_FP16_SLN_FILE, ORT_FUSED_FILES, REPORT_FILE
from runtime.backends.trt import ENGINE_FILES, INT8_TRT_FILE, sidecar_path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
TEXT = {page: page.read_text() for page in PAGES}
README_MAX_LINES = 150  # one or two screens: the rest belongs in docs/
FENCED = re.compile(r"```[a-z]*\n(.*?)```", re.S)
MAKEFILE = (ROOT / "Makefile").read_text()
# `python -m <module>` -> the module whose build_parser() defines that CLI
CLIS = {
    "export": "export.__main__",
    "export.engines": "export.engines",
    "export.triton": "export.triton",
    "calibration": "calibration.__main__",
    "runtime.infer": "runtime.infer.cli",
    "runtime.distributed": "runtime.distributed.cli",
    "runtime.serve": "runtime.serve.cli",
    "benchmarks": "benchmarks.__main__",
    "benchmarks.gpu_check": "benchmarks.gpu_check",
    "benchmarks.pipeline_throughput": "benchmarks.pipeline_throughput",
    "benchmarks.int8_latency": "benchmarks.int8_latency",
    "benchmarks.export_time": "benchmarks.export_time",
    "benchmarks.distributed_throughput": "benchmarks.distributed_throughput",
    "benchmarks.distributed_listing": "benchmarks.distributed_listing",
    "benchmarks.serve": "benchmarks.serve",
    "benchmarks.serve_ray": "benchmarks.serve_ray",
    "benchmarks.serve_stalled": "benchmarks.serve_stalled",
}
FOREIGN_MODULES = {"pytest"}  # shown as commands, not ours to check
FOREIGN_FLAGS = {"--no-deps"}  # pip's, named where the docs explain an install step


def _code(text: str) -> str:
    """What a page shows as commands: fenced code blocks and inline code spans, not prose."""
    spans = [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", FENCED.sub("", text))]
    return "\n".join(FENCED.findall(text) + spans)


CODE = {page: _code(text) for page, text in TEXT.items()}
ALL_CODE = "\n".join(CODE.values())


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _commands() -> list[tuple[str, list[str]]]:
    """(module, words after it) for every `python -m module ...` the pages show, in code or code blocks."""
    found = []
    for match in re.finditer(r"python3? -m ([\w.]+)([^`\n|>#;]*)", ALL_CODE.replace("\\\n", " ")):
        found.append((match.group(1), shlex.split(match.group(2).replace("[", " ").replace("]", " "), posix=True)))
    return found


def _options(module: str) -> set[str]:
    parser = importlib.import_module(CLIS[module]).build_parser()
    return {option for action in parser._actions for option in action.option_strings}


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


def _table(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table whose header row starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_the_readme_fits_on_two_screens_and_shows_the_setup_first() -> None:
    text = TEXT[README]
    assert len(text.splitlines()) <= README_MAX_LINES, "README.md: move detail into docs/<topic>.md"
    first_block = FENCED.search(text)
    assert first_block and re.findall(r"^make (\w+)", first_block.group(1), re.M) == ["install", "test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_pages_show_commands() -> None:
    modules = {m for m, _ in _commands()}
    assert {"export", "calibration", "runtime.infer", "benchmarks", "export.engines", "runtime.distributed"} <= modules


@pytest.mark.parametrize("module", sorted(CLIS))
def test_every_flag_shown_with_a_command_exists(module: str) -> None:
    uses = [words for m, words in _commands() if m == module]
    if not uses:
        pytest.skip(f"no page shows python -m {module}")
    shown = {w.split("=")[0] for words in uses for w in words if w.startswith("--") and len(w) > 2}
    assert not shown - _options(module), f"python -m {module}: the docs show {sorted(shown - _options(module))}"


def test_every_flag_named_alone_exists() -> None:
    """A flag in an inline code span of its own (`--draft`, `--weights synthetic`) is one some CLI has."""
    known = set().union(*(_options(m) for m in CLIS)) | FOREIGN_FLAGS
    for page, text in TEXT.items():
        named = {m.group(1) for m in re.finditer(r"`(--[a-z][\w-]*)[^`]*`", FENCED.sub("", text))}
        assert not named - known, f"{_name(page)} names {sorted(named - known)}, which no CLI has"


def test_every_command_shown_is_known() -> None:
    unknown = {m for m, _ in _commands()} - set(CLIS) - FOREIGN_MODULES
    assert not unknown, f"the docs show python -m {sorted(unknown)}, which this test does not know"


def test_every_make_target_and_variable_exists() -> None:
    targets = set(re.findall(r"^([\w-]+):", MAKEFILE, re.M))
    shown = re.findall(r"\bmake ([a-z][\w-]*)((?: [A-Z_]+=\S+)*)", ALL_CODE)
    assert shown
    for target, variables in shown:
        assert target in targets, f"make {target}"
        for var in re.findall(r"([A-Z_]+)=", variables):
            assert re.search(rf"\b{var}\b", MAKEFILE), f"make {target} {var}=..."


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_link_resolves(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCED.sub("", TEXT[page])):
        if re.match(r"[a-z]+:", target):
            continue  # a web address: not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{_name(page)}: link to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", FENCED.sub("", dest.read_text()), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{_name(page)}: link to {target}: no such heading"


def test_every_page_in_docs_is_linked() -> None:
    linked = {(page.parent / t.partition("#")[0]).resolve() for page, text in TEXT.items()
              for t in re.findall(r"\]\(([^)#\s]+)", text)}
    orphans = [_name(p) for p in PAGES[1:] if p not in linked and p.parent not in linked]
    assert not orphans, f"no page links to {orphans}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_the_pages_speak_of_the_project_only(page: Path) -> None:
    text = TEXT[page]
    assert "FIELD-NOTES" not in text and "../shared/docs" not in text
    found = re.findall(r"\bissue #?\d+|\b(?:this|earlier|previous|next) session\b|\bhelpers?\b", text, re.I)
    assert not found, f"{_name(page)}: {found}: how the work was organised is not documentation"


def test_the_exit_status_table_is_runtime_errors() -> None:
    shown = set()
    for status, meaning in _table(TEXT[README], "| status | meaning |"):
        assert meaning
        shown |= {int(s) for s in status.split("/")}
    defined = {v for k, v in vars(errors).items() if k.isupper() and isinstance(v, int)}
    defined |= {errors.Interrupted(s).exit_code for s in (signal.SIGINT, signal.SIGTERM)}
    assert shown == defined
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.DeitError)]
    assert {c.exit_code for c in classes} <= shown


def _file_names(cells: str) -> set[str]:
    return {n for n in re.findall(r"`([^`/ ]+)`", cells) if re.fullmatch(r"[\w.-]+\.(?:onnx|json|plan)", n)}


def _export_row_names() -> set[str]:
    rows = _table(TEXT[README], "| command | writes |")
    return _file_names(next(row[1] for row in rows if row[0].startswith("`python -m export`")))


def test_the_files_the_docs_say_the_export_writes_are_its_constants() -> None:
    written = {MODEL_FILES["fp32"], MODEL_FILES["fp16"], *ORT_FUSED_FILES.values(), ORT_FP16_SLN_FILE, REPORT_FILE}
    table = _file_names(" ".join(row[0] for row in _table(TEXT[ROOT / "docs" / "export.md"], "| file | what |")))
    assert written <= table, f"docs/export.md does not list {sorted(written - table)}"
    assert written <= _export_row_names(), f"the README's export row does not list {sorted(written - _export_row_names())}"


def test_the_files_the_docs_say_the_export_writes_are_written(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Names the docs list for the export are the files of a real export folder, and every file there is listed.

    A fresh export: the session's shared artifact also holds what later stages add to it.
    """
    from export.pipeline import ExportOptions, export_checkpoint

    export_checkpoint(ExportOptions(str(tiny_checkpoint), out_root=tmp_path, progress=False))
    written = {p.name for p in (tmp_path / tiny_checkpoint.name).iterdir() if not p.name.startswith(".")}
    table = _file_names(" ".join(row[0] for row in _table(TEXT[ROOT / "docs" / "export.md"], "| file | what |")))
    assert table == written
    assert _export_row_names() == written


def test_the_calibration_and_engine_files_named_are_the_codes() -> None:
    table = _file_names(" ".join(row[0] for row in _table(TEXT[ROOT / "docs" / "calibration.md"], "| file | what |")))
    onnx = {n for n in table if n.endswith(".onnx")}
    assert onnx == {MODEL_FILES["int8"], INT8_TRT_FILE, INT8_CPU_FILE}
    engines = set(ENGINE_FILES.values())
    rows = _table(TEXT[README], "| command | writes |")
    engine_row = next(row[1] for row in rows if row[0].startswith("`python -m export.engines`"))
    assert engines <= _file_names(engine_row)
    assert all(sidecar_path(n).name.endswith(".plan.json") for n in engines) and "`.plan.json`" in engine_row
    assert all(f"`{n}`" in TEXT[ROOT / "docs" / "tensorrt.md"] for n in engines)
