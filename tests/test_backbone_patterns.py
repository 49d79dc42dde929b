"""Backbone patterns of torchvision and timm (tests/zoo.py) through capture -> supermodel -> compact -> files.

The right values: the all-share supermodel computes the backbone's features (eval mode, and train
mode where nothing is random), the compact model computes the supermodel's outputs under the same
hard policy in both modes, and two eval calls agree. Issue 11 names each kind.
"""
import collections
import copy
import functools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import automtl
from automtl.capture import capture
from automtl.compact import compact
from automtl.errors import BackboneError
from automtl.policy import SHARE, SPECIALIZE, Policy
from automtl.tasks import Task

from zoo import ZOO, AuxHeadNet, BatchNormAct2d

TASKS = [Task("segment", "segmentation", classes=3), Task("depth", "depth")]
SIZE = 16
RANDOM = {"dropout", "efficientnet", "convnext", "own_generator"}  # random in train mode (dropout, stochastic depth, noise)


@functools.lru_cache(maxsize=None)
def built(name):
    """A freshly built backbone (train mode, as users hand it over) with non-trivial BN statistics, and its supermodel."""
    torch.manual_seed(0)
    backbone = ZOO[name]()
    with torch.no_grad():
        backbone(torch.randn(8, 3, SIZE, SIZE))  # move the running statistics away from 0 / 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = automtl.supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE))
    return backbone, sm


def expected(backbone, x):
    f = backbone.expected_features if hasattr(backbone, "expected_features") else backbone
    return f(x)


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_all_share_supermodel_equals_the_backbone_in_eval_mode(name):
    backbone, sm = built(name)
    x = torch.randn(3, 3, SIZE, SIZE)
    sm.eval().hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))
    with torch.no_grad():
        ref = expected(copy.deepcopy(backbone).eval(), x)
        for task, feat in sm.features(x).items():
            assert close(feat, ref), (name, task, (feat - ref).abs().max())
        again = sm.features(x)
    assert all(torch.equal(again[t], f) for t, f in sm.features(x).items())


@pytest.mark.parametrize("name", sorted(set(ZOO) - RANDOM))
def test_all_share_supermodel_equals_the_backbone_in_train_mode(name):
    backbone, sm = built(name)
    sm = copy.deepcopy(sm).train().hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = expected(copy.deepcopy(backbone).train(), x)
        for task, feat in sm.features(x).items():
            assert close(feat, ref, 1e-4), (name, task, (feat - ref).abs().max())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_compact_equals_supermodel_under_random_policies_in_both_modes(name):
    _, sm = built(name)
    x = torch.randn(3, 3, SIZE, SIZE)
    for seed in range(3):
        policy = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed)
        model = copy.deepcopy(sm).hard(policy)
        c = compact(model, policy)
        with torch.no_grad():
            model.eval(), c.eval()
            a, b = model(x), c(x)
            assert all(close(a[t], b[t], 1e-4) for t in a), (name, seed)
            assert all(torch.equal(b[t], c(x)[t]) for t in b)  # two eval calls agree
            model.train(), c.train()
            torch.manual_seed(seed)
            a = model(x)
            torch.manual_seed(seed)
            b = c(x)
            if name not in RANDOM:  # the same function; random ops draw in another order
                assert all(close(a[t], b[t], 1e-4) for t in a), (name, seed, "train")
                # and the same running statistics: one update per step for all tasks, however grouped
                mine, theirs = c.graph_module.state_dict(), model.state_dict()
                stats = [k for k in mine if "running" in k or "num_batches" in k]
                assert stats or name in {"convnext"}, name
                for k in stats:
                    assert close(mine[k].double(), theirs[k].double(), 1e-5), (name, seed, k)


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_train_mode_is_random_and_eval_mode_is_not(name):
    """Item 1: dropout and stochastic depth written in the forward act in train mode only."""
    _, sm = built(name)
    model = copy.deepcopy(sm).hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))
    c = compact(model)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        for m in (model, c):
            m.train()
            assert not torch.equal(m(x)["depth"], m(x)["depth"]), name
            m.eval()
            assert torch.equal(m(x)["depth"], m(x)["depth"]), name


def test_dropout_in_forward_is_off_in_eval_mode_and_in_saved_files(tmp_path):
    """Item 1, the issue's example: conv -> F.dropout(x, 0.5, self.training), built in train mode."""
    _, sm = built("dropout")
    c = compact(copy.deepcopy(sm).hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    path = tmp_path / "m.automtl"
    automtl.save(c, path)
    loaded = automtl.load(path)
    with torch.no_grad():
        ref = c(x)
        assert all(torch.allclose(loaded(x)[t], ref[t], atol=1e-6) for t in ref)
        assert sm.train()._net_for(False).graph is not sm.net.graph and c.train_graph is not None


def test_a_generator_the_backbone_owns_is_kept_by_every_copy():
    """Train-mode noise from a module's own torch.Generator, read by the train graph only (the trace check compared
    it with the backbone's at conversion): a deep copy of the supermodel and the compact model each keep a generator
    of their own at the same state (a copy draws the same noise; the compact model draws it for the rows it runs, so
    its draws are its own), and each call moves it."""
    backbone, sm = built("own_generator")

    def generator(model):
        (g,) = [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Generator)]
        return g

    # the build's checks drew from it and put it back: the converted model starts where the backbone is
    assert torch.equal(generator(sm).get_state(), backbone.g.get_state())
    sm = copy.deepcopy(sm).train().hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))

    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        twin, c = copy.deepcopy(sm), compact(sm)
        assert len({id(generator(m)) for m in (sm, twin, c)}) == 3
        assert torch.equal(generator(c).get_state(), generator(sm).get_state())
        a, b = sm(x), twin(x)
        assert all(torch.equal(a[t], b[t]) for t in a)
        assert not torch.equal(sm(x)["depth"], a["depth"]) and not torch.equal(c(x)["depth"], c(x)["depth"])
        sm.eval()
        assert torch.equal(sm(x)["depth"], sm(x)["depth"])


def test_norm_after_conv_is_fused_by_kind():
    """Item 2: a BatchNorm2d subclass with an activation follows its conv's choice and counts in its parameters."""
    _, sm = built("efficientnet")
    layer = sm.net.get_submodule("blocks.0.expand")
    assert isinstance(layer.shared.bn, BatchNormAct2d) and isinstance(layer.specialized[1].bn, BatchNormAct2d)
    info = sm.layer_info[sm.layer_names.index("blocks.0.expand")]
    assert info.unit_params == 8 * 16 + 2 * 16
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in sm.net.named_modules() if "." not in n)


def test_batchnorm_not_after_a_conv_normalises_per_task():
    """Item 3: in train mode a task's features do not move when only another task's copy changes."""
    _, sm = built("preact")
    sm = copy.deepcopy(sm).train()
    policy = Policy(sm.layer_names, sm.task_names, [[SPECIALIZE, SHARE]] + [[SHARE, SHARE]] * (len(sm.layer_names) - 1))
    sm.hard(policy)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        before = sm.features(x)["depth"]
        sm.net.get_submodule(sm.layer_names[0]).specialized[0].conv.weight.mul_(3)
        after = sm.features(x)["depth"]
    assert torch.allclose(before, after, atol=1e-6)


def test_conv_called_at_several_places_keeps_each_call_sites_norm():
    """Item 4: one conv module, two call sites, each with its own BN: no BN is fused into the shared conv."""
    _, sm = built("pyramid")
    assert "shared" in sm.layer_names
    assert isinstance(sm.net.get_submodule("shared").shared.bn, nn.Identity)


def test_conv_weight_read_directly_stays_a_plain_conv():
    """Item 6: a tied decoder reading self.enc.weight: enc is not made a policy layer."""
    _, sm = built("tied")
    assert "enc" not in sm.layer_names and isinstance(sm.net.get_submodule("enc"), nn.Conv2d)


def test_pruned_and_weight_normed_backbones_convert_with_their_current_weights():
    """Item 8: masks and weight norm are folded into the copy; the user's module keeps them."""
    backbone, sm = built("pruned")
    assert hasattr(backbone.layer1[1], "weight_mask")
    conv = sm.net.get_submodule("layer1.1").shared.conv
    assert not hasattr(conv, "weight_mask") and (conv.weight == 0).float().mean() >= 0.5


def test_skip_is_legal_only_where_it_fits_every_input_size():
    """Item 7: a stride-4 4x4 patchify stem built at 32 px runs at 30 px; 'same'-padded strided convs keep their projection."""
    torch.manual_seed(0)
    sm = automtl.supermodel(ZOO["convnext"](), TASKS, torch.randn(1, 3, 32, 32))
    assert not sm.skip_legal[sm.layer_names.index("stem")]
    for seed in range(3):
        sm.hard(Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed)).eval()
        out = sm(torch.randn(2, 3, 30, 30))
        assert out["depth"].shape == (2, 1, 30, 30)
    _, cls = built("classifier")
    assert cls.layer_info[cls.layer_names.index("stem.0")].skip_kind == "projection"


@pytest.mark.parametrize("name,channels,size", [
    ("classifier", 8, 8), ("squeezenet", 16, 8), ("segmentation", 16, 4), ("efficientnet", 16, 8), ("convnext", 8, 4),
    ("transform_input", 12, 8),
])
def test_default_feature_cut_is_before_spatial_collapse_and_classifier(name, channels, size):
    """Item 9: not the pooled 1x1 map, not a classifier conv, not the logits."""
    _, sm = built(name)
    assert sm.feature_shape == (1, channels, size, size)


def test_a_train_only_branch_that_fails_at_the_example_size_does_not_stop_the_conversion():
    """Inception v3's auxiliary classifier at a small input: it runs in train mode only, after the feature cut."""
    torch.manual_seed(0)
    backbone = AuxHeadNet()
    with pytest.raises(RuntimeError):
        backbone.train()(torch.randn(2, 3, SIZE, SIZE))  # the backbone itself cannot train at this size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = automtl.supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE))
    sm.hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))
    x = torch.randn(3, 3, SIZE, SIZE)
    for train in (False, True):
        sm.train(train), backbone.train(train)
        with torch.no_grad():
            ref = backbone.expected_features(x)
            assert all(close(f, ref, 1e-4) for f in sm.features(x).values()), train


def test_several_outputs_say_which_one_was_used_and_module_paths_name_features():
    with pytest.warns(UserWarning, match="'out', 'aux'.*output 'out'"):
        capture(ZOO["segmentation"](), torch.randn(1, 3, SIZE, SIZE))
    cap = capture(ZOO["segmentation"](), torch.randn(1, 3, SIZE, SIZE), feature_node="backbone.0")
    assert cap.feature_shape == (1, 8, 8, 8)
    cap = capture(ZOO["classifier"](), torch.randn(1, 3, SIZE, SIZE), feature_node="layer1")
    assert cap.feature_shape == (1, 8, 8, 8)
    with pytest.raises(BackboneError, match="did you mean layer1"):
        capture(ZOO["classifier"](), torch.randn(1, 3, SIZE, SIZE), feature_node="layer2")


def test_in_place_write_through_a_view_that_is_read_again_is_refused():
    class ViewWrite(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            y = self.c(x)
            y[:, :4].mul_(2)
            return y + 1

    with pytest.raises(BackboneError, match="view of a tensor in place.*test_backbone_patterns.py"):
        capture(ViewWrite(), torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_saved_and_exported_files_equal_the_compact_model(name, tmp_path):
    _, sm = built(name)
    policy = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=1)
    c = compact(copy.deepcopy(sm).hard(policy)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = c(x)
    automtl.export(c, tmp_path / "m.pt2")
    program = automtl.load_pt2(tmp_path / "m.pt2").module()  # what export writes, the checked loader reads
    out = program(x)
    assert all(close(out[t], ref[t], 1e-4) for t in ref)
    x3 = torch.randn(3, 3, SIZE, SIZE)  # the batch stays dynamic
    with torch.no_grad():
        ref3 = c(x3)
    assert all(close(program(x3)[t], ref3[t], 1e-4) for t in ref3)
    automtl.save(c, tmp_path / "m.automtl")
    loaded = automtl.load(tmp_path / "m.automtl")
    assert all(close(loaded(x)[t], ref[t], 1e-5) for t in ref)


#: What a file cannot describe in train mode: random masks and noise drawn by operations off the vocabulary
#: (stochastic depth's bernoulli_, a generator's randn), a tensor only the train branch builds (torch.arange).
TRAINS_OTHERWISE = {"efficientnet", "convnext", "own_generator", "train_only_constant"}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_a_loaded_model_trains_as_the_saved_one(name, tmp_path):
    """saved = loaded in train mode: a file holds the eval graph and, on each call that takes other constants in
    training (F.batch_norm's training and momentum, F.dropout's training, written in the backbone's forward or in a
    module inlined at save, as timm's BatchNormAct2d), those constants. Trained two steps from one seed, the loaded
    model's outputs, and its evaluation after (weights and running statistics), are the saved one's. A file that
    cannot describe its train mode says so once, at the first train-mode forward."""
    _, sm = built(name)
    x = torch.randn(4, 3, SIZE, SIZE)
    for seed in (1, 2):
        policy = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed)
        saved = compact(copy.deepcopy(sm).hard(policy)).eval()
        automtl.save(saved, tmp_path / "m.automtl")
        loaded = automtl.load(tmp_path / "m.automtl")
        assert loaded.trains_otherwise is (name in TRAINS_OTHERWISE), name
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            models = [saved.train(), loaded.train()]
            optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
            for step in range(2):
                outs = []
                for model, optimizer in zip(models, optimizers):
                    torch.manual_seed(step)
                    y = model(x)
                    sum(v.square().mean() for v in y.values()).backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    outs.append(y)
                if not loaded.trains_otherwise:
                    assert all(close(outs[0][t], outs[1][t]) for t in outs[0]), (name, seed, step)
        said = [w for w in caught if "trains without that" in str(w.message)]
        assert len(said) == (name in TRAINS_OTHERWISE), (name, [str(w.message) for w in caught])
        if not loaded.trains_otherwise:
            with torch.no_grad():
                a, b = saved.eval()(x), loaded.eval()(x)
            assert all(close(a[t], b[t]) for t in a), (name, seed, "evaluated after training")


_Pyramid = collections.namedtuple("_Pyramid", ["fine", "coarse"])


class _NamedTupleOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return _Pyramid(coarse=self.b(y), fine=y)


def test_a_namedtuple_of_outputs_is_cut_as_a_tuple_of_them():
    """A namedtuple was one output to torch.fx: the cut went to the last map (the coarse one) without a warning, where
    the same outputs as a tuple are cut on the way to the first with one."""
    with pytest.warns(UserWarning, match=r"returns 2 outputs \('fine', 'coarse'\).*on the way to output 'fine'"):
        cap = capture(_NamedTupleOutputs(), torch.randn(1, 3, SIZE, SIZE))
    assert cap.feature_shape == (1, 8, SIZE, SIZE)


def test_training_batches_never_end_with_a_short_last_batch():
    """Item 12: 17 samples at batch 16 train on full batches only (BatchNorm cannot train on one sample)."""
    from torch.utils.data import DataLoader, TensorDataset

    from automtl.search import _Stream

    data = TensorDataset(torch.randn(17, 3, 4, 4), torch.zeros(17))
    stream = _Stream(DataLoader(data, batch_size=16, shuffle=True), "train", 0, 0, 1, 16)
    it = stream.iterate(0)
    assert [len(next(it)[0]) for _ in range(4)] == [16] * 4


@pytest.mark.parametrize("name", sorted(ZOO))
def test_batched_pass_equals_task_by_task_with_shared_and_per_task_inputs(name):
    from automtl.reference import run_task_by_task

    _, sm = built(name)
    sm = copy.deepcopy(sm).soft(0.7)
    x = torch.randn(2, 3, SIZE, SIZE)
    xs = {t: torch.randn(2, 3, SIZE, SIZE) for t in sm.task_names}
    mix = sm.mixing_weights(torch.Generator().manual_seed(1))
    modes = (False,) if name in RANDOM else (False, True)
    with torch.no_grad():
        for train in modes:
            sm.train(train)
            for inp in (x, xs):
                a, b = sm(inp, mix=mix), run_task_by_task(sm, inp, mix)
                assert all(close(a[t], b[t], 1e-4) for t in a), (name, train)


class _Mixing(nn.Module):
    """Two convs around an operation written in ``mix``; tasks folded into one batch would mix their rows there."""

    def __init__(self, mix):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.mix = mix

    def forward(self, x):
        return self.c2(self.mix(self.c1(x), x.shape[0]))


class _FlipTTA(nn.Module):
    """Test-time augmentation inside the model: the batch and its mirror through the convs, averaged back with
    the batch size read from the input."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        n = x.shape[0]
        y = self.c2(torch.relu(self.c1(torch.cat([x, x.flip(-1)], 0))))
        return (y[:n] + y[n:].flip(-1)) / 2


MIXERS = {
    "mean over the batch": (lambda: _Mixing(lambda y, n: y - y.mean(0, keepdim=True)), "mean"),
    "minibatch standard deviation": (lambda: _Mixing(lambda y, n: y + y.std(0, keepdim=True).mean()), "std"),
    "flip test-time augmentation": (_FlipTTA, "getitem"),
    "samples rolled along the batch": (lambda: _Mixing(lambda y, n: y + 0.5 * y.roll(1, 0)), "roll"),
    "batch-wide softmax": (lambda: _Mixing(lambda y, n: y * y.softmax(0)), "softmax"),
    "flattened batch": (lambda: _Mixing(lambda y, n: y - y.flatten().mean()), "flatten"),
    "mean of the whole tensor": (lambda: _Mixing(lambda y, n: y - y.mean()), "mean"),
    "roll by four": (lambda: _Mixing(lambda y, n: y + torch.roll(y, 4, 0)), "roll"),
    "mean over the batch of a square root": (lambda: _Mixing(lambda y, n: y.abs().sqrt() - y.abs().sqrt().mean(0)), "mean"),
    "input standardised with the batch's statistics": (lambda: _Standardised(), None),
}


class _Standardised(nn.Module):
    """The input standardised with the whole batch's mean and spread (one batch for all tasks is exact; a batch per
    task folded together is not)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1((x - x.mean()) / x.std())))


@pytest.mark.parametrize("pattern", sorted(MIXERS))
def test_a_backbone_that_mixes_the_samples_of_a_batch_is_refused(pattern):
    """Folding tasks into the batch is exact only for per-sample operations; any other is refused by the
    check that the folded pass equals the task-by-task one, naming the operation where it can."""
    make, op = MIXERS[pattern]
    where = f" \\(at node '{op}" if op else ""
    with pytest.raises(BackboneError, match=f"mixes the samples of a batch{where}"):
        automtl.supermodel(make(), TASKS, torch.randn(1, 3, SIZE, SIZE))


class _TrainOnly(nn.Module):
    """Two convs around ``mix``, applied in train mode only (eval mode is per sample): the eval-mode check cannot
    see it; each task's training would depend on the other tasks' rows."""

    def __init__(self, mix):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.mix = mix

    def forward(self, x):
        y = self.c1(x)
        if self.training:
            y = self.mix(y)
        return self.c2(torch.relu(y))


def _hand_norm(y):
    mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), keepdim=True)
    return (y - mean) / (var + 1e-5).sqrt()


TRAIN_ONLY_MIXERS = {
    "batch statistics by hand": (lambda: _TrainOnly(_hand_norm), "mean"),
    "a random shuffle of the batch": (lambda: _TrainOnly(lambda y: y + y[torch.randperm(y.shape[0])]), None),
    "mixup with the mirrored batch": (lambda: _TrainOnly(lambda y: 0.7 * y + 0.3 * y.flip(0)), "flip"),
    "dropout then a batch mean": (lambda: _TrainOnly(lambda y: F.dropout(y, 0.5) - F.dropout(y, 0.5).mean(0)), "mean"),
}


@pytest.mark.parametrize("pattern", sorted(TRAIN_ONLY_MIXERS))
def test_a_backbone_that_mixes_the_batch_in_train_mode_only_is_refused(pattern):
    """Random draws (the shuffle, dropout) are repeated from one random state, so only the other task's rows
    can move an output: the check refuses batch mixing that eval mode does not have."""
    make, op = TRAIN_ONLY_MIXERS[pattern]
    where = f" \\(at node '{op}" if op else ""
    with pytest.raises(BackboneError, match=f"mixes the samples of a batch in train mode{where}.*F.batch_norm"):
        automtl.supermodel(make(), TASKS, torch.randn(1, 3, SIZE, SIZE))


def test_the_folding_check_keeps_trained_copies():
    """A supermodel whose task copies were trained apart keeps them through the check (restored, not re-copied)."""
    from automtl.foldcheck import check_tasks_apart

    torch.manual_seed(0)
    sm = automtl.supermodel(ZOO["efficientnet"](), TASKS, torch.randn(1, 3, SIZE, SIZE))
    with torch.no_grad():
        for layer in sm.policy_layers:
            for unit in layer.specialized:
                for p in unit.parameters():
                    p.add_(torch.randn_like(p))
    sm.train()
    sm(torch.randn(4, 3, SIZE, SIZE))  # running statistics moved by training
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    check_tasks_apart(sm)
    after = sm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_backbone_that_takes_one_image_only_is_refused_in_one_sentence():
    with pytest.raises(BackboneError, match="fails on a check batch of 3 images a task .*must take any batch size"):
        automtl.supermodel(_Mixing(lambda y, n: y.view(1, 8, SIZE, SIZE)), TASKS, torch.randn(1, 3, SIZE, SIZE))


def test_operations_along_the_batch_that_keep_samples_apart_are_accepted():
    """A concatenation along the batch split back at the folded size keeps each task's rows together: exact."""
    def both(y, n):
        pair = torch.cat([y, y.flip(-1)], 0)
        return (pair[:n] + pair[n:].flip(-1)) / 2

    sm = automtl.supermodel(_Mixing(both), TASKS, torch.randn(1, 3, SIZE, SIZE))
    backbone = _Mixing(both).eval()
    backbone.load_state_dict({k.replace(".shared.conv", ""): v for k, v in sm.net.state_dict().items()
                              if ".shared.conv" in k})
    sm.eval().hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        for feat in sm.features(x).values():
            assert close(feat, backbone(x))


def test_the_folding_check_leaves_the_supermodel_and_the_random_state_as_they_were():
    from automtl.foldcheck import check_tasks_apart

    torch.manual_seed(0)
    sm = automtl.supermodel(ZOO["efficientnet"](), TASKS, torch.randn(1, 3, SIZE, SIZE))  # a fresh one: every
    before = {k: v.clone() for k, v in sm.state_dict().items()}  # task's copy is still its shared operator
    state, training, mode = torch.random.get_rng_state(), sm.training, sm.mode
    check_tasks_apart(sm)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (sm.training, sm.mode) == (training, mode)
    after = sm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_graphs_built_on_first_use_follow_the_model_to_another_dtype():
    """The train-mode and per-task graphs (built by supermodel()'s fold check) and the compact model's train graph
    read a hand-written norm's running statistics directly; after .double() they read the new tensors, so training
    runs and the statistics in the state dict move."""
    torch.manual_seed(0)
    sm = automtl.supermodel(ZOO["preact"](), TASKS, torch.randn(1, 3, SIZE, SIZE)).double()
    model = compact(copy.deepcopy(sm).hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))).train()
    model(torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64))  # its train graph, built in float64 ...
    model.float()  # ... then moved back
    for net, x, key in ((sm.train(), {t: torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64) for t in sm.task_names},
                         "net.bn2.running_mean"),
                        (model, torch.randn(2, 3, SIZE, SIZE), "graph_module.net.bn2.running_mean")):
        before = net.state_dict()[key].clone()
        with torch.no_grad():
            net(x)
        assert not torch.equal(net.state_dict()[key], before), key


class _BufferThroughAView(nn.Module):
    """Input statistics in buffers, read through a view (``x - self.mean.view(1, -1, 1, 1)``), as models that
    normalise their input do; with ``update``, a running mean kept by hand, moved in place in train mode."""

    def __init__(self, update=False):
        super().__init__()
        self.register_buffer("mean", torch.zeros(3))
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.update = update

    def forward(self, x):
        if self.training and self.update:
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean((0, 2, 3)))
        return self.c2(torch.relu(self.c1(x - self.mean.view(1, -1, 1, 1))))


def test_a_buffer_read_through_a_view_is_read_where_it_is_kept():
    """torch.fx's default trace froze ``self.mean.view(...)`` into a constant: a buffer loaded or changed after
    supermodel() was never read, and it was missing from the state dict."""
    torch.manual_seed(0)
    sm = automtl.supermodel(_BufferThroughAView(), TASKS, torch.randn(1, 3, SIZE, SIZE)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        before = sm(x)["depth"]
        sm.load_state_dict({**sm.state_dict(), "net.mean": torch.full((3,), 5.0)})
        after = sm(x)["depth"]
    assert not torch.allclose(before, after)


def test_a_buffer_changed_in_place_by_the_forward_is_refused():
    backbone = _BufferThroughAView(update=True)
    with pytest.raises(BackboneError, match="changes its own tensor 'mean' in place during the forward .*BatchNorm"):
        automtl.supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE))
    assert torch.equal(backbone.mean, torch.zeros(3))  # the trace did not run the update on the backbone either


class _BufferUses(nn.Module):
    """Buffers whose size drives Python (a loop over a table's rows, a check of its length), one whose value does
    (``int(self.repeats)``: traced with torch.fx's default, buffers as constants), and writes into module tensors
    that do not need refusing: a copy made by indexing with a tensor, a cache of a parameter, an average kept in
    the classifier after the feature node."""

    def __init__(self, value_in_python=False):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("table", torch.randn(4, 8))
        self.register_buffer("index", torch.tensor([0, 2]))
        self.register_buffer("repeats", torch.tensor(2))
        self.register_buffer("cache", torch.zeros(8), persistent=False)
        self.register_buffer("logit_mean", torch.zeros(3))
        self.scale = nn.Parameter(torch.ones(8))
        self.fc = nn.Linear(8, 3)
        self.value_in_python = value_in_python

    def forward(self, x):
        y = self.c1(x)
        if self.table.numel() > 0 and len(self.table) == self.table.shape[0]:
            for i in range(self.table.size(0)):
                y = y + self.table[i].view(1, -1, 1, 1) * 0.1
        rows = self.table[self.index]
        rows.add_(1.0)  # a copy: indexing with a tensor
        self.cache.copy_(self.scale.detach() * 2)  # made from a parameter only, every call
        y = y * self.cache.view(1, -1, 1, 1) + rows.mean(0).view(1, -1, 1, 1)
        if self.value_in_python:
            y = y * int(self.repeats)
        f = self.c2(torch.relu(y))
        logits = self.fc(f.mean((2, 3)))
        if self.training:
            self.logit_mean.mul_(0.9).add_(0.1 * logits.detach().mean(0))  # after the feature node: cut away
        return logits


@pytest.mark.parametrize("value_in_python", [False, True], ids=["sizes", "a value"])
def test_buffers_read_in_python_and_harmless_writes_still_convert(value_in_python):
    torch.manual_seed(0)
    backbone = _BufferUses(value_in_python).eval()
    sm = automtl.supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE), feature_node="c2")
    assert sm.layer_names == ["c1", "c2"]
    sm.eval().hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))
    x = torch.randn(2, 3, SIZE, SIZE)

    def expected():
        return backbone.c2(torch.relu((backbone.c1(x) + backbone.table.sum(0).view(1, -1, 1, 1) * 0.1)
                                      * (backbone.scale * 2).view(1, -1, 1, 1)
                                      + (backbone.table[backbone.index] + 1).mean(0).view(1, -1, 1, 1))
                           * (2 if value_in_python else 1))

    for step in range(2):  # as converted; then with a trained parameter and a loaded buffer, in both
        with torch.no_grad():
            assert all(close(f, expected()) for f in sm.features(x).values())
            for model in (backbone, sm):
                next(p for n, p in model.named_parameters() if n.endswith("scale")).mul_(3)
                next(b for n, b in model.named_buffers() if n.endswith("table")).add_(1)


class _BufferReadInPython(nn.Module):
    """``int(self.repeats)`` needs a buffer's value in Python while traced; beside it, a buffer changed in the
    forward in one of three ways."""

    def __init__(self, change):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("repeats", torch.tensor(2))
        self.register_buffer("seen", torch.zeros(()))
        self.register_buffer("cache", torch.zeros(8))
        self.change = change

    def forward(self, x):
        y = self.c1(x)
        if self.change == "a value read in Python, counted":
            if self.seen < 10:  # a warm-up read in Python
                y = y * 0.5
            self.seen += 1
        elif self.change == "a value read in Python, written from the input":
            self.repeats.copy_(x.shape[1] + x.detach().mean().round().long())
        elif self.change == "a cache, when no buffer traces symbolically":
            json.dumps(self.cache.tolist())  # a cache key: fails on a traced value whatever the buffers are
            self.cache.copy_(self.c1.bias.detach() * 2)
            y = y * self.cache.view(1, -1, 1, 1)
        return self.c2(torch.relu(y * int(self.repeats)))


BUFFER_CHANGES = {
    "a value read in Python, counted":
        "changes its own tensor 'seen' in place during the forward while torch.fx traces it as a constant \\(Python "
        "reads the value of 'repeats', 'seen'\\), so the converted model would never make that change",
    "a value read in Python, written from the input":
        "writes its own tensor 'repeats' during the forward at .*repeats.copy_.* while torch.fx traces it as a "
        "constant \\(Python reads the value of 'repeats'\\), so the converted model would read the value it had",
    "a cache, when no buffer traces symbolically":
        "writes its own tensor 'cache' during the forward at .* while torch.fx traces it as a constant \\(the "
        "backbone traces no other way\\)",
}


@pytest.mark.parametrize("change", sorted(BUFFER_CHANGES))
def test_a_buffer_traced_as_a_constant_and_changed_in_the_forward_is_refused(change):
    backbone = _BufferReadInPython(change)
    before = copy.deepcopy(backbone.state_dict())
    with pytest.raises(BackboneError, match=BUFFER_CHANGES[change]):
        automtl.supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE))
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())  # the user's backbone as it was


class _StateWrite(_BufferThroughAView):
    """A running mean kept by hand, written in one of the ways Python and torch allow."""

    def __init__(self, write):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.write = write

    def forward(self, x):
        if self.training:
            self.write(self, x.detach().mean((0, 2, 3)))
        return self.c2(torch.relu(self.c1(x - self.mean.view(1, -1, 1, 1))))


def _rebind(m, v):
    m.mean = 0.9 * m.mean + 0.1 * v


def _count(m, v):
    m.count += 1


def _set_data(m, v):
    m.mean.data = 0.9 * m.mean + 0.1 * v


def _setitem(m, v):
    m.mean[:] = 0.9 * m.mean + 0.1 * v


STATE_WRITES = {
    "out=": (lambda m, v: torch.add(0.9 * m.mean, 0.1 * v, out=m.mean), "changes its own tensor 'mean' in place"),
    ".data =": (_set_data, "changes its own tensor 'mean' in place"),
    "item assignment": (_setitem, "assigns into its own tensor 'mean' during the forward at .*m.mean\\[:\\] ="),
    "rebinding": (_rebind, "assigns its own tensor 'mean' during the forward"),
    "a counter": (_count, "assigns its own tensor 'count' during the forward"),
}


@pytest.mark.parametrize("pattern", sorted(STATE_WRITES))
def test_every_way_of_writing_a_buffer_in_the_forward_is_refused(pattern):
    write, message = STATE_WRITES[pattern]
    backbone = _StateWrite(write)
    with pytest.raises(BackboneError, match=message + ".*BatchNorm module or F.batch_norm"):
        automtl.supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE))
    assert torch.equal(backbone.mean, torch.zeros(3)) and torch.equal(backbone.count, torch.zeros(()))


class _FrozenByTrain(nn.Module):
    """Frozen BatchNorm the way detection code often does it: a train() override that keeps it in eval mode."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

    def train(self, mode=True):
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x)) + x.mean()))


def test_norm_layers_frozen_by_a_train_override_are_refused():
    with pytest.raises(BackboneError, match="train\\(\\) keeps 'bn' in eval mode .*FrozenBatchNorm2d"):
        automtl.supermodel(_FrozenByTrain(), TASKS, torch.randn(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("layer", ["norm", "dropout"])
def test_layers_put_in_eval_mode_by_hand_in_a_train_mode_backbone_are_refused(layer):
    """``backbone.train(); backbone.bn.eval()``, the usual way to freeze a norm layer when fine-tuning: automtl sets
    the modes itself, so the supermodel trained it (1.36 off in train mode, its running statistics moving)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.2),
                             nn.Conv2d(8, 8, 3, padding=1)).train()
    backbone[1 if layer == "norm" else 3].eval()
    message = {"norm": "the backbone is in train mode but keeps '1' in eval mode .a frozen norm layer.*FrozenBatchNorm2d",
               "dropout": "the backbone is in train mode but keeps '3' in eval mode .a dropout turned off.*probability "
                          "to 0"}[layer]
    with pytest.raises(BackboneError, match=message):
        automtl.supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE))
    automtl.supermodel(backbone.eval(), TASKS, torch.randn(1, 3, SIZE, SIZE))  # a backbone in eval mode: as usual


@pytest.mark.parametrize("layer", ["norm", "dropout"])
def test_layers_put_in_train_mode_by_hand_in_an_eval_mode_backbone_are_refused(layer):
    """The reverse: ``backbone.eval(); backbone.drop.train()`` (Monte Carlo dropout, test-time BatchNorm) converted
    silently into a model whose modes automtl sets, so the dropout was off and the norm used running statistics
    (1.1 and 3.0 off the user's backbone)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.2),
                             nn.Conv2d(8, 8, 3, padding=1)).eval()
    backbone[1 if layer == "norm" else 3].train()
    what = {"norm": "a norm normalising with its batch", "dropout": "a dropout left on"}[layer]
    with pytest.raises(BackboneError, match=f"the backbone is in eval mode but keeps '{1 if layer == 'norm' else 3}' "
                                            f"in train mode .{what}.*one mode"):
        automtl.supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_supermodel_is_in_the_backbone_s_mode(mode):
    """A backbone handed over in eval mode (pretrained, loaded for inference) gave a supermodel whose flag said train
    while its norms and dropouts stayed in eval: its compact model, all in train mode, differed by 0.8."""
    torch.manual_seed(0)
    backbone = getattr(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                                     nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)), mode)()
    sm = automtl.supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE))
    assert {m.training for m in sm.modules()} == {mode == "train"}
    policy = Policy.uniform(sm.layer_names, sm.task_names, "share")
    c = compact(sm.hard(policy), policy)
    assert {m.training for m in c.modules()} == {mode == "train"}
    if mode == "eval":
        x = torch.randn(2, 3, SIZE, SIZE)
        with torch.no_grad():
            a, b = sm(x), c(x)
        assert all(close(a[t], b[t], 1e-5) for t in a)


def test_a_buffer_written_through_data_is_refused():
    class _DataWrite(_BufferThroughAView):
        def forward(self, x):
            if self.training:
                self.mean.data.copy_(0.9 * self.mean + 0.1 * x.detach().mean((0, 2, 3)))
            return self.c2(torch.relu(self.c1(x - self.mean.view(1, -1, 1, 1))))

    with pytest.raises(BackboneError, match="changes its own tensor 'mean' in place"):
        automtl.supermodel(_DataWrite(), TASKS, torch.randn(1, 3, SIZE, SIZE))


class _NormBlock(nn.Module):
    """A block the trace does not enter (a leaf), holding a norm that uses batch or running statistics."""

    def __init__(self, norm):
        super().__init__()
        self.n = norm

    def forward(self, x):
        return self.n(x) + x


class _LeafNormNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.c1, self.blk, self.c2 = nn.Conv2d(3, 8, 3, padding=1), _NormBlock(norm), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(self.blk(self.c1(x)))


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(8), nn.InstanceNorm2d(8, track_running_stats=True)],
                         ids=["batch norm", "instance norm with running statistics"])
def test_a_leaf_module_holding_a_norm_sees_each_task_s_rows_apart(norm):
    """A leaf holding a norm is called per task like the norm itself: train-mode outputs and the running
    statistics after a step are the compact model's (which calls it once per class of tasks)."""
    torch.manual_seed(0)
    sm = automtl.supermodel(_LeafNormNet(norm).train(), TASKS, torch.randn(1, 3, SIZE, SIZE), leaf_modules=[_NormBlock])
    policy = Policy(sm.layer_names, sm.task_names, [[SHARE, SPECIALIZE], [SHARE, SHARE]])  # tasks apart after c1
    hard, model = copy.deepcopy(sm).hard(policy).train(), compact(copy.deepcopy(sm).hard(policy)).train()
    x = torch.randn(3, 3, SIZE, SIZE)
    a, b = hard(x), model(x)
    assert all(close(a[t], b[t]) for t in a)
    ours, theirs = hard.state_dict(), model.state_dict()
    for key in ("running_mean", "running_var"):
        assert close(ours[f"net.blk.n.{key}"], theirs[f"graph_module.net.blk.n.{key}"])


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.n = nn.BatchNorm2d(8)

    def forward(self, x, y, scale=1.0):
        return self.n(x) * scale + y


class _Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.n = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.n(x), x


class _LeafCalls(nn.Module):
    def __init__(self, tuple_out):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.leaf = _Split() if tuple_out else _Gate()
        self.tuple_out = tuple_out

    def forward(self, x):
        y = self.c1(x)
        y = self.leaf(y)[0] if self.tuple_out else self.leaf(y, y, scale=3.0)
        return self.c2(y)


@pytest.mark.parametrize("tuple_out, message", [(False, "with more than one argument"), (True, "returns a tuple")],
                         ids=["two arguments", "a tuple out"])
def test_a_leaf_holding_a_norm_that_cannot_be_split_by_task_is_refused(tuple_out, message):
    with pytest.raises(BackboneError, match=f"{message}.*mark a smaller module"):
        automtl.supermodel(_LeafCalls(tuple_out), TASKS, torch.randn(1, 3, SIZE, SIZE), leaf_modules=[_Gate, _Split])


def _instance_norm(moves):
    class _FunctionalInstanceNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.register_buffer("running_mean", torch.zeros(8))
            self.register_buffer("running_var", torch.ones(8))

        def forward(self, x):
            y = F.instance_norm(self.c1(x), self.running_mean, self.running_var, use_input_stats=moves(self))
            return self.c2(y)

    return _FunctionalInstanceNorm()


def test_a_functional_norm_moving_running_statistics_is_refused():
    """F.instance_norm with running statistics in train mode: the compact model would move them once per class
    of tasks; refused, pointing to the module. Reading them only (use_input_stats=False) is per sample: kept."""
    with pytest.raises(BackboneError, match="calls F.instance_norm with running statistics .*nn.InstanceNorm2d"):
        automtl.supermodel(_instance_norm(lambda m: m.training), TASKS, torch.randn(1, 3, SIZE, SIZE))
    sm = automtl.supermodel(_instance_norm(lambda m: False), TASKS, torch.randn(1, 3, SIZE, SIZE))
    assert sm.layer_names == ["c1", "c2"]


def test_convs_off_the_input_stay_plain_modules():
    _, sm = built("positional_conv")
    assert "pos_conv" not in sm.layer_names and sm.layer_names


class _TinyViT(nn.Module):
    """A patch-embedding conv, then blocks on tokens: the deepest 4-D map is the patch embedding."""

    def __init__(self, blocks=10, dim=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                                  nn.Linear(2 * dim, dim)) for _ in range(blocks))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            t = t + block(t)
        return self.head(t.mean(1))


def test_a_cut_that_leaves_out_the_body_of_the_model_says_so():
    with pytest.warns(UserWarning, match=r"cut at 'embed'.*leaves out \d+ modules after it holding \d+% of the backbone's"):
        automtl.supermodel(_TinyViT(), TASKS, torch.randn(1, 3, SIZE, SIZE))
    with warnings.catch_warnings():  # a classifier after the cut is what the cut is for: no note
        warnings.simplefilter("error")
        automtl.supermodel(ZOO["classifier"](), TASKS, torch.randn(1, 3, SIZE, SIZE))
        automtl.supermodel(_TinyViT(), TASKS, torch.randn(1, 3, SIZE, SIZE), feature_node="embed")


def test_the_folding_check_keeps_each_modules_mode_and_skips_a_supermodel_of_mixed_dtypes():
    backbone = ZOO["efficientnet"]().eval()  # handed over in eval mode: its modules stay so in the supermodel
    sm = automtl.supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE))
    reference = automtl.supermodel(ZOO["efficientnet"]().eval(), TASKS, torch.randn(1, 3, SIZE, SIZE))
    assert [m.training for m in sm.modules()] == [m.training for m in reference.modules()]
    own_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(2))  # the user's, float32
    tasks = [TASKS[0], Task("mine", "custom", head=own_head, loss=lambda y, t: y.sum(), metric=lambda y, t: {})]
    with pytest.warns(UserWarning, match="several, so it was skipped"):  # float64 backbone, the user's float32 head
        automtl.supermodel(ZOO["efficientnet"]().double(), tasks, torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64))


@pytest.mark.parametrize("name", ["efficientnet", "segmentation", "shufflenet"])
def test_what_the_supermodel_adds_is_made_in_the_backbones_dtype(name):
    """Skip projections, builtin heads and policy logits follow a float64 backbone (they used to be float32: the
    supermodel failed on float64 input until .double(), and the folding check was skipped); the default example
    input follows it too."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*so it was skipped")  # the folding check runs
        sm = automtl.supermodel(ZOO[name]().double(), TASKS)
    assert {t.dtype for t in (*sm.parameters(), *sm.buffers()) if t.is_floating_point()} == {torch.float64}
    policy = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=0)
    out = sm.eval().hard(policy)(torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64))
    assert all(y.dtype == torch.float64 for y in out.values())
    c = compact(sm, policy).eval()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    assert all(close(c(x)[t], sm(x)[t], 1e-9) for t in sm.task_names)


class _NamedLikeAttributes(nn.Module):
    """Submodules whose names are attributes of an fx GraphModule (`graph`, `meta`, `code`) below the top level."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Module()
        self.enc.graph, self.enc.meta = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.enc.meta(torch.relu(self.enc.graph(x)))


def test_what_save_writes_load_reads_whatever_the_module_names(tmp_path):
    sm = automtl.supermodel(_NamedLikeAttributes(), TASKS, torch.randn(1, 3, SIZE, SIZE))
    c = compact(sm, Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=1)).eval()
    automtl.save(c, tmp_path / "m.automtl")
    x = torch.randn(2, 3, SIZE, SIZE)
    loaded = automtl.load(tmp_path / "m.automtl")
    assert all(close(loaded(x)[t], c(x)[t]) for t in c.task_names)


class _MCDropout(nn.Module):
    """Monte Carlo dropout: random in eval mode too."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(F.dropout(self.c1(x), 0.2, training=True))


def test_randomness_in_eval_mode_is_refused_as_such():
    """Not as batch mixing (the advice about batch statistics does not apply): the message says what it is."""
    with pytest.raises(BackboneError, match="draws random numbers in eval mode"):
        automtl.supermodel(_MCDropout(), TASKS, torch.randn(1, 3, SIZE, SIZE))


class _TiedConvs(nn.Module):
    """Two convolutions sharing one weight (``c.weight = b.weight``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                  nn.Conv2d(8, 8, 3, padding=1))
        self.c.weight = self.b.weight

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_a_weight_tied_between_layers_is_refused_by_the_bundle_in_one_sentence(tmp_path):
    """safetensors refused the shared memory with its own traceback; the .pt2 keeps the tie."""
    sm = automtl.supermodel(_TiedConvs(), TASKS, torch.randn(1, 3, SIZE, SIZE))
    c = compact(sm.hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))).eval()
    with pytest.raises(automtl.errors.FileFormatError, match=r"the model's tensors '.*b.*weight' and '.*c.*weight' "
                                                             r"share memory \(a weight tied between two layers"):
        automtl.save(c, tmp_path / "m.automtl")
    assert not list(tmp_path.iterdir())
    automtl.export(c, tmp_path / "m.pt2")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert all(close(automtl.load_pt2(tmp_path / "m.pt2").module()(x)[t], y) for t, y in c(x).items())


def test_a_parametrization_whose_state_does_not_move_converts_with_the_right_numbers():
    """orthogonal() keeps a ``base`` buffer that its forward never changes: it was refused as spectral_norm is."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    parametrizations.orthogonal(backbone[3])
    sm = automtl.supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE))
    x = torch.randn(3, 3, SIZE, SIZE)
    for mode in (False, True):
        model = copy.deepcopy(sm).train(mode).hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))
        with torch.no_grad():
            ref = copy.deepcopy(backbone).train(mode)(x)
            assert all(close(f, ref, 1e-4) for f in model.features(x).values()), mode
        policy = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=0)
        model = copy.deepcopy(sm).hard(policy)
        c = compact(model, policy)
        model.train(mode), c.train(mode)
        with torch.no_grad():
            a, b = model(x), c(x)
        assert all(close(a[t], b[t], 1e-4) for t in a), mode


@pytest.mark.parametrize("case", ["dropout of 0", "instance norm", "cut away with the classifier"])
def test_layers_in_eval_mode_that_change_nothing_kept_are_not_refused(case):
    """(Review) a dropout of probability 0 and an InstanceNorm without running statistics compute the same in both
    modes, and a classifier's dropout is cut away: none of them is frozen in the features."""
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Dropout(0.0), nn.InstanceNorm2d(8),
                             nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.add_module("classifier", nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 10)))
    backbone.train()
    {"dropout of 0": backbone[1], "instance norm": backbone[2], "cut away with the classifier": backbone.classifier[0]}[case].eval()
    automtl.supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE))


def test_a_parametrization_that_rebinds_its_state_is_refused_and_left_as_it_was():
    """(Review) a power iteration written out of place (``self.u = ...``) left the recorded tensor unchanged: it
    passed the check, and the state it moved was not put back."""
    from torch.nn.utils import parametrize

    class _Rebinding(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("u", torch.ones(1))

        def forward(self, w):
            if self.training:
                self.u = self.u + 1
            return w * self.u

    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    parametrize.register_parametrization(backbone[2], "weight", _Rebinding())  # which computes it once
    before = backbone[2].parametrizations.weight[0].u.clone()
    with pytest.raises(BackboneError, match=r"_Rebinding's u"):
        automtl.supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE))
    assert torch.equal(backbone[2].parametrizations.weight[0].u, before)


def test_views_of_one_storage_that_do_not_overlap_are_saved_apart(tmp_path):
    """(Review) a table of constants sliced into a mean and a std was refused as a tied weight."""
    class _Normalised(nn.Module):
        def __init__(self):
            super().__init__()
            stats = torch.tensor([[0.4, 0.5, 0.6], [0.2, 0.3, 0.4]]).view(2, 1, 3, 1, 1)
            self.register_buffer("mean", stats[0])
            self.register_buffer("std", stats[1])
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return self.conv((x - self.mean) / self.std)

    sm = automtl.supermodel(_Normalised(), TASKS, torch.randn(1, 3, SIZE, SIZE))
    c = compact(sm.hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))).eval()
    automtl.save(c, tmp_path / "m.automtl")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert all(torch.equal(automtl.load(tmp_path / "m.automtl")(x)[t], y) for t, y in c(x).items())
