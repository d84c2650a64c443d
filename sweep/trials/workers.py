"""Several workers of one study on this machine, each on its own GPUs.

``sweep.workers`` local worker processes join the sweep's study, which is the only coordination
(as for workers on several machines: plans claimed through the storage, a dead worker's trial
failed by the heartbeat and retried by another). ``sweep.gpus`` (``all``, a count, or a list of
indices) is split into groups of ``sweep.gpus_per_worker``; worker ``i`` runs on group ``i mod
groups``: its model on the group's first GPU, or spread over the group with ``backend.device_map``.
``sweep.workers`` defaults to one worker per group; workers without GPUs split the CPU cores.

``launch`` starts each worker as ``selfmerge sweep ... sweep.worker=i``, a process of its own: one
that dies (an OOM kill) leaves the others running, which a joblib pool would not (it stops every job
when one of its processes dies). A multirun the user starts (``-m hydra/launcher=joblib ...``) gets
the same pinning: its job number is the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any, Optional, Sequence

from merge_core.errors import SelfMergeError

ALL = "all"


def visible_gpus() -> list[int]:
    """The CUDA devices torch sees (CUDA_VISIBLE_DEVICES applies), numbered as torch numbers them."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def gpu_groups(gpus: Any, per_worker: int, visible: Sequence[int]) -> list[tuple[int, ...]]:
    """``sweep.gpus`` as one tuple of GPU indices per worker: ``all`` the visible GPUs, an int the
    first that many, a list those; none (``None``) when the sweep does not pin GPUs."""
    if gpus is None:
        return []
    have = f"torch sees {len(visible)} GPU{'s' * (len(visible) != 1)}" + (
        f" ({_ids(visible)})" if visible else ""
    )
    if gpus == ALL:
        chosen = list(visible)
    elif isinstance(gpus, int) and not isinstance(gpus, bool):
        if not 1 <= gpus <= len(visible):
            raise SelfMergeError(f"sweep.gpus={gpus} asks for {gpus} GPUs but {have}")
        chosen = list(visible[:gpus])
    elif (
        isinstance(gpus, (list, tuple))
        and gpus
        and all(isinstance(g, int) and not isinstance(g, bool) for g in gpus)
    ):
        unknown = [g for g in gpus if g not in visible]
        if unknown:
            raise SelfMergeError(f"sweep.gpus={list(gpus)}: GPU {_ids(unknown)} is not visible; {have}")
        if len(set(gpus)) != len(gpus):
            raise SelfMergeError(f"sweep.gpus={list(gpus)} names a GPU twice")
        chosen = list(gpus)
    else:
        raise SelfMergeError(
            f"sweep.gpus={gpus!r} is not a GPU choice: use all, a count, or a list of indices like [0,2]"
        )
    if not chosen:
        raise SelfMergeError(f"sweep.gpus={gpus} but {have}: leave sweep.gpus unset to run on backend.device")
    if per_worker < 1 or len(chosen) % per_worker:
        raise SelfMergeError(
            f"sweep.gpus_per_worker={per_worker} does not divide the {len(chosen)} GPUs of sweep.gpus={gpus}"
        )
    return [tuple(chosen[i : i + per_worker]) for i in range(0, len(chosen), per_worker)]


def groups(run) -> list[tuple[int, ...]]:
    """The GPU groups of a sweep's ``sweep`` section (RunConfig): torch is asked only when it pins GPUs."""
    return gpu_groups(run.gpus, run.gpus_per_worker, visible_gpus() if run.gpus is not None else [])


def n_workers(workers: Optional[int], groups: Sequence[tuple[int, ...]]) -> int:
    """Worker processes to start: ``sweep.workers``, else one per GPU group, else one."""
    return workers if workers is not None else max(1, len(groups))


def gpus_of(worker: Optional[int], groups: Sequence[tuple[int, ...]]) -> Optional[tuple[int, ...]]:
    """The GPUs of worker ``worker`` (0 when it is the only one); None when GPUs are not pinned."""
    if not groups:
        return None
    return groups[(worker or 0) % len(groups)]


def launch(overrides: Sequence[str], count: int, split_cores: bool = False) -> dict[int, int]:
    """Run ``count`` workers of this sweep, ``selfmerge sweep OVERRIDES sweep.worker=i``, until all
    have ended: {worker: exit status}. They run in sessions of their own, so a Ctrl-C or SIGTERM
    reaches them once, from here: each then stops as a sweep does (after, or failing and retrying,
    its running trial). ``split_cores`` (workers on the CPU): worker i may use cores i, i + count, ...
    (llama.cpp and torch then run that many threads, not every core each)."""
    command = [sys.executable, "-m", "sweep.cli", "sweep", *overrides]
    cores = sorted(os.sched_getaffinity(0))
    shares = [cores[i::count] if split_cores and len(cores) >= count else None for i in range(count)]
    procs = {
        i: subprocess.Popen([*command, f"sweep.worker={i}"], start_new_session=True,
                            preexec_fn=(lambda share=share: os.sched_setaffinity(0, share)) if share else None)
        for i, share in enumerate(shares)
    }  # fmt: skip

    def pass_on(signum, frame) -> None:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {signum: signal.signal(signum, pass_on) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return {i: proc.wait() for i, proc in procs.items()}
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exit_status(statuses: dict[int, int]) -> int:
    """The launcher's status: 0 when every worker ended well, else the first failure's (a signal
    ``s`` as 128 + s, as a shell reports it)."""
    failed = [status for status in statuses.values() if status != 0]
    return 0 if not failed else (128 - failed[0] if failed[0] < 0 else failed[0])


def _ids(gpus: Sequence[int]) -> str:
    return ", ".join(str(g) for g in gpus)
