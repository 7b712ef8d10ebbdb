"""The one predictor every runner uses: records in input order, decode errors kept, non-finite logits never a prediction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_DIR, needs_sample
from runtime.backends import create
from runtime.errors import UsageError
from runtime.paths import output_lock
from runtime.decode import DecodeFailure, decode_bytes, decode_file
from runtime.predictor import Predictor


@needs_sample()
def test_records_follow_the_inputs_and_bytes_decode_like_files(tiny_artifact: Path) -> None:
    files = sorted(SAMPLE_DIR.iterdir())[:3]
    with create("ort-cpu", tiny_artifact) as backend:
        predictor = Predictor(backend, topk=3)
        from_files = [decode_file(f, predictor.spec) for f in files]
        from_bytes = [decode_bytes(f.read_bytes(), f.name, predictor.spec) for f in files]
        for a, b in zip(from_files, from_bytes):
            assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
        broken = decode_bytes(b"not an image", "upload-7", predictor.spec)
        assert isinstance(broken, DecodeFailure) and broken.source == "upload-7"
        assert broken.message == "upload-7: not an image (or an unsupported format)"
        sources = ["a", "broken", "b", "c"]
        records = predictor.predict(sources, [from_files[0], broken, from_files[1], from_files[2]])
        assert [r.source for r in records] == sources
        assert [r.ok for r in records] == [True, False, True, True] and records[1].error == broken.message
        logits, tops = predictor.run(np.stack(from_files))
        assert [r.top for r in records if r.ok] == tops
        assert all(len(t) == 3 and t[0][0] == int(np.argmax(row)) for t, row in zip(tops, logits))


def test_non_finite_logits_are_an_error_for_that_row_only(tiny_artifact: Path) -> None:
    with create("ort-cpu", tiny_artifact) as backend:
        predictor = Predictor(backend, topk=2)
        real_infer = backend.infer

        def poisoned(x: np.ndarray) -> dict[str, np.ndarray]:
            out = real_infer(x)
            out["logits"][1, 0] = np.nan
            return out

        backend.infer = poisoned  # type: ignore[method-assign]
        h, w = predictor.spec.input_size
        records = predictor.predict(["x", "y", "z"], list(np.zeros((3, 3, h, w), np.float32)))
    assert [r.ok for r in records] == [True, False, True]
    assert records[1].error is not None and records[1].error.startswith("y: ") and "not finite" in records[1].error


def test_topk_beyond_the_classes_is_a_usage_error(tiny_artifact: Path) -> None:
    backend = create("ort-cpu", tiny_artifact)
    with pytest.raises(UsageError, match="--topk 11"):
        Predictor(backend, topk=11)


def test_a_second_writer_of_one_output_is_refused_and_named(tmp_path: Path) -> None:
    lock = tmp_path / "out.csv.lock"
    probe = ("import sys; from pathlib import Path; from runtime.paths import output_lock\n"
             "with output_lock(Path(sys.argv[1]), 'out.csv'): print('got it')")
    with output_lock(lock, "out.csv"):
        blocked = subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True)
    assert blocked.returncode != 0 and "another run (pid " in blocked.stderr
    free = subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True)
    assert free.returncode == 0 and free.stdout == "got it\n"  # the lock went with its holder
