"""Task kinds: a new kind is one class and a registration, and then runs the whole pipeline."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import automtl
from automtl import Task, TaskKind, register_kind
from automtl.data import check_targets
from automtl.errors import ConfigError
from automtl.kinds import KINDS
from automtl.losses import loss_for
from automtl.metrics import HIGHER_IS_BETTER, Metric, delta_mtl, metric_for

SIZE = 32


class CountError(Metric):
    """Mean absolute error of a predicted count."""

    primary = "count_mae"
    names = ("count_mae",)

    def reset(self):
        self.total, self.n = 0.0, 0

    def update(self, pred, target):
        self.total += float((pred.reshape(-1) - target.reshape(-1).to(pred.dtype)).abs().sum())
        self.n += target.numel()

    def compute(self):
        return {"count_mae": self.total / self.n if self.n else float("nan")}


class Count(TaskKind):
    """How many of something an image holds: one non-negative number per image."""

    fixed_outputs = 1
    higher_is_better = {"count_mae": False}

    def finish(self, y, size):
        return y.clamp_min(0.0)  # a count is never negative; compact emits this as graph code

    def loss(self, task):
        return lambda pred, target: (pred.reshape(-1) - target.reshape(-1).to(pred.dtype)).abs().mean()

    def metric(self, task):
        return CountError()

    def target_shapes(self, task):
        return [(), (1,)]


@pytest.fixture
def count_kind():
    register_kind("count")(Count)
    yield KINDS["count"]
    KINDS.pop("count", None)
    HIGHER_IS_BETTER.pop("count_mae", None)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 3, SIZE, SIZE, generator=g)
    counts = (xs[:, 0] > 1.5).flatten(1).sum(1).float() / 10  # bright pixels in the red channel
    labels = (xs[:, 1].mean((1, 2)) > 0).long()
    return [(x, {"people": c, "day": lab}) for x, c, lab in zip(xs, counts, labels)]


def test_a_registered_kind_runs_supermodel_search_compact_save_load(count_kind, tmp_path):
    tasks = [Task("people", kind="count"), Task("day", kind="classification", classes=2)]
    assert tasks[0].spec is count_kind and tasks[0].outputs == 1 and not tasks[0].dense
    torch.manual_seed(0)
    sm = automtl.supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
    train, val = DataLoader(_data(16, 0), batch_size=8), DataLoader(_data(8, 1), batch_size=8)
    res = automtl.search(sm, train, val, warmup_steps=2, search_steps=2, finetune_steps=2, log_every=1, quiet=True)
    assert set(res.metrics["people"]) == {"count_mae"}

    model = automtl.compact(sm, res.policy).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref, out = sm.eval()(x), model(x)
    assert out["people"].shape == (2, 1) and bool((out["people"] >= 0).all())  # the kind's finish ran
    assert torch.allclose(out["people"], ref["people"], atol=1e-5)
    assert any(n.op == "call_method" and n.target == "clamp_min" for n in model.graph_module.graph.nodes)

    automtl.save(model, tmp_path / "count.automtl")
    loaded = automtl.load(tmp_path / "count.automtl")
    assert [t.kind for t in loaded.tasks] == ["count", "classification"]
    with torch.no_grad():
        assert torch.allclose(loaded(x)["people"], out["people"], atol=1e-5)
    KINDS.pop("count")  # another program, which does not register it: the file names the kind, it holds no code
    with pytest.raises(automtl.FileFormatError, match="has task 'people' of kind 'count', which is not registered in "
                                                      "this process; load it from Python after importing the code that registers it"):
        automtl.load(tmp_path / "count.automtl")


def test_the_register_kind_example_runs_and_a_kind_without_a_loss_is_one_sentence():
    """The docstring's example registered a kind with an output width only: search then ended in a raw
    NotImplementedError from inside it."""
    import inspect
    import textwrap

    doc = inspect.getdoc(register_kind)
    code = "\n".join(line.lstrip()[4:] for line in doc.splitlines() if line.lstrip().startswith((">>>", "...")))
    namespace = {"register_kind": register_kind, "TaskKind": TaskKind}
    try:
        exec(textwrap.dedent(code), namespace)
        tasks = [Task("people", kind="count")]
        sm = automtl.supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
        data = DataLoader([(x, {"people": t["people"].reshape(1)}) for x, t in _data(8, 0)], batch_size=4)
        res = automtl.search(sm, data, data, warmup_steps=1, search_steps=1, finetune_steps=1, quiet=True)
        assert set(res.metrics["people"]) >= {"mae"}
    finally:
        KINDS.pop("count", None)

    @register_kind("count")
    class Bare(TaskKind):
        fixed_outputs = 1
    try:
        sm = automtl.supermodel("tiny", [Task("people", kind="count")], torch.randn(1, 3, SIZE, SIZE))
        with pytest.raises(ConfigError, match="task kind 'count' defines no loss; define loss\\(\\) in its TaskKind "
                                              "subclass, or give the Task its own"):
            automtl.search(sm, data, None, warmup_steps=1, search_steps=1, finetune_steps=1, quiet=True)
    finally:
        KINDS.pop("count", None)


def test_a_registered_kind_brings_loss_metric_direction_and_target_check(count_kind):
    task = Task("people", kind="count")
    pred, target = torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 3.0])
    assert loss_for(task)(pred, target).item() == pytest.approx(0.5)
    m = metric_for(task)
    m.update(pred, target)
    assert m.compute() == {"count_mae": 0.5}
    assert delta_mtl({"people": {"count_mae": 0.5}}, {"people": {"count_mae": 1.0}}) == pytest.approx(50.0)
    with pytest.raises(automtl.DataError, match=r"does not fit a count task \(one sample's target is \(\) or \(1,\)\)"):
        check_targets([(torch.zeros(3, 4, 4), {"people": torch.zeros(2, 2)})], [task])


def test_register_kind_refuses_taken_names_bad_names_and_flipped_directions(count_kind):
    with pytest.raises(ConfigError, match="already registered"):
        register_kind("count")(Count)
    with pytest.raises(ConfigError, match="Python-style name"):
        register_kind("custom")
    with pytest.raises(ConfigError, match="needs a TaskKind"):
        register_kind("things")(object)

    class Flipped(TaskKind):
        higher_is_better = {"accuracy": False}

    with pytest.raises(ConfigError, match="other direction"):
        register_kind("flipped")(Flipped)
    assert "flipped" not in KINDS and HIGHER_IS_BETTER["accuracy"] is True
    with pytest.raises(ConfigError, match="register one with automtl.register_kind"):
        Task("t", kind="keypoints")


def test_builtin_kinds_are_registered_with_their_directions():
    assert list(KINDS)[:6] == ["classification", "multilabel", "regression", "segmentation", "depth", "normal"]
    for kind in KINDS.values():
        for name, up in kind.higher_is_better.items():
            assert HIGHER_IS_BETTER[name] is up
    assert repr(KINDS["depth"]) == "Depth(name='depth')"


@pytest.mark.parametrize("kind, classes", [("depth", 5), ("normal", 1), ("normal", 4)])
def test_a_class_count_a_fixed_width_kind_would_ignore_is_refused(kind, classes):
    """`--task a:depth:5` built a one-channel depth head without a word; the width a kind fixes may be given (as
    itself) or left out, not contradicted."""
    with pytest.raises(ConfigError, match=f"of kind '{kind}' has .* output channel.*not classes={classes}"):
        Task("a", kind, classes=classes)
    assert Task("a", "depth", classes=1).classes == 1 and Task("a", "normal").classes is None


def test_a_custom_loss_that_cannot_take_pred_and_target_is_refused_when_the_task_is_made():
    """loss=lambda p: ... failed in the first training step with a TypeError naming no task."""
    with pytest.raises(ConfigError, match=r"task 'a': loss= is called as loss\(pred, target\), which a function of "
                                          r"\(p\) cannot take"):
        Task("a", "depth", loss=lambda p: p.mean())
    Task("a", "depth", loss=lambda pred, target, weight=1.0: (pred - target).abs().mean() * weight)


class _PooledCount(Count):
    """A count read off the features without parameters: its head holds no key in a state dict."""

    def head(self, task, channels):
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Identity())


class _PriorHead(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.fc = torch.nn.Linear(channels, 1)
        torch.nn.init.constant_(self.fc.bias, float(torch.log(torch.tensor(4.0))))  # reads a value while made

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class _PriorCount(Count):
    def head(self, task, channels):
        return _PriorHead(channels)


@pytest.mark.parametrize("kind", [_PooledCount, _PriorCount], ids=["head without parameters", "head reading values"])
def test_a_run_of_a_registered_kind_loads_whatever_its_head(tmp_path, kind):
    """The run folder's check of its config against its weights (heads held, size from below) refused a run whose
    head has no parameters (no `heads.<task>.` key), and raised a traceback where the head, built on the meta device
    to be counted, reads a value while it is made (helper-77)."""
    from automtl.convert import ConvertConfig, build_supermodel
    from automtl.runs import load_run, save_run

    register_kind("count")(kind)
    try:
        cfg = ConvertConfig.from_dict({"backbone": "tiny", "input_size": SIZE, "tasks": [
            {"name": "seg", "kind": "segmentation", "classes": 3}, {"name": "n", "kind": "count"}]}, "test")
        sm = build_supermodel(cfg)
        save_run(sm, cfg, tmp_path / "run")
        loaded, _, _ = load_run(tmp_path / "run")
        assert all(torch.equal(a, b) for a, b in zip(sm.state_dict().values(), loaded.state_dict().values()))
    finally:
        KINDS.pop("count", None)
        HIGHER_IS_BETTER.pop("count_mae", None)
