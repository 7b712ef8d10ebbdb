"""`python -m runtime.serve --address ...`: the same protocol server as Ray Serve replicas.

Each replica is the one-process server's Starlette application (`runtime.serve.build_app`) over its own
predictor and dynamic batcher; Ray Serve's HTTP proxy listens on --host/--port and spreads requests over
the replicas. A replica whose process dies is restarted by Ray Serve; a request it held is answered with
an error (Ray Serve's 500), never dropped without an answer. SIGTERM / Ctrl-C delete the application
(replicas finish the requests they hold, up to 30 s) and the command exits 143 / 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from runtime.artifact import SYNTHETIC_WARNING
from runtime.cli import settle_model
from runtime.predictor import open_predictor
from runtime.cpuinfo import usable_cores
from runtime.errors import Interrupted, ModelError, Unavailable
from runtime.serve import PROG, ModelServer, banner, bind, build_app, server_options

APP = "deit-serve"
GRACE_S = 30.0  # what the one-process server gives a drain (uvicorn's timeout_graceful_shutdown)


def import_serve() -> Any:
    try:
        from ray import serve
    except ImportError as err:
        raise Unavailable(f"--address needs Ray Serve: pip install -e '.[distributed]' ({err})") from None
    return serve


class Replica:
    """One Ray Serve replica: the model server of `runtime.serve`, built where Ray placed the replica."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.predictor = open_predictor(settle_model(args, PROG))
        self.backend = self.predictor.backend.__enter__()
        self.model = ModelServer(self.predictor, server_options(args, self.predictor))

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self.model)

    def __del__(self) -> None:
        if hasattr(self, "model"):  # not when the constructor failed
            self.model.close()
            self.backend.__exit__(None, None, None)


def deployment(args: argparse.Namespace) -> Any:
    """The Ray Serve application: --replicas copies of `Replica`, each sent up to --max-queue-size requests at
    once (what its batcher may hold); Ray Serve's proxy queues as many more, then answers 503 itself."""
    serve = import_serve()
    ingress = serve.deployment(name="oip", num_replicas=args.replicas, max_ongoing_requests=args.max_queue_size,
                               max_queued_requests=args.max_queue_size,
                               ray_actor_options={"num_cpus": args.threads or 1}, max_constructor_retry_count=2,
                               graceful_shutdown_timeout_s=GRACE_S)(serve.ingress()(Replica))
    return ingress.bind(args)


@contextlib.contextmanager
def ray_session(address: str) -> Iterator[bool]:
    """Join the cluster at `address`, or for 'local' start a Ray of our own (even beside a `ray start` cluster on
    this host), stopped on the way out; yields whether this process started it."""
    import ray

    started = address == "local"
    try:
        options = {"num_cpus": usable_cores(), "include_dashboard": False, "object_store_memory": 512 << 20} if started else {}
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, **options)
        yield started
    finally:
        if started:
            ray.shutdown()


def proxy_port(host: str, port: int) -> int:
    """--port checked free on this host (a taken one is a usage error now, not a proxy that never starts), or for
    0 a port free now: Ray Serve's proxy cannot report the one it was given."""
    with bind(host, port) as sock:
        return sock.getsockname()[1]


def run_on_ray(args: argparse.Namespace) -> int:
    """Start (or join) Ray, run the application behind Ray Serve's proxy, wait for SIGTERM / Ctrl-C."""
    port = args.port if args.address.startswith("ray://") else proxy_port(args.host, args.port)
    predictor = open_predictor(settle_model(args, PROG))  # the flags and the artifact checked here, before Ray starts
    if predictor.backend.meta.synthetic:
        print(SYNTHETIC_WARNING, file=sys.stderr)
    opts = server_options(args, predictor)
    serve = import_serve()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines repeat what the banner says
    stop = threading.Event()
    signum: list[int] = []
    stopped = False
    with ray_session(args.address) as started:
        serve.start(http_options={"host": args.host, "port": port})
        try:
            try:
                serve.run(deployment(args), name=APP, route_prefix="/", blocking=False)
            except RuntimeError as err:  # a replica could not start: its constructor's error is in the message
                raise ModelError(f"the Ray Serve replicas did not start: {str(err).strip().splitlines()[-1]}") from None

            def handler(sig: int, frame: object) -> None:
                signum.append(sig)
                stop.set()

            previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
            where = (f", {args.replicas} Ray Serve replica{'s' if args.replicas > 1 else ''} "
                     f"({'a local Ray' if started else 'Ray at ' + args.address})")
            print(banner(opts, predictor, args.host, port, where), flush=True)
            try:
                while not stop.wait(1.0):
                    pass
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)
        finally:  # bounded: with the local Ray's own processes gone (a terminal's Ctrl-C reaches them too) these would hang
            stopped = within(GRACE_S + 10, lambda: serve.delete(APP))
            if stopped and (started or not serve.status().applications):
                within(GRACE_S, serve.shutdown)
    if not stopped:
        raise Interrupted(signum[0] if signum else signal.SIGINT, "Ray did not confirm that the replicas stopped")
    raise Interrupted(signum[0] if signum else signal.SIGINT, "the replicas answered the requests they held and stopped")


def within(seconds: float, call: Callable[[], object]) -> bool:
    """Run `call` in a daemon thread; False when it has not returned after `seconds` (it is then left behind)."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()
