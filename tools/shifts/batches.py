"""Shifted batches produced in a worker process, so shifting overlaps with model inference."""

from __future__ import annotations

import multiprocessing
import queue as queue_module
from collections.abc import Iterator
from functools import lru_cache
from multiprocessing import shared_memory

import numpy as np

from tools.shifts.base import ShiftError
from tools.shifts.registry import _check_seed, prepare_shift, validate_shift

# Seconds between checks of the worker's liveness while the consumer waits for a batch.
_POLL_SECONDS = 0.2
# Seconds the consumer waits for a stopped worker to exit before terminating it.
_EXIT_WAIT_SECONDS = 2.0


@lru_cache(maxsize=1)
def _context() -> multiprocessing.context.BaseContext:
    """Start workers from a fork server that has preloaded OpenCV and albumentations.

    Plain fork is unsafe here: a child forked after the parent has used OpenCV's thread pool
    hangs in cv2.setNumThreads (observed with opencv-python-headless 5.1 on Linux). The fork
    server never runs OpenCV code, so children forked from it start clean, and after its first
    start (a few seconds of imports) each worker starts in milliseconds.
    """
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # NOTE: the preload list belongs to the process-wide fork server, so it also applies to other
    # forkserver users in this process, and it takes effect only before the server first starts.
    context.set_forkserver_preload(["tools.shifts.worker"])
    return context


def start_worker_server() -> None:
    """Start the fork server for shift workers now, in the background, if it is not running.

    Its first start imports OpenCV and albumentations (and torch through albumentations), which
    takes seconds. Call this before other work, such as the clean-set predictions, so that the
    imports run alongside it.
    """
    context = _context()
    if context.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _get(queue, worker) -> tuple:
    while True:
        try:
            return queue.get(timeout=_POLL_SECONDS)
        except queue_module.Empty:
            if worker.is_alive():
                continue
        # The worker has exited: take what it flushed before exiting, else report the failure.
        try:
            return queue.get(timeout=_POLL_SECONDS)
        except queue_module.Empty:
            raise RuntimeError(f"shift worker exited with code {worker.exitcode} before "
                               "sending all batches") from None


def _generate(images: np.ndarray, jobs: list[tuple[str, int]], seed: int, batch_size: int,
              prefetch: int) -> Iterator[tuple[str, int, int, np.ndarray]]:
    from tools.shifts.worker import produce

    context = _context()
    # Shared memory hands the images to the worker without pickling them.
    memory = shared_memory.SharedMemory(create=True, size=max(1, images.nbytes))
    shared = np.ndarray(images.shape, dtype=np.uint8, buffer=memory.buf)
    shared[...] = images
    queue = context.Queue(maxsize=prefetch)
    stop = context.Event()
    worker = context.Process(
        target=produce, args=(memory.name, images.shape, jobs, seed, batch_size, queue, stop),
        name="clinaudit-shift-worker", daemon=True)

    try:
        worker.start()
        batches_per_job = -(-len(images) // batch_size)
        for _ in range(len(jobs) * batches_per_job):
            item = _get(queue, worker)
            if item[0] == "error":
                raise RuntimeError(f"shift worker failed: {item[1]}")
            _, name, severity, start, batch = item
            yield name, severity, start, batch
    finally:
        # Runs when the consumer finishes, raises, or stops early (the generator is closed).
        stop.set()
        if worker.pid is not None:
            worker.join(timeout=_EXIT_WAIT_SECONDS)
            if worker.is_alive():
                worker.terminate()
                worker.join()
        queue.close()
        del shared
        memory.close()
        memory.unlink()


def iter_shifted_batches(images: np.ndarray, jobs: list[tuple[str, int]], seed: int,
                         batch_size: int, prefetch: int = 4,
                         ) -> Iterator[tuple[str, int, int, np.ndarray]]:
    """Yield (name, severity, start row, shifted batch) for every job, shifted ahead of use.

    A worker process shifts the batches in job order while the caller predicts on earlier ones.
    At most prefetch finished batches wait in a bounded queue. Batch rows equal
    ``shift_images(images, name, severity, seed)[start:start + len(batch)]``.

    All jobs are validated before the worker starts. The worker stops when the iterator is
    exhausted, closed (``close()``, or leaving a ``for`` loop early, which closes it once the
    iterator is no longer referenced) or the caller raises. An error in the worker is raised
    here as RuntimeError with its message.

    Workers start from a fork server (spawn where there is none), which imports the caller's
    main module, so a script that calls this needs an ``if __name__ == "__main__":`` guard.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[3] != 3:
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ShiftError(f"images must be a uint8 array of shape (n, H, W, 3), got {dtype} {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ShiftError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
        raise ShiftError(f"prefetch must be a positive integer, got {prefetch!r}")
    seed = _check_seed(seed)

    checked: list[tuple[str, int]] = []
    side = min(images.shape[1], images.shape[2])
    for name, severity in jobs:
        validate_shift(name, severity)
        # Building here catches a transform that fails to build before any worker starts.
        prepare_shift(name, int(severity), side)
        checked.append((name, int(severity)))

    return _generate(images, checked, seed, batch_size, prefetch)
