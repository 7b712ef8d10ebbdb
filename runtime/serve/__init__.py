"""The Open Inference Protocol server (`python -m runtime.serve`), in layers that import only downwards:

- `failures`: why a request is refused, one class per reason, and the tables of their HTTP and gRPC statuses;
- `protocol`: the wire format (KServe v2 / Triton JSON and binary tensors), parsed and encoded;
- `batching`: the dynamic batcher;
- `metrics`: Prometheus metrics with Triton's names, read from the data plane's counts;
- `options`: the flags as the data plane takes them, and the ready line;
- `dataplane`: one model behind the protocol (admission, decoding, batching, statistics, metrics): what
  every endpoint calls, so each gets the same limits, errors and statistics;
- `rest`: the HTTP endpoint (Starlette) over a data plane;
- `server`: the process (uvicorn with deadlines and limits on every connection, its signals and drain);
- `grpc`: the gRPC endpoint (KServe v2 / Triton's service) over the same data plane, beside the HTTP server;
- `ray_serve`: the same HTTP endpoint as Ray Serve replicas;
- `cli`: the command line.
"""

from runtime.serve.cli import main

__all__ = ["main"]
