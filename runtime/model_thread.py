"""One thread for all of a process's model work: loading, timing, forward passes, sampling.

torch's CPU kernels run in OpenMP parallel regions, and GNU OpenMP gives every thread
that opens one its own team of worker threads. Between regions a team's workers spin
briefly and then sleep, but only while the process has no more OpenMP-managed threads
than CPUs; past that every team wakes its workers through the kernel on every region.
So once a second thread has run a parallel kernel, every forward in the process pays
that wake-up on each of its hundreds of regions: measured on 2 vCPUs, SmolLM2-135M's
batch-1 forward took 23-25 ms when one thread did all the work and 47-55 ms after a
second thread had run one (the serving loop keeps the event loop on the main thread and
the forward on a worker, which is exactly that). Routing the model work of a process
through this single thread keeps one team.

`call` runs a function there and waits (inline when already there); `run` awaits it
from an event loop, which keeps serving meanwhile (torch releases the GIL).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

_local = threading.local()


def _mark() -> None:
    _local.is_model_thread = True


_executor = ThreadPoolExecutor(1, thread_name_prefix="smartspec-model", initializer=_mark)


def on_model_thread() -> bool:
    return getattr(_local, "is_model_thread", False)


def call(fn, *args, **kwargs):
    """fn(*args, **kwargs) on the model thread; the caller waits."""
    if on_model_thread():
        return fn(*args, **kwargs)
    return _executor.submit(fn, *args, **kwargs).result()


async def run(fn, *args, **kwargs):
    """fn(*args, **kwargs) on the model thread, awaited: the event loop goes on meanwhile."""
    if on_model_thread():
        return fn(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_executor, functools.partial(fn, *args, **kwargs))
