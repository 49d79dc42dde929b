"""The compact model: cross-task CSE equals the supermodel's hard policy, on every builtin backbone."""
import copy
import functools

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from automtl.backbones import build_backbone, count_parameters, list_backbones
from automtl.compact import META_CHOICE, META_TASKS, compact
from automtl.errors import AutomtlError
from automtl.policy import SHARE, SKIP, SPECIALIZE, Policy
from automtl.supermodel import supermodel
from automtl.tasks import Task

BUILTINS = [s.name for s in list_backbones()]
TASKS = [Task("segment", "segmentation", classes=4), Task("depth", "depth"), Task("label", "classification", classes=5)]
SIZE = 32


@functools.lru_cache(maxsize=None)
def built(name):
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    return backbone, supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE)).eval()


def policies(sm):
    """all-share, all-specialize, all-skip-where-legal and random mixes."""
    skip_or_share = [[SKIP if legal else SHARE] * len(sm.task_names) for legal in sm.skip_legal]
    yield "share", Policy.uniform(sm.layer_names, sm.task_names, "share")
    yield "specialize", Policy.uniform(sm.layer_names, sm.task_names, "specialize")
    yield "skip", Policy(sm.layer_names, sm.task_names, skip_or_share)
    for seed in range(3):
        yield f"random{seed}", Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed)
    # A staged policy: share the first half, then branch.
    L = len(sm.layer_names)
    staged = [[SHARE] * 3 if l < L // 2 else [SHARE, SPECIALIZE, SKIP if sm.skip_legal[l] else SPECIALIZE] for l in range(L)]
    yield "staged", Policy(sm.layer_names, sm.task_names, staged)


@pytest.mark.parametrize("name", BUILTINS)
def test_compact_equals_supermodel_hard_policy(name):
    _, sm = built(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    for label, pol in policies(sm):
        model = compact(sm, pol).eval()
        with torch.no_grad():
            expected = sm.hard(pol)(x)
            got = model(x)
        for task in sm.task_names:
            assert torch.allclose(got[task], expected[task], atol=1e-5, rtol=1e-4), (label, task)
        assert model.num_parameters() == sm.policy_parameter_count(pol), label


@pytest.mark.parametrize("name", ["tiny", "resnet18", "mobilenet_v2"])
def test_all_share_is_one_backbone_and_all_specialize_is_t_backbones(name):
    backbone, sm = built(name)
    heads = count_parameters(sm.heads)
    share = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share")).eval()
    spec = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "specialize")).eval()
    assert share.num_parameters() == count_parameters(backbone) + heads
    assert spec.num_parameters() == len(TASKS) * count_parameters(backbone) + heads
    # All-share runs the backbone once, at batch B: bitwise equal features.
    x = torch.randn(2, 3, SIZE, SIZE)
    feature = [n for n in share.graph_module.graph.nodes if n.op == "call_module" and n.target.startswith("heads.")]
    assert len({n.args[0] for n in feature}) == 1
    convs = [n for n in share.graph_module.graph.nodes if n.meta.get(META_CHOICE) == "share"]
    assert len(convs) == len(sm.layer_names)
    specs = [n for n in spec.graph_module.graph.nodes if n.meta.get(META_CHOICE) == "specialize"]
    assert len(specs) == len(sm.layer_names) * len(TASKS)


def test_shared_prefix_runs_once_and_branches_after():
    _, sm = built("tiny")
    L = len(sm.layer_names)
    rows = [[SHARE, SHARE, SHARE] if l < 3 else [SHARE, SPECIALIZE, SPECIALIZE] for l in range(L)]
    model = compact(sm, Policy(sm.layer_names, sm.task_names, rows))
    nodes = [n for n in model.graph_module.graph.nodes if n.meta.get(META_CHOICE)]
    by_layer = {}
    for n in nodes:
        by_layer.setdefault(n.meta["automtl_layer"], []).append(n.meta[META_TASKS])
    for l, name in enumerate(sm.layer_names):
        if l < 3:
            assert by_layer[name] == [("segment", "depth", "label")]
        else:
            assert sorted(by_layer[name]) == [("depth",), ("label",), ("segment",)]


def test_task_subset_computes_only_what_it_needs():
    _, sm = built("tiny")
    pol = Policy.uniform(sm.layer_names, sm.task_names, "specialize")
    model = compact(sm, pol).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        full = model(x)
        only = model(x, tasks=["depth"])
    assert list(only) == ["depth"] and torch.equal(only["depth"], full["depth"])
    sub = model._subset(("depth",))
    used = {n.target for n in sub.graph.nodes if n.op == "call_module"}
    assert not any(".specialized.0" in t or ".specialized.2" in t for t in used)
    with pytest.raises(AutomtlError, match="no task 'nope'"):
        model(x, tasks=["nope"])


def test_compact_owns_its_weights():
    _, sm = built("tiny")
    pol = Policy.uniform(sm.layer_names, sm.task_names, "share")
    model = compact(sm, pol)
    before = sm.policy_layers[0].shared.conv.weight.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(sm.policy_layers[0].shared.conv.weight, before)


class InplaceAfterSkip(nn.Module):
    """A skipped conv hands its input on; an in-place ReLU there must not change the residual."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv0(x)  # may be negative: no ReLU before the residual
        return self.relu(self.conv1(x)) + x


def test_inplace_ops_are_safe_after_compaction():
    tasks = [Task("a", "depth"), Task("b", "depth")]
    sm = supermodel(InplaceAfterSkip(), tasks, torch.randn(1, 3, 8, 8)).eval()
    pol = Policy(sm.layer_names, sm.task_names, [[SHARE, SHARE], [SKIP, SPECIALIZE]])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert all(torch.allclose(compact(sm, pol).eval()(x)[t], sm.hard(pol)(x)[t], atol=1e-6) for t in sm.task_names)


def test_compact_needs_a_policy():
    sm = supermodel("tiny", TASKS, torch.randn(1, 3, SIZE, SIZE))
    with pytest.raises(AutomtlError, match="needs a policy"):
        compact(sm)


@pytest.mark.parametrize("name", BUILTINS)
def test_saved_equals_loaded_bit_for_bit(name, tmp_path):
    """saved = loaded: every builtin backbone's compact model, under random policies, survives a bundle exactly."""
    from automtl.formats import load, save

    _, sm = built(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    for seed in (11, 12):
        model = compact(sm, Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed)).eval()
        save(model, tmp_path / "m.automtl")
        loaded = load(tmp_path / "m.automtl")
        with torch.no_grad():
            want, got = model(x), loaded(x)
        assert list(got) == list(want) and all(torch.equal(got[t], want[t]) for t in want), (name, seed)


class NormsAfterBranch(nn.Module):
    """Norms with running statistics after a layer where tasks diverge: a conv's BN and InstanceNorm
    (momentum None: a cumulative average), and a BN after an add."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.in2 = nn.InstanceNorm2d(4, affine=True, track_running_stats=True, momentum=None)
        self.post = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.conv0(x)
        y = self.in2(self.conv2(self.bn1(self.conv1(x))))
        return self.post(x + y)


@pytest.mark.parametrize("rows", [[[SHARE, SPECIALIZE, SHARE], [SHARE] * 3, [SHARE] * 3],  # classes {0, 2}, {1}
                                  [[SPECIALIZE] * 3, [SHARE, SHARE, SPECIALIZE], [SHARE] * 3]])
def test_running_statistics_move_once_per_step_however_tasks_are_grouped(rows):
    """A shared norm runs once per class of tasks in the compact model and once per task in the supermodel;
    either way its running statistics take one update for all tasks (the mean of the tasks' changes)."""
    tasks = [Task("a", "depth"), Task("b", "depth"), Task("c", "depth")]
    torch.manual_seed(0)
    sm = supermodel(NormsAfterBranch(), tasks, torch.randn(1, 3, 8, 8)).train()
    pol = Policy(sm.layer_names, sm.task_names, rows)
    with torch.no_grad():  # tasks' copies that compute different things
        for layer in sm.policy_layers:
            for t, op in enumerate(layer.specialized):
                op.conv.weight.add_(0.1 * (t + 1))
    model = compact(sm, pol).train()
    sm.hard(pol)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        a, b = sm(x), model(x)
        (sum(v.mean() for v in a.values()) + sum(v.mean() for v in b.values())).backward()  # the graphs stay differentiable
    mine, theirs = model.graph_module.state_dict(), sm.state_dict()
    stats = [k for k in mine if "running" in k or "num_batches" in k]
    assert any("conv2.shared.bn" in k for k in stats) and any("post" in k for k in stats)  # the InstanceNorm is fused
    for k in stats:
        assert torch.equal(mine[k], theirs[k]), k
    assert int(mine["net.post.num_batches_tracked"]) == 2  # one update per step, not one per class
    model.eval(), sm.eval()
    with torch.no_grad():
        a, b = sm(x), model(x)
    assert all(torch.allclose(a[t], b[t], atol=1e-6) for t in a)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_in_another_floating_dtype_saves_and_loads(dtype, tmp_path):
    """The load-time dry run builds the file's modules in the file's dtype (float64 was refused as corrupt)."""
    from automtl.formats import load, save

    sm = supermodel("tiny", TASKS[:2], torch.randn(1, 3, SIZE, SIZE)).eval()
    model = compact(sm, Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=0)).to(dtype).eval()
    save(model, tmp_path / "m.automtl")
    loaded = load(tmp_path / "m.automtl")
    x = torch.randn(2, 3, SIZE, SIZE, dtype=dtype)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert all(b[t].dtype == dtype and torch.equal(a[t], b[t]) for t in a)


def test_policy_choices_are_names_or_indices_and_anything_else_is_one_clear_error():
    assert Policy(["l0", "l1"], ["a"], [["specialize"], [SKIP]]).choices == [[SPECIALIZE], [SKIP]]
    for rows in ([["fork"]], [[True]], [[5]], [7]):
        with pytest.raises(AutomtlError, match="share, specialize"):
            Policy(["l0"], ["a"], rows)


def test_a_train_mode_subset_runs_only_its_tasks_and_moves_their_statistics():
    tasks = [Task("a", "depth"), Task("b", "depth"), Task("c", "depth")]
    torch.manual_seed(0)
    sm = supermodel(NormsAfterBranch(), tasks, torch.randn(1, 3, 8, 8)).train()
    pol = Policy(sm.layer_names, sm.task_names, [[SHARE, SPECIALIZE, SHARE], [SHARE] * 3, [SHARE] * 3])
    model = compact(sm, pol).train()
    sub = model._subset(("a",), True)
    assert not any(n.name.endswith("__b") or "__b_" in n.name for n in sub.graph.nodes), [n.name for n in sub.graph.nodes]
    x = torch.randn(4, 3, 8, 8)
    out = model(x, tasks=["a"])
    assert set(out) == {"a"} and int(model.graph_module.state_dict()["net.post.num_batches_tracked"]) == 1


def test_wrong_arguments_get_one_sentence():
    """A policy that is not a Policy, and images of other channels than the example's, are named in a sentence
    (they were an AttributeError and torch's own convolution error)."""
    import automtl
    from automtl.errors import AutomtlError, ConfigError

    torch.manual_seed(0)
    sm = automtl.supermodel("tiny", [automtl.Task("a", "depth"), automtl.Task("b", "depth")], torch.randn(1, 3, 32, 32))
    for wrong in ("share", {"a": "share"}):
        with pytest.raises(ConfigError, match=r"^compact\(\) needs an automtl Policy"):
            compact(sm, wrong)
    four = torch.randn(2, 4, 32, 32)
    with pytest.raises(AutomtlError, match=r"^the supermodel takes images of 3 channel\(s\), as its example input "
                                           r"\(1, 3, 32, 32\) had, got 4"):
        sm(four)
    with pytest.raises(AutomtlError, match=r"^the supermodel's input for task 'a' takes images of 3 channel"):
        sm({"a": four, "b": four})
    model = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share"))
    with pytest.raises(AutomtlError, match=r"^the model takes images of 3 channel\(s\)"):
        model(four)
    with pytest.raises(AutomtlError, match=r"^the model takes an image batch \(N, C, H, W\), got \(3, 32, 32\)"):
        model(four[0, :3])


def test_a_bfloat16_model_is_evaluated_on_images_cast_to_its_dtype(tmp_path):
    """``automtl eval``'s evaluation of a saved bfloat16 model: the float32 images are cast to the model's dtype
    (a dtype mismatch error before), and the metrics are those of the float32 model within bfloat16's precision."""
    from automtl.evaluation import evaluate_model
    from automtl.formats import load, save

    tasks = [Task("segmentation", "segmentation", classes=5), Task("depth", "depth")]
    sm = supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE)).eval()
    model = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, SHARE)).eval()
    save(model.to(torch.bfloat16), tmp_path / "m.automtl")
    half = evaluate_model(load(tmp_path / "m.automtl"), samples=8, input_size=SIZE)
    full = evaluate_model(model.float(), samples=8, input_size=SIZE)
    assert abs(half["depth"]["abs_err"] - full["depth"]["abs_err"]) < 0.05 * full["depth"]["abs_err"]


class ReusedNormLoop(nn.Module):
    """One conv and one BatchNorm applied three times in a loop: three call sites of one module."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv, self.bn = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)

    def forward(self, x):
        x = self.stem(x)
        for _ in range(3):
            x = F.relu(self.bn(self.conv(x))) + x
        return x


@pytest.mark.parametrize("backbone", ["tiny", "norms_after_branch", "reused_norm_loop"])
def test_a_loaded_model_trains_its_norms_as_the_saved_one(backbone, tmp_path):
    """saved = loaded in train mode too: a file holds the eval graph, where a shared norm runs once per class of
    tasks, so a loaded model moved its running statistics once per class (2-6 times a step; its evaluation after
    one step differed by up to 0.18). Loaded, it groups them as the compact model's train graph does, task subsets
    included: outputs, running statistics and the evaluation after the step agree bit for bit."""
    from automtl.formats import load, save

    net = {"tiny": "tiny", "norms_after_branch": NormsAfterBranch(), "reused_norm_loop": ReusedNormLoop()}[backbone]
    tasks = [Task("a", "depth"), Task("b", "depth"), Task("c", "segmentation", classes=3)]
    torch.manual_seed(0)
    sm = supermodel(net, tasks, torch.randn(1, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    for seed in (1, 2, 3):
        model = compact(sm, Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed)).eval()
        save(model, tmp_path / "m.automtl")
        for subset in (None, ["a", "c"]):
            saved, loaded = copy.deepcopy(model).train(), load(tmp_path / "m.automtl").train()
            with torch.no_grad():
                want, got = saved(x, tasks=subset), loaded(x, tasks=subset)
            assert all(torch.equal(got[t], want[t]) for t in want), (backbone, seed, subset)
            mine, theirs = saved.state_dict(), loaded.state_dict()
            assert all(torch.equal(mine[k], theirs[k]) for k in mine), \
                [k for k in mine if not torch.equal(mine[k], theirs[k])]
            with torch.no_grad():
                want, got = saved.eval()(x), loaded.eval()(x)
            assert all(torch.equal(got[t], want[t]) for t in want), (backbone, seed, subset)


def test_a_loaded_model_says_once_that_it_trains_without_what_the_forward_does_only_in_training(tmp_path):
    """A file holds the eval graph and the constants its calls take in training: a backbone with stochastic depth
    (a random mask off the vocabulary) trains without it once loaded. Said once, at the first train-mode forward, and
    kept by a second save; dropout written in the forward and a backbone without either say nothing."""
    import sys as _sys
    import warnings

    from automtl.formats import load, save

    _sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from zoo import ConvNeXtish, DropoutNet

    for net, says in ((ConvNeXtish(), True), (DropoutNet(), False), (NormsAfterBranch(), False)):
        sm = supermodel(net, [Task("a", "depth"), Task("b", "depth")], torch.randn(1, 3, 16, 16))
        model = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, SHARE)).eval()
        assert model.trains_otherwise is False  # its own train graph holds it
        save(model, tmp_path / "m.automtl")
        loaded = load(tmp_path / "m.automtl")
        assert loaded.trains_otherwise is says
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded(torch.randn(2, 3, 16, 16))  # eval: nothing to say
            loaded.train()
            loaded(torch.randn(2, 3, 16, 16))
            loaded(torch.randn(2, 3, 16, 16))
        said = [w for w in caught if "trains without that" in str(w.message)]
        assert len(said) == (1 if says else 0), (type(net).__name__, [str(w.message) for w in caught])
        save(loaded, tmp_path / "again.automtl")  # the note survives a second save
        assert load(tmp_path / "again.automtl").trains_otherwise is says


def test_norm_calls_that_feed_each_other_are_not_grouped():
    """A file's notes could put two calls of one norm, the second reading the first's result, at one call site:
    one call for both would need its own result (a cycle, a traceback at load). They are left as they are, the graph
    handed in too (grouping it halfway left a cycle, and every train-mode forward of the loaded model failed), and
    the result says the statistics then move once per call."""
    from torch import fx

    from automtl.compact import META_SOURCE, META_TASKS, grouped_train_graph

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            a = self.bn(x)
            return {"a": a, "b": self.bn(a + 1)}

    gm = fx.symbolic_trace(Chain())
    for node, task in zip([n for n in gm.graph.nodes if n.op == "call_module"], ("a", "b")):
        node.meta[META_SOURCE], node.meta[META_TASKS] = "bn", (task,)
    before = str(gm.graph)
    assert grouped_train_graph(gm, ["a", "b"], gm.graph) == (None, False)
    assert str(gm.graph) == before


def test_a_norm_subclass_inlined_at_save_trains_as_the_saved_one(tmp_path):
    """timm's BatchNormAct2d calls F.batch_norm(training=self.training): a file held its eval-mode call only, so a
    loaded model trained it with its running statistics, never moved (off by up to 1.03). The file notes the call's
    train-mode constants: trained, the loaded model (and one saved again) computes what the saved one does, its
    statistics moved once a step where the norm runs for several classes. A momentum of None (a cumulative average
    of the step counter, read as a number) cannot be noted: the file says it trains otherwise, and saving leaves
    the model as it was (the train-mode trace counted a step on it)."""
    import sys as _sys
    import warnings

    from automtl.formats import load, save

    _sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from zoo import BatchNormAct2d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4), nn.Conv2d(4, 4, 3, padding=1),
                        BatchNormAct2d(4), nn.Conv2d(4, 4, 3, padding=1))
    sm = supermodel(net, [Task("a", "depth"), Task("b", "depth"), Task("c", "depth")], torch.randn(1, 3, 8, 8))
    policy = Policy.uniform(sm.layer_names, sm.task_names, SHARE)
    policy.choices[0][1] = SPECIALIZE  # the next layer's norm then runs for two classes
    model = compact(sm, policy).eval()
    save(model, tmp_path / "m.automtl")
    save(load(tmp_path / "m.automtl"), tmp_path / "again.automtl")
    x = torch.randn(4, 3, 8, 8)
    for path in ("m.automtl", "again.automtl"):
        saved, loaded = copy.deepcopy(model).train(), load(tmp_path / path).train()
        assert not loaded.trains_otherwise
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(2):
                a, b = saved(x), loaded(x)
                assert all(torch.equal(a[t], b[t]) for t in a), path
        with torch.no_grad():
            a, b = saved.eval()(x), loaded.eval()(x)
        assert all(torch.equal(a[t], b[t]) for t in a), path  # the running statistics moved alike

    net[1].momentum = None
    sm = supermodel(net, [Task("a", "depth"), Task("b", "depth")], torch.randn(1, 3, 8, 8))
    model = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, SHARE)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save(model, tmp_path / "cumulative.automtl")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    loaded = load(tmp_path / "cumulative.automtl")
    assert loaded.trains_otherwise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded.train()(x)
    assert any("trains without that" in str(w.message) for w in caught)


class TwoDropoutsOfOneValue(nn.Module):
    """Two dropouts of one value (MC-dropout's branches): in eval mode the same computation twice."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        f = self.c2(F.relu(self.c1(x)))
        return F.dropout(f, 0.5, self.training) * 2 + F.dropout(f, 0.5, self.training)


class BatchNormTwice(nn.BatchNorm2d):
    """A BatchNorm2d subclass (inlined at save, as timm's) that normalises twice in one forward."""

    def forward(self, x):
        return super().forward(F.relu(super().forward(x)))


class NormTwiceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), BatchNormTwice(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(self.b1(self.c1(F.relu(self.b0(self.c0(x))))))


@pytest.mark.parametrize("net", [TwoDropoutsOfOneValue, NormTwiceNet])
def test_what_a_file_cannot_say_in_train_mode_is_noted_not_guessed(net, tmp_path):
    """Two dropouts of one value are one computation in the eval graph: which of them the note belongs to is not
    known (the first got it, the second stayed off). A norm called twice in one class's forward cannot be grouped
    with the other classes' calls, so its statistics would move once per call. Both files say they train otherwise
    (before, they trained otherwise and said nothing: outputs off by 1.3, the evaluation after by 0.016)."""
    from automtl.formats import load, save

    torch.manual_seed(0)
    sm = supermodel(net(), [Task("a", "depth"), Task("b", "depth")], torch.randn(1, 3, 16, 16))
    policy = Policy.uniform(sm.layer_names, sm.task_names, SHARE)
    policy.choices[0][1] = SPECIALIZE  # the later norms then run for two classes
    save(compact(sm, policy).eval(), tmp_path / "m.automtl")
    assert load(tmp_path / "m.automtl").trains_otherwise


def test_a_noted_norm_that_reaches_no_output_moves_nothing():
    """A file's dead code is harmless in eval mode, but a noted batch_norm there would move its statistics in
    training: a loaded model's train graph leaves out what reaches no output."""
    from torch import fx

    from automtl.formats.bundle import _train_graph
    from automtl.formats.trainmode import META_TRAIN

    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(3))
            self.register_buffer("var", torch.ones(3))

        def forward(self, x):
            F.batch_norm(x * 1000, self.mean, self.var, None, None, False, 0.1, 1e-5)
            return {"a": x + 1}

    gm = fx.symbolic_trace(Dead())
    (node,) = [n for n in gm.graph.nodes if n.target is F.batch_norm]
    node.meta[META_TRAIN] = {"training": True}
    graph, exact = _train_graph(gm, ["a"])
    assert exact and not any(n.target is F.batch_norm for n in graph.nodes)
    trained = fx.GraphModule(gm, graph)
    trained(torch.randn(2, 3, 4, 4))
    assert torch.equal(gm.mean, torch.zeros(3))


def test_images_of_another_dtype_are_one_sentence(tmp_path):
    """float64 images into float32 weights were torch's "Input type (double) and bias type (float)" from inside a
    layer, and a loaded model blamed its file ("crafted or corrupted")."""
    import automtl

    sm = supermodel("tiny", [Task("depth", "depth")], torch.randn(1, 3, 16, 16)).eval()
    model = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share")).eval()
    automtl.save(model, tmp_path / "m.automtl")
    for m in (model, automtl.load(tmp_path / "m.automtl")):
        with pytest.raises(AutomtlError, match=r"the model takes float32 images, got "
                                               r"float64; convert them \(x.to\(torch.float32\)\)"):
            m(torch.randn(2, 3, 16, 16, dtype=torch.float64))
        with pytest.raises(AutomtlError, match=r"got uint8; convert them \(x.to\(torch.float32\) / 255\)"):
            m(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
        assert m.to(torch.float64)(torch.randn(2, 3, 16, 16, dtype=torch.float64))["depth"].dtype == torch.float64
