"""Print the headline numbers of one audit's report.json, for evals/RESULTS.md.

Usage: .venv/bin/python evals/summarise_audit.py audits/demo/report.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def clean_value(report: dict, metric: str, condition: str = "clean") -> str:
    for row in report["results"]:
        if row["condition"] == condition and row["metric"] == metric and row["class"] is None:
            if row["value"] is None:
                return "n/a"
            return f"{row['value']:.3f} ({row['low']:.3f} to {row['high']:.3f})"
    return "not measured"


def main(path: Path) -> None:
    report = json.loads(path.read_text())
    audit = report["audit"]
    print(f"audit {audit['id']}, wall {audit['wall_seconds']:.0f} s, "
          f"n_test {report['data']['n_test']}")
    for metric in ("balanced_accuracy", "accuracy", "auroc", "ece_top_label", "brier", "nll",
                   "auroc_f", "aurc"):
        print(f"  clean {metric}: {clean_value(report, metric)}")
    findings = report["findings"]
    print(f"  findings: {len(findings)} ({sum(f['light'] == 'red' for f in findings)} red)")

    calibration = report.get("calibration")
    if calibration:
        print(f"  temperature {calibration['temperature']:.3f} "
              f"({calibration['low']:.3f} to {calibration['high']:.3f}), "
              f"{calibration['direction']}")
        verdicts = {v["condition"]: v for v in calibration["verdicts"]}
        counts: dict[str, int] = {}
        for verdict in verdicts.values():
            counts[verdict["verdict"]] = counts.get(verdict["verdict"], 0) + 1
        print(f"  recalibration verdicts: {counts}")
        for key in ["clean"] + sorted(k for k in verdicts if k.startswith("shift:"))[:0]:
            change = next(c for c in verdicts[key]["changes"] if c["metric"] == "ece_top_label")
            print(f"  ECE {key}: {change['before']:.3f} -> {change['after']:.3f} "
                  f"(change {change['delta']:+.3f}, {change['low']:+.3f} to {change['high']:+.3f})")
        harmed = [v for v in verdicts.values() if v["verdict"] == "harmed"]
        for verdict in harmed[:5]:
            change = next(c for c in verdict["changes"] if c["metric"] == "ece_top_label")
            print(f"  harmed {verdict['condition']}: ECE {change['before']:.3f} -> "
                  f"{change['after']:.3f} ({change['low']:+.3f} to {change['high']:+.3f})")
        print(f"  sentence: {calibration['sentence']}")

    referral = report.get("referral")
    if referral:
        print(f"  referral target {referral['target']:.0%}, threshold {referral['threshold']}")
        rows = {r["condition"]: r for r in referral["rows"]}
        clean = rows.get("clean")
        if clean:
            print(f"  clean: referred {clean['referred']:.1%}, accepted accuracy "
                  f"{clean['accepted_value']}")
        worst = sorted((r for r in referral["rows"] if r["accepted_value"] is not None
                        and r["condition"].startswith("shift:")),
                       key=lambda r: r["accepted_value"])[:3]
        for row in worst:
            print(f"  {row['condition']}: referred {row['referred']:.1%}, accepted accuracy "
                  f"{row['accepted_value']:.3f} ({row['low']:.3f} to {row['high']:.3f})")
        print(f"  sentence: {referral['sentence']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
