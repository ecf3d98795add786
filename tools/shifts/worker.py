"""Body of the worker process that shifts batches for ``iter_shifted_batches``.

This module imports OpenCV and albumentations at the top on purpose: the fork server preloads
it once, so every worker forked from that server starts with them imported. The rest of
``tools.shifts`` imports it only inside the function that starts a worker.
"""

from __future__ import annotations

import os
import queue as queue_module
from multiprocessing import shared_memory

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations  # noqa: F401 - preloaded for the workers, see the module docstring
import cv2
import numpy as np

from tools.shifts.registry import shift_rows

# Seconds between checks of the stop flag while waiting for room in the queue.
POLL_SECONDS = 0.2


def _put(queue, item: tuple, stop) -> bool:
    """Put item on the queue unless stop is set first; return whether it was put."""
    while not stop.is_set():
        try:
            queue.put(item, timeout=POLL_SECONDS)
            return True
        except queue_module.Full:
            continue
    return False


def produce(memory_name: str, shape: tuple[int, ...], jobs: list[tuple[str, int]], seed: int,
            batch_size: int, queue, stop) -> None:
    """Shift every batch of every job, in order, onto the bounded queue.

    The images are read from the shared memory block memory_name, of uint8 and shape shape.
    A failure is sent as ("error", message) for the consumer to raise.
    """
    memory = None
    try:
        # The consumer's inference needs the other cores, so the worker shifts on one thread.
        cv2.setNumThreads(1)
        memory = shared_memory.SharedMemory(name=memory_name)
        images = np.ndarray(shape, dtype=np.uint8, buffer=memory.buf)
        for name, severity in jobs:
            for start in range(0, shape[0], batch_size):
                if stop.is_set():
                    return
                batch = shift_rows(images[start:start + batch_size], name, severity, seed, start)
                if not _put(queue, ("batch", name, severity, start, batch), stop):
                    return
    except KeyboardInterrupt:
        # Ctrl-C reaches the whole process group: the parent reports it, the worker stops quietly.
        queue.cancel_join_thread()
    except Exception as error:  # noqa: BLE001 - any failure goes back to the parent as one message
        _put(queue, ("error", f"{type(error).__name__}: {error}"), stop)
    finally:
        images = None
        if memory is not None:
            memory.close()
        if stop.is_set():
            # The consumer has stopped reading, so exit without flushing the queue's buffer into the pipe.
            queue.cancel_join_thread()
