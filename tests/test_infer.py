"""`python -m runtime.infer` and the classify pipeline: real tiny model, real (generated) image files.

Every bad-input case of the runtime issue is generated here in tmp_path and either predicted (and
compared against what the picture should decode to) or reported in one line naming the file.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from runtime.artifact import SYNTHETIC_WARNING, read_onnx_meta, set_onnx_meta
from runtime.backends import BackendUnavailable, create
from runtime.backends.onnxruntime import ORT_CUDA
from runtime.classify import ClassifyOptions, classify, decoded
from runtime.decode import display_path
from runtime.predictor import Prediction, Predictor
from runtime.infer import main
from runtime.labels import imagenet_classes

ROOT = Path(__file__).resolve().parents[1]


def photo(seed: int = 0, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A picture with structure at every scale, so a rotation or a wrong frame changes the logits."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)
    out = np.asarray(img).copy()
    out[: h // 3, : w // 2] = (250, 20, 20)  # an asymmetric block: every orientation looks different
    return Image.fromarray(out)


@pytest.fixture(scope="module")
def backend(tiny_artifact: Path):  # type: ignore[no-untyped-def]
    with create("ort-cpu", tiny_artifact, max_batch=8) as b:
        yield b


def probs(backend, path: Path) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The full probability vector the pipeline gives one file."""
    preds: list[Prediction] = []
    classify([path], Predictor(backend, 10), ClassifyOptions(workers=1), preds.append)
    (pred,) = preds
    assert pred.ok, pred.error
    assert pred.top is not None
    out = np.zeros(10)
    for index, _, p in pred.top:
        out[index] = p
    return out


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main([*args, "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


# --- every bad-input case: prediction or a one-line error, and the run goes on ----------------------

def make_bad_folder(root: Path) -> tuple[set[str], set[str]]:
    """Write every awkward case; return (names that must be predicted, names that must fail)."""
    root.mkdir()
    ok: set[str] = set()
    bad: set[str] = set()

    def save(name: str, img: Image.Image, **kw: object) -> None:
        img.save(root / name, **kw)
        ok.add(name)

    save("plain.jpg", photo(1), quality=95)
    save("gray.jpg", photo(2).convert("L"))
    save("cmyk.jpg", photo(3).convert("CMYK"))
    save("rgba.png", photo(4).convert("RGBA"))
    save("palette.png", photo(5).convert("P"))
    save("sixteen.png", Image.fromarray((np.asarray(photo(6).convert("L"), dtype=np.uint16) * 257)))
    frames = [photo(7), photo(8)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    save("animated.webp", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", photo(9), exif=exif)
    save("one-pixel.png", Image.new("RGB", (1, 1), (10, 200, 30)))
    save("name with spaces.jpg", photo(10))
    save("quo'te\"s.png", photo(11))
    save(os.fsdecode(b"caf\xe9-latin1.png"), photo(12))  # not valid UTF-8

    (root / "zero-byte.jpg").write_bytes(b"")
    full = io.BytesIO()
    photo(13, (256, 256)).save(full, "JPEG")
    (root / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 3])
    (root / "text.jpg").write_text("this is not a picture\n")
    (root / "broken-link.jpg").symlink_to(root / "gone.jpg")
    (root / "bomb.png").write_bytes(png_header_only(40_000, 40_000))
    os.mkfifo(root / "fifo.jpg")
    bad |= {"zero-byte.jpg", "truncated.jpg", "text.jpg", "broken-link.jpg", "bomb.png", "fifo.jpg"}
    return ok, bad


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims to be huge: Pillow's decompression-bomb guard must refuse it, not crash."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_every_bad_input_is_predicted_or_named_in_one_line(
    tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    ok, bad = make_bad_folder(folder)
    out_file = tmp_path / "pred.json"
    rc, _, err = run_cli([str(folder), "--model", str(tiny_artifact), "--format", "json", "--output", str(out_file),
                          "--batch-size", "3", "--topk", "10", "--backend", "ort-cpu"], capsys)
    assert rc == 1, err
    report = json.loads(out_file.read_text())
    by_name = {Path(p["path"]).name: p for p in report["predictions"]}
    assert set(by_name) == {display_path(Path(n)) for n in ok | bad}
    for name in ok:
        entry = by_name[display_path(Path(name))]
        assert "error" not in entry and len(entry["top"]) == 10, entry
        probs = [t["prob"] for t in entry["top"]]
        assert abs(sum(probs) - 1) < 1e-9 and probs == sorted(probs, reverse=True)  # all 10 classes: a distribution
    for name in bad:
        assert by_name[name]["error"].startswith(str(folder / name) + ": "), by_name[name]
    assert "over the limit" in by_name["bomb.png"]["error"]
    assert "empty" in by_name["zero-byte.jpg"]["error"]
    assert "not a regular file" in by_name["fifo.jpg"]["error"]
    summary = report["summary"]
    assert (summary["images"], summary["predicted"], len(summary["failed"])) == (len(ok | bad), len(ok), len(bad))
    # stderr: each failure once as it happens, once in the final list; each a single line naming its file.
    for name in bad:
        lines = [line for line in err.splitlines() if f"{folder / name}:" in line]
        assert len(lines) == 2, (name, lines)
    assert f"{len(ok | bad)} images, {len(ok)} predicted, {len(bad)} failed" in err


def test_awkward_pictures_decode_to_what_they_show(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    def saved(name: str, img: Image.Image, **kw: object) -> Path:
        img.save(tmp_path / name, **kw)
        return tmp_path / name

    # EXIF orientation 6: stored sideways, shown rotated 90 degrees clockwise.
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = probs(backend, saved("upright.png", photo(1).transpose(Image.Transpose.ROTATE_270)))
    assert np.allclose(probs(backend, saved("exif.png", photo(1), exif=exif)), upright, atol=1e-6)
    assert not np.allclose(probs(backend, saved("raw.png", photo(1))), upright, atol=1e-4)

    # Animated files: the first frame, not the last.
    first = probs(backend, saved("f0.png", photo(2)))
    assert not np.allclose(probs(backend, saved("f1.png", photo(3))), first, atol=1e-4)
    gif = probs(backend, saved("a.gif", photo(2), save_all=True, append_images=[photo(3)], duration=50))
    gif_first = probs(backend, saved("gif-first.png", Image.open(tmp_path / "a.gif").convert("RGB")))
    assert np.allclose(gif, gif_first, atol=1e-6)  # GIF quantises colours; the frame itself must match
    webp = probs(backend, saved("a.webp", photo(2), save_all=True, append_images=[photo(3)], lossless=True))
    assert np.allclose(webp, first, atol=1e-6)

    # 16-bit grayscale keeps its brightness (a naive convert("RGB") clips it to white).
    gray8 = photo(4).convert("L")
    want = probs(backend, saved("gray8.png", gray8))
    got = probs(backend, saved("gray16.png", Image.fromarray(np.asarray(gray8, dtype=np.uint16) * 257)))
    assert np.allclose(got, want, atol=1e-6)
    assert not np.allclose(probs(backend, saved("white.png", Image.new("L", gray8.size, 255))), want, atol=1e-4)

    # Transparency is composited on white.
    rgba = photo(5).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))))
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    assert np.allclose(probs(backend, saved("rgba.png", rgba)), probs(backend, saved("flat.png", flat)), atol=1e-6)

    # Grayscale and CMYK become the RGB picture Pillow reads from them.
    cmyk = saved("cmyk.jpg", photo(6).convert("CMYK"))
    assert np.allclose(probs(backend, cmyk), probs(backend, saved("cmyk-rgb.png", Image.open(cmyk).convert("RGB"))), atol=1e-6)
    gray = saved("gray.jpg", photo(7).convert("L"))
    assert np.allclose(probs(backend, gray), probs(backend, saved("gray-rgb.png", Image.open(gray).convert("RGB"))), atol=1e-6)


def test_huge_and_tiny_pictures(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """10,000 x 10,000 (100 Mpx) is under the pixel limit; 1 x 1 is resized like any other picture.
    (Padding, for pictures smaller than the crop after resizing, is tested in test_preprocess.py.)"""
    big = tmp_path / "big.png"
    Image.new("L", (10_000, 10_000), 77).save(big, compress_level=1)
    small = tmp_path / "small.png"
    Image.new("L", (1, 1), 77).save(small)
    # A flat grey picture preprocesses to the same flat tensor at any size (after resize, before crop).
    assert np.allclose(probs(backend, big), probs(backend, small), atol=1e-6)


def test_unreadable_file_is_reported_and_the_run_goes_on(tiny_artifact: Path, tmp_path: Path) -> None:
    """Root reads a mode-000 file anyway, so as root the CLI runs without the capabilities that allow it."""
    photo(1).save(tmp_path / "readable.png")
    photo(2).save(tmp_path / "secret.png")
    (tmp_path / "secret.png").chmod(0o000)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and util-linux `setpriv` (to drop CAP_DAC_OVERRIDE) is not installed")
        caps = "-dac_override,-dac_read_search"
        prefix = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]
    proc = subprocess.run([*prefix, sys.executable, "-m", "runtime.infer", str(tmp_path), "--model", str(tiny_artifact),
                           "--backend", "ort-cpu", "--format", "csv", "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(io.StringIO(proc.stdout))}
    assert rows["readable.png"]["error"] == "" and rows["readable.png"]["label1"].startswith("thing")
    assert rows["secret.png"]["error"] == f"{tmp_path / 'secret.png'}: permission denied"
    assert f"infer: error: {tmp_path / 'secret.png'}: permission denied" in proc.stderr


# --- names, folders, formats ------------------------------------------------------------------------

def test_odd_names_survive_every_format(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = ["with space.jpg", "it's \"quoted\".png", os.fsdecode(b"\xff\xfe-bytes.png"), "comma, too.png"]
    for i, name in enumerate(names):
        photo(i).save(tmp_path / name)
    shown = sorted(display_path(tmp_path / n) for n in names)
    model = ["--model", str(tiny_artifact), "--topk", "2"]

    rc, out, _ = run_cli([str(tmp_path), *model], capsys)
    assert rc == 0
    assert sorted(line.split("\t")[0] for line in out.splitlines()) == shown
    assert all(len(line.split("\t")) == 3 for line in out.splitlines())
    assert "\\xff\\xfe-bytes.png" in out

    rc, out, _ = run_cli([str(tmp_path), *model, "--format", "csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and sorted(r["path"] for r in rows) == shown
    assert all(r["label1"].startswith("thing") and 0 < float(r["prob1"]) < 1 for r in rows)

    # Explicit file arguments, as a shell passes them (the non-UTF-8 one as raw bytes).
    rc, out, _ = run_cli([str(tmp_path / n) for n in names] + [*model, "--format", "json"], capsys)
    assert rc == 0 and [p["path"] for p in json.loads(out)["predictions"]] == [display_path(tmp_path / n) for n in names]


def test_recursive_finds_nested_folders(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    photo(1).save(tmp_path / "top.jpg")
    photo(2).save(tmp_path / "a" / "one.png")
    photo(3).save(tmp_path / "a" / "b" / "c" / "deep.JPEG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    model = ["--model", str(tiny_artifact), "--format", "json"]
    rc, out, _ = run_cli([str(tmp_path), *model], capsys)
    assert rc == 0 and [Path(p["path"]).name for p in json.loads(out)["predictions"]] == ["top.jpg"]
    rc, out, _ = run_cli([str(tmp_path), "--recursive", *model], capsys)
    got = [Path(p["path"]).relative_to(tmp_path).as_posix() for p in json.loads(out)["predictions"]]
    assert rc == 0 and got == ["a/b/c/deep.JPEG", "a/one.png", "top.jpg"]


# --- exit status 2 and what is said -----------------------------------------------------------------

def test_usage_errors_exit_2_and_write_nothing(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    photo().save(images / "x.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "model.onnx").write_bytes((tiny_artifact / "model.onnx").read_bytes()[:-5000])
    for folder in (corrupt, truncated):
        (folder / "export.json").write_text("{}")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "model.onnx").write_bytes((tiny_artifact / "model.onnx").read_bytes())
    out_file = tmp_path / "out.json"
    cases = {  # expected text -> (arguments, exit status of runtime/errors.py)
        "no such file or folder": ([str(tmp_path / "missing"), "--model", str(tiny_artifact)], 2),
        "no images found": ([str(empty), "--model", str(tiny_artifact)], 2),
        "no finished model artifact under": ([str(images), "--artifacts", str(empty)], 5),
        "no model artifact": ([str(images), "--model", str(empty)], 5),
        "unfinished export": ([str(images), "--model", str(unfinished)], 5),
        "not a readable ONNX file": ([str(images), "--model", str(corrupt)], 5),
        "ONNX": ([str(images), "--model", str(truncated)], 5),
        "no CUDAExecutionProvider": ([str(images), "--model", str(tiny_artifact), "--backend", "ort-cuda"], 6),
    }
    if ORT_CUDA.unavailable_reason() is None:
        del cases["no CUDAExecutionProvider"]
    for expected, (args, status) in cases.items():
        backend = [] if "--backend" in args else ["--backend", "ort-cpu"]
        rc, out, err = run_cli([*args, *backend, "--output", str(out_file)], capsys)
        assert rc == status, (expected, err)
        assert err.startswith("infer: error: ") and expected in err and len(err.strip().splitlines()) == 1, err
        assert not out_file.exists() and not list(tmp_path.glob(".out.json*")), expected
    with pytest.raises(SystemExit) as exc:
        main([str(images), "--batch-size", "0"])
    assert exc.value.code == 2


def test_ort_cuda_says_what_is_missing_on_a_cpu_machine(tiny_artifact: Path) -> None:
    reason = ORT_CUDA.unavailable_reason()
    if reason is None:
        pytest.skip("onnxruntime-gpu and a GPU are present; see the gpu test instead")
    assert "make install-gpu" in reason
    backend = create("ort-cuda", tiny_artifact)
    assert backend.precision == "fp16" and backend.model_file.name == "model.ort.fp16.onnx"  # ORT's own fused-op graph
    with pytest.raises(BackendUnavailable, match="make install-gpu"):
        backend.__enter__()


@pytest.mark.gpu
def test_ort_cuda_fp16_agrees_with_cpu_fp32(tiny_artifact: Path) -> None:
    reason = ORT_CUDA.unavailable_reason()
    if reason:
        pytest.skip(f"ort-cuda unavailable: {reason}")
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    with create("ort-cuda", tiny_artifact, max_batch=2) as gpu, create("ort-cpu", tiny_artifact) as cpu:
        got, want = gpu.infer(x)["logits"], cpu.infer(x)["logits"]
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert got.shape == want.shape and cos.min() > 0.999


def test_auto_says_what_it_picked_and_synthetic_weights_warn(
    tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = tmp_path / "artifacts" / "synthetic-tiny"
    artifact.mkdir(parents=True)
    model = onnx.load(str(tiny_artifact / "model.onnx"))
    meta = read_onnx_meta(tiny_artifact / "model.onnx")
    meta.weights, meta.id2label = "synthetic", "imagenet-1k"
    set_onnx_meta(model, meta)
    onnx.save(model, str(artifact / "model.onnx"))
    (artifact / "export.json").write_text("{}")
    photo().save(tmp_path / "x.png")
    # No --model: the newest artifact under --artifacts; labels from the shipped ImageNet list.
    rc, out, err = run_cli([str(tmp_path / "x.png"), "--artifacts", str(tmp_path / "artifacts"), "--topk", "10"], capsys)
    assert rc == 0
    picked = next(line for line in err.splitlines() if line.startswith("infer: backend: "))
    assert picked.split()[2] in ("ort-cpu", "openvino-cpu", "torch-sdpa") and "fp32" in picked
    assert "fastest measured on" in picked and "ort-cuda fp16:" in picked  # measured here; the GPU route said why not
    assert err.count(SYNTHETIC_WARNING) == 2  # when the model loads, and again under the summary
    names = {name for _, name in imagenet_classes()[:10]}
    assert {field.rsplit(" ", 1)[0] for field in out.strip().split("\t")[1:]} == names
    rc, _, err = run_cli([str(tmp_path / "x.png"), "--artifacts", str(tmp_path / "artifacts")], capsys)
    assert rc == 0 and "(cached)" in err, "the choice is cached beside the artifact"


# --- the pipeline itself --------------------------------------------------------------------------

def test_batches_split_and_partial_batches_give_the_same_answers(backend, tiny_artifact: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = []
    for i in range(7):
        photo(i).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    files.insert(3, tmp_path / "bad.png")
    singles = [probs(backend, f) for f in files if f.name != "bad.png"]
    # batch 5 on a backend that takes at most 2: split 2+2+1, then a partial batch of 2.
    with create("ort-cpu", tiny_artifact, max_batch=2) as small:
        preds: list[Prediction] = []
        summary = classify(files, Predictor(small, 10), ClassifyOptions(batch_size=5, workers=2, prefetch=3), preds.append)
    assert [p.source for p in preds] == files  # input order, the failure in its place
    assert preds[3].error and summary.images == 8 and summary.predicted == 7 and summary.images_per_s > 0
    for pred, want in zip([p for p in preds if p.ok], singles):
        got = np.zeros(10)
        for index, _, p in pred.top or []:
            got[index] = p
        assert np.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("name", ["torch-eager", "torch-sdpa"])
def test_torch_backends_give_the_same_predictions(backend, tiny_artifact: Path, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    files = []
    for i in range(3):
        photo(i).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    want: list[Prediction] = []
    got: list[Prediction] = []
    classify(files, Predictor(backend, 3), ClassifyOptions(), want.append)
    with create(name, tiny_artifact) as torch_backend:
        classify(files, Predictor(torch_backend, 3), ClassifyOptions(), got.append)
    for g, w in zip(got, want, strict=True):
        assert [i for i, _, _ in g.top or []] == [i for i, _, _ in w.top or []]
        assert np.allclose([p for _, _, p in g.top or []], [p for _, _, p in w.top or []], atol=1e-5)


def test_decoding_reads_at_most_prefetch_files_ahead(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An endless stream of files must work in bounded memory: never more than `prefetch` pending."""
    photo().save(tmp_path / "x.png")
    taken = 0

    def endless():  # type: ignore[no-untyped-def]
        nonlocal taken
        for _ in itertools.count():
            taken += 1
            yield tmp_path / "x.png"

    spec = backend.meta.preprocessing
    for n, (_, pixels) in enumerate(decoded(endless(), spec, workers=2, prefetch=4), start=1):
        assert isinstance(pixels, np.ndarray) and pixels.shape == (3, 32, 32)
        assert taken <= n + 4
        if n == 20:
            break


def test_draft_mode_is_close_to_exact_on_a_big_jpeg(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    big = tmp_path / "big.jpg"
    photo(3, (1600, 1200)).save(big, quality=95)
    spec = backend.meta.preprocessing
    ((_, exact),) = decoded([big], spec, workers=1, prefetch=1)
    ((_, draft),) = decoded([big], spec, workers=1, prefetch=1, draft=True)
    assert isinstance(exact, np.ndarray) and isinstance(draft, np.ndarray)
    diff = np.abs(exact - draft)
    assert 0 < diff.mean() < 0.05, diff.mean()  # decoded at 1/8 scale (200x150 >= 2 x 36): not identical


def test_pipeline_throughput_reports_both_figures_and_draft_effect(tiny_artifact: Path, tmp_path: Path) -> None:
    from benchmarks.pipeline_throughput import measure_pipeline

    for i in range(5):
        photo(i).save(tmp_path / f"{i}.jpg")
    photo(9, (800, 600)).save(tmp_path / "big.jpg", quality=95)  # >= 2 x 2 x 36: draft decodes it at 1/8
    (tmp_path / "broken.jpg").write_bytes(b"")
    r = measure_pipeline(tiny_artifact, tmp_path, batch_size=4, repeats=1, progress=False)
    assert (r["images"], r["decoded"], r["backend"], r["precision"]) == (7, 6, "ort-cpu", "fp32")
    assert r["model_only_images_per_s"] > 0 and r["end_to_end_images_per_s"] > 0 and r["end_to_end_ratio"] > 0
    assert r["draft_images_changed"] == 1 and r["draft_decode_speedup_on_changed"] > 0
    assert 0 < r["draft_pixel_abs_diff"]["mean"] < r["draft_pixel_abs_diff"]["mean_over_changed_images"]
    json.dumps(r)  # plain data, for the benchmarks report
