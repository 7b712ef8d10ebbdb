"""`make install-gpu` on a machine that reaches PyPI only, and whether every documented GPU install resolves.

The resolution tests ask the real index (`pip install --dry-run --report`, metadata only: no wheel of the several
GB that torch's CUDA build and its nvidia-* wheels weigh is downloaded) and skip, saying so, where the index
cannot be reached. They run pip with `--isolated` so that this machine's own pip configuration (a local CPU
build of torch, a torch cap) does not stand in for what a GPU user's pip sees.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from runtime.backends import cudart

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TORCH_PIN = next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch=="))


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name} :?= (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile has no {name}"
    return match.group(1).strip()


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=10)
    except urllib.error.HTTPError:
        return True  # an answer, whatever the status
    except (urllib.error.URLError, OSError):
        return False
    return True


def dry_run(requirements: list[str], tmp_path: Path, *extra: str) -> dict:
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed",
                           "--quiet", "--timeout", "30", "--report", str(report), *extra, *requirements],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("extra", [e for e in PYPROJECT["project"]["optional-dependencies"] if e.startswith("gpu")])
def test_every_gpu_extra_resolves_from_pypi_beside_the_torch_pin(extra: str, tmp_path: Path) -> None:
    """What `make install-gpu` installs from PyPI resolves with torch 2.13.0 (CUDA 13: cuda-bindings 13)."""
    if not reachable("https://pypi.org/simple/pip/"):
        pytest.skip("PyPI (https://pypi.org) cannot be reached from here")
    requirements = [TORCH_PIN, *PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"][extra]]
    got = dry_run(list(dict.fromkeys(requirements)), tmp_path, "--only-binary", ":all:")
    assert got["torch"] == TORCH_PIN.split("==")[1] and "onnxruntime-gpu" in got and "polygraphy" in got
    assert got["cuda-bindings"].split(".")[0] == "13"


def test_tensorrt_comes_from_nvidias_index_at_the_major_ort_links(tmp_path: Path) -> None:
    assert makefile_variable("TENSORRT") == cudart.TENSORRT_REQUIREMENT
    assert makefile_variable("NVIDIA_INDEX") == cudart.NVIDIA_INDEX
    if not reachable(f"{cudart.NVIDIA_INDEX}/tensorrt-cu13-libs/"):
        pytest.skip(f"NVIDIA's index ({cudart.NVIDIA_INDEX}) cannot be reached from here")
    got = dry_run([cudart.TENSORRT_REQUIREMENT], tmp_path, "--extra-index-url", cudart.NVIDIA_INDEX)
    assert got["tensorrt-cu13"].split(".")[0] == "10" and "tensorrt-cu13-libs" in got


FAKE_PYTHON = """#!/bin/sh
# Stands in for python and pip: records each call; the TensorRT install fails as it does without NVIDIA's index.
echo "$*" >> "$CALLS"
case "$*" in
  "-m venv "*) mkdir -p "$3" ;;
  *tensorrt-cu13*) [ "$TENSORRT_OK" = 1 ] && exit 0
    echo "error: Failed to download tensorrt_cu13_libs from https://pypi.nvidia.com" >&2; exit 1 ;;
esac
exit 0
"""


@pytest.mark.parametrize("tensorrt_ok", [False, True])
def test_install_gpu_installs_what_pypi_has_and_tries_tensorrt_last(tmp_path: Path, tensorrt_ok: bool) -> None:
    """Where only PyPI answers, `make install-gpu` still installs onnxruntime-gpu, cuda-python and Polygraphy, says in
    one line that TensorRT needs NVIDIA's index, and exits 0. (pip itself is faked: nothing is installed here.)"""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls, venv = tmp_path / "calls.txt", tmp_path / "venv"
    env = {"PATH": "/usr/bin:/bin", "CALLS": str(calls), "TENSORRT_OK": "1" if tensorrt_ok else "0"}
    proc = subprocess.run(["make", "-s", "install-gpu", f"PYTHON={fake}", f"PY={fake}", f"VENV={venv}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    made = calls.read_text().splitlines()
    gpu = next(i for i, c in enumerate(made) if "-e .[gpu]" in c)
    swap = next(i for i, c in enumerate(made) if "--no-deps onnxruntime-gpu" in c)
    trt = next(i for i, c in enumerate(made) if "tensorrt-cu13" in c)
    assert gpu < swap < trt and f"--extra-index-url {cudart.NVIDIA_INDEX}" in made[trt]
    last = proc.stdout.strip().splitlines()[-1]
    if tensorrt_ok:
        assert last == f"install-gpu: TensorRT installed from {cudart.NVIDIA_INDEX}"
    else:
        assert last.startswith("install-gpu: TensorRT not installed") and cudart.NVIDIA_INDEX in last
        assert "make install-tensorrt" in last and "Failed to download" in (venv / "install-tensorrt.log").read_text()
