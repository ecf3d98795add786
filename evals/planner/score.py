"""Score a planner against the scenario files: does its plan include what a careful auditor must?

Each scenario gives a clinical context (prose plus structured fields), an aggregate description
of the data and, for vague requests, the answers a user would give. Its `expect` section lists
what a careful auditor's plan must include:

- must_ask: context fields the interview has to ask about;
- metric_families: at least one chosen metric of each family (from the metric registry);
- metrics: groups of alternatives, each "id" or "id:key=value,..."; one of each group must be
  chosen with at least those parameters;
- primary: allowed primary metric ids;
- shift_families: at least one chosen shift of each family (from the shift registry);
- shift_families_excluded: no chosen shift of these families (colour shifts on grey-scale data);
- subgroups: metadata columns that must be compared as subgroups;
- site: true when the plan must evaluate per acquisition site.

Agreement of a scenario is the share of these checks the plan passes.

Usage:
    python evals/planner/score.py                  # the offline rules planner
    python evals/planner/score.py --llm-model M [--llm-base-url URL]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCENARIOS = Path(__file__).resolve().parent / "scenarios"


@dataclass
class ScenarioScore:
    name: str
    passed: int = 0
    total: int = 0
    missed: list[str] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        return self.passed / self.total if self.total else 1.0

    def check(self, ok: bool, item: str) -> None:
        self.total += 1
        if ok:
            self.passed += 1
        else:
            self.missed.append(item)


def load_scenarios(folder: Path = SCENARIOS) -> list[dict[str, Any]]:
    scenarios = []
    for path in sorted(folder.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        raw.setdefault("name", path.stem)
        scenarios.append(raw)
    return scenarios


def dataset_info(raw: dict[str, Any]):
    """Build the planner's DatasetInfo from a scenario's dataset section; split sizes default to
    50/20/30 % of the class counts."""
    from agent.state import ColumnSummary, DatasetInfo

    total = sum(raw["class_counts"].values())
    return DatasetInfo(
        classes=raw["classes"], class_counts=raw["class_counts"],
        n_train=raw.get("n_train", total // 2), n_calibration=raw.get("n_calibration", total // 5),
        n_test=raw.get("n_test", total - total // 2 - total // 5),
        greyscale=bool(raw.get("greyscale", False)),
        metadata=[ColumnSummary(**column) for column in raw.get("metadata", [])])


def _parse_requirement(text: str) -> tuple[str, dict[str, str]]:
    metric_id, _, rest = text.partition(":")
    params = dict(part.split("=", 1) for part in rest.split(",") if part)
    return metric_id, params


def _metric_matches(requirement: str, choice) -> bool:
    metric_id, params = _parse_requirement(requirement)
    if choice.id != metric_id:
        return False
    return all(str(choice.params.get(key)) == value for key, value in params.items())


def score_plan(scenario: dict[str, Any], plan, asked: list[str]) -> ScenarioScore:
    """Check one plan (and the fields its interview asked) against a scenario's expectations."""
    from tools.metrics import REGISTRY
    from tools.shifts import SHIFTS

    expect = scenario.get("expect", {})
    score = ScenarioScore(scenario["name"])
    for name in expect.get("must_ask", []):
        score.check(name in asked, f"ask {name}")

    families = {REGISTRY[m.id].family for m in plan.metrics if m.id in REGISTRY}
    for family in expect.get("metric_families", []):
        score.check(family in families, f"metric family {family}")
    for group in expect.get("metrics", []):
        ok = any(_metric_matches(req, choice) for req in group for choice in plan.metrics)
        score.check(ok, f"metric {' or '.join(group)}")
    if "primary" in expect:
        score.check(plan.primary_metric in expect["primary"],
                    f"primary metric {' or '.join(expect['primary'])}")

    shift_families = {SHIFTS[s.name].family for s in plan.shifts if s.name in SHIFTS}
    for family in expect.get("shift_families", []):
        score.check(family in shift_families, f"shift family {family}")
    for family in expect.get("shift_families_excluded", []):
        score.check(family not in shift_families, f"no shift of family {family}")

    columns = {s.column for s in plan.subgroups}
    for column in expect.get("subgroups", []):
        score.check(column in columns, f"subgroup {column}")
    if expect.get("site"):
        score.check(plan.site_column is not None, "per-site evaluation")
    return score


def run_scenario(planner, scenario: dict[str, Any]) -> ScenarioScore:
    """Interview (answering from the scenario's `answers`) and plan, then score the plan."""
    from tools.spec import Context

    answers = {k: str(v) for k, v in (scenario.get("answers") or {}).items()}
    asked: list[str] = []

    def ask(question: str, field_name: str, choices: list[str] | None) -> str:
        asked.append(field_name)
        return answers.get(field_name, "")

    info = dataset_info(scenario["dataset"])
    context = Context.model_validate(scenario.get("context") or {})
    context = planner.interview(context, info, ask)
    plan = planner.plan(context, info, n_boot=200)
    return score_plan(scenario, plan, asked)


def score_planner(planner, scenarios: list[dict[str, Any]] | None = None) -> list[ScenarioScore]:
    return [run_scenario(planner, s) for s in (scenarios or load_scenarios())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-model", help="Score the LLM planner with this chat model.")
    parser.add_argument("--llm-base-url", help="OpenAI-compatible endpoint [default: "
                        "$OPENAI_BASE_URL].")
    parser.add_argument("--scenarios", type=Path, default=SCENARIOS,
                        help="Folder of scenario YAML files.")
    options = parser.parse_args(argv)

    from agent.planners.llm import planner_from_options

    planner = planner_from_options(options.llm_model, options.llm_base_url, use_env_model=False)
    scores = score_planner(planner, load_scenarios(options.scenarios))
    width = max(len(s.name) for s in scores)
    print(f"planner: {planner.name}")
    for score in scores:
        missed = f"  missed: {'; '.join(score.missed)}" if score.missed else ""
        print(f"{score.name:<{width}}  {score.passed:>2}/{score.total:<2} "
              f"{score.agreement:6.1%}{missed}")
    mean = sum(s.agreement for s in scores) / len(scores)
    print(f"{'mean agreement':<{width}}  {mean:12.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
