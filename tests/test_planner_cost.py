"""The plan's cost estimate counts the images the audit will actually predict."""

from __future__ import annotations

import pytest

from agent.planners.rules import RulesPlanner
from agent.state import DatasetInfo
from tools.spec import Context


def info(max_images):
    return DatasetInfo(classes=["benign", "malignant"], class_counts={"benign": 900,
                       "malignant": 895}, metadata=[], n_train=0, n_calibration=0, n_test=1795,
                       greyscale=False, max_images=max_images)


@pytest.mark.parametrize("max_images, audited", [(None, 1795), (400, 400), (5000, 1795)])
def test_cost_counts_audited_images(max_images, audited):
    plan = RulesPlanner().plan(Context(domain="dermatology"), info(max_images))
    shift_conditions = sum(len(shift.severities) for shift in plan.shifts)

    assert plan.cost.images_predicted == audited * (1 + shift_conditions)
