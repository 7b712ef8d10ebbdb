"""The contract every registry backend keeps, checked for each name and precision the registry knows.

Like timm's tests parametrize over its model list: each backend that can run here is built from the
registry, opened, runs a batch larger than its `max_batch` (so it is split), is closed, and agrees
with fp32 PyTorch within its precision's tolerance; a backend or precision that cannot run here is
a skip that says why (a missing library, GPU, engine or file), never a silent pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_DIR
from export.verify import verification_inputs
from runtime.backends import BACKENDS, PRECISIONS, Backend, BackendUnavailable, ModelSource, backend_kind, create
from export.compare import MIN_COSINE, compare

MAX_BATCH = 3


@pytest.fixture(scope="module")
def inputs(tiny_int8_artifact: Path) -> np.ndarray:
    """Random tensors and, where the shared sample is present, real photos (7 rows or more: 3 + 3 + 1 batches)."""
    meta = backend_kind("ort-cpu").source(tiny_int8_artifact).meta
    x, _ = verification_inputs(meta.preprocessing, SAMPLE_DIR if SAMPLE_DIR.is_dir() else None, limit=8, n_random=7)
    return x


@pytest.fixture(scope="module")
def reference(tiny_int8_artifact: Path, inputs: np.ndarray) -> dict[str, np.ndarray]:
    with create("torch-eager", tiny_int8_artifact, precision="fp32") as backend:
        return backend.infer(inputs)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_contract(name: str, precision: str, tiny_int8_artifact: Path, inputs: np.ndarray,
                          reference: dict[str, np.ndarray]) -> None:
    try:
        kind = backend_kind(name)
    except BackendUnavailable as err:
        pytest.skip(str(err))
    if precision not in kind.precisions:
        pytest.skip(f"{name} runs {', '.join(kind.precisions)}, not {precision}")
    reason = kind.unavailable_reason() or kind.missing_files(tiny_int8_artifact, precision)
    if reason:
        pytest.skip(f"{name} {precision} cannot run here: {reason}")
    backend = create(name, tiny_int8_artifact, precision=precision, max_batch=MAX_BATCH, threads=1)
    assert isinstance(backend, Backend) and backend.kind is kind
    assert (backend.name, backend.precision, backend.max_batch) == (name, precision, MAX_BATCH)
    assert backend.model_file == kind.model_file_for(tiny_int8_artifact, precision)
    assert backend.input.shape == ("batch", *inputs.shape[1:])
    with backend as opened:
        assert opened is backend
        got = backend.infer(inputs)
        described = backend.describe()
    assert list(got) == list(reference), "outputs are named and ordered as PyTorch's"
    for key, value in got.items():
        assert value.shape == reference[key].shape and value.dtype == np.float32, key
        assert np.isfinite(value).all(), key
    result = compare(reference, got)
    assert result["min_cosine"] >= MIN_COSINE[precision], result
    if precision == "fp32":
        assert result["max_abs_diff"] <= 1e-4, result
    assert described["backend"] == name and described["precision"] == precision
    assert described["device"] == backend.device


def test_every_registry_name_resolves_to_a_kind_of_that_name() -> None:
    for name in BACKENDS:
        try:
            kind = backend_kind(name)
        except BackendUnavailable:
            continue
        assert kind.name == name and kind.default_precision in kind.precisions
        assert set(kind.precisions) <= set(PRECISIONS)


def test_a_backend_runs_the_source_it_is_given(tiny_int8_artifact: Path, tmp_path: Path) -> None:
    """The backend runs what its source names, not what it would find in the artifact folder itself."""
    kind = backend_kind("ort-cpu")
    fp16 = kind.source(tiny_int8_artifact, "fp16")
    assert isinstance(fp16, ModelSource) and fp16.file.name == "model.fp16.onnx" and fp16.precision == "fp16"
    copy = tmp_path / "elsewhere.onnx"
    copy.write_bytes(fp16.file.read_bytes())
    moved = ModelSource(tmp_path, copy, fp16.precision, fp16.meta)
    with kind.backend(moved, max_batch=2) as backend:
        assert backend.model_file == copy and backend.describe()["model_file"] == copy.name
        out = backend.infer(np.zeros((1, *backend.input.shape[1:]), dtype=np.float32))
    assert next(iter(out.values())).shape[0] == 1


def test_missing_files_names_the_first_missing_file(tmp_path: Path) -> None:
    """One rule for every kind: the precision, then what the machine cannot do, then the files, with the kind's hint."""
    assert backend_kind("ort-cpu").missing_files(tmp_path, "fp32") == f"{tmp_path / 'model.onnx'} not found"
    assert backend_kind("ort-cpu").missing_files(tmp_path, "bf16") == "ort-cpu does not run bf16"
    assert backend_kind("torch-eager").missing_files(tmp_path, "int8") == "torch-eager does not run int8"
    # torch rebuilds from the checkpoint: at any precision it needs only the fp32 file's metadata
    assert backend_kind("torch-sdpa").missing_files(tmp_path, "bf16") == f"{tmp_path / 'model.onnx'} not found"
    trt = backend_kind("trt")
    assert trt.missing_files(tmp_path) == f"{tmp_path / 'model.fp16.plan'} not found; build it with `make engines`"
    (tmp_path / "model.fp16.plan").write_bytes(b"x")
    assert trt.missing_files(tmp_path, "fp16") == f"{tmp_path / 'model.fp16.plan.json'} not found; build it with `make engines`"


class FakeCudaSession:
    """An ONNX Runtime session as the CUDA provider gives it: records its creation, runs nothing."""

    def __init__(self, calls: list[str], providers: list[str]) -> None:
        self.calls, self.providers = calls, providers

    def __call__(self, path: str, sess_options: object = None, providers: object = None) -> FakeCudaSession:
        self.calls.append("session")
        return self

    def get_providers(self) -> list[str]:
        return self.providers

    def get_outputs(self) -> list[object]:
        return []


@pytest.mark.parametrize("used", [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]])
def test_ort_cuda_preloads_cuda_libraries_and_records_its_providers(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    used: list[str]) -> None:
    """onnxruntime-gpu installed without its CUDA wheels finds cuBLAS/cuDNN only if they are preloaded (as torch
    would); without them ORT silently runs on the CPU, which the backend refuses and otherwise records."""
    import onnxruntime

    from runtime.backends import cudart

    calls: list[str] = []
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: calls.append("preload_dlls"), raising=False)
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeCudaSession(calls, used))
    monkeypatch.setattr(cudart, "stream_create", lambda **flags: "stream")  # the parts that need a GPU
    monkeypatch.setattr(cudart, "stream_handle", lambda stream: 7)
    monkeypatch.setattr(cudart, "stream_destroy", lambda stream: None)
    backend = create("ort-cuda", tiny_artifact)
    try:
        if used[0] != "CUDAExecutionProvider":
            with pytest.raises(BackendUnavailable, match="providers in use: CPUExecutionProvider"):
                backend.activate()
        else:
            backend.activate()
            assert backend.describe()["providers_used"] == used
    finally:
        backend.deactivate()
    assert calls[:2] == ["preload_dlls", "session"]


def test_a_failed_cuda_library_never_reaches_stdout_and_is_named(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """onnxruntime-gpu's preload_dlls prints "Failed to load ..." to stdout and returns; stdout is runtime.infer's
    predictions and runtime.serve's banner line. Faked: this CPU onnxruntime's preload_dlls loads nothing."""
    import onnxruntime

    from runtime.backends.onnxruntime import preload_cuda_libraries
    from runtime.errors import UNAVAILABLE, exit_code

    def preload_dlls() -> None:  # what onnxruntime-gpu 1.31 prints on a machine without cuBLAS 13
        print("Failed to load libcublasLt.so.13: libcublasLt.so.13: cannot open shared object file: No such file or directory")
        print("Please follow https://onnxruntime.ai/docs/install/#cuda-and-cudnn to install CUDA.")

    monkeypatch.setattr(onnxruntime, "preload_dlls", preload_dlls, raising=False)
    with pytest.raises(BackendUnavailable) as err:
        preload_cuda_libraries()
    out, _ = capsys.readouterr()
    assert out == ""
    assert "libcublasLt.so.13" in str(err.value) and "\n" not in str(err.value) and exit_code(err.value) == UNAVAILABLE
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: print("Skip loading CUDA and cuDNN DLLs since torch is imported."))
    assert preload_cuda_libraries() is None
    out, err_text = capsys.readouterr()
    assert out == "" and "Skip loading" in err_text


@pytest.mark.parametrize("name", ["torch-sdpa", "torch-eager"])
def test_torch_backends_let_go_of_their_model_on_close(name: str, tiny_artifact: Path) -> None:
    """Between benchmark rows the closed backend's model (and, on a GPU, its cached memory) must be freeable."""
    import weakref

    with create(name, tiny_artifact, max_batch=2, threads=1) as backend:
        backend.infer(np.zeros((1, *backend.input.shape[1:]), np.float32))
        model = weakref.ref(backend.model)  # type: ignore[attr-defined]
    assert model() is None


@pytest.mark.gpu
def test_torch_on_cuda_returns_its_cached_memory_on_close(tiny_artifact: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA GPU")
    baseline = torch.cuda.memory_reserved()
    with create("torch-sdpa", tiny_artifact, max_batch=8) as backend:
        backend.infer(np.zeros((8, *backend.input.shape[1:]), np.float32))
        assert torch.cuda.memory_reserved() > baseline
    assert torch.cuda.memory_reserved() <= baseline


def test_the_fp16_skip_layer_norm_row_asks_for_strict_mode(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ort-cuda-sln16` (benchmark row) runs model.ort.fp16-sln.onnx with fp32 accumulation inside SkipLayerNormalization."""
    from benchmarks.optimum_style import ORT_CUDA_SLN16
    from runtime.backends import cudart

    monkeypatch.setattr(cudart, "stream_create", lambda **flags: "stream")
    monkeypatch.setattr(cudart, "stream_handle", lambda stream: 7)
    backend = ORT_CUDA_SLN16(tiny_artifact)
    assert backend.model_file.name == "model.ort.fp16-sln.onnx" and backend.precision == "fp16"
    options = dict(backend.provider_list())["CUDAExecutionProvider"]  # type: ignore[attr-defined]
    assert options["enable_skip_layer_norm_strict_mode"] == "1" and options["enable_cuda_graph"] == "1"
    assert "enable_skip_layer_norm_strict_mode" not in dict(create("ort-cuda", tiny_artifact).provider_list())[  # type: ignore[attr-defined]
        "CUDAExecutionProvider"]


def test_ort_busy_waits_unless_its_cores_are_shared(tiny_artifact: Path) -> None:
    """Spinning is ORT's fastest setting alone (10-30% on 2 cores); off only beside other work."""
    with create("ort-cpu", tiny_artifact, threads=1) as alone:
        with pytest.raises(RuntimeError, match="allow_spinning"):
            alone.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    shared = create("ort-cpu", tiny_artifact, threads=1)
    shared.shares_cores = True
    with shared:
        assert shared.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
