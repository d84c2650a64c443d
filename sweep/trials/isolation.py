"""Run a function in a child process under a wall-clock timeout and an address-space cap.

A crash, hang, out-of-memory or kill ends the child, not the sweep: the caller gets
``TrialCrashed`` with the reason. The child may ask the parent questions on the way (the
sweep's pruning decision after the early perplexity) through ``ask``.

Children come from a forkserver (single-threaded, modules preloaded), not a fork of the sweep
itself: the sweep runs Optuna's heartbeat thread, and forking a threaded process can deadlock.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import resource
import signal
import threading
import time
from typing import Any, Callable, Optional

PRELOAD = ["sweep.trial_work"]  # imported once by the forkserver: llama.cpp, numpy, the evals


class TrialCrashed(Exception):
    """The child failed: an exception in it, a timeout, or its death."""


@functools.cache
def _context():
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        preload = list(PRELOAD)
        if multiprocessing.get_start_method(allow_none=True) == "loky":
            # a joblib (loky) worker: children are told to use "loky", which must then be known to them
            preload.append("joblib.externals.loky.backend.context")
        context.set_forkserver_preload(preload)
        return context
    return multiprocessing.get_context("spawn")


def _die_with_parent() -> None:
    """Linux: the child is killed when its parent dies (the forkserver, which exits with the sweep),
    so a sweep killed with -9 leaves no trial running behind it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(conn, fn, args, max_memory: Optional[int]) -> None:
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())  # tqdm's default lock is a semaphore this short-lived child would leak
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the sweep's: it stops after this trial
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so is SIGTERM: the sweep fails this trial and kills the child
    if max_memory:
        resource.setrlimit(resource.RLIMIT_AS, (max_memory, max_memory))

    def ask(question: Any) -> Any:
        conn.send(("ask", question))
        return conn.recv()

    try:
        result = fn(*args, ask)
        message = ("done", result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    except (BrokenPipeError, EOFError):  # the sweep is gone (killed): nobody to tell, nothing to print
        os._exit(1)
    except MemoryError:
        cap = f" (cap {max_memory / 2**30:.1f} GiB: trial.max_memory)" if max_memory else ""
        message = ("error", f"out of memory{cap}")
    except BaseException as err:  # noqa: BLE001 - everything the child meets is the trial's failure
        message = ("error", f"{type(err).__name__}: {err}")
    try:
        conn.send(message)
    except (BrokenPipeError, EOFError):
        os._exit(1)
    except Exception as err:  # noqa: BLE001 - a result that cannot be sent (pickled) fails the trial
        conn.send(("error", f"{type(err).__name__}: {err}"))


def _death(exitcode: Optional[int], max_memory: Optional[int]) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if name == "SIGKILL" else ""
        hint = hint or (" (out of memory? allocation under trial.max_memory failed)" if name == "SIGABRT" and max_memory else "")
        return f"child process died: {name}{hint}"
    return f"child process exited with status {exitcode} without a result"


def run_isolated(fn: Callable, args: tuple, answer: Callable[[Any], Any], timeout: Optional[float], max_memory: Optional[int]) -> tuple[Any, float]:
    """``fn(*args, ask)`` in a child; returns (its result, the child's peak RSS in MiB)."""
    context = _context()
    parent, child = context.Pipe()
    process = context.Process(target=_child, args=(child, fn, args, max_memory), daemon=True)
    process.start()
    child.close()
    deadline = time.monotonic() + timeout if timeout else None
    try:
        while True:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                raise TrialCrashed(f"timed out after {timeout:.0f} s (trial.timeout)")
            if parent.poll(wait):
                try:
                    message = parent.recv()
                except EOFError:
                    process.join(5)
                    raise TrialCrashed(_death(process.exitcode, max_memory)) from None
                if message[0] == "ask":
                    parent.send(answer(message[1]))
                elif message[0] == "done":
                    return message[1], message[2]
                else:
                    raise TrialCrashed(message[1])
            elif not process.is_alive():
                raise TrialCrashed(_death(process.exitcode, max_memory))
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        parent.close()
