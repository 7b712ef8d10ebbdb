"""`python -m runtime.distributed`: classify millions of images on a Ray cluster, with the same backends and answers.

    python -m runtime.distributed images/ --model artifacts/deit-small-distilled-patch16-224 --output predictions/
    python -m runtime.distributed 's3://bucket/photos/**/*.jpg' --output s3://bucket/predictions/ --address auto
    python -m runtime.distributed paths.parquet --output predictions/ --backend ort-cuda --num-gpus-per-worker 1

INPUT is a folder (searched recursively), a glob, or a .parquet / text list of paths and URIs (local or
anything pyarrow.fs reads: s3://, gs://, ...). Without --address a local Ray starts on this machine;
with one, the job joins a running cluster (`ray start --head`, KubeRay). Every node needs this
package installed and the model at the same path (local inputs too; URIs are read where they run).

The work is one Ray Data pipeline, streamed, so memory stays bounded whatever the input count:
  1. the driver lists the inputs (distinct paths, as Arrow blocks of paths) and leaves out those the
     output already holds (resume);
  2. a CPU task stage decodes and preprocesses each file with runtime.preprocess (through
     runtime.classify's loader; a URI's bytes are read with pyarrow.fs and decoded through the same
     loader); a file that cannot be read becomes a row with an `error`;
  3. an actor pool runs the backend, one per GPU (or one per node for CPU backends), and the
     top-k of runtime.classify;
  4. rows stream back to the driver, the only writer, which commits them in Parquet (or JSON
     lines) part files, each written whole under a `_tmp-` name and then renamed.
Exactly once: Ray retries the tasks of a killed actor on its restart, and a task's rows count only
once it completed, so a lost worker costs time, never a lost or doubled row; each input is in
exactly one committed part, and a re-run with the same --output skips the paths its parts hold.
Ctrl-C (or SIGTERM) commits the rows that arrived and exits 130 (143). A run counts only its own
inputs in the output, so one huge list can also be split into several runs sharing one --output (the
driver holds its list as Arrow, about 100 bytes a path). Exit status as runtime.infer: 0 all
predicted, 1 some files failed, 2 usage, 5 model, 6 unavailable (Ray missing too).
"""

from runtime.distributed.cli import main
from runtime.distributed.job import Job, JobOptions, connect, import_ray
from runtime.distributed.sources import list_inputs
from runtime.distributed.writer import PartWriter

__all__ = ["Job", "JobOptions", "PartWriter", "connect", "import_ray", "list_inputs", "main"]
