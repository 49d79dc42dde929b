"""Costs of a policy in the budget's unit, and the budget check at the search's entry."""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import DataLoader

import automtl
from automtl import SearchConfig, Task
from automtl.cost import check_budget, policy_cost, single_model_cost, smallest_policy
from automtl.errors import ConfigError
from automtl.policy import Policy

SIZE = 32


@pytest.fixture(scope="module")
def sm():
    torch.manual_seed(0)
    return automtl.supermodel("tiny", [Task("c", kind="classification", classes=3), Task("d", kind="depth")],
                              torch.randn(1, 3, SIZE, SIZE))


def _loader():
    xs = torch.randn(8, 3, SIZE, SIZE)
    return DataLoader([(x, {"c": torch.tensor(i % 3), "d": x[:1].abs()}) for i, x in enumerate(xs)], batch_size=4)


def _floor(sm, metric):
    """The smallest budget multiple any policy meets, in ``metric``."""
    return policy_cost(sm, smallest_policy(sm, metric), metric) / single_model_cost(sm, metric)


def test_costs_are_the_supermodels_counts(sm):
    share = Policy.uniform(sm.layer_names, sm.task_names, "share")
    assert policy_cost(sm, share, "params") == sm.policy_parameter_count(share) == single_model_cost(sm)
    assert policy_cost(sm, share, "macs") == sm.policy_mac_count(share) == single_model_cost(sm, "macs")
    for metric in ("params", "macs"):
        assert 0 < _floor(sm, metric) < 1
    with pytest.raises(ConfigError, match="budget metric 'flops' is unknown"):
        policy_cost(sm, share, "flops")


def test_search_from_python_refuses_an_unreachable_budget_before_training(sm):
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        automtl.search(sm, _loader(), _loader(), budget="0.1x", warmup_steps=1, search_steps=1, finetune_steps=1,
                       quiet=True)
    msg = str(err.value)
    assert re.fullmatch(r"budget 0\.1x \([\d,]+ parameters\) is below what any policy can reach "
                        r"\([\d,]+ parameters, 0\.\d\dx\); raise the budget \(--budget\)", msg), msg
    assert all(torch.equal(before[k], v) for k, v in sm.state_dict().items())  # nothing trained


def test_a_mac_budget_is_checked_in_macs(sm):
    params_floor, macs_floor = _floor(sm, "params"), _floor(sm, "macs")
    assert macs_floor < params_floor  # tiny's heads and skips: MACs shrink further than parameters
    between = round((params_floor + macs_floor) / 2, 3)
    check_budget(sm, SearchConfig(budget=between, budget_metric="macs"))  # reachable in MACs
    with pytest.raises(ConfigError, match="parameters"):
        check_budget(sm, SearchConfig(budget=between, budget_metric="params"))
    below = round(macs_floor * 0.9, 3)
    with pytest.raises(ConfigError, match=r"MACs per sample\) is below what any policy can reach"):
        automtl.search(sm, _loader(), _loader(), budget=below, budget_metric="macs", quiet=True)
    check_budget(sm, SearchConfig())  # no budget, nothing to check
