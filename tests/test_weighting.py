"""Loss balancers against hand-computed examples."""
import math

import pytest
import torch
from torch import nn

from automtl.errors import ConfigError
from automtl.weighting import TORCHJD_BALANCERS, WEIGHTINGS, GradNorm, LossWeighting, make_weighting

NAMES = ["a", "b"]


def L(a, b, grad=False):
    return {"a": torch.tensor(float(a), requires_grad=grad), "b": torch.tensor(float(b), requires_grad=grad)}


def test_registry_and_errors():
    builtin = {"equal", "static", "uncertainty", "dwa", "gradnorm", "rlw"}
    assert set(WEIGHTINGS) == builtin | set(TORCHJD_BALANCERS)  # torchjd's: tests/test_torchjd.py
    for name in builtin:
        opts = {"weights": {"a": 1.0, "b": 1.0}} if name == "static" else {}
        assert isinstance(make_weighting(name, NAMES, **opts), LossWeighting)
    with pytest.raises(ConfigError, match="did you mean 'gradnorm'"):
        make_weighting("gradnrom", NAMES)
    with pytest.raises(ConfigError, match="does not take option"):
        make_weighting("dwa", NAMES, windw=3)
    with pytest.raises(ConfigError, match="built for tasks"):
        make_weighting("equal", NAMES)({"a": torch.tensor(1.0)})


@pytest.mark.parametrize("name, options", [
    ("dwa", {"temperature": "hot"}), ("dwa", {"window": 2.5}), ("dwa", {"temperature": float("nan")}),
    ("gradnorm", {"alpha": [1.5]}), ("gradnorm", {"lr": True}), ("uncertainty", {"init": "0"}),
    ("rlw", {"seed": float("inf")}), ("mgda", {"max_iters": 1.5}), ("cagrad", {"c": "x"}),
    ("upgrad", {"pref_vector": "x"}), ("upgrad", {"pref_vector": [1.0, 2.0]}),
    ("dwa", {"temperature": 10**400}), ("dwa", {"window": 10**400}), ("rlw", {"seed": 2**64})])  # no float, no int64
def test_an_option_of_the_wrong_kind_is_one_config_error(name, options):
    """An option value a weighting cannot use (a string where it takes a number, NaN, a fraction for a count, a list
    for torchjd's tensor) is refused when the weighting is built, naming it, not by a TypeError in the first step
    (DWA's temperature "hot" was a raw ValueError; torchjd's pref_vector "x" an AttributeError)."""
    if name in TORCHJD_BALANCERS:
        pytest.importorskip("torchjd")
    with pytest.raises(ConfigError, match=f"loss weighting '{name}' (option|cannot use)"):
        make_weighting(name, NAMES, **options)


def test_weighting_option_names_in_a_config_are_words():
    from automtl.search import SearchConfig

    with pytest.raises(ConfigError, match="'weighting_options' has the option name 1"):
        SearchConfig(weighting="dwa", weighting_options={1: 2})


def test_equal():
    total, w = make_weighting("equal", NAMES)(L(1.5, 2.0))
    assert total.item() == pytest.approx(3.5)
    assert w == {"a": 1.0, "b": 1.0}


def test_static():
    total, w = make_weighting("static", NAMES, weights={"a": 2.0, "b": 0.5})(L(1.5, 2.0))
    assert total.item() == pytest.approx(4.0)
    assert w == {"a": 2.0, "b": 0.5}
    with pytest.raises(ConfigError, match="no weight for task"):
        make_weighting("static", NAMES, weights={"a": 1.0})
    with pytest.raises(ConfigError, match="unknown task"):
        make_weighting("static", NAMES, weights={"a": 1.0, "b": 1.0, "c": 1.0})
    with pytest.raises(ConfigError):
        make_weighting("static", NAMES, weights={"a": -1.0, "b": 1.0})


def test_uncertainty_value_and_parameters():
    u = make_weighting("uncertainty", NAMES)
    params = list(u.parameters())
    assert len(params) == 1 and params[0].requires_grad
    with torch.no_grad():
        u.log_vars.copy_(torch.tensor([0.0, math.log(2.0)]))
    total, w = u(L(1.5, 2.0))
    # exp(-0)*1.5 + 0 + exp(-log 2)*2 + log 2
    assert total.item() == pytest.approx(1.5 + 1.0 + math.log(2.0), rel=1e-6)
    assert w["a"] == pytest.approx(1.0) and w["b"] == pytest.approx(0.5)
    total.backward()
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L
    assert u.log_vars.grad.tolist() == pytest.approx([1 - 1.5, 1 - 0.5 * 2.0])


def test_dwa_weights_after_two_windows_and_resume():
    d = make_weighting("dwa", NAMES, window=2)
    history = [(1.0, 1.0), (1.0, 1.0), (2.0, 1.0), (2.0, 1.0)]  # window means (1, 1) then (2, 1)
    for step, (a, b) in enumerate(history):
        _, w = d(L(a, b), step=step)
        assert w == {"a": 1.0, "b": 1.0}  # first two windows: weight 1
    total, w = d(L(3.0, 5.0), step=4)
    # r = (2/1, 1/1), T = 2: w_t = 2 exp(r_t/2) / sum
    ea, eb = math.exp(1.0), math.exp(0.5)
    assert w["a"] == pytest.approx(2 * ea / (ea + eb))
    assert w["b"] == pytest.approx(2 * eb / (ea + eb))
    assert total.item() == pytest.approx(3.0 * w["a"] + 5.0 * w["b"], rel=1e-6)
    # weights stay fixed inside a window
    assert d(L(0.1, 0.1), step=5)[1] == w
    # the state is in buffers: a fresh module with the state dict continues identically
    d2 = make_weighting("dwa", NAMES, window=2)
    d2.load_state_dict(d.state_dict())
    assert d2(L(1.0, 1.0), step=6)[1] == d(L(1.0, 1.0), step=6)[1]


def test_dwa_counts_its_own_steps_when_none_given():
    d = make_weighting("dwa", NAMES, window=1)
    for a in (1.0, 2.0):
        d(L(a, 1.0))
    _, w = d(L(1.0, 1.0))
    assert w["a"] > 1.0 > w["b"]  # task a's loss went up: it gets more weight


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(3, 4)
        self.head_a = nn.Linear(4, 1)
        self.head_b = nn.Linear(4, 1)
        with torch.no_grad():
            self.head_a.weight.mul_(10.0)  # task a pulls much harder on the shared layer

    def losses(self, x, ya, yb):
        h = torch.relu(self.shared(x))
        return {
            "a": ((self.head_a(h).squeeze(1) - ya) ** 2).mean(),
            "b": ((self.head_b(h).squeeze(1) - yb) ** 2).mean(),
        }


def test_gradnorm_one_step():
    model = Tiny()
    g = torch.Generator().manual_seed(1)
    x, ya, yb = torch.randn(8, 3, generator=g), torch.randn(8, generator=g), torch.randn(8, generator=g)
    gn = make_weighting("gradnorm", NAMES, alpha=1.5, lr=0.025)
    assert isinstance(gn, GradNorm)
    losses = model.losses(x, ya, yb)
    W = model.shared.weight
    # manual grad norms of the weighted losses (weights start at 1)
    manual = []
    for n in NAMES:
        (gw,) = torch.autograd.grad(1.0 * losses[n], W, retain_graph=True, create_graph=True)
        manual.append(gw.norm().item())
    assert manual[0] > manual[1]

    total, w = gn(losses, shared_parameters=[W], step=0)
    assert w == {"a": 1.0, "b": 1.0}  # the weights used in this step's total
    assert total.item() == pytest.approx((losses["a"] + losses["b"]).item(), rel=1e-6)
    assert [gn.grad_norms[n] for n in NAMES] == pytest.approx(manual, rel=1e-5)
    # first step: r_t = 1, target = mean(G) for both -> loss = |Ga - m| + |Gb - m|
    m = sum(manual) / 2
    assert gn.gradnorm_loss == pytest.approx(abs(manual[0] - m) + abs(manual[1] - m), rel=1e-5)
    # one Adam step moves each weight by ~lr against the sign of its gradient, then renormalises
    new = gn.task_weights.detach().clone()
    assert new.sum().item() == pytest.approx(2.0, rel=1e-6)
    assert new[0].item() == pytest.approx(1 - 0.025, abs=1e-4)
    assert new[1].item() == pytest.approx(1 + 0.025, abs=1e-4)
    # the caller's backward still works and never touches the GradNorm weights
    total.backward()
    assert W.grad is not None and gn.task_weights.grad is None

    # second step uses the new weights and the loss ratios against step 0
    losses2 = model.losses(x, ya * 0.5, yb)
    total2, w2 = gn(losses2, shared_parameters=[W], step=1)
    assert w2["a"] == pytest.approx(new[0].item()) and w2["b"] == pytest.approx(new[1].item())
    assert sum(gn.task_weights.tolist()) == pytest.approx(2.0, rel=1e-6)


def test_gradnorm_needs_shared_parameters_in_training_only():
    gn = make_weighting("gradnorm", NAMES)
    with pytest.raises(ConfigError, match="shared_parameters"):
        gn(L(1.0, 2.0, grad=True))
    gn.eval()
    total, w = gn(L(1.0, 2.0))
    assert total.item() == pytest.approx(3.0)


def test_rlw_reproducible_and_sums_to_task_count():
    r1 = make_weighting("rlw", NAMES, seed=3)
    r2 = make_weighting("rlw", NAMES, seed=3)
    r3 = make_weighting("rlw", NAMES, seed=4)
    torch.manual_seed(123)  # the global RNG plays no part
    seq1 = [r1(L(1.0, 1.0), step=s)[1] for s in range(5)]
    torch.manual_seed(999)
    seq2 = [r2(L(1.0, 1.0))[1] for _ in range(5)]  # own counter == explicit steps 0..4
    assert seq1 == seq2
    assert seq1 != [r3(L(1.0, 1.0), step=s)[1] for s in range(5)]
    assert len({tuple(w.values()) for w in seq1}) == 5  # fresh weights every step
    for w in seq1:
        assert sum(w.values()) == pytest.approx(2.0, rel=1e-6)  # T * softmax: sums to T
        assert all(v > 0 for v in w.values())
    total, w = r1(L(2.0, 3.0), step=7)
    assert total.item() == pytest.approx(2.0 * w["a"] + 3.0 * w["b"], rel=1e-6)
