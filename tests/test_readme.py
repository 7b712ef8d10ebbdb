"""The README matches the code: every command it shows exists, with every flag it shows, and so does every make target."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# What the README shows as commands: fenced code blocks and inline code spans, not prose.
FENCED = re.compile(r"```[a-z]*\n(.*?)```", re.S)
CODE = "\n".join(FENCED.findall(README) + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", FENCED.sub("", README))])
MAKEFILE = (ROOT / "Makefile").read_text()
# `python -m <module>` -> the module whose build_parser() defines that CLI
CLIS = {
    "export": "export.__main__",
    "export.engines": "export.engines",
    "calibration": "calibration.__main__",
    "runtime.infer": "runtime.infer",
    "runtime.distributed": "runtime.distributed.cli",
    "benchmarks": "benchmarks.__main__",
    "benchmarks.gpu_check": "benchmarks.gpu_check",
    "benchmarks.pipeline_throughput": "benchmarks.pipeline_throughput",
    "benchmarks.int8_latency": "benchmarks.int8_latency",
    "benchmarks.export_time": "benchmarks.export_time",
    "benchmarks.distributed_throughput": "benchmarks.distributed_throughput",
}


def _commands() -> list[tuple[str, list[str]]]:
    """(module, words after it) for every `python -m module ...` the README shows, in code or code blocks."""
    found = []
    text = CODE.replace("\\\n", " ")
    for match in re.finditer(r"python3? -m ([\w.]+)([^`\n|>#;]*)", text):
        found.append((match.group(1), shlex.split(match.group(2).replace("[", " ").replace("]", " "), posix=True)))
    return found


def test_the_readme_shows_commands() -> None:
    modules = {m for m, _ in _commands()}
    assert {"export", "calibration", "runtime.infer", "benchmarks", "export.engines", "runtime.distributed"} <= modules


@pytest.mark.parametrize("module", sorted(CLIS))
def test_every_flag_the_readme_shows_exists(module: str) -> None:
    uses = [words for m, words in _commands() if m == module]
    if not uses:
        pytest.skip(f"the README does not show python -m {module}")
    parser = importlib.import_module(CLIS[module]).build_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    shown = {w.split("=")[0] for words in uses for w in words if w.startswith("--") and len(w) > 2}
    assert shown and not shown - known, f"python -m {module}: the README shows {sorted(shown - known)}, which do not exist"


def test_every_command_the_readme_names_is_known() -> None:
    unknown = {m for m, _ in _commands()} - set(CLIS)
    assert not unknown, f"the README shows python -m {sorted(unknown)}, which this test does not know"


def test_every_make_target_and_variable_exists() -> None:
    targets = set(re.findall(r"^([\w-]+):", MAKEFILE, re.M))
    shown = re.findall(r"\bmake ([a-z][\w-]*)((?: [A-Z_]+=\S+)*)", CODE)
    assert shown
    for target, variables in shown:
        assert target in targets, f"make {target}"
        for var in re.findall(r"([A-Z_]+)=", variables):
            assert re.search(rf"\b{var}\b", MAKEFILE), f"make {target} {var}=..."


def test_no_references_to_files_outside_the_repository() -> None:
    assert "FIELD-NOTES" not in README and "../shared/docs" not in README
