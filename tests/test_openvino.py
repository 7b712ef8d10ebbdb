"""openvino-cpu against ONNX Runtime CPU on the tiny DeiT: fp32 equal to 1e-4, bf16 and int8 within their error.

The int8 file (conftest's `tiny_int8_artifact`) is built the way `python -m calibration` builds
`model.int8.onnx` (plan_qdq, max calibration on random batches, insert_qdq), so OpenVINO is checked on
the project's own Q/DQ placement.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.artifact import MODEL_FILES, read_onnx_meta
from runtime.backends import BackendUnavailable, create
from export.compare import compare
from runtime.errors import UsageError

pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino, or `make install`)")

from runtime.backends import openvino as ov_backend  # noqa: E402  (imported after the skip)


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def ort_fp32(artifact: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    with create("ort-cpu", artifact) as ort:
        return ort.infer(x)


@pytest.fixture(scope="module")
def int8_file(tiny_int8_artifact: Path) -> Path:
    return tiny_int8_artifact / MODEL_FILES["int8"]


@pytest.mark.parametrize("batch", [1, 3, 9])
def test_fp32_matches_onnxruntime(tiny_artifact: Path, batch: int) -> None:
    x = pixels(batch, seed=batch)
    ref = ort_fp32(tiny_artifact, x)
    with create("openvino-cpu", tiny_artifact, max_batch=4) as ov:  # batch 9: runs of 4, 4 and 1
        out = ov.infer(x)
        assert ov.describe()["inference_precision"] == "f32"  # never the silent bf16 default
    assert list(out) == list(ref) == read_onnx_meta(tiny_artifact / MODEL_FILES["fp32"]).output_names
    for name in ref:
        assert out[name].dtype == np.float32 and out[name].shape == ref[name].shape
        np.testing.assert_allclose(out[name], ref[name], atol=1e-4, rtol=0, err_msg=name)


def test_outputs_survive_the_next_run(tiny_artifact: Path) -> None:
    """The infer request is reused: a returned array must not be overwritten by the next batch."""
    with create("openvino-cpu", tiny_artifact, max_batch=2) as ov:
        first = ov.run(pixels(2, seed=1))
        kept = {k: v.copy() for k, v in first.items()}
        ov.run(pixels(2, seed=2))
    for name in kept:
        np.testing.assert_array_equal(first[name], kept[name])


def test_bf16_is_close_to_fp32(tiny_artifact: Path) -> None:
    reason = ov_backend.OPENVINO_CPU.precision_unavailable("bf16")
    if reason:
        pytest.skip(reason)
    x = pixels(16, seed=3)
    with create("openvino-cpu", tiny_artifact, precision="bf16") as ov:
        out = ov.infer(x)
        assert ov.describe()["inference_precision"] == "bf16"
    result = compare(ort_fp32(tiny_artifact, x), out)
    assert result["min_cosine"] >= 0.99, result
    assert result["max_abs_diff"] > 0, "bf16 gave fp32's exact numbers: the hint was not applied"


def test_int8_qdq_agrees_with_fp32(tiny_artifact: Path, int8_file: Path) -> None:
    x = pixels(64, seed=4)
    with create("openvino-cpu", tiny_artifact, model_file=int8_file) as ov:
        assert ov.precision == "int8"
        out = ov.infer(x)
    with create("ort-cpu", tiny_artifact, model_file=int8_file) as ort:
        same_file = compare(ort.infer(x), out)
    result = compare(ort_fp32(tiny_artifact, x), out)
    assert result["top1_agreement"] >= 0.9 and result["min_cosine"] >= 0.98, result
    assert result["max_abs_diff"] > 0, "int8 gave fp32's exact numbers: the Q/DQ nodes were dropped"
    assert same_file["min_cosine"] >= 0.999, same_file  # OpenVINO computes what the Q/DQ file says, as ORT does


def test_int8_from_the_artifact_folder(tiny_artifact: Path, int8_file: Path, tmp_path: Path) -> None:
    for name in (MODEL_FILES["fp32"], "export.json"):
        (tmp_path / name).write_bytes((tiny_artifact / name).read_bytes())
    kind = ov_backend.OPENVINO_CPU
    assert kind.missing_files(tmp_path, "int8") == f"{tmp_path / MODEL_FILES['int8']} not found"
    (tmp_path / MODEL_FILES["int8"]).write_bytes(int8_file.read_bytes())
    assert kind.missing_files(tmp_path, "int8") is None
    with create("openvino-cpu", tmp_path, precision="int8") as ov:
        assert ov.model_file.name == MODEL_FILES["int8"] and ov.infer(pixels(2))["logits"].shape == (2, 10)


def test_named_files_run_at_their_precision(tiny_artifact: Path) -> None:
    fp32 = tiny_artifact / MODEL_FILES["fp32"]
    assert create("openvino-cpu", tiny_artifact, model_file=fp32).precision == "fp32"
    assert create("openvino-cpu", tiny_artifact, precision="bf16", model_file=fp32).precision == "bf16"
    with pytest.raises(UsageError, match="fp16 model"):
        create("openvino-cpu", tiny_artifact, model_file=tiny_artifact / MODEL_FILES["fp16"])
    assert ov_backend.OPENVINO_CPU.missing_files(tiny_artifact, "fp16") == "openvino-cpu does not run fp16"


def test_bf16_refused_without_the_capability(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ov_backend, "cpu_capabilities", lambda: ("FP32", "INT8"))
    reason = ov_backend.OPENVINO_CPU.missing_files(tiny_artifact, "bf16")
    assert reason is not None and "OPTIMIZATION_CAPABILITIES: FP32, INT8" in reason
    with pytest.raises(BackendUnavailable, match="bf16"):
        with create("openvino-cpu", tiny_artifact, precision="bf16"):
            pass


def test_missing_openvino_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    reason = ov_backend.OPENVINO_CPU.unavailable_reason()
    assert reason is not None and "pip install openvino" in reason and "make install" in reason
