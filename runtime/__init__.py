"""What a deployment needs: three runners over one library.

Runners (each a package, a `python -m` command and a `deit-*` script):
    infer/         a folder of images -> records on stdout or a file (resumable)
    distributed/   the same across a Ray cluster -> Parquet / JSON-lines parts
    serve/         the same behind the Open Inference Protocol (HTTP and gRPC), with metrics

The library they share, top down:
    cli, console, errors        the flags every runner shares, progress bars, the one exit policy
    classify, paths             decode-ahead batching with the run's summary; output files and their locks
    predictor                   one way to open a model (`settle`, `open_predictor`) and batch -> top-k records
    decode, inputs, preprocess  inputs -> pixels: listing, decoding (limits, budget, `DecodeFailure`), the spec's math
    artifact, labels, checkpoints   what an artifact folder holds; the published DeiT checkpoints
    backends/                   one module per backend, the registry, `auto` and the timing it measures with
    cpuinfo                     the cores and instruction sets this machine has

Nothing here imports `export`, `calibration` or `benchmarks`.
"""

__version__ = "0.2.0"
