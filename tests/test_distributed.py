"""runtime.distributed on a local Ray (started once for the module): same answers as runtime.classify,
bad files as rows, a killed actor costing neither a lost nor a doubled row, resume, and every INPUT kind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_DIR, needs_sample

BIG_COPIES = 96  # 3200 x 2400 JPEGs: ~90 ms each to decode, so decoding outlasts an actor's start (the pool starts it lazily)


@pytest.fixture(scope="module")
def ray_session() -> Any:
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install -e '.[distributed]')")
    import ray

    from runtime.distributed import connect

    started = connect(num_cpus=2, object_store_bytes=512 * 2**20)
    yield ray
    if started:
        ray.shutdown()


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour fields plus noise: compresses and decodes like a photo, differs per seed."""
    small = rng.integers(0, 255, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)).astype(np.int16)
    return Image.fromarray(np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 small JPEGs in two folders (the input is searched recursively)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for i in range(40):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        photo(rng, 320 + i, 240).save(folder / f"p{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def big_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big")
    photo(np.random.default_rng(2), 3200, 2400).save(root / "big000.jpg", quality=90)
    for i in range(1, BIG_COPIES):
        os.link(root / "big000.jpg", root / f"big{i:03d}.jpg")
    return root


def reference(artifact: Path, files: list[Path], topk: int = 3) -> dict[str, tuple[list[int], list[float]]]:
    """runtime.classify's answers (what runtime.infer prints), by absolute path."""
    from runtime.backends import create
    from runtime.classify import ClassifyOptions, classify
    from runtime.predictor import Prediction, Predictor

    preds: list[Prediction] = []
    with create("ort-cpu", artifact, max_batch=8) as backend:
        classify(files, Predictor(backend, topk), ClassifyOptions(batch_size=8), preds.append)
    return {os.path.abspath(p.source): ([i for i, _, _ in p.top or []], [q for _, _, q in p.top or []]) for p in preds}


def run_job(inp: str | Path, out: Path, artifact: Path, on_part: Any = None, **opts: Any) -> Any:
    from runtime.distributed import Job, JobOptions

    options = JobOptions(**{"backend": "ort-cpu", "batch_size": 8, "topk": 3, "progress": False, **opts})
    return Job(str(inp), str(out), str(artifact), options).run(on_part=on_part)


def rows(out: Path) -> Any:
    import pandas as pd

    parts = sorted(out.glob("part-*.jsonl"))
    if parts:
        return pd.concat([pd.read_json(p, lines=True) for p in parts], ignore_index=True)
    return pd.read_parquet(out)


def assert_same_answers(table: Any, expected: dict[str, tuple[list[int], list[float]]]) -> None:
    ok = table[table["error"].isna()]
    assert sorted(ok["path"]) == sorted(expected)
    for path, indices, probs in zip(ok["path"], ok["indices"], ok["probs"]):
        assert list(indices) == expected[path][0], path
        np.testing.assert_allclose(list(probs), expected[path][1], rtol=0, atol=1e-6)


def images(folder: Path) -> list[Path]:
    from runtime.inputs import list_images

    return list_images([folder], recursive=True)


def test_a_cpu_actor_threads_split_its_node_between_the_jobs_actors_there() -> None:
    from runtime.distributed.job import actor_threads

    assert actor_threads(2, 1, cores=2) == 2  # one actor a node: the node's two cores, not what the actor reserved
    assert actor_threads(8, 1, cores=8) == 8
    assert actor_threads(8, 3, cores=8) == 2  # three of the job's actors on the node share it
    assert actor_threads(16, 1, cores=4) == 4  # Ray told 16 CPUs on 4 cores
    assert actor_threads(1, 1, cores=1) == 1


def test_a_cpu_actor_takes_its_nodes_cores_and_does_not_busy_wait(ray_session: Any, tiny_artifact: Path) -> None:
    """Spinning ORT threads would take the cores the decode tasks need between operators."""
    from runtime.cpuinfo import usable_cores
    from runtime.distributed.job import Classifier, make_plan
    from runtime.predictor import ModelOptions

    def session_settings(plan: Any) -> tuple[int, str]:
        classifier = Classifier(plan)  # held: dropping it closes the backend
        options = classifier.predictor.backend.session.get_session_options()
        return options.intra_op_num_threads, options.get_session_config_entry("session.intra_op.allow_spinning")

    plan = make_plan(ModelOptions(str(tiny_artifact), backend="ort-cpu", batch_size=4))
    threads, spinning = ray_session.get(ray_session.remote(num_cpus=1)(session_settings).remote(plan))
    assert (threads, spinning) == (min(2, usable_cores()), "0")  # the session's node has 2 CPUs; the actor reserves 1


@needs_sample()
def test_same_answers_as_runtime_infer_on_the_shared_photos(ray_session: Any, tiny_artifact: Path,
                                                            tmp_path: Path) -> None:
    files = images(SAMPLE_DIR)
    summary = run_job(SAMPLE_DIR, tmp_path / "out", tiny_artifact, topk=5)
    table = rows(tmp_path / "out")
    assert summary.images == summary.predicted == len(files) == len(table) == table["path"].nunique()
    assert_same_answers(table, reference(tiny_artifact, files, topk=5))
    labels = table["labels"].iloc[0]
    assert len(labels) == 5 and all(label.startswith("thing") for label in labels)  # the artifact's id2label


def test_a_corrupt_file_is_a_row_with_an_error_and_counted(ray_session: Any, tiny_artifact: Path, photos: Path,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.distributed import main

    folder = tmp_path / "in"
    folder.mkdir()
    for f in images(photos)[:12]:
        os.link(f, folder / f.name)
    (folder / "corrupt.jpg").write_bytes(images(photos)[0].read_bytes()[:300])
    (folder / "empty.png").write_bytes(b"")
    (folder / "huge.jpg").write_bytes(images(photos)[0].read_bytes() + bytes(3 * 2**20))
    status = main([str(folder), "--model", str(tiny_artifact), "--output", str(tmp_path / "out"),
                   "--backend", "ort-cpu", "--topk", "3", "--no-progress", "--max-file-bytes", str(2**21)])
    err = capsys.readouterr().err
    assert status == 1  # done, some files failed
    assert "15 images, 12 predicted, 3 failed" in err
    table = rows(tmp_path / "out")
    assert len(table) == 15
    failed = table[table["error"].notna()].set_index("path")["error"]
    corrupt, empty, huge = str(folder / "corrupt.jpg"), str(folder / "empty.png"), str(folder / "huge.jpg")
    assert sorted(failed.index) == [corrupt, empty, huge]
    assert failed[huge] == f"{huge}: refused, 3.0 MiB is over the limit of 2.0 MiB (--max-file-bytes)"
    assert failed[empty] == f"{empty}: empty file"
    assert failed[corrupt].startswith(f"{corrupt}: ")
    assert table[table["error"].isna()]["indices"].map(len).eq(3).all()
    assert f"distributed: error: {empty}: empty file" in err


def _descends_from_us(pid: int) -> bool:
    """A process of this test's Ray (the raylet is our child), not another session's on the same machine."""
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def classifier_actors() -> dict[int, bytes]:
    """pid -> command line of this session's inference actors (Ray titles them after the stage)."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                title = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue
            if b"MapBatches(Classifier)" in title and _descends_from_us(int(entry.name)):
                found[int(entry.name)] = title
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor's process in /proc")
def test_a_killed_actor_loses_and_duplicates_no_row(ray_session: Any, tiny_artifact: Path, big_photos: Path,
                                                     tmp_path: Path) -> None:
    from runtime.distributed.writer import Part

    killed: list[int] = []
    after: set[int] = set()

    def kill_on_first_part(part: Part) -> None:
        actors = classifier_actors()
        if not killed:  # the first part is committed: the actor is mid-run, decoding is not finished
            assert actors
            for pid, title in actors.items():
                assert b"decode" not in title  # decoding is its own stage, not fused into the actor
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        else:
            after.update(actors)

    summary = run_job(big_photos, tmp_path / "out", tiny_artifact, rows_per_file=1, on_part=kill_on_first_part)
    table = rows(tmp_path / "out")
    assert killed and after - set(killed), "the actor was not restarted after the kill: nothing was left to do"
    assert summary.images == summary.predicted == BIG_COPIES
    assert len(table) == table["path"].nunique() == BIG_COPIES
    files = images(big_photos)
    assert sorted(table["path"]) == [str(f) for f in files]
    answer = reference(tiny_artifact, files[:1])[str(files[0])]  # every file is a link to the same picture
    assert_same_answers(table, {str(f): answer for f in files})


def test_a_large_list_starts_classifying_on_a_two_cpu_ray(ray_session: Any, tiny_artifact: Path, tmp_path: Path) -> None:
    """100,000 listed inputs (missing files: rows with an error, so decoding is quick) on the module's 2-CPU
    Ray: the first part is committed while the job's own stall watchdog (60 s without a row classified)
    waits. Nothing that prepares the inputs may hold a CPU the decode tasks need."""
    from runtime.distributed.writer import Part
    from runtime.errors import Interrupted

    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{tmp_path}/missing/{i // 1000:03d}/{i:06d}.jpg\n" for i in range(100_000)))
    first: list[Part] = []

    def stop_at_first_part(part: Part) -> None:
        first.append(part)
        raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        run_job(listing, tmp_path / "out", tiny_artifact, rows_per_file=200, stall_s=60, on_part=stop_at_first_part)
    assert [p.rows for p in first] == [200] and first[0].failed == 200
    assert "200 rows of this run committed" in str(info.value.saved)


def test_the_claim_tasks_cut_the_decode_blocks_themselves(ray_session: Any, tiny_artifact: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The cuts (of the listing into claims' blocks, of the claims into decode blocks) run inside the
    listing and claim tasks: run as stages of their own, they would hold a CPU for as long as the
    listing lasts and starve the decoders."""
    from runtime.distributed import Job, JobOptions

    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"/missing/{i}.jpg\n" for i in range(100)))
    job = Job(str(listing), str(tmp_path / "out"), str(tiny_artifact), JobOptions(backend="ort-cpu", progress=False))
    ledgers: list[Any] = []
    try:
        todo, ledgers, done = job.settle(ray_session)
        todo.explain()
        optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
        assert "TaskPoolMapOperator[MapBatches(claim_batch)->StreamingRepartition[num_rows_per_block=32," in optimized
        assert "TaskPoolMapOperator[MapBatches(text_chunk_batch)->StreamingRepartition[num_rows_per_block=4096," in optimized
        assert done == 0 and sum(len(block) for block in todo.iter_batches(batch_size=None, batch_format="pyarrow")) == 100
    finally:
        job.close()
        for actor in ledgers:
            ray_session.kill(actor)


def test_a_hung_decode_becomes_that_inputs_error_row(photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An input whose read never returns (a hung network mount, here a decoder that waits forever) is an
    error row naming it after the deadline; the other inputs of its batch are decoded."""
    import threading

    import runtime.distributed.sources as sources
    from runtime.preprocess import Preprocessing

    real, never = sources.decode_source, threading.Event()
    files = images(photos)[:3]
    hung = os.fsencode(files[1])

    def hangs_on_one(source: bytes, *args: Any) -> Any:
        if source == hung:
            never.wait()
        return real(source, *args)

    monkeypatch.setattr(sources, "decode_source", hangs_on_one)
    batch = {"source": np.array([os.fsencode(f) for f in files], dtype=object),
             "key": np.array([str(f) for f in files], dtype=object), "error": np.array([None] * 3, dtype=object)}
    try:
        spec = Preprocessing(224, 224, None, None, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        out = sources.decode_batch(batch, spec, draft=False, max_pixels=2**26, deadline_s=0.5)
    finally:
        never.set()  # the thread left behind ends with the test
    assert list(out["error"]) == ["", "not read and decoded within 0.5 s (--decode-timeout); skipped", ""]
    assert out["pixels"][0].any() and out["pixels"][2].any() and not out["pixels"][1].any()


def test_a_text_list_read_in_chunks_gives_each_line_once_wherever_the_chunks_cut(tmp_path: Path) -> None:
    """Each line belongs to the chunk its first byte is in: every chunk size, from one byte (cutting
    every line) to more than the file, yields the list's names once each, in order, non-UTF-8 bytes kept."""
    import pyarrow.fs as pafs

    from runtime.distributed.sources import _chunk_lines, _names

    names = ["/a/1.jpg", "# a comment", "", "/b/long-" + "x" * 40 + ".jpg", "rel/2.png", "/c/\udcff.jpg", "  /d/3.jpg  "]
    listing = tmp_path / "list.txt"
    listing.write_bytes("\r\n".join(names).encode("utf-8", "surrogateescape") + b"\n\n/e/4.jpg")
    expected = _names(["/a/1.jpg", "/b/long-" + "x" * 40 + ".jpg", "rel/2.png", "/c/\udcff.jpg", "/d/3.jpg", "/e/4.jpg"])
    size = listing.stat().st_size
    fs = pafs.LocalFileSystem()
    for chunk in (1, 2, 3, 5, 7, 16, 49, 64, size - 1, size, 10 * size):
        with fs.open_input_file(str(listing)) as f:
            got = [n for start in range(0, size, chunk) for n in _names(_chunk_lines(f, start, chunk))]
        assert got == expected, chunk


def test_the_ledger_claims_each_key_once_and_knows_what_earlier_runs_did(monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim stage's record, without Ray: a key is TODO the first time it is listed (in one call or
    across calls, before and after the recent claims are folded into the sorted array), DONE or
    DONE_FAILED the first time when an earlier run did it, REPEATED after that; the counts add up."""
    import runtime.distributed.ledger as ledger
    from runtime.distributed.ledger import DONE, DONE_FAILED, REPEATED, TODO, Ledger, digests

    monkeypatch.setattr(ledger, "FOLD_AT", 4)
    book = Ledger()
    book.add_done(digests(["d0", "d1"]), np.array([False, True]))
    book.add_done(digests(["d0"]), np.array([False]))  # a load task that ran twice
    assert book.seal() == 2
    first = book.claim(digests(["a", "b", "a", "d0", "d1", "c"]))
    assert first.tolist() == [TODO, TODO, REPEATED, DONE, DONE_FAILED, TODO]
    assert len(book.seen) == 5 and not book.recent  # five claimed: folded
    second = book.claim(digests(["c", "e", "d0", "f", "e"]))
    assert second.tolist() == [REPEATED, TODO, REPEATED, TODO, REPEATED]
    assert book.claim(digests(["e", "f", "g"])).tolist() == [REPEATED, REPEATED, TODO]
    assert book.totals() == {"todo": 6, "done": 1, "done_failed": 1, "repeated": 6}
    assert ledger.ledger_of(digests([f"k{i}" for i in range(1000)]), 2).tolist().count(0) in range(420, 580)


def test_a_list_naming_files_twice_gives_each_one_row_and_a_resume_skips_them(
        ray_session: Any, tiny_artifact: Path, photos: Path, tmp_path: Path) -> None:
    """A list that names every file twice (two lists concatenated) through the streaming claims: one row a
    file; run again into the same output, nothing is redone and the summary counts them as earlier."""
    files = images(photos)
    twice = tmp_path / "twice.txt"
    twice.write_text("".join(f"{f}\n" for f in files) * 2)
    out = tmp_path / "out"
    first = run_job(twice, out, tiny_artifact, rows_per_file=7)
    assert (first.images, first.resumed) == (len(files), 0)
    table = rows(out)
    assert len(table) == table["path"].nunique() == len(files)
    again = run_job(twice, out, tiny_artifact, rows_per_file=7)
    assert (again.images, again.resumed) == (len(files), len(files))
    assert len(rows(out)) == len(files)


def test_resume_skips_what_the_output_holds(ray_session: Any, tiny_artifact: Path, photos: Path,
                                            tmp_path: Path) -> None:
    files = images(photos)
    first = tmp_path / "first.txt"
    first.write_text("".join(f"{f}\n" for f in files[:10]))
    out = tmp_path / "out"
    assert run_job(first, out, tiny_artifact, fmt="jsonl").images == 10
    again = run_job(photos, out, tiny_artifact, fmt="jsonl")
    assert (again.resumed, again.images) == (10, len(files))
    table = rows(out)
    assert len(table) == table["path"].nunique() == len(files)
    assert_same_answers(table, reference(tiny_artifact, files))
    done = run_job(photos, out, tiny_artifact, fmt="jsonl")
    assert (done.resumed, done.images) == (len(files), len(files))
    from runtime.errors import UsageError

    with pytest.raises(UsageError, match=r"holds rows made with topk 3; this run would use topk 2"):
        run_job(photos, out, tiny_artifact, fmt="jsonl", topk=2)


def test_an_interrupted_run_keeps_whole_parts_and_resumes_to_the_same_rows(
        ray_session: Any, tiny_artifact: Path, photos: Path, tmp_path: Path) -> None:
    from runtime.distributed.writer import Part
    from runtime.errors import Interrupted

    files = images(photos)
    parts: list[int] = []

    def ctrl_c_on_third(part: Part) -> None:
        parts.append(part.rows)
        if len(parts) == 3:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(Interrupted) as info:
        run_job(photos, out, tiny_artifact, rows_per_file=4, on_part=ctrl_c_on_third)
    kept = sum(parts)
    assert f"{kept} rows of this run committed" in str(info.value.saved)
    assert len(rows(out)) == kept
    summary = run_job(photos, out, tiny_artifact, rows_per_file=4)
    assert not list(out.glob("_tmp-*"))  # parts written when the first run stopped were never committed
    assert (summary.resumed, summary.images) == (kept, len(files))
    table = rows(out)
    assert len(table) == table["path"].nunique() == len(files)
    assert_same_answers(table, reference(tiny_artifact, files))


@needs_sample()
def test_two_shard_jobs_write_every_input_once_into_one_output(ray_session: Any, tiny_artifact: Path,
                                                               tmp_path: Path) -> None:
    """`--shard 0/2` and `1/2` (one by one here; each locks only its own shard, so the other shard's lock
    held meanwhile does not stop it) write disjoint rows whose union is an unsharded run's rows; a
    re-run of a shard resumes it."""
    from runtime.distributed.ledger import job_shard
    from runtime.distributed.writer import LOCK
    from runtime.paths import output_lock

    # The same shard on every machine and in every process (Python's own str hash is salted per process).
    assert [job_shard(f"/photos/{i}.jpg", 4) for i in range(8)] == [2, 1, 2, 3, 3, 1, 0, 3]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{f}\n" for f in images(SAMPLE_DIR)[:48]))
    whole = tmp_path / "whole"
    run_job(listing, whole, tiny_artifact)
    out = tmp_path / "out"
    counts = []
    writing = out / "_tmp-part-s1of2-20260101T000000-abcdef-0123.parquet"  # shard 1's, mid-write
    for i in range(2):
        with output_lock(out / f"{LOCK}-s{1 - i}of2", "the other shard"):
            if i == 0:
                writing.write_bytes(b"shard 1 is writing this")
            counts.append(run_job(listing, out, tiny_artifact, shard=(i, 2)).images)
            assert writing.exists() == (i == 0)  # shard 0 leaves it; shard 1, starting again, removes it
        assert len(rows(out)) == sum(counts)
    table, expected = rows(out), rows(whole)
    assert 0 < counts[0] < 48 and sum(counts) == 48
    assert len(table) == table["path"].nunique() == 48
    same = [t.sort_values("path").reset_index(drop=True)[["path", "indices", "probs", "error"]].to_json()
            for t in (table, expected)]
    assert same[0] == same[1]
    assert sorted(p.name for p in out.glob("_manifest*")) == ["_manifest-s0of2.json", "_manifest-s1of2.json"]
    names = sorted(p.name for p in out.glob("part-*"))
    assert names and all(n.startswith(("part-s0of2-", "part-s1of2-")) for n in names)
    again = run_job(listing, out, tiny_artifact, shard=(1, 2))
    assert (again.resumed, again.images) == (counts[1], counts[1])
    assert len(rows(out)) == 48


def test_every_input_kind_lists_the_same_images(ray_session: Any, photos: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runtime.distributed import list_inputs

    def keys(spec: str) -> list[str]:
        return sorted(row["key"] for row in list_inputs(spec)(ray_session).take_all())

    files = [str(f) for f in images(photos)]
    (tmp_path / "list.txt").write_text("# photos\n" + "\n".join(files) + "\n\n")
    pq.write_table(pa.table({"n": range(len(files)), "path": files}), tmp_path / "list.parquet")
    monkeypatch.chdir(photos)
    kinds = {
        "folder": str(photos),
        "relative glob": "**/*.jpg",
        "text list": str(tmp_path / "list.txt"),
        "parquet list": str(tmp_path / "list.parquet"),
    }
    for kind, spec in kinds.items():
        assert keys(spec) == sorted(files), kind
    assert keys("a/*.jpg") == [f for f in files if "/a/" in f]
    assert keys(f"file://{photos}/**/p0*.jpg") == [f"file://{f}" for f in files if Path(f).name.startswith("p0")]
    assert keys(f"file://{photos}") == [f"file://{f}" for f in files]


def test_uris_are_read_through_pyarrow_with_the_same_answers(ray_session: Any, tiny_artifact: Path, photos: Path,
                                                             tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = images(photos)[:16]
    uris = [f"file://{f}" for f in files] + [f"file://{photos}/missing.jpg"]
    pq.write_table(pa.table({"path": uris}), tmp_path / "uris.parquet")
    summary = run_job(tmp_path / "uris.parquet", tmp_path / "out", tiny_artifact)
    assert (summary.images, summary.failures) == (17, 1)
    table = rows(tmp_path / "out")
    missing = f"file://{photos}/missing.jpg"
    assert table.set_index("path")["error"][missing] == f"{missing}: no such file"
    expected = reference(tiny_artifact, files)
    assert_same_answers(table, {f"file://{p}": v for p, v in expected.items()})


def test_usage_errors_come_before_ray_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray.data", reason="Ray Data is not installed")
    from runtime.distributed import main

    assert main([str(tmp_path / "nothing"), "--output", str(tmp_path / "out")]) == 2
    assert "distributed: error: no such file or folder:" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-x.jsonl").write_text("")
    (tmp_path / "in.jpg").write_bytes(b"")
    assert main([str(tmp_path / "in.jpg"), "--output", str(tmp_path / "out")]) == 2
    assert "holds other part files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "in.jpg"), "--output", str(tmp_path / "out"), "--shard", "2/2"])
    assert info.value.code == 2
    assert capsys.readouterr().err == ("distributed: error: --shard 2/2: give I/N with 0 <= I < N, e.g. --shard 0/4 "
                                       "(see --help)\n")


def test_a_second_job_on_the_same_output_is_refused_before_ray_starts(
        tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The first job's lock (held here as a job holds it) makes the second say who holds it, exit 2, and
    leave the output as it was: its `_tmp-` parts belong to the first job."""
    pytest.importorskip("ray.data", reason="Ray Data is not installed")
    import runtime.distributed.cli as cli
    from runtime.distributed import main
    from runtime.distributed.writer import LOCK
    from runtime.paths import output_lock

    def no_ray(address: str | None) -> None:
        raise AssertionError("Ray started before the output was checked")

    monkeypatch.setattr(cli, "session", no_ray)

    out = tmp_path / "out"
    out.mkdir()
    (out / "_tmp-part-20260101T000000-abcdef-0.parquet").write_bytes(b"being written")
    with output_lock(out / LOCK, "the first job"):
        status = main([str(photos), "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [f"distributed: error: --output {out}: another run (pid {os.getpid()}) is writing it; "
                   "wait for it or choose another output"]
    assert (out / "_tmp-part-20260101T000000-abcdef-0.parquet").exists()


def test_one_lock_per_output_for_every_kind_of_job(tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard jobs of one N share an output; an unsharded job, or shards of another N, are refused before Ray
    starts (exit 2, naming the holder), and so are rows of another sharding on resume."""
    pytest.importorskip("ray.data", reason="Ray Data is not installed")
    import runtime.distributed.cli as cli
    from runtime.distributed import main
    from runtime.distributed.writer import Output

    def no_ray(address: str | None) -> None:
        raise AssertionError("Ray started before the output was checked")

    monkeypatch.setattr(cli, "session", no_ray)
    out = tmp_path / "out"

    def refusal(*extra: str) -> str:
        assert main([str(photos), "--output", str(out), "--no-progress", *extra]) == 2
        return capsys.readouterr().err.strip()

    shard0 = Output(str(out), shard=(0, 2))
    try:
        Output(str(out), shard=(1, 2)).close()  # the same N shares the output
        holder = f"another run (pid {os.getpid()}, one of shard jobs of 2) is writing it"
        assert refusal() == f"distributed: error: --output {out}: {holder}; wait for it or choose another output"
        assert holder in refusal("--shard", "0/3")
        assert f"--output {out} (shard 0/2): another run (pid {os.getpid()})" in refusal("--shard", "0/2")
    finally:
        shard0.close()
    whole = Output(str(out))
    try:
        assert f"another run (pid {os.getpid()}) is writing it" in refusal("--shard", "1/2")
    finally:
        whole.close()
    (out / "part-s1of2-20260101T000000-abcdef-00000.parquet").write_bytes(b"rows of shard 1/2")
    assert refusal() == (f"distributed: error: --output {out} holds rows of --shard I/2 "
                         "(part-s1of2-20260101T000000-abcdef-00000.parquet); resume it with --shard I/2, "
                         "or use another --output")
    assert "holds rows of --shard I/2" in refusal("--shard", "0/4")
    Output(str(out), shard=(0, 2)).close()


def test_a_missing_model_is_one_line_from_the_worker_that_looked(ray_session: Any, photos: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.distributed import main

    missing = tmp_path / "nothing"
    status = main([str(photos), "--model", str(missing), "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 5  # the model's exit status survives Ray's task error
    assert err[-1] == f"distributed: error: {missing}: no such artifact folder or model file; run `make export`"


def test_without_ray_the_cli_says_how_to_install_it(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['ray'] = None; import runtime.distributed as d; "
            f"sys.exit(d.main([{str(tmp_path)!r}, '--output', {str(tmp_path / 'out')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 6, done.stderr
    assert "pip install -e '.[distributed]'" in done.stderr


@pytest.fixture(scope="module")
def ray_start_cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two `ray start` nodes of 1 CPU each, for the module (the test that kills one comes last)."""
    pytest.importorskip("ray.data", reason="Ray Data is not installed")
    from benchmarks.distributed_node_loss import RayStartCluster

    cluster = RayStartCluster(tmp_path_factory.mktemp("cluster"), cpus=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_two_shard_jobs_at_once_on_two_one_cpu_nodes_both_finish(ray_start_cluster: Any, tiny_artifact: Path,
                                                                  photos: Path, tmp_path: Path) -> None:
    """Each job's actor must leave its node room to decode: two jobs started together on 1-CPU nodes both
    end with their rows, every input once."""
    jobs = [subprocess.Popen([sys.executable, "-m", "runtime.distributed", str(photos), "--output", str(tmp_path / "out"),
                              "--model", str(tiny_artifact), "--backend", "ort-cpu", "--topk", "3", "--no-progress",
                              "--shard", f"{i}/2", "--address", ray_start_cluster.address],
                             env=ray_start_cluster.env, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
            for i in range(2)]
    errs = [job.communicate(timeout=300)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], "\n".join(e[-2000:] for e in errs)
    table = rows(tmp_path / "out")
    assert len(table) == table["path"].nunique() == len(images(photos))


def test_admission_queues_a_job_that_does_not_fit_beside_the_running_ones(ray_session: Any) -> None:
    """First come, first served: a job is admitted alone, or when the running jobs' actors and its own
    leave a CPU to decode; one that waits says why and stays in line; a job whose driver died (its lease
    gone) frees its room."""
    from runtime.distributed.admission import Admission, Claim
    from runtime.distributed.job import Counter

    ray = ray_session
    book = ray.remote(num_cpus=0)(Admission).remote()  # its own, not the cluster's named one
    a, b, c = (ray.remote(num_cpus=0)(Counter).remote() for _ in range(3))
    assert ray.get(book.admit.remote(Claim("a", 1.0, 0.0, "job a"), a)) is None
    assert ray.get(book.admit.remote(Claim("b", 0.5, 0.0, "job b"), b)) == (
        "1 running job(s) hold 1 CPUs for their actors, and this one needs 0.5 CPUs beside a CPU to decode, of 2 "
        "CPUs; running: job a")
    assert "; 1 job(s) ahead in line;" in ray.get(book.admit.remote(Claim("c", 0.0, 0.0, "job c"), c))
    ray.kill(a)  # job a's driver is gone, and its counter with it
    assert ray.get(book.admit.remote(Claim("c", 0.0, 0.0, "job c"), c)) is not None  # b came first
    assert ray.get(book.admit.remote(Claim("b", 0.5, 0.0, "job b"), b)) is None
    assert ray.get(book.admit.remote(Claim("c", 0.0, 0.0, "job c"), c)) is None  # 0.5 + 0 and a decoder fit in 2
    ray.get(book.release.remote("b"))
    for actor in (book, b, c):
        ray.kill(actor)


def test_a_job_that_cannot_fit_beside_a_running_one_queues_and_then_finishes(
        ray_start_cluster: Any, tiny_artifact: Path, photos: Path, big_photos: Path, tmp_path: Path) -> None:
    """Two jobs whose actors take a CPU each on two 1-CPU nodes cannot both run (no CPU would be left to
    decode): the second says it is queued, naming the first, and finishes once the first has ended."""
    import threading

    def job(inp: Path, out: str, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "runtime.distributed", str(inp), "--output", str(tmp_path / out),
                                 "--model", str(tiny_artifact), "--backend", "ort-cpu", "--topk", "3", "--no-progress",
                                 "--num-cpus-per-worker", "1", "--address", ray_start_cluster.address, *extra],
                                env=ray_start_cluster.env, stderr=subprocess.PIPE, text=True,
                                cwd=Path(__file__).parents[1])

    def lines(proc: subprocess.Popen[str], log: list[str], sign: str, seen: threading.Event) -> threading.Thread:
        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                log.append(line)
                if line.startswith(sign):
                    seen.set()
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        return reader

    long = tmp_path / "long"  # the big photo 600 times (links): a minute of decoding on the one CPU left to it
    long.mkdir()
    for i in range(600):
        os.link(images(big_photos)[0], long / f"{i:03d}.jpg")
    first_log: list[str] = []
    second_log: list[str] = []
    running, queued = threading.Event(), threading.Event()
    first = job(long, "first", "--rows-per-file", "8")
    second = None
    try:
        readers = [lines(first, first_log, "distributed: committed", running)]
        assert running.wait(180), "".join(first_log)[-3000:]
        second = job(photos, "second")
        readers.append(lines(second, second_log, "distributed: queued:", queued))
        assert queued.wait(180), "".join(first_log + second_log)[-3000:]
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130, "".join(first_log)[-3000:]
        assert second.wait(timeout=300) == 0, "".join(second_log)[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    for reader in readers:
        reader.join(timeout=30)
    text = "".join(second_log)
    assert "distributed: queued: 1 running job(s) hold 1 CPUs for their actors, and this one needs 1 CPUs beside a " \
           "CPU to decode, of 2 CPUs; running: `python -m runtime.distributed " in text, text[-3000:]
    assert "distributed: admitted: the job starts" in text
    table = rows(tmp_path / "second")
    assert len(table) == table["path"].nunique() == len(images(photos))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the raylet's process in /proc")
def test_a_raylet_killed_mid_job_leaves_exactly_one_row_per_input(ray_start_cluster: Any,
                                                                   tiny_artifact: Path, big_photos: Path,
                                                                   tmp_path: Path) -> None:
    """The documented two-node recipe with Ray's token authentication (1-CPU nodes), the job given
    `--address host:port`;
    once a part is committed the second node's raylet is SIGKILLed (a node crash, as the head sees it), and
    the job ends by itself, exit 0, with every input once."""
    import threading

    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, "-m", "runtime.distributed", str(big_photos), "--output", str(out),
                            "--model", str(tiny_artifact), "--backend", "ort-cpu", "--topk", "3", "--no-progress",
                            "--rows-per-file", "8", "--address", ray_start_cluster.address],
                           env=ray_start_cluster.env, stderr=subprocess.PIPE, text=True,
                           cwd=Path(__file__).parents[1])
    log: list[str] = []
    killed = threading.Event()

    def read() -> None:
        assert job.stderr is not None
        for line in job.stderr:
            log.append(line)
            if line.startswith("distributed: committed") and not killed.is_set():
                os.kill(ray_start_cluster.raylet_of(1), signal.SIGKILL)
                killed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        status = job.wait(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
    reader.join(timeout=30)
    text = "".join(log)
    assert killed.is_set(), text[-3000:]
    assert status == 0, text[-3000:]
    assert "joined the Ray cluster at 127.0.0.1:" in text and "(2 CPUs" in text
    assert f"{BIG_COPIES} images, {BIG_COPIES} predicted" in text
    table = rows(out)
    assert len(table) == table["path"].nunique() == BIG_COPIES
    assert sorted(table["path"]) == [str(f) for f in images(big_photos)]


def test_the_stall_watchdog_interrupts_a_job_that_makes_no_progress() -> None:
    """The watchdog reads the actors' counter; a counter that never moves ends the wait with the stall reason."""
    import time

    from runtime.distributed.job import Watchdog
    from runtime.errors import Interrupted, signals_raise_interrupted

    class Stuck:  # the counter actor's handle: `get.remote()` is a reference that `ray.get` resolves
        class get:  # noqa: N801
            @staticmethod
            def remote() -> tuple[int, int]:
                return 40, 7  # listed to do, classified

    class NoRay:
        def get(self, ref: tuple[int, int], timeout: float) -> tuple[int, int]:
            return ref

    class Bar:
        disable = False  # a bar shows the progress: the watchdog does not say it

        def __init__(self) -> None:
            self.n, self.total = 0, None

        def update(self, n: int) -> None:
            self.n += n

        def refresh(self) -> None:
            pass

    watch, bar = Watchdog(NoRay(), Stuck(), stall_s=0.5, poll_s=0.05), Bar()
    # The CLI's own handler, as in a job: a process started in the background (`cmd &`) inherits SIGINT ignored.
    with pytest.raises(Interrupted), signals_raise_interrupted(), watch.running(bar):
        time.sleep(60)  # the driver waiting inside Ray for a row that never comes
    assert (bar.n, bar.total) == (7, 40) and watch.stalled is not None
    assert watch.stalled.startswith("no input classified for 0.5 s (")


def test_the_watchdog_says_when_a_node_leaves_and_ends_a_job_no_node_can_run() -> None:
    """A lost node is said in one line; when the nodes left cannot hold an actor and a decode task, the job
    ends after `room_s` with what is missing (not after --stall-timeout)."""
    import threading

    from runtime.distributed.job import Need, Watchdog
    from runtime.errors import Interrupted, signals_raise_interrupted

    head = {"NodeID": "aaaa" * 14, "Alive": True, "Resources": {"CPU": 1.0}}
    worker = {"NodeID": "bbbb" * 14, "Alive": True, "Resources": {"CPU": 2.0}}
    cluster = [head, worker]
    lost = threading.Event()

    class Counter:
        class get:  # noqa: N801
            @staticmethod
            def remote() -> tuple[int, int]:
                return 40, 3

    class Ray:
        def get(self, ref: tuple[int, int], timeout: float) -> tuple[int, int]:
            return ref

        def nodes(self) -> list[dict[str, Any]]:
            return list(cluster)

    class Bar:
        disable = True  # no bar: the watchdog says where the job stands
        lines: list[str] = []
        total = None

        def refresh(self) -> None:
            pass

        def update(self, n: int) -> None:
            if n and not lost.is_set():
                cluster.remove(worker)  # the worker's raylet is gone, as the GCS tells it
                lost.set()

        def write(self, line: str, file: Any = None) -> None:
            self.lines.append(line)

    watch = Watchdog(Ray(), Counter(), stall_s=600, poll_s=0.05, need=Need(cpus=0.5), room_s=0.5)
    with pytest.raises(Interrupted), signals_raise_interrupted(), watch.running(Bar()):
        threading.Event().wait(60)  # the driver waiting inside Ray
    assert Bar.lines[0] == "distributed: lost node bbbbbbbbbbbb (2 CPUs); its tasks and actor move to the 1 nodes left"
    assert watch.stalled == ("no node can run this job any more (an actor needs 0.5 CPUs and a decode task 1 CPU; "
                             "the 1 nodes alive have 1 CPUs, for 0.5 s)")
    assert Need(cpus=0.5).missing([{"CPU": 2.0}]) is None and Need(cpus=0).missing([{"CPU": 1.0}]) is None
    assert Need(cpus=1, gpus=1).missing([{"CPU": 8.0}, {"CPU": 1.0, "GPU": 1.0}]) is None  # actor + decoder on two
