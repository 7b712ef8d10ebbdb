"""One error policy: each CLI driven into each class of failure it can meet gives that class's exit status and one line."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import first_record, photos, stalling_file
from runtime.errors import (
    FAILED, GATE_FAILED, MODEL, UNAVAILABLE, USAGE, Interrupted, UsageError, exit_code, one_line, run_cli,
)


ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith(prog), err
    return lines[-1]


def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("x.png", "y.png"):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / name)
    return folder


def status(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """The exit status a CLI gives, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_run_cli_turns_anything_into_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def raises(err: BaseException) -> Callable[[], int]:
        def work() -> int:
            raise err
        return work

    disk_full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out.csv")
    cases = [(UsageError("--x 3: must be 1 or 2"), USAGE, "--x 3: must be 1 or 2"),
             (disk_full, FAILED, "/data/out.csv: No space left on device"),
             (MemoryError(), FAILED, "out of memory"),
             (RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bad\nmore lines"), FAILED,
              "RuntimeError: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bad")]
    for err, code, text in cases:
        assert run_cli("tool", raises(err), entry=False) == code
        assert text in one_error_line(capsys, "tool: error:")
    assert run_cli("tool", raises(KeyboardInterrupt()), entry=False) == 130
    assert one_error_line(capsys, "tool") == "tool: interrupted"
    assert run_cli("tool", raises(Interrupted(15, "12 predictions kept in x.partial")), entry=False) == 143
    assert one_error_line(capsys, "tool") == "tool: terminated; 12 predictions kept in x.partial"
    monkeypatch.setenv("DEIT_DEBUG", "1")
    assert run_cli("tool", raises(ValueError("why")), entry=False) == FAILED
    assert "Traceback" in capsys.readouterr().err
    assert exit_code(ValueError()) == FAILED and one_line(ValueError("a\nb")) == "ValueError: a"


def test_export_failure_classes(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    import export.pipeline as pipeline
    from export.__main__ import main

    base = ["--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--no-progress", "--no-fp16"]
    assert status(main, [*base, "--verify-images", str(tmp_path / "none")]) == USAGE
    assert "--verify-images" in one_error_line(capsys, "export: error:")
    assert status(main, ["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == MODEL
    assert "no such checkpoint folder" in one_error_line(capsys, "export: error:")
    monkeypatch.setattr(pipeline, "FP32_MAX_ABS_DIFF", -1.0)
    assert status(main, base) == GATE_FAILED
    assert "verification failed" in one_error_line(capsys, "export: error:")

    def broken_exporter(*args: object) -> None:
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(pipeline, "export_onnx", broken_exporter)
    assert status(main, base) == FAILED
    assert "RuntimeError: exporter crashed" in one_error_line(capsys, "export: error:")


def test_infer_failure_classes(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.backends.onnxruntime import OrtBackend
    from runtime.infer import main

    folder = images(tmp_path)
    base = [str(folder), "--model", str(tiny_artifact), "--no-progress"]
    assert status(main, [*base, "--topk", "0"]) == USAGE
    assert status(main, [str(folder), "--model", str(tmp_path / "nothing")]) == MODEL
    assert status(main, [*base, "--backend", "trt"]) == UNAVAILABLE
    assert "TensorRT" in one_error_line(capsys, "infer: error:")

    def failing_run(self: OrtBackend, x: np.ndarray) -> dict[str, np.ndarray]:
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 2: out of memory")

    monkeypatch.setattr(OrtBackend, "run", failing_run)
    assert status(main, [*base, "--backend", "ort-cpu"]) == FAILED
    assert "CUDA failure 2" in one_error_line(capsys, "infer: error:")


def test_calibration_failure_classes(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import calibration.pipeline as pipeline
    from calibration.__main__ import main

    folder = images(tmp_path)
    assert status(main, ["--calib-dir", str(folder), "--num-eval", "0"]) == USAGE
    assert status(main, ["--model", str(tmp_path / "none"), "--calib-dir", str(folder)]) == MODEL
    empty = tmp_path / "empty"
    empty.mkdir()
    artifact = shutil.copytree(tiny_artifact, tmp_path / "artifact")
    assert status(main, ["--model", str(artifact), "--calib-dir", str(empty), "--no-progress"]) == USAGE
    assert "no image files found" in one_error_line(capsys, "calibration: error:")

    def crash(*args: object, **kwargs: object) -> None:
        raise MemoryError()

    monkeypatch.setattr(pipeline, "collect_stats", crash)
    assert status(main, ["--model", str(artifact), "--calib-dir", str(folder), "--num-images", "1", "--num-eval", "1",
                         "--no-progress", "--no-cache"]) == FAILED
    assert "out of memory" in one_error_line(capsys, "calibration: error:")


def test_benchmarks_engines_and_gpu_check_failure_classes(tiny_artifact: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.__main__ import main as bench
    from export.engines import main as engines

    assert status(bench, ["--batch-sizes", "0"]) == USAGE
    assert status(bench, ["--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == MODEL
    assert status(engines, ["--precision", "fp8"]) == USAGE
    assert status(engines, ["--model", str(tmp_path / "none")]) == MODEL
    artifact = shutil.copytree(tiny_artifact, tmp_path / "artifact")
    from runtime.backends.trt import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason() is not None:
        assert status(engines, ["--model", str(artifact)]) == UNAVAILABLE
        assert "cannot build TensorRT engines here" in one_error_line(capsys, "engines: error:")


def console_scripts() -> dict[str, str]:
    """`deit-*` script -> the module its `python -m` twin runs, from pyproject.toml's [project.scripts]."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0].removesuffix(".__main__") for name, target in scripts.items()}


def script(name: str) -> Path:
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{path}: not installed; run `make install` (it installs the console scripts)"
    return path


# A failure each CLI meets before its work, without a model: the same argv goes to the script and to its twin.
MISSING_MODEL = "/nonexistent/model"
FAILURES = {
    "deit-export": ["--model", MISSING_MODEL, "--out", "{tmp}/out"],
    "deit-calibrate": ["--model", MISSING_MODEL, "--calib-dir", "{tmp}"],
    "deit-engines": ["--model", MISSING_MODEL],
    "deit-infer": ["{tmp}", "--model", MISSING_MODEL],
    "deit-distributed": ["{tmp}/nothing", "--output", "{tmp}/out"],
    "deit-serve": ["--model", MISSING_MODEL],
    "deit-bench": ["--model", MISSING_MODEL, "--out", "{tmp}/out"],
    "deit-gpu-check": ["--out", "{tmp}/out", "--images", "{tmp}/nothing"],
}


def test_every_console_script_fails_like_its_python_m_twin(tmp_path: Path) -> None:
    """Same status, same one line on stderr: an installed `deit-*` script is its `python -m` twin."""
    scripts = console_scripts()
    assert sorted(scripts) == sorted(FAILURES), "a console script without a failure case here"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name, module in scripts.items():
        argv = [a.format(tmp=tmp_path) for a in FAILURES[name]]
        ran = [subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
               for cmd in ([str(script(name)), *argv], [sys.executable, "-m", module, *argv])]
        installed, twin = ran
        assert installed.returncode == twin.returncode != 0, (name, installed.stderr, twin.stderr)
        assert installed.stderr.splitlines()[-1] == twin.stderr.splitlines()[-1], name
        assert "Traceback" not in installed.stderr + twin.stderr, name


def test_sigterm_ends_deit_infer_like_its_twin_while_a_decode_is_stuck(tiny_artifact: Path, tmp_path: Path) -> None:
    """A decode thread scanning a 2 GiB file must not keep the installed script alive after SIGTERM
    (a process that waits for its threads at exit would run for minutes): both end with 143 at once."""
    folder = photos(tmp_path / "images", 2)
    stalling_file(folder / "stall.jpg")
    for i, cmd in enumerate(([str(script("deit-infer"))], [sys.executable, "-m", "runtime.infer"])):
        out = tmp_path / f"out{i}.csv"
        proc = subprocess.Popen([*cmd, str(folder), "--model", str(tiny_artifact), "--backend", "ort-cpu", "--format", "csv",
                                 "--no-progress", "--batch-size", "1", "--workers", "1", "--max-file-bytes", str(4 * 2**30),
                                 "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first_record(Path(f"{out}.partial"), proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)  # the scan alone would take minutes
        assert proc.returncode == 143, (cmd, err)
        assert err.splitlines()[-1].startswith("infer: terminated; "), err
