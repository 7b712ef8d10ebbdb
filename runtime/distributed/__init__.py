"""`python -m runtime.distributed`: classify millions of images on a Ray cluster, with the same backends and answers.

    python -m runtime.distributed images/ --model artifacts/deit-small-distilled-patch16-224 --output predictions/
    python -m runtime.distributed 's3://bucket/photos/**/*.jpg' --output s3://bucket/predictions/ --address auto
    python -m runtime.distributed paths.parquet --output predictions/ --backend ort-cuda --num-gpus-per-worker 1

INPUT is a folder (searched recursively), a glob, or a .parquet / text list of paths and URIs (local or
anything pyarrow.fs reads: s3://, gs://, ...). Without --address a local Ray starts on this machine;
with one, the job joins a running cluster (`ray start --head`, KubeRay). Every node needs this
package installed and the model at the same path (local inputs too; URIs are read where they run).

One Ray Data pipeline, streamed from the first input; the driver holds neither the listing nor the
rows (docs/distributed.md): listing tasks, claims against two ledger actors (each input once, those
the output holds left out), decode tasks feeding an autoscaling pool of inference actors
(runtime.predictor's records), write tasks writing whole part files on the workers, and the driver
committing each by a rename. Jobs that cannot fit beside the running ones on a cluster queue. `_manifest.json` records the
model's sha256, backend, precision and top-k; a run with other settings into the same output is
refused, and so is a second job while one holds the output's lock. Exactly once: a part counts only
once committed, so a lost node or actor costs time, never a lost or doubled row; a re-run with the
same --output resumes. `--shard I/N` runs the inputs of shard I (a stable hash of each path) of N
jobs, which run side by side into one output. Ctrl-C (or SIGTERM) keeps the committed parts and
exits 130 (143). A lost node's tasks and actor move to the nodes left; a cluster where no node can
run the job any more ends it within a minute, and no progress for --stall-timeout too: exit 7 with
what is missing and the command that resumes.
Exit status as runtime.infer: 0 all predicted, 1 some files failed, 2 usage, 5 model, 6 unavailable
(Ray missing too), 7 failed or stalled.

    package layout: sources (INPUT -> listing, decoding), ledger (claims), admission (the queue),
    writer (parts, manifest), job (the pipeline), cli
"""

from runtime.distributed.cli import main
from runtime.distributed.job import Job, JobOptions, connect, import_ray, session
from runtime.distributed.sources import list_inputs

__all__ = ["Job", "JobOptions", "connect", "import_ray", "list_inputs", "main", "session"]
