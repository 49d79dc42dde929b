"""The search: stages end to end, a policy fed back, exact resume after SIGKILL, NaN stops,
the config, and two DDP ranks agreeing on the policy."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from automtl.data import SyntheticScenes, make_loader
from automtl.errors import AutomtlError, ConfigError, DataError
from automtl.policy import Policy
from automtl.search import SearchConfig, evaluate, parse_budget, search
from automtl.supermodel import supermodel
from automtl.tasks import Task

WORKER = Path(__file__).with_name("search_worker.py")
SIZE = 32



@pytest.fixture(scope="module")
def data():
    train = SyntheticScenes(64, size=SIZE, seed=0)
    val = SyntheticScenes(32, size=SIZE, seed=1, split="val")
    return train, val


def fresh(tasks, seed=0):
    torch.manual_seed(seed)
    return supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))


def better(after, before):
    """Every task's headline metric improved."""
    return (after["segmentation"]["miou"] > before["segmentation"]["miou"]
            and after["depth"]["abs_err"] < before["depth"]["abs_err"]
            and after["normal"]["mean_angle"] < before["normal"]["mean_angle"])


def test_search_runs_all_stages_and_learns(data, tmp_path):
    train, val = data
    sm = fresh(train.tasks)
    untrained = copy.deepcopy(sm)
    cfg = SearchConfig(warmup_steps=24, search_steps=40, finetune_steps=24, budget="2x", policy_lr=0.05,
                       tau_every=2, log_every=4, checkpoint_every=16, out_dir=str(tmp_path), quiet=True)
    res = search(sm, make_loader(train, 8, shuffle=True), make_loader(val, 16), cfg)

    assert isinstance(res.policy, Policy) and res.policy.tasks == sm.task_names
    counts = res.policy.counts()
    assert sum(1 for c in counts.values() if c) >= 2, counts  # neither all-share nor all-specialize
    assert sm.policy_logits.detach().abs().max() > 0.01  # the policy moved from its zero start
    stages = {h["stage"] for h in res.history}
    assert stages == {"warmup", "search", "finetune", "val"}
    assert any(h.get("kind") == "policy" and "resource" in h for h in res.history)
    taus = [h["tau"] for h in res.history if h["stage"] == "search"]
    assert taus[0] == 5.0 and taus[-1] < taus[0]  # annealed
    # budget accounting
    assert res.base_params == sm.policy_parameter_count(Policy.uniform(sm.layer_names, sm.task_names, "share"))
    assert res.budget == 2.0 and res.budget_params == 2.0 * res.base_params
    assert res.params == sm.policy_parameter_count(res.policy)
    # better than the untrained model under the same policy
    untrained.hard(res.policy)
    before, _ = evaluate(untrained, make_loader(val, 16))
    assert better(res.metrics, before), (res.metrics, before)
    assert set(res.losses) == set(sm.task_names)
    # files: a JSONL line per logged step, the checkpoint and the policy
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(lines) == len(res.history)
    assert {"stage", "step", "losses", "total", "lr", "time"} <= set(lines[0])
    assert Policy.load(tmp_path / "policy.yaml") == res.policy
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 88


def test_policy_fed_back_fine_tunes_only(data, tmp_path):
    train, val = data
    sm = fresh(train.tasks)
    policy = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=3)
    path = tmp_path / "policy.yaml"
    policy.save(path)
    text = path.read_text().replace("skip", "share", 1)  # a hand edit
    path.write_text(text)
    edited = Policy.load(path)
    res = search(sm, make_loader(train, 8, shuffle=True), make_loader(val, 16),
                 dict(finetune_steps=6, policy_file=str(path), quiet=True))
    assert res.policy == edited
    assert res.stages == ["finetune"]
    assert {h["stage"] for h in res.history} == {"finetune", "val"}
    assert sm.mode == "hard"
    # the same through policy=
    res2 = search(fresh(train.tasks), make_loader(train, 8), None, dict(finetune_steps=2, quiet=True), policy=edited)
    assert res2.stages == ["finetune"] and res2.metrics == {}


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_finetune_learning_rate_schedule(data, schedule):
    """cosine: the fine-tune starts at finetune_lr (else lr) and decays along half a cosine toward 0."""
    train, _ = data
    sm = fresh(train.tasks)
    policy = Policy.uniform(sm.layer_names, sm.task_names, "share")
    res = search(sm, make_loader(train, 8), None, dict(finetune_steps=8, log_every=1, quiet=True, lr=1e-3,
                                                       finetune_lr=2e-3, finetune_schedule=schedule), policy=policy)
    lrs = [h["lr"] for h in res.history if h["stage"] == "finetune"]
    assert len(lrs) == 8 and lrs[0] == pytest.approx(2e-3)
    if schedule == "constant":
        assert all(lr == pytest.approx(2e-3) for lr in lrs)
    else:
        import math
        assert lrs == pytest.approx([1e-3 * (1 + math.cos(math.pi * i / 8)) for i in range(8)])
        # decaying over the last quarter only: constant before it (the shape of a convert run's whole schedule)
        res = search(fresh(train.tasks), make_loader(train, 8), None, dict(finetune_steps=8, log_every=1, quiet=True,
                     lr=1e-3, finetune_decay_fraction=0.25), policy=policy)
        lrs = [h["lr"] for h in res.history if h["stage"] == "finetune"]
        assert lrs == pytest.approx([1e-3] * 6 + [1e-3, 0.5e-3])


def test_finetune_unit_compute_trains_every_architecture_the_same_macs(data):
    """finetune_unit: compute — a branched architecture fine-tunes fewer steps, all-share exactly finetune_steps."""
    train, _ = data
    for choice in ("share", "specialize"):
        sm = fresh(train.tasks)
        policy = Policy.uniform(sm.layer_names, sm.task_names, choice)
        base = sm.policy_mac_count(Policy.uniform(sm.layer_names, sm.task_names, "share"))
        res = search(sm, make_loader(train, 8), None, dict(finetune_steps=12, log_every=1, quiet=True,
                                                           finetune_unit="compute"), policy=policy)
        steps = sum(1 for h in res.history if h["stage"] == "finetune")
        assert steps == round(12 * base / sm.policy_mac_count(policy)) == res.steps["finetune"], choice
        assert steps == 12 if choice == "share" else steps < 12


def _worker(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


@pytest.mark.parametrize("strategy,weighting,backbone", [("gumbel", "dwa", "tiny"), ("conflict", "dwa", "tiny"),
                                                       ("conflict", "gradnorm", "own generators")])
def test_killed_run_resumes_bitwise(tmp_path, strategy, weighting, backbone):
    """Each strategy's resumed run ends bitwise equal to an uninterrupted one (gumbel with 96 samples:
    enough for its held-out split, so both data parts and their positions are resumed); GradNorm's learnt
    weights and its own Adam moments live in the balancer's state_dict, so they resume too; so do the states of
    the generators a backbone's modules own (torch's, traced; Python's and numpy's, in a leaf)."""
    options = {"window": 3} if weighting == "dwa" else {}
    config = dict(warmup_steps=6, search_steps=10, finetune_steps=6, weight_steps_per_policy_step=1,
                  checkpoint_every=4, tau_every=1, budget="1.5x", weighting=weighting, weighting_options=options,
                  quiet=True, seed=7, strategy=strategy, conflict_confidence=0.0)
    n = {"n_train": 96 if strategy == "gumbel" else 32, "backbone": backbone}
    straight = _worker({"config": {**config, "out_dir": str(tmp_path / "a")}, "result": str(tmp_path / "a.pt"), **n})
    killed_dir = tmp_path / "b"
    ckpt = killed_dir / "checkpoint.pt"
    victim = _worker({"config": {**config, "out_dir": str(killed_dir)}, "result": str(tmp_path / "never.pt"),
                      "delay": 0.03, **n})
    deadline = time.time() + 60
    while not ckpt.exists():
        assert victim.poll() is None, victim.stdout.read().decode()
        assert time.time() < deadline, "no checkpoint was written"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    step = torch.load(ckpt, weights_only=True)["global_step"]
    assert 0 < step < 22 and not (tmp_path / "never.pt").exists()

    resumed = _worker({"config": {**config, "out_dir": str(killed_dir), "resume": True}, "result": str(tmp_path / "b.pt"), **n})
    for p in (straight, resumed):
        out = p.communicate(timeout=120)[0].decode()
        assert p.returncode == 0, out
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a["choices"] == b["choices"] and a["evidence"] == b["evidence"]
    assert torch.equal(a["logits"], b["logits"])
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert a["history_len"] == b["history_len"]
    steps = [json.loads(x)["step"] for x in (killed_dir / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicate lines after the resume


class NanAt:
    """A depth loss that turns NaN on its ``k``-th call."""

    def __init__(self, k):
        from automtl.losses import DepthLoss

        self.k, self.calls, self.inner = k, 0, DepthLoss()

    def __call__(self, pred, target):
        self.calls += 1
        loss = self.inner(pred, target)
        return loss * float("nan") if self.calls == self.k else loss


def test_nan_loss_stops_with_task_and_step(data, tmp_path):
    train, _ = data
    tasks = [Task("segmentation", "segmentation", classes=4), Task("depth", "depth", loss=NanAt(13)), Task("normal", "normal")]
    sm = fresh(tasks)
    cfg = SearchConfig(warmup_steps=8, search_steps=10, finetune_steps=4, checkpoint_every=5, out_dir=str(tmp_path), quiet=True)
    with pytest.raises(AutomtlError, match=r"'depth'.*step 13"):
        search(sm, make_loader(train, 8, shuffle=True), None, cfg)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 10  # the last good one; none after the bad step
    fresh(tasks).load_state_dict(ckpt["model"])
    # and a resume from it runs into the same bad step again (the loss counts its calls afresh)
    tasks[1].loss.calls = 10
    with pytest.raises(AutomtlError, match=r"step 13"):
        search(sm, make_loader(train, 8, shuffle=True), None, cfg.replace(resume=True))


def _damage(ckpt: dict, how: str) -> dict:
    ckpt = copy.deepcopy(ckpt)
    if how == "step beyond the run":  # consistent otherwise: refused once the fine-tune is fitted, then rolled back
        ckpt["global_step"] = ckpt["data_position"] = 10 ** 12
    elif how == "negative step":
        ckpt["global_step"] = ckpt["data_position"] = -5
    elif how == "step as text":
        ckpt["global_step"] = "6"
    elif how == "data position":
        ckpt["data_position"] = 10 ** 15
    elif how == "stage":
        ckpt["stage"] = "pwn"
    elif how == "history":
        ckpt["history"] = [1, "x", None]
    elif how == "model missing":
        del ckpt["model"]
    elif how == "learning rate as text":
        ckpt["weight_opt"]["param_groups"][0]["lr"] = "x"
    elif how == "Adam state without its second moment":
        for entry in ckpt["weight_opt"]["state"].values():
            del entry["exp_avg_sq"]
    elif how == "Adam state of another shape":
        entry = next(iter(ckpt["weight_opt"]["state"].values()))
        entry["exp_avg"] = torch.zeros(3)
    elif how == "random state":
        ckpt["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)
    elif how == "strategy state":
        ckpt["strategy"]["cos_sum"] = torch.zeros(1, 1, 1, dtype=torch.float64)
    elif how == "ranks":
        ckpt["ranks"] = [{}, {}]
    elif how == "fingerprint":
        del ckpt["fingerprint"]
    elif how == "elapsed":
        ckpt["elapsed"] = float("nan")
    elif how == "numpy position past its key":  # numpy does not check it: a crash at the next draw
        ckpt["rng"]["numpy"]["pos"] = 10 ** 8
    elif how == "numpy Gaussian flag":
        ckpt["rng"]["numpy"]["has_gauss"] = 7
    elif how == "Python key word beyond 32 bits":  # an OverflowError traceback from random.setstate
        version, words, gauss = ckpt["rng"]["python"]
        ckpt["rng"]["python"] = (version, (-1, *words[1:]), gauss)
    elif how == "Python state position past its key":  # random.setstate refused it after the torch state was set
        version, words, gauss = ckpt["rng"]["python"]
        ckpt["rng"]["python"] = (version, (*words[:-1], 700), gauss)
    elif how == "negative measurement count":  # made the fitted fine-tune ~10^12 steps: a resume without end
        ckpt["strategy"]["count"], ckpt["strategy"]["stopped"] = -10 ** 12, True
    elif how == "more measurements than planned":
        ckpt["strategy"]["count"] = 10 ** 6
    # numbers no float holds (math.isfinite raised OverflowError) and values too long to quote whole
    elif how == "elapsed a 400-digit integer":
        ckpt["elapsed"] = 10 ** 400
    elif how == "numpy Gaussian a 400-digit integer":
        ckpt["rng"]["numpy"]["cached"] = 10 ** 400
    elif how == "numpy position a 400-digit integer":
        ckpt["rng"]["numpy"]["pos"] = 10 ** 400
    elif how == "measurement count a 400-digit integer":
        ckpt["strategy"]["count"] = 10 ** 400
    elif how == "learning rate a 400-digit integer":
        ckpt["weight_opt"]["param_groups"][0]["lr"] = 10 ** 400
    elif how == "step a 400-digit integer":
        ckpt["global_step"] = ckpt["data_position"] = 10 ** 400
    elif how == "stage of a megabyte":
        ckpt["stage"] = "x" * 10 ** 6
    elif how == "Adam state keyed by numbers and names":  # sorted() raised comparing an int with a str
        entry = next(iter(ckpt["weight_opt"]["state"].values()))
        entry[7] = entry.pop("exp_avg")
    return ckpt


@pytest.mark.parametrize("how", ["step beyond the run", "negative step", "step as text", "data position", "stage",
                                 "history", "model missing", "learning rate as text",
                                 "Adam state without its second moment", "Adam state of another shape", "random state",
                                 "strategy state", "ranks", "fingerprint", "elapsed", "numpy position past its key",
                                 "numpy Gaussian flag", "Python key word beyond 32 bits",
                                 "Python state position past its key", "negative measurement count",
                                 "more measurements than planned", "elapsed a 400-digit integer",
                                 "numpy Gaussian a 400-digit integer", "numpy position a 400-digit integer",
                                 "measurement count a 400-digit integer", "learning rate a 400-digit integer",
                                 "step a 400-digit integer", "stage of a megabyte",
                                 "Adam state keyed by numbers and names"])
def test_a_damaged_checkpoint_is_refused_before_anything_is_restored(data, tmp_path, how):
    """A checkpoint is read as data: a part that does not fit the run is refused in one sentence, before the
    supermodel, the optimizers or the random state change (a step beyond the run once skipped all training)."""
    train, _ = data
    tasks = [Task("segmentation", "segmentation", classes=4), Task("depth", "depth")]
    cfg = SearchConfig(strategy="conflict", warmup_steps=2, search_steps=4, finetune_steps=0, conflict_every=1,
                       checkpoint_every=3, out_dir=str(tmp_path), quiet=True)
    search(fresh(tasks), make_loader(train, 8, shuffle=True), None, cfg)  # its checkpoint: the run's end, step 6
    path = tmp_path / "checkpoint.pt"
    torch.save(_damage(torch.load(path, weights_only=True), how), path)
    sm = fresh(tasks, seed=1)
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(AutomtlError, match=r"^checkpoint '.*checkpoint.pt' (is damaged|is at step).*delete it to start over") as caught:
        search(sm, make_loader(train, 8, shuffle=True), None, cfg.replace(resume=True))
    assert len(str(caught.value)) < 300 + len(str(path)), "a value from the file quoted whole"
    assert all(torch.equal(v, sm.state_dict()[k]) for k, v in before.items())
    assert torch.equal(rng, torch.get_rng_state())


def _places(value, at=()):
    """Places in a checkpoint's nested dicts, lists and tuples: every top-level part, and below it the first three
    entries of each container."""
    items = list(value.items()) if isinstance(value, dict) else list(enumerate(value)) \
        if isinstance(value, (list, tuple)) else []
    for key, item in items[:3] if at else items:
        yield at + (key,)
        yield from _places(item, at + (key,))


def _put(value, place, new):
    if not place:
        return new
    if isinstance(value, tuple):
        return tuple(_put(v, place[1:], new) if i == place[0] else v for i, v in enumerate(value))
    value[place[0]] = _put(value[place[0]], place[1:], new)
    return value


def test_whatever_a_checkpoint_holds_a_resume_refuses_or_takes(data, tmp_path):
    """A checkpoint is data: with a tensor of two values, or None, at any place of it (its format, a fingerprint
    field, a step, an optimizer's parameter ids, the module generators, the strategy, the policy's evidence), a
    resume either refuses in one sentence before anything is restored or resumes; never a raw exception (a tensor
    where the resume compared with == raised "Boolean value of Tensor with more than one value is ambiguous")."""
    train, _ = data
    tasks = [Task("segmentation", "segmentation", classes=4), Task("depth", "depth")]
    cfg = SearchConfig(strategy="conflict", warmup_steps=2, search_steps=4, finetune_steps=0, conflict_every=1,
                       checkpoint_every=3, out_dir=str(tmp_path), quiet=True)
    search(fresh(tasks), make_loader(train, 8, shuffle=True), None, cfg)
    path = tmp_path / "checkpoint.pt"
    whole = torch.load(path, weights_only=True)
    sm = fresh(tasks, seed=1)
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    places = [p for p in _places(whole) if p[0] not in ("model", "weight_opt", "policy_opt") or "param_groups" in p]
    assert len(places) > 50
    refused = 0
    for place in places:
        for new in (torch.ones(2),) + ((None,) if len(place) == 1 else ()):
            torch.save(_put(copy.deepcopy(whole), place, new), path)
            try:
                search(sm, make_loader(train, 8, shuffle=True), None, cfg.replace(resume=True))
            except AutomtlError:
                refused += 1
                assert all(torch.equal(v, sm.state_dict()[k]) for k, v in before.items()), place
            else:
                sm.load_state_dict(before)
    assert refused > len(places) // 2


@pytest.mark.parametrize("change", ["fewer training samples", "another batch size", "unshuffled", "input size",
                                    "ignore_index", "generator seeded from entropy"])
def test_a_resume_on_other_data_is_refused(data, tmp_path, change):
    """A resume restarts the data at its position: on other data (more or fewer samples, another batch size or order,
    another input size) or tasks labelled otherwise, it would train on without a word and be equal to no
    uninterrupted run; it is refused, naming what changed, before anything is restored. Other validation data is
    not a change (it trains nothing), and a checkpoint written before the data was recorded still resumes."""
    train, val = data
    tasks = [Task("segmentation", "segmentation", classes=4), Task("depth", "depth")]
    cfg = SearchConfig(strategy="conflict", warmup_steps=2, search_steps=2, finetune_steps=0, conflict_every=1,
                       checkpoint_every=2, out_dir=str(tmp_path), quiet=True)
    size = SIZE
    loader, val_loader = make_loader(train, 8, shuffle=True), make_loader(val, 8)
    if change == "generator seeded from entropy":
        loader = torch.utils.data.DataLoader(train, batch_size=8, shuffle=True, generator=torch.Generator())
        loader.generator.seed()
    search(fresh(tasks), loader, val_loader, cfg)
    search(fresh(tasks), loader, make_loader(torch.utils.data.Subset(val, range(16)), 4), cfg.replace(resume=True))
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    older = copy.deepcopy(ckpt)
    del older["fingerprint"]["data"]
    torch.save(older, path)
    search(fresh(tasks), loader, val_loader, cfg.replace(resume=True))  # an older checkpoint: as before
    torch.save(ckpt, path)
    if change == "fewer training samples":
        loader = make_loader(torch.utils.data.Subset(train, range(48)), 8, shuffle=True)
    elif change == "another batch size":
        loader = make_loader(train, 4, shuffle=True)
    elif change == "unshuffled":
        loader = make_loader(train, 8)
    elif change == "input size":
        size = SIZE * 2
    elif change == "ignore_index":
        tasks[0] = Task("segmentation", "segmentation", classes=4, ignore_index=0)
    else:
        loader = torch.utils.data.DataLoader(train, batch_size=8, shuffle=True, generator=torch.Generator())
        loader.generator.seed()
    torch.manual_seed(0)
    sm = supermodel("tiny", tasks, torch.randn(1, 3, size, size))
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    what = {"input size": "input's shape", "ignore_index": "tasks' kinds",
            "generator seeded from entropy": "training loader's generator seed changed .*manual_seed"}
    with pytest.raises(AutomtlError, match=r"written by a different run \(the " + what.get(change, "training data")):
        search(sm, loader, val_loader, cfg.replace(resume=True))
    assert all(torch.equal(v, sm.state_dict()[k]) for k, v in before.items())


def test_one_shot_validation_data_is_refused_where_it_would_run_out():
    """A generator as validation data is used up by the first validation: with val_every it is refused at setup (the
    second validation said "yielded no batches" partway through the run); validated once, it is read once."""
    from automtl.errors import DataError

    train = SyntheticScenes(16, size=SIZE, seed=0)
    tasks = [Task("segmentation", "segmentation", classes=4), Task("depth", "depth")]
    batches = lambda: iter([(torch.stack([train[i][0] for i in range(4)]),  # noqa: E731
                             {k: torch.stack([train[i][1][k] for i in range(4)]) for k in ("segmentation", "depth")})])
    cfg = SearchConfig(warmup_steps=2, search_steps=0, finetune_steps=0, quiet=True, budget=None)
    with pytest.raises(DataError, match="one-shot iterator.*every 1 steps"):
        search(fresh(tasks), make_loader(train, 4), batches(), cfg.replace(val_every=1))
    result = search(fresh(tasks), make_loader(train, 4), batches(), cfg)
    assert result.metrics["depth"]["abs_err"] == result.metrics["depth"]["abs_err"]  # measured, not NaN


def test_missing_task_key_is_all_missing(data):
    train, _ = data

    class DropDepth(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            x, y = train[i]
            return x, {k: v for k, v in y.items() if k != "depth"}

    sm = fresh(train.tasks)
    res = search(sm, make_loader(DropDepth(), 8), None, dict(warmup_steps=2, search_steps=2, finetune_steps=2,
                                                             weight_steps_per_policy_step=1, log_every=1, quiet=True))
    assert all(h["losses"]["depth"] == 0.0 for h in res.history if "losses" in h)


def test_per_task_loaders(data):
    train, val = data
    sm = fresh(train.tasks)
    loaders = {t: make_loader(torch.utils.data.Subset(train, range(8 * (k + 1))), 8, shuffle=True, seed=k)
               for k, t in enumerate(sm.task_names)}
    vals = {t: make_loader(val, 16) for t in sm.task_names}
    res = search(sm, loaders, vals, dict(warmup_steps=3, search_steps=4, finetune_steps=3, weight_steps_per_policy_step=1,
                                         paths="sampled", quiet=True))
    assert set(res.metrics) == set(sm.task_names)


@pytest.mark.parametrize("options", [
    dict(weighting="gradnorm", paths="soft"),
    dict(weighting="uncertainty", weight_optimizer="sgd", budget="1.2x", budget_metric="macs", discretize="sample"),
    dict(amp=True, grad_clip=1.0, val_every=4),  # amp is a no-op on the CPU
])
def test_options_run(data, options):
    train, val = data
    sm = fresh(train.tasks)
    res = search(sm, make_loader(train, 8, shuffle=True), make_loader(val, 16, ), quiet=True, warmup_steps=2,
                 search_steps=4, finetune_steps=2, weight_steps_per_policy_step=1, val_batches=1, **options)
    assert res.policy.tasks == sm.task_names and res.metrics
    if options.get("budget_metric") == "macs":
        assert res.macs == sm.policy_mac_count(res.policy) and res.budget_macs == 1.2 * res.base_macs
        assert any("expected_macs" in h for h in res.history)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_gpu_is_a_config_error(data):
    train, _ = data
    with pytest.raises(ConfigError, match="no CUDA"):
        search(fresh(train.tasks), make_loader(train, 8), None, device="cuda", quiet=True)


def test_more_processes_on_a_machine_than_gpus_is_a_config_error(monkeypatch):
    """torchrun --nproc-per-node 2 on a one-GPU machine: the second process has no GPU of its own (it died with
    CUDA's 'invalid device ordinal')."""
    from automtl.search._util import _resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"process 1 of this machine has no GPU of its own: the machine has 1 .*\("
                                          r"torchrun --nproc-per-node 1\) or use device: cpu"):
        _resolve_device("auto", 1)


def test_evaluate_on_a_device_the_model_is_not_on_is_one_sentence(data):
    _, val = data
    sm = fresh(val.tasks)
    with pytest.raises(ConfigError, match=r"evaluate\(\) was asked for device 'meta' but the model is on 'cpu'; move "
                                          r"the model there first \(model.to\('meta'\)\) or leave device out"):
        evaluate(sm, make_loader(val, 16), device="meta")
    assert evaluate(sm, make_loader(val, 16), device="cpu", max_batches=1)[0]


# ---- the config --------------------------------------------------------------------------
def test_config_yaml_round_trip(tmp_path):
    cfg = SearchConfig(warmup_steps=3, budget="1.5x", weighting="dwa", weighting_options={"window": 5}, out_dir="runs/x")
    path = tmp_path / "search.yaml"
    cfg.to_yaml(path)
    assert SearchConfig.from_yaml(path) == cfg
    assert SearchConfig.from_dict(yaml.safe_load(path.read_text())) == cfg


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'warmup_steps'"):
        SearchConfig.from_dict({"warmup_step": 3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nlr: [0.1\nquiet: true\n")
    with pytest.raises(ConfigError, match="line 3"):
        SearchConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="warmup_steps"):
        SearchConfig(warmup_steps=-1)
    with pytest.raises(ConfigError, match="did you mean 'macs'"):
        SearchConfig(budget_metric="mac")
    with pytest.raises(ConfigError, match="did you mean 'finetune_steps'"):
        search(None, [], None, finetune_step=3)


@pytest.mark.parametrize("fields, message", [
    (dict(momentum=1.0), "'momentum' must be below 1"),
    (dict(tau_decay=5.0), "'tau_decay' is a decay: at most 1"),
    (dict(tau_start=0.5, tau_min=1.0), "'tau_min' \\(1.0\\) is above 'tau_start' \\(0.5\\)"),
])
def test_values_outside_a_field_s_meaning_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        SearchConfig(**fields)


@pytest.mark.parametrize("field", ["lr", "momentum", "tau_start", "conflict_confidence", "holdout_fraction", "min_margin",
                                   "finetune_decay_fraction", "conflict_threshold", "grad_clip", "finetune_lr", "budget",
                                   "seed", "warmup_steps"])
@pytest.mark.parametrize("value", [10 ** 400, -10 ** 400], ids=["huge", "minus-huge"])
def test_a_number_no_float_holds_is_refused_in_a_short_sentence(field, value):
    """A 400-digit integer where a number goes: math.isfinite and float() raised OverflowError; now one sentence
    that does not quote the 400 digits."""
    with pytest.raises(ConfigError, match=field) as caught:
        SearchConfig(**{field: value})
    assert len(str(caught.value)) < 300 and "0" * 100 not in str(caught.value)


@pytest.mark.parametrize("value, expected", [("1.5x", 1.5), (1.5, 1.5), ("2x", 2.0), (2, 2.0), ("3", 3.0),
                                             (" 1.25 X ", 1.25), (None, None), ("none", None)])
def test_parse_budget(value, expected):
    assert parse_budget(value) == expected


@pytest.mark.parametrize("value", ["1.5y", "x", "-1x", 0, -2.0, True, "1.5xx", [1.5], "", "  ", 10 ** 400],
                         ids=lambda v: "huge" if v == 10 ** 400 else None)
def test_parse_budget_rejects(value):
    with pytest.raises(ConfigError):
        parse_budget(value)
    with pytest.raises(ConfigError):
        SearchConfig(budget=value)


@pytest.mark.parametrize("value", ["-1.5x", "-2", 0, "0x", -2.0])
def test_a_budget_below_zero_is_named_as_one_whatever_its_form(value):
    """helper-78: '-1.5x' was "not a multiple of the single model" where '0x' "must be positive"."""
    with pytest.raises(ConfigError, match="must be a positive multiple of the single model"):
        parse_budget(value)


# ---- two ranks ---------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["gumbel", "conflict"])
def test_two_ranks_agree_on_the_policy(tmp_path, strategy):
    config = dict(warmup_steps=4, search_steps=8, finetune_steps=4, weight_steps_per_policy_step=1, tau_every=1,
                  checkpoint_every=5, budget="1.5x", out_dir=str(tmp_path / "run"), quiet=True, log_every=1,
                  strategy=strategy, conflict_confidence=0.0)
    args = {"config": config, "result": str(tmp_path / "rank{rank}.pt"), "batch_size": 4}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), json.dumps(args)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180)
    assert proc.returncode == 0, proc.stdout.decode()[-4000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["choices"] == r1["choices"] and r0["evidence"] == r1["evidence"]
    assert torch.equal(r0["logits"], r1["logits"])
    assert r0["logits"].abs().max() > 0 or strategy == "conflict"  # conflict has no logits to move
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # only rank 0 wrote files
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 16


def test_two_ranks_resume_each_ranks_balancer_state(tmp_path):
    """GradVac's moving targets follow each rank's own Jacobian, so they differ between ranks: the checkpoint
    holds every rank's, and two ranks killed mid-run resume to the weights of an uninterrupted run."""
    pytest.importorskip("torchjd", reason="torchjd is not installed (pip install 'automtl[torchjd]')")
    config = dict(warmup_steps=3, search_steps=4, finetune_steps=3, checkpoint_every=1, quiet=True, strategy="conflict",
                  conflict_every=2, weighting="gradvac")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def two_ranks(out, result, **extra):
        args = {"config": {**config, "out_dir": str(tmp_path / out), **extra.pop("cfg", {})}, "batch_size": 4,
                "result": str(tmp_path / result), **extra}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), json.dumps(args)]
        return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180)

    proc = two_ranks("a", "a{rank}.pt")
    assert proc.returncode == 0, proc.stdout.decode()[-4000:]
    proc = two_ranks("b", "never{rank}.pt", crash_after=4 * 5)
    assert proc.returncode != 0 and b"went away" in proc.stdout
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 5 and len(ckpt["ranks"]) == 2
    proc = two_ranks("b", "b{rank}.pt", cfg={"resume": True})
    assert proc.returncode == 0, proc.stdout.decode()[-4000:]
    a, b = (torch.load(tmp_path / f"{x}0.pt", weights_only=True)["state"] for x in "ab")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("choice", ["share", "specialize"])
def test_finetune_through_compact_view_trains_like_hard_mode(data, monkeypatch, choice):
    """Fine-tune runs a compact view of the supermodel (shared layers once, not per task). Where
    every BatchNorm sees the same rows either way (all tasks share, or none do), one SGD step
    must move every parameter exactly as a step of the supermodel in hard mode does."""
    search_module = sys.modules["automtl.search._run"]  # where the run compiles its compact views
    train, _ = data
    policy_of = lambda sm: Policy.uniform(sm.layer_names, sm.task_names, choice)  # noqa: E731
    cfg = SearchConfig(finetune_steps=1, batch_size=8, weight_optimizer="sgd", lr=0.1, quiet=True, checkpoint_every=0)
    via_view = fresh(train.tasks)
    via_hard = copy.deepcopy(via_view)
    start = {k: v.clone() for k, v in via_view.state_dict().items()}
    search(via_view, train, None, cfg, policy=policy_of(via_view))
    monkeypatch.setattr(search_module, "compact", lambda *a, **k: None)
    search(via_hard, train, None, cfg, policy=policy_of(via_hard))
    moved = 0
    for (name, a), b in zip(via_view.named_parameters(), via_hard.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} differs after one fine-tune step")
        moved += not torch.equal(a, start[name])
    assert moved > 0


def test_generators_a_model_owns_round_trip_and_a_missing_one_is_one_sentence(tmp_path):
    """The checkpoint's RNG state holds the generators of the model's modules (torch's, Python's, numpy's legacy and
    new ones); one the model no longer owns is a FileFormatError, not a KeyError."""
    import random

    import numpy as np

    from automtl.errors import FileFormatError
    from automtl.fileio import load_tensors
    from automtl.search._util import _rng_state, _set_rng_state

    def model():
        m = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity())
        m[0].g, m[0].py = torch.Generator().manual_seed(1), random.Random(2)
        m[1].legacy, m[1].new = np.random.RandomState(3), np.random.default_rng(4)
        return m

    a = model()
    torch.save(_rng_state(a), tmp_path / "rng.pt")
    draws = [torch.rand(2, generator=a[0].g), a[0].py.random(), a[1].legacy.rand(), a[1].new.random()]
    b = model()
    for _ in range(3):  # move every generator of the second model away, then set them back from the file
        b[0].py.random(), b[1].legacy.rand(), b[1].new.random(), torch.rand(1, generator=b[0].g)
    state = load_tensors(tmp_path / "rng.pt", "checkpoint", FileFormatError, "")
    _set_rng_state(state, b)
    again = [torch.rand(2, generator=b[0].g), b[0].py.random(), b[1].legacy.rand(), b[1].new.random()]
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]
    del b[1].new
    with pytest.raises(FileFormatError, match="generator '1.new' that this model's modules do not own"):
        _set_rng_state(state, b)


def test_optimizer_states_a_run_writes_pass_the_checkpoint_check():
    """What the check compares against is the optimizer's own kind: a float64 supermodel's Adam state, and a
    run that resumes with fused Adam where it started without (None) or the other way, are not damage."""
    from automtl.search._checkpoint import _optimizer_unlike

    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    written = torch.optim.Adam([p])
    p.grad = torch.ones(3, dtype=torch.float64)
    written.step()
    assert _optimizer_unlike(torch.optim.Adam([p]), written.state_dict(), "the weight optimizer") is None
    q = torch.nn.Parameter(torch.zeros(3))
    unfused, fused = torch.optim.Adam([q]), torch.optim.Adam([q], fused=True)
    q.grad = torch.ones(3)
    unfused.step()
    assert _optimizer_unlike(fused, unfused.state_dict(), "the weight optimizer") is None
    state = unfused.state_dict()
    state["param_groups"][0]["fused"] = "x"
    assert "neither a bool nor None" in _optimizer_unlike(fused, state, "the weight optimizer")


def test_a_target_named_like_a_task_is_refused_as_a_typo_at_the_first_batch():
    """A dataset yielding 'segmentaton' for the task 'segmentation' trained the others and left segmentation's head
    untrained, with only a warning in a run shorter than the partial-label grace; a target whose name is close to a
    task that has none in the batch is refused at once, naming both."""
    class Typo(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return torch.randn(3, SIZE, SIZE), {"segmentaton": torch.randint(0, 4, (SIZE, SIZE)),
                                                "depth": torch.rand(1, SIZE, SIZE)}

    tasks = [Task("segmentation", "segmentation", classes=4), Task("depth", "depth")]
    cfg = SearchConfig(warmup_steps=2, search_steps=0, finetune_steps=0, quiet=True)
    with pytest.raises(AutomtlError, match="no target for task 'segmentation' but one named 'segmentaton'"):
        search(fresh(tasks), Typo(), None, cfg)


def test_the_typo_check_leaves_partial_labels_and_number_names_alone():
    """Only a task with no target yet, beside a stray target whose name is close to it, is a typo: a later batch
    without it beside another attribute is partial labels, and a key 0 is the task '0'."""
    from automtl.search._data import TargetTally

    tally = TargetTally(["attr_1", "attr_3"])
    tally.add({"attr_1": torch.zeros(1), "attr_3": torch.zeros(1)})
    tally.add({"attr_1": torch.zeros(1), "attr_2": torch.zeros(1)})
    TargetTally(["0"]).add({0: torch.zeros(1)})
    with pytest.raises(AutomtlError, match="no target for task 'attr_3' but one named 'attr_2'"):
        TargetTally(["attr_1", "attr_3"]).add({"attr_1": torch.zeros(1), "attr_2": torch.zeros(1)})


def test_a_run_with_a_tensor_option_resumes(data, tmp_path):
    """torchjd's pref_vector given as a tensor (the Python API) sat in the checkpoint's fingerprint: the resume's ==
    raised; the fingerprint now holds its numbers."""
    pytest.importorskip("torchjd")
    train, _ = data
    tasks = [Task("segmentation", "segmentation", classes=4), Task("depth", "depth")]
    cfg = SearchConfig(strategy="conflict", warmup_steps=2, search_steps=2, finetune_steps=1, conflict_every=1,
                       checkpoint_every=2, out_dir=str(tmp_path), quiet=True, weighting="upgrad",
                       weighting_options={"pref_vector": torch.tensor([1.0, 2.0])})
    first = search(fresh(tasks), make_loader(train, 8, shuffle=True), None, cfg)
    again = search(fresh(tasks), make_loader(train, 8, shuffle=True), None, cfg.replace(resume=True))
    assert again.policy == first.policy


def test_evaluate_refuses_a_plain_backbone_and_a_count_of_no_batches():
    """A backbone was an AttributeError from inside; max_batches=0 returned NaN for every metric."""
    from torch import nn

    sm = supermodel("tiny", [Task("depth", "depth")], torch.randn(1, 3, 16, 16))
    data = [(torch.randn(2, 3, 16, 16), {"depth": torch.rand(2, 1, 16, 16)})]
    with pytest.raises(ConfigError, match="evaluate\\(\\) needs a multi-task model with its tasks .* got a Conv2d"):
        evaluate(nn.Conv2d(3, 1, 1), data)
    for wrong in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="max_batches must be a positive whole number"):
            evaluate(sm, data, max_batches=wrong)
    assert set(evaluate(sm, data, max_batches=1)[0]["depth"]) >= {"abs_err"}


def test_a_config_keyword_typo_gets_a_did_you_mean():
    from automtl.convert import ConvertConfig

    with pytest.raises(ConfigError, match="SearchConfig: unknown key 'warmup_step'; did you mean 'warmup_steps'"):
        SearchConfig(warmup_step=3)
    with pytest.raises(ConfigError, match="ConvertConfig: unknown key 'backbon'; did you mean 'backbone'"):
        ConvertConfig(backbon="tiny")
    import dataclasses
    assert dataclasses.replace(SearchConfig(warmup_steps=3), search_steps=2).warmup_steps == 3


def test_per_task_loaders_of_other_batch_sizes_are_refused_before_training(data):
    """helper-78: per-task training loaders of batch sizes 4 and 24 failed at the first step, after the setup; they
    are refused up front (validation loaders run task by task, so theirs may differ)."""
    train, val = data
    sm = fresh(train.tasks)
    loaders = {t: make_loader(train, 4 if k == 0 else 8) for k, t in enumerate(sm.task_names)}
    with pytest.raises(DataError, match=r"training data is a dict of per-task loaders with batch sizes '\w+': 4, "
                                        r"'\w+': 8.*give every task's loader the same batch_size"):
        search(sm, loaders, None, dict(warmup_steps=1, search_steps=1, finetune_steps=1, quiet=True))
    mixed = {t: make_loader(train, 4) if k == 0 else train for k, t in enumerate(sm.task_names)}  # a data set: batch_size
    with pytest.raises(DataError, match=r"batch sizes '\w+': 4, '\w+': 8"):
        search(sm, mixed, None, dict(warmup_steps=1, search_steps=1, finetune_steps=1, batch_size=8, quiet=True))
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from automtl.data.collate import stack_samples
    sampled = {t: DataLoader(train, batch_sampler=BatchSampler(SequentialSampler(train), 4 if k == 0 else 8, False),
                             collate_fn=stack_samples) for k, t in enumerate(sm.task_names)}  # batch_size None (helper-80)
    with pytest.raises(DataError, match=r"batch sizes '\w+': 4, '\w+': 8"):
        search(sm, sampled, None, dict(warmup_steps=1, search_steps=1, finetune_steps=1, quiet=True))
    vals = {t: make_loader(val, 4 if k == 0 else 16) for k, t in enumerate(sm.task_names)}
    res = search(sm, make_loader(train, 8), vals, dict(warmup_steps=1, search_steps=1, finetune_steps=1, quiet=True))
    assert set(res.metrics) == set(sm.task_names)


def test_a_checkpoint_of_another_number_of_processes_names_the_torchrun_that_resumes_it(data, tmp_path):
    """A checkpoint written under torchrun by 2 processes, resumed by one: the refusal says how many processes
    wrote it and the torchrun that resumes it (it said "world differ")."""
    train, _ = data
    tasks = [Task("segmentation", "segmentation", classes=4), Task("depth", "depth")]
    cfg = SearchConfig(strategy="conflict", warmup_steps=2, search_steps=2, finetune_steps=0, checkpoint_every=2,
                       out_dir=str(tmp_path), quiet=True)
    search(fresh(tasks), make_loader(train, 8, shuffle=True), None, cfg)
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["fingerprint"]["world"] = 2
    torch.save(ckpt, path)
    with pytest.raises(AutomtlError, match=r"written by 2 processes and this run has 1: resume it under torchrun "
                                           r"--nproc-per-node 2\), or use another out_dir$"):
        search(fresh(tasks), make_loader(train, 8, shuffle=True), None, cfg.replace(resume=True))


@pytest.mark.parametrize("env,prefix", [({}, "automtl search"),
                                        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
                                         "torchrun --nproc-per-node 2 -m automtl search"),
                                        ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"},
                                         "torchrun --nnodes 2 --nproc-per-node 4 -m automtl search")])
def test_the_resume_command_after_ctrl_c_runs_as_many_processes_as_the_run(monkeypatch, env, prefix):
    from automtl.cli import _again

    for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _again(["search", "tiny", "--out", "r", "--overwrite"]) == f"{prefix} tiny --out r --resume"


def test_a_resume_in_the_fine_tune_with_another_finetune_steps_says_what_it_changes(data, tmp_path):
    """finetune_steps may change on resume (to lengthen a run), but from inside the fine-tune its anneal then
    restarts on the new schedule: a warning says so, and a resume with the run's own length says nothing."""
    import warnings

    train, _ = data
    tasks = [Task("segmentation", "segmentation", classes=4), Task("depth", "depth")]
    cfg = SearchConfig(strategy="conflict", warmup_steps=2, search_steps=2, finetune_steps=4, checkpoint_every=100,
                       out_dir=str(tmp_path), quiet=True)
    search(fresh(tasks), make_loader(train, 8, shuffle=True), None, cfg)  # its checkpoint: the run's end, step 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search(fresh(tasks), make_loader(train, 8, shuffle=True), None, cfg.replace(resume=True))
    with pytest.warns(UserWarning, match=r"resuming in the fine-tune \(step 8\) with finetune_steps 6, where the run "
                                         r"was started with 4: its length and learning-rate anneal follow the new"):
        longer = search(fresh(tasks), make_loader(train, 8, shuffle=True), None, cfg.replace(resume=True, finetune_steps=6))
    assert longer.steps["finetune"] == 6
