"""Time the metric engine against torchmetrics and scikit-learn on the same arrays.

Run with ``.venv/bin/python evals/bench_metrics.py``. It prints one line per comparison with
both times and the ratio peer / engine (above 1 means the engine is faster), then the times of
the kernel estimators and of the bootstrap. Input validation is on for every engine call.
Times are the best of ``--repeats`` runs on whatever machine runs the script.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from tools.metrics import bootstrap_metrics, compute_metric


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_predictions(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += 1.5
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs, labels


def compare(name: str, engine, peer, peer_name: str, repeats: int) -> None:
    engine_value = engine()
    peer_value = peer()
    engine_s = best_time(engine, repeats)
    peer_s = best_time(peer, repeats)
    print(
        f"{name:<14} engine {engine_s:8.3f} s   {peer_name:<13} {peer_s:8.3f} s   "
        f"ratio {peer_s / engine_s:6.2f}   |difference| {abs(engine_value - peer_value):.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="rows for the peer comparisons")
    parser.add_argument("--classes", type=int, default=10, help="classes for the peer comparisons")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; the best is kept")
    args = parser.parse_args()

    import sklearn
    import torch
    import torchmetrics
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score
    from torchmetrics.functional.classification import multiclass_calibration_error

    print(f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
          f"torchmetrics {torchmetrics.__version__}, scikit-learn {sklearn.__version__}, "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")

    probs, labels = make_predictions(args.n, args.classes, seed=0)
    probs_t = torch.from_numpy(probs)
    labels_t = torch.from_numpy(labels)
    k = args.classes
    print(f"\n{args.n:,} x {k} predictions, validation on")

    compare(
        "ECE (15 bins)",
        lambda: compute_metric("ece_top_label", probs, labels).value,
        lambda: float(multiclass_calibration_error(probs_t, labels_t, num_classes=k, n_bins=15, norm="l1")),
        "torchmetrics",
        args.repeats,
    )
    compare(
        "MCE (15 bins)",
        lambda: compute_metric("mce_top_label", probs, labels).value,
        lambda: float(multiclass_calibration_error(probs_t, labels_t, num_classes=k, n_bins=15, norm="max")),
        "torchmetrics",
        args.repeats,
    )
    compare(
        "BS",
        lambda: compute_metric("brier", probs, labels).value,
        lambda: brier_score_loss(labels, probs, labels=list(range(k))),
        "scikit-learn",
        args.repeats,
    )
    compare(
        "NLL",
        lambda: compute_metric("nll", probs, labels).value,
        lambda: log_loss(labels, probs, labels=list(range(k))),
        "scikit-learn",
        args.repeats,
    )
    compare(
        "AUROC (macro)",
        lambda: compute_metric("auroc", probs, labels).value,
        lambda: roc_auc_score(labels, probs, multi_class="ovr", average="macro"),
        "scikit-learn",
        args.repeats,
    )

    print("\nkernel calibration error (no peer installed)")
    small_probs, small_labels = make_predictions(10_000, k, seed=1)
    unbiased_s = best_time(lambda: compute_metric("kce", small_probs, small_labels), 1)
    print(f"unbiased SKCE  10,000 x {k}: {unbiased_s:.3f} s")
    linear_s = best_time(lambda: compute_metric("kce", probs, labels, estimator="linear"), args.repeats)
    print(f"linear SKCE    {args.n:,} x {k}: {linear_s:.3f} s")

    print("\nbootstrap, 1,000 replicates of accuracy, BA, BS, NLL, ECE, macro AUROC")
    boot_probs, boot_labels = make_predictions(10_000, 7, seed=2)
    metrics = ["accuracy", "balanced_accuracy", "brier", "nll", "ece_top_label", "auroc"]
    boot_s = best_time(lambda: bootstrap_metrics(metrics, boot_probs, boot_labels, n_boot=1000), 1)
    print(f"10,000 x 7: {boot_s:.2f} s (goal: under 5 s)")


if __name__ == "__main__":
    main()
