"""Gradient-level balancers from torchjd through the same weighting option: each trains a tiny
search (warm-up, gumbel search, fine-tune) without error and with finite losses."""
import math

import pytest
import torch
from click.testing import CliRunner

from automtl.data import SyntheticScenes
from automtl.errors import ConfigError
from automtl.search import SearchConfig, search
from automtl.supermodel import supermodel
from automtl.weighting import TORCHJD_BALANCERS, make_weighting

SIZE = 32



@pytest.fixture(scope="module")
def data():
    return SyntheticScenes(16, size=SIZE, seed=0), SyntheticScenes(8, size=SIZE, seed=1, split="val")


def _needs(name):
    pytest.importorskip("torchjd", reason="torchjd is not installed (pip install 'automtl[torchjd]')")
    try:
        make_weighting(name, ["a", "b"])
    except ConfigError as exc:
        pytest.skip(f"{name}: {exc}")


@pytest.mark.parametrize("name", sorted(TORCHJD_BALANCERS))
def test_torchjd_balancer_trains_a_tiny_search(data, tmp_path, name):
    _needs(name)
    train, val = data
    torch.manual_seed(0)
    sm = supermodel("tiny", train.tasks, torch.randn(1, 3, SIZE, SIZE))
    before = [p.detach().clone() for p in sm.weight_parameters()]
    cfg = SearchConfig(warmup_steps=2, search_steps=2, finetune_steps=2, batch_size=8, log_every=1,
                       weight_steps_per_policy_step=1, val_batches=1, device="cpu", quiet=True, weighting=name)
    result = search(sm, train, val, cfg)
    train_recs = [r for r in result.history if r["stage"] != "val"]
    assert {r["stage"] for r in train_recs} == {"warmup", "search", "finetune"}
    for r in train_recs:
        assert all(math.isfinite(v) for v in r["losses"].values()) and math.isfinite(r["total"])
    assert any(not torch.equal(a, b) for a, b in zip(before, sm.weight_parameters())), "no weight moved"


def test_torchjd_balancer_in_the_conflict_strategy(data):
    _needs("upgrad")
    train, val = data
    torch.manual_seed(0)
    sm = supermodel("tiny", train.tasks, torch.randn(1, 3, SIZE, SIZE))
    cfg = SearchConfig(warmup_steps=1, search_steps=2, finetune_steps=1, batch_size=8, val_batches=1, device="cpu",
                       quiet=True, weighting="upgrad", strategy="conflict")
    result = search(sm, train, val, cfg)
    weights = [r["weights"] for r in result.history if r["stage"] == "search"]
    assert weights and all(w is not None and math.isfinite(w) for ws in weights for w in ws.values())


def test_torchjd_options_and_cli(tmp_path):
    _needs("cagrad")
    with pytest.raises(ConfigError, match="cagrad"):
        make_weighting("cagrad", ["a", "b"], nonsense=1)
    assert make_weighting("cagrad", ["a", "b"], c=0.2).aggregator is not None
    from automtl.cli import main

    result = CliRunner().invoke(main, ["search", "tiny", "--steps", "1,2,1", "--samples", "16,8", "--input-size", "32",
                                       "--quiet", "--weighting", "upgrad", "--out", str(tmp_path / "out")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_without_torchjd_is_a_config_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)
    with pytest.raises(ConfigError, match=r"automtl\[torchjd\]"):
        make_weighting("upgrad", ["a", "b"])


def test_the_stateful_balancers_are_those_whose_aggregator_keeps_state():
    pytest.importorskip("torchjd", reason="torchjd is not installed (pip install 'automtl[torchjd]')")
    from torchjd import Stateful

    from automtl.weighting import STATEFUL_BALANCERS

    stateful = set()
    for name in TORCHJD_BALANCERS:
        try:
            w = make_weighting(name, ["a", "b"])
        except ConfigError:
            continue
        if any(isinstance(m, Stateful) for m in w.aggregator.modules()):
            stateful.add(name)
    assert stateful <= set(STATEFUL_BALANCERS) and "gradvac" in stateful


@pytest.mark.parametrize("name,options", [("gradvac", {}), ("nashmtl", {}), ("nashmtl", {"update_weights_every": 3})])
def test_a_stateful_balancer_resumes_bitwise(data, tmp_path, name, options, crash_after):
    """GradVac's moving cosine targets and Nash-MTL's last weights live outside the aggregator's parameters
    and buffers: the checkpoint holds them (the weighting's extra state), so a run that dies resumes to
    the weights of an uninterrupted one."""
    _needs(name)
    train, _ = data

    def go(dataset, out, resume=False):
        torch.manual_seed(0)
        sm = supermodel("tiny", train.tasks, torch.randn(1, 3, SIZE, SIZE))
        cfg = SearchConfig(strategy="conflict", warmup_steps=3, search_steps=4, finetune_steps=3, conflict_every=2,
                           checkpoint_every=1, batch_size=8, quiet=True, weighting=name, weighting_options=options,
                           out_dir=str(out), resume=resume)
        search(sm, dataset, None, cfg)
        return [p.detach().clone() for p in sm.weight_parameters()]

    straight = go(train, tmp_path / "a")
    with pytest.raises(RuntimeError, match="went away"):
        go(crash_after(train, 8 * 5), tmp_path / "b")
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["global_step"] == 5
    resumed = go(train, tmp_path / "b", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_a_stateful_balancers_state_is_its_own():
    """Only what a step changed is state (not the options it was built with), and a state saved for other tasks
    or naming an attribute this torchjd lacks is refused."""
    _needs("gradvac")
    w = make_weighting("gradvac", ["a", "b"], beta=0.9)
    p = torch.nn.Parameter(torch.randn(5))
    for _ in range(2):
        w({t: (p * torch.randn(5)).sum() for t in "ab"})
        w.backward([p])
    state = w.state_dict()
    assert set(state["_extra_state"]["modules"]["weighting.weighting"]) == {"_phi_t", "_state_key"}
    fresh = make_weighting("gradvac", ["a", "b"], beta=0.9)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.aggregator.gramian_weighting._phi_t, w.aggregator.gramian_weighting._phi_t)
    with pytest.raises(RuntimeError, match="saved for tasks"):
        make_weighting("gradvac", ["a", "c"]).load_state_dict(state)
    modules = state["_extra_state"]["modules"]
    modules["weighting.weighting"]["_renamed"] = modules["weighting.weighting"].pop("_state_key")
    with pytest.raises(RuntimeError, match="has no state"):
        make_weighting("gradvac", ["a", "b"]).load_state_dict(state)
