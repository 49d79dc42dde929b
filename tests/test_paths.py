"""Sampled paths (automtl.paths): the same numbers as the supermodel's hard policy, each shared value computed once."""
import pytest
import torch

from automtl.paths import run_paths
from automtl.policy import SHARE, SKIP, SPECIALIZE, Policy
from automtl.supermodel import supermodel
from test_compact import BUILTINS, SIZE, TASKS
from test_compact import built as built_pair
from zoo import ZOO


def built(name):
    """The cached supermodel of test_compact (each test leaves it in eval mode)."""
    return built_pair(name)[1]


def policies(sm):
    yield Policy.uniform(sm.layer_names, sm.task_names, "share")
    yield Policy.uniform(sm.layer_names, sm.task_names, "specialize")
    for seed in range(3):
        yield Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed)


def close(a, b):
    return all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


@pytest.mark.parametrize("name", BUILTINS)
def test_a_path_equals_the_hard_policy(name):
    """Property: on every builtin backbone and random policies, a sampled path computes what sm.hard(policy)
    computes, in eval mode and (one batch per task group) in train mode, for one batch or per-task batches."""
    sm = built(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    per_task = {t: torch.randn(2, 3, SIZE, SIZE) for t in sm.task_names}
    for pol in policies(sm):
        for train in (False, True):
            sm.train(train)
            with torch.no_grad():
                state = {k: v.clone() for k, v in sm.state_dict().items()}
                expected = sm.hard(pol)(x)
                sm.load_state_dict(state)  # the running statistics a train-mode pass moved
                got = run_paths(sm, x, pol.choices)
                sm.load_state_dict(state)
                assert close(got, expected), (name, train)
                if not train:
                    assert close(run_paths(sm, per_task, pol.choices), sm.hard(pol)(per_task)), name
        sm.warmup()
    sm.eval()


def _conv_rows(sm, fn):
    """Rows each policy layer's shared/specialized operators ran on during ``fn()``."""
    rows = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
             for layer in sm.policy_layers for m in (layer.shared.conv, *[u.conv for u in layer.specialized])]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return rows


def test_what_tasks_share_runs_once():
    sm = built("resnet18").eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    L, T = len(sm.layer_names), sm.num_tasks
    share = [[SHARE] * T for _ in range(L)]
    with torch.no_grad():
        rows = _conv_rows(sm, lambda: run_paths(sm, x, share))
    assert rows == [2] * L  # one backbone, not three
    # tasks 0 and 1 share everything, task 2 owns layer 3 and everything after it reads its branch
    split = [[SHARE, SHARE, SPECIALIZE if l == 3 else SHARE] for l in range(L)]
    with torch.no_grad():
        rows = _conv_rows(sm, lambda: run_paths(sm, x, split))
    assert sum(rows) == 2 * (L + (L - 3)), rows  # the trunk once, then the two branches
    # straight-through gates make every task's path its own (a task's policy gradient from its own loss)
    with torch.no_grad():
        rows = _conv_rows(sm, lambda: run_paths(sm, x, share, gates=torch.ones(L, T)))
    assert sum(rows) == 2 * T * L


def test_gates_carry_the_policy_gradient_and_only_sampled_operators_get_weight_gradients():
    sm = built("tiny").train()
    sm.zero_grad(set_to_none=True)
    choices = [[SHARE, SPECIALIZE, SKIP if legal else SHARE] for legal in sm.skip_legal]
    soft = sm.masked_logits().softmax(-1).gather(-1, torch.tensor(choices).unsqueeze(-1)).squeeze(-1)
    gates = 1.0 - soft.detach() + soft
    out = run_paths(sm, torch.randn(2, 3, SIZE, SIZE), choices, gates=gates)
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    assert sm.policy_logits.grad is not None and sm.policy_logits.grad.abs().sum() > 0
    for layer in sm.policy_layers:
        assert layer.specialized[0].conv.weight.grad is None and layer.specialized[2].conv.weight.grad is None
        assert layer.specialized[1].conv.weight.grad is not None and layer.shared.conv.weight.grad is not None
    # the gates' value is 1: outputs equal the ungated path
    with torch.no_grad():
        x = torch.randn(2, 3, SIZE, SIZE)
        sm.eval()
        assert close(run_paths(sm, x, choices, gates=gates.detach()), run_paths(sm, x, choices))


@pytest.mark.parametrize("pattern", sorted(ZOO))
def test_paths_on_the_backbone_patterns(pattern):
    """Reused modules, sizes read from the input, norms of every kind, tied weights: a path is the hard policy."""
    torch.manual_seed(0)
    sm = supermodel(ZOO[pattern](), TASKS[:2], torch.randn(1, 3, SIZE, SIZE)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    for seed in range(2):
        pol = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed)
        with torch.no_grad():
            assert close(run_paths(sm, x, pol.choices), sm.hard(pol)(x)), pattern
        sm.warmup()


def test_an_illegal_skip_is_refused():
    sm = built("resnet18")
    bad = next(l for l, legal in enumerate(sm.skip_legal) if not legal)
    choices = [[SHARE] * 3 for _ in sm.layer_names]
    choices[bad][0] = SKIP
    with pytest.raises(ValueError, match="illegal"):
        run_paths(sm, torch.randn(1, 3, SIZE, SIZE), choices)
