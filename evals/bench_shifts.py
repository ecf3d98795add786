"""Time shift generation against inference, and the audit pipeline that overlaps the two.

Measures, on ham10000_subset test images at a small input size with mobilenetv3_small_050
(random weights: timing does not depend on them):

- forward-only: predicting the clean images once per (shift, severity) job, in the main process;
- shift-only: ``shift_images`` for every job, in the main process;
- pipeline: ``iter_shifted_batches`` feeding ``Classifier.predict_proba``, as the audit runner
  does (shifting in a worker process while the main process predicts), metrics excluded.

It prints overhead = pipeline / (forward-only + shift-only); at most 1.1 means orchestration
costs at most a tenth on top of the two parts it cannot avoid, and below 1 means the overlap
saves time. Run from the repository root:

    .venv/bin/python evals/bench_shifts.py [--data DIR] [--n 2000] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIRST_SLICE = ["gaussian_noise", "gaussian_blur", "brightness", "contrast", "jpeg", "rotation"]


def parse_args() -> argparse.Namespace:
    default_data = Path(os.environ.get("CLINAUDIT_DATA",
                                       Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data / "ham10000_subset",
                        help="ham10000_subset folder with metadata.csv and images/")
    parser.add_argument("--n", type=int, default=2000, help="number of test images")
    parser.add_argument("--size", type=int, default=64, help="model input size in pixels")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch")
    parser.add_argument("--shifts", nargs="+", default=FIRST_SLICE, help="shift names")
    parser.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5],
                        help="severities of every shift")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shifts")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    return parser.parse_args()


def load_test_images(folder: Path, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return n test images (uint8, n x size x size x 3) and labels of ham10000_subset.

    The split is the data module's grouped, stratified one. Its test share is raised to 0.35,
    so the test split of the 5,984 images has at least 2,000 of them.
    """
    from tools.data import load_dataset
    from tools.spec import DataSpec, SplitSpec

    spec = DataSpec(manifest=folder / "metadata.csv", images=folder / "images",
                    id_column="image_id", label_column="dx", group_column="lesion_id",
                    split=SplitSpec(test=0.35, calibration=0.2, seed=0))
    test = load_dataset(spec, classes=None, name="ham10000_subset").part("test")
    if len(test) < n:
        raise SystemExit(f"the test split has {len(test)} images, fewer than --n {n}")
    test = test.subset(np.arange(n))
    return test.images(size), test.labels


def build_classifier(classes: int, size: int):
    import timm

    from tools.models import Classifier

    module = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=classes)
    return Classifier(module, [str(k) for k in range(classes)], input_size=size)


def time_forward(classifier, images: np.ndarray, jobs: list, batch_size: int) -> float:
    started = time.perf_counter()
    for _ in jobs:
        classifier.predict_proba(images, batch_size=batch_size)
    return time.perf_counter() - started


def time_shifts(images: np.ndarray, jobs: list, seed: int) -> float:
    from tools.shifts import shift_images

    started = time.perf_counter()
    for name, severity in jobs:
        shift_images(images, name, severity, seed)
    return time.perf_counter() - started


def time_pipeline(classifier, images: np.ndarray, jobs: list, seed: int,
                  batch_size: int) -> tuple[float, float, dict]:
    """Return the pipeline's wall time, the part of it spent waiting for batches, and probs."""
    from tools.shifts import iter_shifted_batches

    probs = {job: np.empty((len(images), len(classifier.classes))) for job in jobs}
    waiting = 0.0
    started = time.perf_counter()
    ready = started
    for name, severity, start, batch in iter_shifted_batches(images, jobs, seed, batch_size):
        received = time.perf_counter()
        waiting += received - ready
        probs[(name, severity)][start:start + len(batch)] = classifier.predict_proba(
            batch, batch_size=batch_size)
        ready = time.perf_counter()
    return time.perf_counter() - started, waiting, probs


def main() -> None:
    args = parse_args()
    if not (args.data / "metadata.csv").exists():
        raise SystemExit(f"ham10000_subset not found at {args.data}; pass --data DIR")

    import torch

    from tools.shifts import shift_images, start_worker_server, validate_shift

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    jobs = [(name, severity) for name in args.shifts for severity in args.severities]
    for name, severity in jobs:
        validate_shift(name, severity)
    # The audit runner should do the same: the worker server's imports overlap with loading.
    start_worker_server()

    started = time.perf_counter()
    images, labels = load_test_images(args.data, args.n, args.size)
    classifier = build_classifier(int(labels.max()) + 1, args.size)
    print(f"loaded {len(images)} images at {args.size} px and the model in "
          f"{time.perf_counter() - started:.1f} s")

    # One untimed pass of each part, so imports, transform building and allocator warm-up
    # are not charged to whichever part runs first.
    classifier.predict_proba(images[:args.batch_size], batch_size=args.batch_size)
    for name, severity in jobs:
        shift_images(images[:2], name, severity, args.seed)

    forward = time_forward(classifier, images, jobs, args.batch_size)
    shifting = time_shifts(images, jobs, args.seed)
    pipeline, waiting, probs = time_pipeline(classifier, images, jobs, args.seed,
                                             args.batch_size)

    # The pipeline must give the same probabilities as shifting and predicting in sequence.
    name, severity = jobs[-1]
    expected = classifier.predict_proba(shift_images(images, name, severity, args.seed),
                                        batch_size=args.batch_size)
    difference = float(np.max(np.abs(probs[(name, severity)] - expected)))

    predicted = len(jobs) * len(images)
    print(f"jobs: {len(jobs)} ({len(args.shifts)} shifts x {len(args.severities)} severities), "
          f"{predicted} images shifted and predicted, batch size {args.batch_size}")
    print(f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"forward-only  {forward:8.2f} s  ({predicted / forward:,.0f} images/s)")
    print(f"shift-only    {shifting:8.2f} s  ({predicted / shifting:,.0f} images/s)")
    print(f"pipeline      {pipeline:8.2f} s  ({predicted / pipeline:,.0f} images/s)")
    print(f"  of which the consumer waited for batches {waiting:.2f} s, and predicted "
          f"{pipeline - waiting:.2f} s")
    print(f"overhead = pipeline / (forward-only + shift-only) = "
          f"{pipeline / (forward + shifting):.3f}")
    print(f"max |pipeline - sequential| probability for {name}:{severity}: {difference:.2e}")


if __name__ == "__main__":
    main()
