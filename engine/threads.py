"""How many CPU threads a process of the studio computes with: the one policy for trainer ranks, the
inference worker and in-process generation (the demo CLI).

Why: the studio's processes share the machine's cores with each other. torch's default (one thread per
core in every process) oversubscribes them as soon as two processes compute at once, and oversubscribed
OpenMP threads spin and stall: on a busy 2-core machine the same demo generation took 15.8 s with 2
threads against 2.8 s with one, and a demo trainer forward 8.6 s against 1.0 s. So each compute process
gets its share of the cores, leaving one core for the app (and the other computing process) where the
machine has more than two. OMP_NUM_THREADS, when set, wins (a person or a cluster script chose it).

Kept free of torch at import; `apply_thread_policy` imports it.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

log = logging.getLogger(__name__)

Role = Literal["trainer", "inference"]
# CPU-heavy processes that may compute at once besides a trainer's ranks: one inference worker.
_INFERENCE_SHARE = 2


def cpu_threads(role: Role, *, ranks: int = 1, cores: int | None = None) -> int:
    """Threads for one process of `role`: a trainer rank's share of the cores among `ranks` local ranks
    (one core kept for the app), or an inference process's share beside one training job."""
    cores = cores or os.cpu_count() or 1
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    if role == "trainer":
        return max(1, cores // max(ranks, 1) - 1)
    return max(1, (cores - 1) // _INFERENCE_SHARE) if cores > 2 else 1


def apply_thread_policy(role: Role, *, ranks: int = 1) -> int:
    """Set torch's intra-op threads (and one inter-op thread: nothing here runs ops concurrently) for
    this process; returns the intra-op count."""
    import torch

    threads = cpu_threads(role, ranks=ranks)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op; the default then stays
        log.debug("inter-op threads already in use; left at %d", torch.get_num_interop_threads())
    log.info("%s process computes with %d CPU thread(s) of %s cores", role, threads, os.cpu_count())
    return threads
