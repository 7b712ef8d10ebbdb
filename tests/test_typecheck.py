"""The TensorRT and CUDA modules type-check with zero errors against the TensorRT API in `tensorrt-stubs`.

No GPU can run them in CI, so this is what catches a misspelt TensorRT attribute or a wrong argument
type (profile shapes must be `trt.Dims`) before a GPU user does. Needs `make install` (basedpyright from
the dev extra, tensorrt-stubs installed with --no-deps).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = [
    "runtime/backends/trt.py",
    "runtime/backends/cudart.py",
    "runtime/backends/onnxruntime.py",
    "runtime/backends/pytorch.py",
    "export/engines.py",
    "benchmarks/gpu_check.py",
]
BASEDPYRIGHT = shutil.which("basedpyright", path=str(Path(sys.executable).parent)) or shutil.which("basedpyright")


def _stubs_present() -> bool:
    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and any(Path(p, "__init__.pyi").is_file() for p in spec.submodule_search_locations or [])


pytestmark = [
    pytest.mark.skipif(BASEDPYRIGHT is None, reason="basedpyright not installed (`make install` adds it)"),
    pytest.mark.skipif(not _stubs_present(), reason="tensorrt-stubs not installed (`make install` adds them)"),
]


def basedpyright(*files: str) -> list[dict]:
    assert BASEDPYRIGHT is not None
    proc = subprocess.run([BASEDPYRIGHT, "--outputjson", "--pythonpath", sys.executable, *files],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return [d for d in json.loads(proc.stdout)["generalDiagnostics"] if d["severity"] == "error"]


def test_tensorrt_modules_have_no_type_errors(tmp_path: Path) -> None:
    # The checker must really see the stubs: a known misuse is reported...
    bad = tmp_path / "probe.py"
    bad.write_text("import tensorrt as trt\n"
                   "b = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
                   "b.create_optimization_profile().set_shape('x', (1,), (1,), (1,))\n"
                   "b.create_builder_config().fp16_everything = True\n")
    probe = basedpyright(str(bad), *CHECKED)
    rules = {d.get("rule") for d in probe if d["file"].endswith(bad.name)}
    assert {"reportArgumentType", "reportAttributeAccessIssue"} <= rules, probe
    # ...and our modules have none.
    errors = [f"{Path(d['file']).relative_to(ROOT)}:{d['range']['start']['line'] + 1}: {d['message']}"
              for d in probe if not d["file"].endswith(bad.name)]
    assert errors == []
