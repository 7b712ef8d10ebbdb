"""`make gpu-check`: every GPU step that can run here, one PASS/FAIL/SKIP row each.

export -> calibrate -> PyTorch on CUDA -> ONNX Runtime CUDA -> TensorRT engines -> Polygraphy cross-check
-> TensorRT vs ONNX Runtime -> bench. Steps whose library or hardware is missing are SKIP rows that
say what is missing (TensorRT cannot be installed everywhere; the rest still runs). Every GPU result
is compared with ONNX Runtime CPU fp32 on the photos given (else random inputs): on photos through
trained weights top-1 agreement >= 99.5% (int8 98%); on random inputs or synthetic weights, whose
near-tied logits a correct fp16 run flips, per-sample cosine (fp16 >= 0.999) and top-1 on the inputs
whose margin exceeds the measured error (`export.compare`). The TensorRT engines are also checked by NVIDIA's own Polygraphy
(`polygraphy run`), so the hand-written TensorRT code is checked by code nobody here wrote.

Exit status (the README's table): 0 every step passed or was skipped, 1 a step failed, 6 no GPU step
could run here (the SKIP rows say why).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from export.pipeline import ExportOptions, export_checkpoint
from export.verify import verification_inputs
from runtime.artifact import model_path, read_onnx_meta
from runtime.backends import create, cudart
from runtime.backends.onnxruntime import ORT_CPU, ORT_CUDA
from runtime.backends.pytorch import cuda_available
from runtime.backends.trt import engine_path, engine_source, read_sidecar, tensorrt_unavailable_reason
from runtime.checkpoints import HubUnreachable
from export.compare import check, compare
from runtime.errors import SOME_FAILED, ArgumentParser, Unavailable, first_line, run_cli

DEFAULT_MODEL = "facebook/deit-small-distilled-patch16-224"
MIN_AGREEMENT = {"fp32": 0.995, "fp16": 0.995, "int8": 0.98}
POLYGRAPHY_TOLERANCE = {"fp16": ("2e-2", "2e-2"), "int8": ("1e-1", "1e-1")}  # (atol, rtol) on logits
# A hung subprocess (a driver wait, a lost GPU) must end as a FAIL row, not hang the check: generous
# bounds, well above what DeiT-B takes (export, 128-image calibration and the bench take minutes).
CLI_TIMEOUT_S = 3600
POLYGRAPHY_TIMEOUT_S = 900


@dataclass
class Step:
    name: str
    status: str  # PASS | FAIL | SKIP
    seconds: float
    detail: str


class StepFailed(Exception):
    """A check inside a step did not hold; the message is the table's detail column."""


class StepSkipped(Exception):
    """The step cannot run here; the message says what is missing."""


def _timed(name: str, fn: Callable[[], str]) -> Step:
    t0 = time.perf_counter()
    try:
        detail, status = fn(), "PASS"
    except StepSkipped as err:
        detail, status = str(err), "SKIP"
    except StepFailed as err:
        detail, status = str(err), "FAIL"
    except Exception as err:  # a crashed step is a FAIL row, and the check goes on
        detail, status = f"{type(err).__name__}: {first_line(err)}", "FAIL"
    return Step(name, status, time.perf_counter() - t0, detail)


def _run(cmd: list[str], timeout_s: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"`{' '.join(cmd[:3])} ...` did not finish within {timeout_s} s") from None


def _run_cli(args: list[str]) -> str:
    proc = _run([sys.executable, "-m", *args], CLI_TIMEOUT_S)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise StepFailed(f"`python -m {' '.join(args)}` exited {proc.returncode}: {lines[-1] if lines else ''}")
    return f"`python -m {args[0]}` ok"


def _agreement(artifact: Path, backend: str, precision: str, images: Path | None, limit: int) -> str:
    """A GPU backend against ONNX Runtime CPU fp32 on the photos (or random inputs), gated by `export.compare.check`:
    plain top-1 agreement on photos through trained weights, cosine and decided top-1 otherwise."""
    meta = read_onnx_meta(model_path(artifact, "fp32"))
    x, photos = verification_inputs(meta.preprocessing, images, limit, n_random=0 if images else 64)
    with ORT_CPU(artifact, precision="fp32") as ref:
        expected = ref.infer(x)
    with create(backend, artifact, precision=precision) as gpu:
        got = gpu.infer(x)
        notes = getattr(gpu, "notes", [])
    result = compare(expected, got)
    text = (f"top-1 agreement {result['top1_agreement']:.2%} on {result['samples']} "
            f"{'photos' if photos else 'random inputs'} ({result['decided']} decided: "
            f"{result['decided_top1_agreement']:.2%}), min cosine {result['min_cosine']:.5f}"
            + (f"; {'; '.join(notes)}" if notes else ""))
    failed = check(result, precision, MIN_AGREEMENT[precision], meaningful_top1=bool(photos) and not meta.synthetic)
    if failed:
        raise StepFailed(f"{text}: {failed}")
    return text


def _attention(artifact: Path, precision: str) -> str:
    att = read_sidecar(engine_path(artifact, precision)).attention
    text = f"{att['fused_attention_layers']} fused attention layers ({att['expected_layers']} encoder layers)"
    if att["fused_attention_layers"] == 0:
        raise StepFailed(f"{precision}: {text}; layer types {att['layer_types']}")
    return text


def polygraphy_executable(bin_dir: Path | None = None) -> str | None:
    """The `polygraphy` script of this Python's environment (found without an activated venv), else one on PATH."""
    beside = (bin_dir or Path(sys.executable).parent) / "polygraphy"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("polygraphy")


def nvidia_library_dirs(roots: list[Path] | None = None) -> list[str]:
    """The `nvidia/*/lib` folders of pip's CUDA wheels (cuda-runtime, cuBLAS, cuDNN, ...).

    Polygraphy's TensorRT runner loads libcudart through ctypes, which searches LD_LIBRARY_PATH and the
    system folders only: on a pip-only CUDA install these folders must be added for it.
    """
    if roots is None:
        roots = [Path(p) for p in (*site.getsitepackages(), site.getusersitepackages())]
    return sorted({str(lib) for root in roots for lib in root.glob("nvidia/*/lib") if lib.is_dir()})


def polygraphy_env(roots: list[Path] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    dirs = nvidia_library_dirs(roots) + [d for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    if dirs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(dirs))
    return env


def polygraphy_commands(artifact: Path, precision: str, work: Path, polygraphy: str = "polygraphy") -> list[list[str]]:
    """ONNX Runtime fp32 outputs saved by Polygraphy, then our engine run by Polygraphy's TensorRT runner against them."""
    meta = read_onnx_meta(model_path(artifact, "fp32"))
    h, w = meta.preprocessing.input_size
    atol, rtol = POLYGRAPHY_TOLERANCE[precision]
    inputs, reference = work / f"inputs-{precision}.json", work / f"onnxrt-{precision}.json"
    shape = f"pixel_values:[8,3,{h},{w}]"
    return [
        [polygraphy, "run", str(model_path(artifact, "fp32")), "--onnxrt", "--input-shapes", shape,
         "--save-inputs", str(inputs), "--save-outputs", str(reference)],
        [polygraphy, "run", str(engine_path(artifact, precision)), "--model-type", "engine", "--trt",
         "--load-inputs", str(inputs), "--load-outputs", str(reference), "--atol", atol, "--rtol", rtol,
         "--check-error-stat", "median"],
    ]


def _polygraphy(artifact: Path, precision: str) -> str:
    polygraphy = polygraphy_executable()
    if polygraphy is None:
        raise StepSkipped(f"polygraphy is not installed beside {sys.executable} nor on PATH "
                          "(`pip install polygraphy`, with TensorRT)")
    work = artifact / "polygraphy"
    work.mkdir(exist_ok=True)
    env = polygraphy_env()
    for cmd in polygraphy_commands(artifact, precision, work, polygraphy):
        proc = _run(cmd, POLYGRAPHY_TIMEOUT_S, env)
        if proc.returncode != 0:
            tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()][-3:]
            raise StepFailed(f"`{' '.join(cmd[:3])} ...` exited {proc.returncode}: {' | '.join(tail)}")
    return f"Polygraphy: TensorRT {precision} engine matches ONNX Runtime fp32 (median error within {POLYGRAPHY_TOLERANCE[precision]})"


def gpu_missing() -> dict[str, str | None]:
    """What each GPU route lacks here (None: it can run)."""
    return {"torch-cuda": None if cuda_available() else "torch sees no CUDA GPU (torch.cuda.is_available() is False)",
            "ort-cuda": ORT_CUDA.unavailable_reason(),
            "tensorrt": tensorrt_unavailable_reason() or cudart.gpu_unavailable_reason()}


def run_gpu_check(out: Path, model: str = DEFAULT_MODEL, images: Path | None = None, limit: int = 500) -> list[Step]:
    """Run every step; a step whose prerequisite is missing or failed is a SKIP row saying so."""
    missing = gpu_missing()
    steps: list[Step] = []
    artifact = out / model.rstrip("/").split("/")[-1]

    def needs(route: str) -> None:
        if missing[route]:
            raise StepSkipped(str(missing[route]))

    def export() -> str:
        opts = ExportOptions(model, out_root=out, verify_images=images, progress=False)
        try:
            report = export_checkpoint(opts)
        except HubUnreachable:
            opts.weights = "synthetic"
            report = export_checkpoint(opts)
        return f"{report['weights']} weights -> {artifact}; files {', '.join(report['files'])}"

    steps.append(_timed("export", export))
    if steps[-1].status != "PASS":
        return steps

    def calibrate() -> str:
        if images is None:
            raise StepSkipped("no --images to calibrate on; int8 steps skipped")
        return _run_cli(["calibration", "--model", str(artifact), "--calib-dir", str(images), "--num-images", "128",
                         "--no-progress"])

    steps.append(_timed("calibrate", calibrate))

    def checked(route: str, fn: Callable[[], str]) -> Callable[[], str]:
        def step() -> str:
            needs(route)
            return fn()
        return step

    for precision in ("fp32", "fp16"):
        steps.append(_timed(f"torch-sdpa {precision} on CUDA vs ORT CPU fp32",
                            checked("torch-cuda", lambda p=precision: _agreement(artifact, "torch-sdpa", p, images, limit))))
        steps.append(_timed(f"ort-cuda {precision} vs ORT CPU fp32",
                            checked("ort-cuda", lambda p=precision: _agreement(artifact, "ort-cuda", p, images, limit))))
    precisions = ("fp16", "int8") if engine_source(artifact, "int8").is_file() else ("fp16",)

    def engines() -> str:
        needs("tensorrt")
        from export.engines import EngineOptions, build_engines

        report = build_engines(artifact, precisions, EngineOptions(progress=False))
        return ", ".join(f"{p} built in {s.build_time_s:.0f} s" for p, s in report["engines"].items())

    steps.append(_timed("engines", engines))
    built = steps[-1].status == "PASS"
    for precision in precisions:
        for name, fn in ((f"attention fused ({precision})", lambda p=precision: _attention(artifact, p)),
                         (f"polygraphy trt {precision} vs onnxrt fp32", lambda p=precision: _polygraphy(artifact, p)),
                         (f"infer trt {precision} vs ORT CPU fp32", lambda p=precision: _agreement(artifact, "trt", p, images, limit))):
            steps.append(_timed(name, fn) if built else
                         Step(name, "SKIP", 0.0, f"no engine: {missing['tensorrt'] or 'the engines step failed'}"))
    steps.append(_timed("bench", lambda: _run_cli(
        ["benchmarks", "--model", str(artifact), "--batch-sizes", "1,2,4,8", "--out", str(out / "bench"), "--no-progress"]
        + (["--agreement-images", str(images)] if images else []))))
    return steps


def format_table(steps: list[Step]) -> str:
    width = max(len(s.name) for s in steps)
    lines = [f"{'step':{width}}  result  time     detail", f"{'-' * width}  ------  -------  ------"]
    lines += [f"{s.name:{width}}  {s.status:6}  {s.seconds:6.1f}s  {s.detail}" for s in steps]
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.gpu_check", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local checkpoint (default {DEFAULT_MODEL})")
    p.add_argument("--out", type=Path, default=Path("artifacts/gpu-check"))
    p.add_argument("--images", type=Path, help="photos for calibration and agreement (else random inputs, no int8)")
    p.add_argument("--limit", type=int, default=500, help="at most this many photos for agreement (default 500)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.images is not None and not args.images.is_dir():
        p.error(f"--images {args.images}: no such folder")

    def work() -> int:
        missing = gpu_missing()
        if all(missing.values()):
            names = ["export", "calibrate", "torch-sdpa on CUDA", "ort-cuda", "engines", "polygraphy", "infer trt", "bench"]
            print(format_table([Step(n, "SKIP", 0.0, "no GPU here") for n in names]))
            raise Unavailable("no GPU step can run here: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
        steps = run_gpu_check(args.out, args.model, args.images, args.limit)
        print(format_table(steps))
        return SOME_FAILED if any(s.status == "FAIL" for s in steps) else 0

    return run_cli("gpu_check", work, entry=argv is None)


if __name__ == "__main__":
    raise SystemExit(main())
