"""Shifted batches produced in a worker process, so shifting overlaps with model inference."""

from __future__ import annotations

import multiprocessing
import queue as queue_module
from collections.abc import Iterator

import numpy as np

from tools.shifts.base import ShiftError
from tools.shifts.registry import _check_seed, prepare_shift, shift_rows, validate_shift

# Seconds between checks of the stop flag while the worker waits for room in the queue, and of
# the worker's liveness while the consumer waits for a batch.
_POLL_SECONDS = 0.2
# Seconds the consumer waits for a stopped worker to exit before terminating it.
_EXIT_WAIT_SECONDS = 2.0


def _put(queue, item: tuple, stop) -> bool:
    """Put item on the queue unless stop is set first; return whether it was put."""
    while not stop.is_set():
        try:
            queue.put(item, timeout=_POLL_SECONDS)
            return True
        except queue_module.Full:
            continue
    return False


def _produce(images: np.ndarray, jobs: list[tuple[str, int]], seed: int, batch_size: int,
             queue, stop) -> None:
    """Worker process: shift every batch of every job, in order, onto the bounded queue."""
    try:
        import cv2

        # The consumer's inference needs the other cores, so the worker shifts on one thread.
        cv2.setNumThreads(1)
        for name, severity in jobs:
            for start in range(0, len(images), batch_size):
                if stop.is_set():
                    return
                batch = shift_rows(images[start:start + batch_size], name, severity, seed, start)
                if not _put(queue, ("batch", name, severity, start, batch), stop):
                    return
    except Exception as error:  # noqa: BLE001 - sent to the consumer, which raises it
        _put(queue, ("error", f"{type(error).__name__}: {error}"), stop)
    finally:
        if stop.is_set():
            # Nobody reads the rest, so exit without flushing the queue's buffer into the pipe.
            queue.cancel_join_thread()


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
    # fork shares the images and the shifts already built here without copying them; it is what
    # PyTorch's DataLoader uses on Linux. Elsewhere spawn copies both into the worker.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    queue = context.Queue(maxsize=prefetch)
    stop = context.Event()
    worker = context.Process(target=_produce, args=(images, jobs, seed, batch_size, queue, stop),
                             name="clinaudit-shift-worker", daemon=True)
    worker.start()

    batches_per_job = -(-len(images) // batch_size)
    try:
        for _ in range(len(jobs) * batches_per_job):
            item = _get(queue, worker)
            if item[0] == "error":
                raise RuntimeError(f"shift worker failed: {item[1]}")
            _, name, severity, start, batch = item
            yield name, severity, start, batch
    finally:
        # Runs when the consumer finishes, raises, or stops early (the generator is closed).
        stop.set()
        worker.join(timeout=_EXIT_WAIT_SECONDS)
        if worker.is_alive():
            worker.terminate()
            worker.join()
        queue.close()


def iter_shifted_batches(images: np.ndarray, jobs: list[tuple[str, int]], seed: int,
                         batch_size: int, prefetch: int = 4,
                         ) -> Iterator[tuple[str, int, int, np.ndarray]]:
    """Yield (name, severity, start row, shifted batch) for every job, shifted ahead of use.

    A worker process shifts the batches in job order while the caller predicts on earlier ones;
    at most prefetch finished batches wait in a bounded queue. Batch rows equal
    ``shift_images(images, name, severity, seed)[start:start + len(batch)]``.

    All jobs are validated before the worker starts. The worker stops when the iterator is
    exhausted, closed (``close()``, or leaving a ``for`` loop early, which closes it once the
    iterator is no longer referenced) or the caller raises. An error in the worker is raised
    here as RuntimeError with its message.
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
        # Building here means a forked worker inherits the built transforms.
        prepare_shift(name, int(severity), side)
        checked.append((name, int(severity)))

    return _generate(images, checked, seed, batch_size, prefetch)
