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


def test_a_cpu_actor_threads_split_its_node_between_the_actors_that_fit() -> None:
    from runtime.distributed.job import actor_threads

    assert actor_threads(2, 1, cores=2) == 2  # one actor beside one decoder: the node's two cores, not the one reserved
    assert actor_threads(8, 4, cores=8) == 8
    assert actor_threads(8, 2, cores=8) == 2  # three actors of 2 CPUs fit beside a decoder
    assert actor_threads(16, 4, cores=4) == 1  # Ray told 16 CPUs on 4 cores: three actors share the 4
    assert actor_threads(1, 0.5, cores=1) == 1


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
    summary = run_job(SAMPLE_DIR, tmp_path / "out", tiny_artifact)
    table = rows(tmp_path / "out")
    assert summary.images == summary.predicted == len(files) == len(table) == table["path"].nunique()
    assert_same_answers(table, reference(tiny_artifact, files))
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
    from runtime.distributed.job import job_shard
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


NODE_LOSS = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from runtime.distributed import Job, JobOptions, connect

inp, out, artifact = sys.argv[1:4]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 256 * 2**20})
worker = cluster.add_node(num_cpus=2, object_store_memory=256 * 2**20)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
connect()
removed = []

def remove_worker_on_first_part(part):
    if not removed:  # a part is committed: the job is mid-run on both nodes
        cluster.remove_node(worker)
    removed.append(part.rows)

opts = JobOptions(backend="ort-cpu", batch_size=8, topk=3, progress=False, rows_per_file=8, stall_s=60)
summary = Job(inp, out, artifact, opts).run(on_part=remove_worker_on_first_part)
print(json.dumps({"parts_after": len(removed) - 1, "images": summary.images, "predicted": summary.predicted,
                  "alive": len([n for n in ray.nodes() if n["Alive"]])}))
ray.shutdown()
cluster.shutdown()
"""


def test_a_node_lost_mid_job_leaves_exactly_one_row_per_input(tiny_artifact: Path, big_photos: Path,
                                                               tmp_path: Path) -> None:
    """Two raylets (ray.cluster_utils.Cluster, in a process of its own); the second is removed once the
    first part is committed, and the job ends on the head alone with every input once."""
    pytest.importorskip("ray.data", reason="Ray Data is not installed")
    import json

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", NODE_LOSS, str(big_photos), str(out), str(tiny_artifact)],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["parts_after"] > 0 and result["alive"] == 1  # the job went on after the node was gone
    assert result["images"] == result["predicted"] == BIG_COPIES
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
            def remote() -> int:
                return 7

    class NoRay:
        def get(self, ref: int, timeout: float) -> int:
            return ref

    class Bar:
        def __init__(self) -> None:
            self.n = 0

        def update(self, n: int) -> None:
            self.n += n

    watch, bar = Watchdog(NoRay(), Stuck(), stall_s=0.5, poll_s=0.05), Bar()
    # The CLI's own handler, as in a job: a process started in the background (`cmd &`) inherits SIGINT ignored.
    with pytest.raises(Interrupted), signals_raise_interrupted(), watch.running(bar):
        time.sleep(60)  # the driver waiting inside Ray for a row that never comes
    assert bar.n == 7 and watch.stalled is not None
    assert watch.stalled.startswith("no input classified for 0.5 s (")
