"""Losses and metrics against small hand-computed examples, missing labels included."""
import math

import pytest
import torch
import torch.nn.functional as F

from automtl.errors import ConfigError
from automtl.losses import loss_for
from automtl.metrics import (
    HIGHER_IS_BETTER,
    MultilabelMetric,
    NormalMetric,
    delta_mtl,
    metric_for,
)
from automtl.tasks import Task

NAN = float("nan")


def _finite_with_grad(loss, pred):
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


# ---------------------------------------------------------------- losses


def test_classification_loss_masks_ignore_index():
    task = Task("c", kind="classification", classes=3)
    assert task.ignore_index == -1
    pred = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]], requires_grad=True)
    target = torch.tensor([0, -1, 2])
    loss = loss_for(task)(pred, target)
    # labelled rows: 0 and 2
    l0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    l2 = -math.log(1 / 3)
    assert loss.item() == pytest.approx((l0 + l2) / 2, rel=1e-6)
    _finite_with_grad(loss, pred)
    assert pred.grad[1].abs().sum() == 0  # the unlabelled sample gets no gradient


@pytest.mark.parametrize("kind, classes, default", [("classification", 3, -1), ("segmentation", 4, 255),
                                                     ("multilabel", 3, 255)])
@pytest.mark.parametrize("given", [255, -1, 0])
def test_an_ignore_index_given_is_kept_and_described(kind, classes, default, given):
    """The value the user gives is the one used, whichever it is (255 for a classification task was taken for
    "not given" and replaced by -1), and the task's description carries it (a config file's ignore_index was dropped
    on the way to the run); a task given none gets its kind's default and describes none."""
    from automtl.convert import ConvertConfig, resolve_config

    task = Task("t", kind=kind, classes=classes, ignore_index=given)
    assert task.ignore_index == given
    assert Task(**task.describe()).ignore_index == given
    assert Task("t", kind=kind, classes=classes).ignore_index == default
    assert "ignore_index" not in Task("t", kind=kind, classes=classes).describe()
    cfg = resolve_config(backbone="tiny", tasks=[{"name": "t", "kind": kind, "classes": classes, "ignore_index": given}])
    assert [t.ignore_index for t in cfg.task_objects()] == [given]
    assert [t.ignore_index for t in ConvertConfig.from_dict(cfg.to_dict()).task_objects()] == [given]


def test_all_missing_batch_gives_zero_with_grad_path():
    cases = [
        (Task("c", kind="classification", classes=3), torch.randn(2, 3), torch.tensor([-1, -1])),
        (Task("m", kind="multilabel", classes=2), torch.randn(2, 2), torch.full((2, 2), NAN)),
        (Task("r", kind="regression", classes=2), torch.randn(2, 2), torch.full((2, 2), NAN)),
        (Task("s", kind="segmentation", classes=3), torch.randn(2, 3, 4, 4), torch.full((2, 4, 4), 255)),
        (Task("d", kind="depth"), torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)),
        (Task("d", kind="depth"), torch.randn(2, 1, 4, 4), torch.full((2, 4, 4), NAN)),
        (Task("n", kind="normal"), torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)),
        (Task("n", kind="normal"), torch.randn(2, 3, 4, 4), torch.full((2, 3, 4, 4), NAN)),
    ]
    for task, pred, target in cases:
        pred.requires_grad_(True)
        loss = loss_for(task)(pred, target)
        assert loss.item() == 0.0, task
        loss.backward()
        assert pred.grad is not None and (pred.grad == 0).all(), task


def test_multilabel_loss_skips_nan_rows():
    task = Task("m", kind="multilabel", classes=2)
    pred = torch.tensor([[0.0, 1.0], [3.0, -3.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [NAN, NAN]])
    loss = loss_for(task)(pred, target)
    expected = (math.log(2) + math.log(1 + math.e)) / 2  # BCE(0,1)=log2, BCE(1,0)=log(1+e)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    _finite_with_grad(loss, pred)


def test_regression_l1_and_mse_with_missing():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[2.0, NAN], [1.0, 4.0]])
    l1 = loss_for(Task("r", kind="regression", classes=2))(pred, target)
    assert l1.item() == pytest.approx((1 + 2 + 0) / 3)
    _finite_with_grad(l1, pred)
    mse = loss_for(Task("r", kind="regression", classes=2, options={"loss": "mse"}))(pred.detach(), target)
    assert mse.item() == pytest.approx((1 + 4 + 0) / 3)
    with pytest.raises(ConfigError):
        loss_for(Task("r", kind="regression", options={"loss": "huberish"}))


def test_segmentation_loss_ignores_void():
    task = Task("s", kind="segmentation", classes=2)
    pred = torch.zeros(1, 2, 1, 3)
    pred[0, 0, 0, 0] = 1.0  # pixel 0 predicts class 0 with logit gap 1
    pred.requires_grad_(True)
    target = torch.tensor([[[0, 1, 255]]])
    loss = loss_for(task)(pred, target)
    p0 = -math.log(math.e / (math.e + 1))
    p1 = math.log(2)
    assert loss.item() == pytest.approx((p0 + p1) / 2, rel=1e-6)
    _finite_with_grad(loss, pred)
    assert pred.grad[0, :, 0, 2].abs().sum() == 0


def test_segmentation_loss_upsamples_low_resolution_logits():
    task = Task("s", kind="segmentation", classes=3)
    pred = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 8, 8))
    up = F.interpolate(pred, size=(8, 8), mode="bilinear", align_corners=False)
    assert loss_for(task)(pred, target).item() == pytest.approx(F.cross_entropy(up, target).item(), rel=1e-6)


def test_depth_loss_valid_pixels_only():
    task = Task("d", kind="depth")
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    target = torch.tensor([[[2.0, 0.0], [NAN, 6.0]]])  # (B, H, W) form; 0 and NaN invalid
    loss = loss_for(task)(pred, target)
    assert loss.item() == pytest.approx((1 + 2) / 2)
    _finite_with_grad(loss, pred)
    assert pred.grad[0, 0, 0, 1] == 0 and pred.grad[0, 0, 1, 0] == 0


def test_normal_loss_cosine_on_valid_pixels():
    task = Task("n", kind="normal")
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, :, 0, 0] = torch.tensor([0.0, 0.0, 2.0])  # same direction as target -> 0
    pred[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])  # 90 degrees -> 1
    pred[0, :, 0, 2] = torch.tensor([1.0, 1.0, 1.0])  # target missing
    pred.requires_grad_(True)
    target = torch.zeros(1, 3, 1, 3)
    target[0, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0])
    target[0, :, 0, 1] = torch.tensor([0.0, 1.0, 0.0])
    loss = loss_for(task)(pred, target)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    _finite_with_grad(loss, pred)
    assert pred.grad[0, :, 0, 2].abs().sum() == 0
    target[0, :, 0, 2] = NAN  # NaN marks missing, too
    pred.grad = None
    loss = loss_for(task)(pred, target)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    _finite_with_grad(loss, pred)


def test_custom_loss_is_used():
    own = lambda p, t: (p - t).abs().max()  # noqa: E731
    task = Task("x", kind="regression", loss=own)
    pred, target = torch.randn(4, 1), torch.randn(4, 1)
    assert loss_for(task).fn is own and torch.equal(loss_for(task)(pred, target), own(pred, target))


# ---------------------------------------------------------------- metrics


def test_accuracy_counts_labelled_only():
    m = metric_for(Task("c", kind="classification", classes=3))
    m.update(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), torch.tensor([0, 2, -1]))
    m.update(torch.tensor([[0, 0, 1.0]]), torch.tensor([2]))
    assert m.compute() == {"accuracy": pytest.approx(200 / 3)}
    assert m.primary == "accuracy"
    m.reset()
    m.update(torch.randn(2, 3), torch.tensor([-1, -1]))
    assert math.isnan(m.compute()["accuracy"])  # nothing labelled: undefined, not 0


def test_multilabel_f1_and_map():
    m = metric_for(Task("m", kind="multilabel", classes=2))
    assert isinstance(m, MultilabelMetric) and m.primary == "f1"
    # class 0: scores .9 .1 -.5 -2 labels 1 0 1 0 -> tp=1 fp=1 fn=1 -> F1 = 0.5
    #          AP: ranks 1(+) 2(-) 3(+): (1/1 + 2/3)/2 = 5/6
    # class 1: scores 1 -1 2 -3 labels 1 0 0 0 (row 3 missing for class 1)
    #          -> tp=1 fp=1 fn=0 -> F1 = 2/3; AP: ranks .. 2(-) 1(+): 1/2
    pred = torch.tensor([[0.9, 1.0], [0.1, -1.0], [-0.5, 2.0], [-2.0, -3.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, NAN]])
    m.update(pred[:2], target[:2])
    m.update(pred[2:], target[2:])
    out = m.compute()
    assert out["f1"] == pytest.approx(100 * (0.5 + 2 / 3) / 2)
    assert out["map"] == pytest.approx(100 * (5 / 6 + 1 / 2) / 2)


def test_average_precision_handles_ties():
    from automtl.metrics import average_precision

    # one threshold at 0.5 holding 1 positive and 1 negative -> P=1/2 at R=1
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == pytest.approx(0.5)


def test_regression_metric():
    m = metric_for(Task("r", kind="regression", classes=2))
    m.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[2.0, NAN], [1.0, 4.0]]))
    out = m.compute()
    assert out["mae"] == pytest.approx(1.0)
    assert out["rmse"] == pytest.approx(math.sqrt(5 / 3))


def test_segmentation_miou_and_pixel_acc():
    m = metric_for(Task("s", kind="segmentation", classes=3))
    assert m.primary == "miou"
    labels = torch.tensor([[[0, 0, 1, 2, 1, 0]]])
    target = torch.tensor([[[0, 1, 1, 255, 255, 0]]])
    pred = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    m.update(pred, target)
    out = m.compute()
    # valid pixels: (t0,p0) (t1,p0) (t1,p1) (t0,p0); class 2 never appears -> left out
    # IoU0 = 2 / (3 + 2 - 2) = 2/3, IoU1 = 1 / (1 + 2 - 1) = 1/2
    assert out["miou"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert out["pixel_acc"] == pytest.approx(75.0)


@pytest.mark.parametrize("seed", range(3))
def test_segmentation_metric_equals_a_confusion_matrix_on_random_data(seed):
    gen = torch.Generator().manual_seed(seed)
    C = 5
    m = metric_for(Task("s", kind="segmentation", classes=C))
    cm = torch.zeros(C, C, dtype=torch.float64)
    for _ in range(3):  # several batches, void pixels and predictions of classes never labelled
        target = torch.randint(0, C - 1, (2, 6, 7), generator=gen)
        target[torch.rand(2, 6, 7, generator=gen) < 0.2] = 255
        pred = torch.randn(2, C, 6, 7, generator=gen)
        m.update(pred, target)
        labels, valid = pred.argmax(1), target != 255
        cm.index_put_((target[valid], labels[valid]), torch.ones(int(valid.sum()), dtype=torch.float64), accumulate=True)
    inter, union = cm.diag(), cm.sum(0) + cm.sum(1) - cm.diag()
    out = m.compute()
    assert out["miou"] == pytest.approx(100 * (inter[union > 0] / union[union > 0]).mean().item())
    assert out["pixel_acc"] == pytest.approx(100 * inter.sum().item() / cm.sum().item())


def test_segmentation_metric_memory_grows_with_the_classes_not_their_square():
    """A model file may declare up to a million classes: a confusion matrix of them is 8 TB (a memory bomb)."""
    m = metric_for(Task("s", kind="segmentation", classes=10**6))
    m.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 4, 4, dtype=torch.long))
    assert m.compute()["pixel_acc"] == 0.0 and m.compute()["miou"] == 0.0


def test_depth_metric_valid_pixels():
    m = metric_for(Task("d", kind="depth"))
    m.update(torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]]), torch.tensor([[[[2.0, 0.0], [NAN, 4.0]]]]))
    out = m.compute()
    assert out["abs_err"] == pytest.approx(1.0)  # |1-2|, |5-4|
    assert out["rel_err"] == pytest.approx((0.5 + 0.25) / 2)


def test_normal_metric_angles():
    m = metric_for(Task("n", kind="normal"))
    assert isinstance(m, NormalMetric)
    angles = [0.0, 10.0, 20.0, 25.0, 60.0]
    target = torch.zeros(1, 3, 1, 6)
    target[0, 2] = 1.0
    target[0, :, 0, 5] = 0.0  # missing pixel
    pred = torch.zeros(1, 3, 1, 6)
    for i, a in enumerate(angles):
        r = math.radians(a)
        pred[0, :, 0, i] = torch.tensor([math.sin(r), 0.0, math.cos(r)]) * 3.0  # length does not matter
    pred[0, :, 0, 5] = torch.tensor([1.0, 0.0, 0.0])
    m.update(pred, target)
    out = m.compute()
    assert out["mean_angle"] == pytest.approx(sum(angles) / 5, abs=1e-4)
    assert out["median_angle"] == pytest.approx(20.0, abs=0.01)
    assert out["within_11_25"] == pytest.approx(40.0)
    assert out["within_22_5"] == pytest.approx(60.0)
    assert out["within_30"] == pytest.approx(80.0)


def test_normal_median_matches_exact_median_on_random_data():
    torch.manual_seed(0)
    pred = torch.randn(2, 3, 8, 8)
    target = F.normalize(torch.randn(2, 3, 8, 8), dim=1)
    m = NormalMetric()
    m.update(pred[:1], target[:1])
    m.update(pred[1:], target[1:])
    cos = F.cosine_similarity(pred.double(), target.double(), dim=1).clamp(-1, 1)
    ang = torch.rad2deg(torch.acos(cos)).flatten()
    s = ang.sort().values
    exact = float((s[63] + s[64]) / 2)
    assert m.compute()["median_angle"] == pytest.approx(exact, abs=0.02)
    assert m.compute()["mean_angle"] == pytest.approx(float(ang.mean()), abs=1e-6)


def test_every_builtin_metric_has_a_direction():
    for kind, kw in [
        ("classification", {"classes": 2}),
        ("multilabel", {"classes": 2}),
        ("regression", {}),
        ("segmentation", {"classes": 2}),
        ("depth", {}),
        ("normal", {}),
    ]:
        m = metric_for(Task("t", kind=kind, **kw))
        assert m.primary in m.names
        assert all(n in HIGHER_IS_BETTER for n in m.names)


def test_custom_metric_factory_is_called():
    class Mine:
        primary = "score"

        def update(self, p, t):
            pass

        def compute(self):
            return {"score": 1.0}

        def reset(self):
            pass

    task = Task("x", kind="regression", metric=Mine)
    assert isinstance(metric_for(task), Mine)


# ---------------------------------------------------------------- delta_mtl


def test_delta_mtl_hand_computed():
    single = {"seg": {"miou": 40.0, "pixel_acc": 80.0}, "depth": {"abs_err": 0.5}}
    multi = {"seg": {"miou": 44.0, "pixel_acc": 80.0}, "depth": {"abs_err": 0.6}}
    # seg: (+10 % + 0 %) / 2 = 5 ; depth: lower is better, -(0.6-0.5)/0.5 = -20 %
    assert delta_mtl(multi, single) == pytest.approx((5.0 - 20.0) / 2)


def test_delta_mtl_errors_and_custom_direction():
    with pytest.raises(ConfigError, match="baseline"):
        delta_mtl({"a": {"miou": 1.0}}, {})
    with pytest.raises(ConfigError, match="direction"):
        delta_mtl({"a": {"mine": 1.0}}, {"a": {"mine": 2.0}})
    assert delta_mtl({"a": {"mine": 1.0}}, {"a": {"mine": 2.0}}, higher_is_better={"mine": False}) == pytest.approx(50.0)
    with pytest.raises(ConfigError, match="non-zero"):
        delta_mtl({"a": {"miou": 1.0}}, {"a": {"miou": 0.0}})


def test_a_prediction_of_no_direction_is_ninety_degrees_off():
    """atan2(|p x t|, p . t) of an all-zero prediction is atan2(0, 0) = 0: a perfect score for a head that outputs
    nothing (a ReLU at its end), while its loss said cosine 0."""
    metric = metric_for(Task("normal", "normal"))
    target = F.normalize(torch.randn(2, 3, 4, 4), dim=1)
    pred = target.clone()
    pred[0] = 0
    metric.update(pred, target)
    out = metric.compute()
    assert out["mean_angle"] == pytest.approx(45.0, abs=1e-3) and out["within_30"] == pytest.approx(50.0)


def test_the_validation_loss_is_the_mean_over_the_sets_labels_whatever_the_batching():
    """A batch's loss is a mean over its labelled pixels; averaged per image, one model's depth loss was 0.875 at a
    batch size of 1 and 1.76 at 4, and an image without a valid pixel counted as one. Weighted by labels, the L1
    loss of a constant prediction equals abs_err at any batching; normals' zero vectors are not labels."""
    from torch import nn

    from automtl.search import evaluate

    class Constant(nn.Module):
        tasks = [Task("depth", "depth"), Task("normal", "normal")]
        task_names = ["depth", "normal"]

        def forward(self, x):
            return {"depth": torch.ones(len(x), 1, 4, 4), "normal": F.normalize(torch.ones(len(x), 3, 4, 4), dim=1)}

    x, depth, normal = torch.zeros(4, 3, 4, 4), torch.zeros(4, 1, 4, 4), torch.zeros(4, 3, 4, 4)
    depth[0] = 3.0
    depth[1:3, 0, 0, 0] = 1.5  # image 3: no valid pixel
    normal[0, 2] = 1.0
    normal[1, 0, 0, 0] = 1.0  # one labelled pixel; images 2 and 3 none
    results = []
    for size in (1, 4):
        data = [(x[i:i + size], {"depth": depth[i:i + size], "normal": normal[i:i + size]}) for i in range(0, 4, size)]
        results.append(evaluate(Constant(), data))
    for metrics, losses in results:
        assert losses["depth"] == pytest.approx(metrics["depth"]["abs_err"])
        cosines = torch.tensor([1.0] * 16 + [1.0]) / math.sqrt(3)
        assert losses["normal"] == pytest.approx(float((1 - cosines).mean()), rel=1e-6)
    assert results[0][1] == pytest.approx(results[1][1])


def test_metrics_read_class_ids_as_ids():
    """A segmentation map or labels of class ids (an integer tensor, with or without a channel of 1) are the
    classes predicted: an id beyond the classes was clamped into the last one and counted correct, and a (B, 1, H, W)
    map was argmaxed over its one channel (class 0 everywhere)."""
    from automtl.metrics import Accuracy, SegmentationMetric

    m = SegmentationMetric(3)
    m.update(torch.tensor([[[7, 7], [0, 1]]]), torch.tensor([[[2, 2], [0, 1]]]))
    assert m.compute() == pytest.approx({"miou": 100 * 2 / 3, "pixel_acc": 50.0})
    m = SegmentationMetric(3)
    m.update(torch.tensor([[[[2, 2], [0, 1]]]]), torch.tensor([[[2, 2], [0, 1]]]))
    assert m.compute() == pytest.approx({"miou": 100.0, "pixel_acc": 100.0})
    scores, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    by_scores, by_ids = SegmentationMetric(3), SegmentationMetric(3)
    by_scores.update(scores, target)
    by_ids.update(scores.argmax(1), target)
    assert by_scores.compute() == by_ids.compute()
    a = Accuracy()
    a.update(torch.tensor([[1], [2]]), torch.tensor([1, 2]))
    assert a.compute() == {"accuracy": 100.0}


# A prediction of each kind and its target: (B, C) scores, (B, C) multilabel logits, (B, 3) values, (B, C, H, W)
# scores, (B, 1, H, W) depth, (B, 3, H, W) unit normals; the first sample's first entry is unlabelled in each.
def _labelled_batches():
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 4, (2, 6, 6), generator=g)
    seg[0, 0, 0] = 255
    depth = torch.rand(2, 1, 6, 6, generator=g) + 0.1
    depth[0, 0, 0, 0] = 0.0
    normal = F.normalize(torch.randn(2, 3, 6, 6, generator=g), dim=1)
    normal[0, :, 0, 0] = 0.0
    multi = torch.randint(0, 2, (6, 4), generator=g).float()
    multi[0, 0] = NAN
    values = torch.randn(6, 3, generator=g)
    values[0, 0] = NAN
    return {
        "classification": ({"classes": 4}, torch.randn(6, 4, generator=g), torch.tensor([-1, 0, 1, 2, 3, 1])),
        "multilabel": ({"classes": 4}, torch.randn(6, 4, generator=g), multi),
        "regression": ({"classes": 3}, torch.randn(6, 3, generator=g), values),
        "segmentation": ({"classes": 4}, torch.randn(2, 4, 6, 6, generator=g), seg),
        "depth": ({}, torch.rand(2, 1, 6, 6, generator=g) + 0.1, depth),
        "normal": ({}, F.normalize(torch.randn(2, 3, 6, 6, generator=g), dim=1), normal),
    }


@pytest.mark.parametrize("kind", list(_labelled_batches()))
@pytest.mark.parametrize("bad", [NAN, math.inf])
def test_a_prediction_that_is_not_finite_where_it_counts_makes_every_value_nan(kind, bad):
    """Found by helper-79: a NaN normal counted as 0 degrees in the median (45.0 became 0.01 with half the pixels NaN)
    and a NaN multilabel score dropped out of mAP as a missing entry (83.3 became 100). Every builtin metric now
    computes NaN for all its values once a counted entry's prediction is NaN or inf, and ignores one where nothing
    is counted (an unlabelled sample, a void pixel, an invalid depth or normal)."""
    kw, pred, target = _labelled_batches()[kind]
    metric = metric_for(Task("t", kind=kind, **kw))
    metric.update(pred, target)
    clean = metric.compute()
    assert all(math.isfinite(v) for v in clean.values()), clean
    unlabelled, counted = pred.clone(), pred.clone()
    unlabelled[(0,) * pred.dim()] = bad  # the first entry: no label there
    counted[(1, 0) + (1,) * (pred.dim() - 2)] = bad  # the second sample's: labelled
    metric.reset()
    metric.update(unlabelled, target)
    assert metric.compute() == pytest.approx(clean)
    metric.reset()
    metric.update(counted, target)
    metric.update(pred, target)  # later finite batches do not wash it out
    assert all(math.isnan(v) for v in metric.compute().values())
    metric.reset()
    metric.update(pred, target)
    assert metric.compute() == pytest.approx(clean)
