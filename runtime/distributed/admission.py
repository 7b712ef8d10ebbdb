"""Jobs that share a cluster start only when they fit beside each other: otherwise they queue.

Every job's actors hold their CPUs (and GPUs) for the whole job, and its decode tasks need one CPU
more to move. Two jobs whose actors together take every CPU would both wait forever for a decoder;
so a job asks one small actor per cluster (named, on the head node) for admission first. It admits a
job when the actors of every admitted job, at their largest pool, plus the new one's, leave a CPU for
decoding (and the GPUs suffice), or when the cluster runs no other job; otherwise the job waits in
line, saying so, and starts when one ends. An admitted job's lease is its progress counter, an actor
that dies with its driver: a job killed without releasing its admission frees it all the same.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

NAME, NAMESPACE = "deit-distributed-admission", "deit"
POLL_S = 2.0


@dataclass(frozen=True)
class Claim:
    """What a job's actors hold at most: `cpus` and `gpus` in all (each actor's reservation times the pool's size)."""

    job: str
    cpus: float
    gpus: float
    command: str


class Admission:
    """The cluster's admitted jobs (a Ray actor): their claims and leases, first come, first served."""

    def __init__(self) -> None:
        self.admitted: dict[str, tuple[Claim, Any]] = {}
        self.waiting: dict[str, tuple[Claim, Any]] = {}  # in the order they came

    def admit(self, claim: Claim, lease: Any) -> str | None:
        """None when `claim` is admitted now; else why it waits, in words."""
        import ray

        self._forget_dead()
        if claim.job in self.admitted:
            return None
        self.waiting.setdefault(claim.job, (claim, lease))
        total = ray.cluster_resources()
        cpus = sum(c.cpus for c, _ in self.admitted.values()) + claim.cpus
        gpus = sum(c.gpus for c, _ in self.admitted.values()) + claim.gpus
        ahead = list(self.waiting).index(claim.job)
        if not ahead and (not self.admitted or (cpus + 1 <= total.get("CPU", 0) and gpus <= total.get("GPU", 0))):
            self.admitted[claim.job] = self.waiting.pop(claim.job)
            return None
        return (f"{len(self.admitted)} running job(s) hold {cpus - claim.cpus:g} CPUs"
                + (f" and {gpus - claim.gpus:g} GPUs" if gpus else "")
                + f" for their actors, and this one needs {claim.cpus:g} CPUs" + (f" and {claim.gpus:g} GPUs" if claim.gpus else "")
                + f" beside a CPU to decode, of {total.get('CPU', 0):g} CPUs" + (f" and {total.get('GPU', 0):g} GPUs" if gpus else "")
                + (f"; {ahead} job(s) ahead in line" if ahead else "")
                + f"; running: {'; '.join(c.command for c, _ in self.admitted.values())}")

    def release(self, job: str) -> None:
        self.admitted.pop(job, None)
        self.waiting.pop(job, None)

    def _forget_dead(self) -> None:
        """Drop the jobs whose lease (their driver's counter) is gone, admitted or waiting."""
        import ray

        for jobs in (self.admitted, self.waiting):
            for job, (_, lease) in list(jobs.items()):
                try:
                    ray.get(lease.get.remote(), timeout=10)
                except Exception:  # dead, or its node is: that job is over
                    del jobs[job]


def wait_for_admission(ray: Any, claim: Claim, lease: Any, say_s: float = 30.0) -> Any:
    """Block until the cluster admits `claim` (saying once why it waits, then every `say_s`); the admission
    actor, for `release`. Ctrl-C ends the wait (the job then leaves the line: its lease dies with it)."""
    admission = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(Admission).options(
        name=NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()
    said = None
    while True:
        why = ray.get(admission.admit.remote(claim, lease), timeout=60)
        if why is None:
            if said is not None:
                print("distributed: admitted: the job starts", file=sys.stderr)
            return admission
        now = time.monotonic()
        if said is None or now - said >= say_s:
            print(f"distributed: queued: {why}; the job starts when there is room", file=sys.stderr)
            said = now
        time.sleep(POLL_S)
