"""Strategies as properties: identical tasks never branch, unrelated tasks do (with higher conflict
scores), evidence reaches policy.yaml and falls back to share where it is weak, the held-out split."""
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from automtl.errors import ConfigError
from automtl.policy import SHARE, SPECIALIZE, Policy
from automtl.search import SearchConfig, list_strategies, search
from automtl.supermodel import supermodel
from automtl.tasks import Task

SIZE = 16



class TwoTargets(Dataset):
    """Images with two regression targets: the same function twice (``related``), or two functions of
    disjoint parts of the image (independent targets, both learnable)."""

    def __init__(self, n, related, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, SIZE, SIZE, generator=g)
        f1 = (self.x[:, 0, : SIZE // 2].mean((1, 2)) * 4).tanh()
        f2 = (self.x[:, 1, :, SIZE // 2:] * self.x[:, 2, :, SIZE // 2:]).mean((1, 2)) * 8
        self.y = {"a": f1[:, None], "b": (f1 if related else f2)[:, None]}

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {k: v[i] for k, v in self.y.items()}


def run(related, strategy, tmp_path=None, **overrides):
    torch.manual_seed(0)
    tasks = [Task("a", kind="regression"), Task("b", kind="regression")]
    sm = supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
    train = DataLoader(TwoTargets(256, related), batch_size=16, shuffle=True)
    cfg = dict(strategy=strategy, warmup_steps=30, search_steps=60, finetune_steps=0, budget="3x", quiet=True,
               checkpoint_every=0, out_dir=str(tmp_path) if tmp_path else None)
    return sm, search(sm, train, None, SearchConfig(**{**cfg, **overrides}))


def test_registered_strategies():
    assert {"gumbel", "conflict"} <= set(list_strategies())
    with pytest.raises(ConfigError, match="did you mean 'conflict'"):
        run(True, "conflcit")


@pytest.mark.parametrize("strategy", ["conflict", "gumbel"])
def test_identical_tasks_never_specialize(strategy):
    _, res = run(True, strategy)
    assert res.policy.counts()["specialize"] == 0, res.policy.choices
    assert res.policy.evidence["strategy"] == strategy


def test_unrelated_tasks_branch_with_higher_conflict_scores(tmp_path):
    _, same = run(True, "conflict")
    sm, apart = run(False, "conflict", tmp_path)
    assert apart.policy.counts()["specialize"] >= 1, apart.policy.evidence
    s_same = torch.tensor(same.policy.evidence["scores"])
    s_apart = torch.tensor(apart.policy.evidence["scores"])
    assert (s_apart > s_same).all(), (s_same, s_apart)
    # the copies start from the trained shared operator
    for layer, row in zip(sm.policy_layers, apart.policy.choices):
        for t, c in enumerate(row):
            if c == SPECIALIZE:
                assert torch.equal(layer.specialized[t].conv.weight, layer.shared.conv.weight)
    # evidence and budget reach policy.yaml and come back
    back = Policy.load(tmp_path / "policy.yaml")
    assert back == apart.policy and back.evidence["scores"] == apart.policy.evidence["scores"]
    assert 1.0 < back.evidence["budget"]["used"] <= 3.0 and back.evidence["budget"]["limit"] == 3.0


def test_budget_limits_branching():
    _, tight = run(False, "conflict", budget="1.0x")
    assert tight.policy.counts()["specialize"] == 0 and tight.within_budget
    assert tight.policy.evidence["over_budget"]


def test_weak_evidence_is_undecided_and_shares():
    # three conflict steps cannot clear t's 4.53 standard errors (2 degrees of freedom): every positive score is
    # undecided
    _, res = run(False, "conflict", search_steps=3, conflict_every=1)
    ev = res.policy.evidence
    assert ev["steps"] == 3 and ev["undecided"]
    for l, t in ev["undecided"]:
        assert res.policy.choices[l][t] == 0 and ev["scores"][l][t] > 0
    # gumbel: margins below min_margin share
    _, res = run(False, "gumbel", search_steps=6, min_margin=0.5)
    assert res.policy.counts()["share"] == len(res.policy.layers) * 2
    assert len(res.policy.evidence["undecided"]) == len(res.policy.layers) * 2


def test_a_config_changed_after_it_was_made_is_checked_again():
    cfg = SearchConfig(strategy="conflict", warmup_steps=1, search_steps=0, finetune_steps=0, quiet=True)
    cfg.conflict_futility = 0.7
    sm = supermodel("tiny", [Task("a", kind="regression"), Task("b", kind="regression")], torch.randn(1, 3, SIZE, SIZE))
    with pytest.raises(ConfigError, match="'conflict_futility' must be at least 0 and below 0.5"):
        search(sm, TwoTargets(16, True), None, cfg)


def test_policy_names_that_look_like_numbers_stay_names(tmp_path):
    p = Policy(["1e3"], ["2e5", "b"], [[0, 1]])
    p.save(tmp_path / "p.yaml")
    assert Policy.load(tmp_path / "p.yaml") == p


def test_old_policy_files_stay_readable(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("automtl_policy: 1\ntasks: [a, b]\nlayers:\n  conv1: {a: share, b: specialize}\n")
    p = Policy.load(path)
    assert p.choices == [[0, 1]] and p.evidence is None and p.score(0, 0) is None


def test_gumbel_policy_steps_read_held_out_data():
    from automtl.search import _Search

    torch.manual_seed(0)
    tasks = [Task("a", kind="regression"), Task("b", kind="regression")]
    sm = supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
    train = DataLoader(TwoTargets(160, True), batch_size=16, shuffle=True)
    run_ = _Search(sm, train, None, SearchConfig(quiet=True, holdout_fraction=0.25), None)
    try:
        weights, held = run_.streams[""], run_.streams["policy"]
        assert not set(weights.subset) & set(held.subset) and len(held.subset) == 40
        assert len(run_.streams["all"].loader.dataset) == 160
    finally:
        run_.close()
    conflict = _Search(sm, train, None, SearchConfig(quiet=True, strategy="conflict"), None)
    assert set(conflict.streams) == {""}
    conflict.close()


def test_evidence_in_bundle_and_inspect_grid(tmp_path):
    import automtl
    from automtl.report import inspect_text

    sm, res = run(False, "conflict", search_steps=20)
    model = automtl.compact(sm, res.policy)
    automtl.save(model, tmp_path / "m.automtl")
    text = inspect_text(tmp_path / "m.automtl")
    assert "gradient-conflict score (conflict)" in text and "budget used:" in text
    assert f"gradients measured {res.policy.evidence['steps']} of 5 planned times" in text
    crit = res.policy.evidence["critical_value"]  # Student's t at Φ(-2) with 4 degrees of freedom
    assert crit == pytest.approx(2.87, abs=0.01) and res.policy.evidence["steps"] == 5
    assert f"? = undecided (a conflict score above 0, but no conflict of {crit} standard errors from every other task)" in text
    l, t = next(iter(res.policy.evidence["undecided"]), (0, 0))
    row = next(line for line in text.splitlines() if line.startswith(res.policy.layers[l] + " "))
    assert f"{res.policy.evidence['scores'][l][t]:+.3f}" in row


def test_edited_choices_leave_the_search_s_evidence_behind(tmp_path):
    """A policy edited by hand (as the README suggests) kept the search's evidence: inspect and render marked an edited
    skip "undecided, fell back to share" and printed the searched architecture's budget used."""
    import automtl
    from automtl.report import inspect_text

    sm, res = run(False, "conflict", search_steps=20)
    assert res.policy.current_evidence is res.policy.evidence and "of_choices" in res.policy.evidence
    res.policy.save(tmp_path / "searched.yaml")
    doc = yaml.safe_load((tmp_path / "searched.yaml").read_text())
    layer = next(l for l, legal in zip(res.policy.layers, sm.skip_legal) if legal)
    doc["layers"][layer]["a"] = "skip" if doc["layers"][layer]["a"] != "skip" else "share"
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.warns(UserWarning, match="its choices were edited after the search, so the search's evidence"):
        edited = Policy.load(tmp_path / "edited.yaml")
    assert edited.evidence is None and not any(edited.undecided(l, t) for l in range(len(edited.layers))
                                               for t in range(len(edited.tasks)))
    automtl.save(automtl.compact(sm, edited), tmp_path / "m.automtl")
    text = inspect_text(tmp_path / "m.automtl")
    assert "budget used" not in text and "undecided" not in text
    same = Policy.load(tmp_path / "searched.yaml")  # not edited: its evidence stays
    assert same.current_evidence["scores"] == res.policy.evidence["scores"]
    same.choices[0][0] = 1 if same.choices[0][0] != 1 else 0  # edited in Python: the same
    assert same.current_evidence is None and same.score(0, 0) is None and "evidence" not in same.to_dict()


def test_rendered_grid_shows_evidence():
    pytest.importorskip("graphviz")
    from automtl.render import to_dot

    pol = Policy(["conv1", "conv2"], ["a", "b"], [[0, 1], [0, 0]],
                 {"kind": "conflict", "strategy": "conflict", "threshold": 0.0, "scores": [[0.1, 0.2], [0.05, -0.3]],
                  "undecided": [[1, 0]], "budget": {"metric": "params", "used": 1.2, "limit": 1.5}})
    src = to_dot(pol).source
    assert "specialize</B> +0.20" in src and "share ?+0.05" in src and "budget used: 1.2x" in src


def test_gumbel_frees_the_optimizer_state_of_ruled_out_operators():
    """Sampled paths: operators the policy rules out lose their Adam state; sampled ones keep theirs."""
    from automtl.search import _Search

    torch.manual_seed(0)
    tasks = [Task("a", kind="regression"), Task("b", kind="regression")]
    sm = supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
    run_ = _Search(sm, DataLoader(TwoTargets(64, False), batch_size=16), None,
                   SearchConfig(strategy="gumbel", quiet=True, checkpoint_every=0), None)
    run_._enter("search")
    iters = {k: s.iterate(0) for k, s in run_.streams.items()}
    for i in range(12):
        run_._step("search", i, i, iters, False)
    spec = [p for layer in sm.policy_layers for u in layer.specialized for p in u.parameters()]
    assert any(p in run_.weight_opt.state for p in spec)
    with torch.no_grad():
        sm.policy_logits[..., SPECIALIZE] = -20.0
    assert run_.strategy._free_ruled_out() > 0
    assert not any(p in run_.weight_opt.state for p in spec)
    shared = [p for layer in sm.policy_layers for p in layer.shared.parameters()]
    assert any(p in run_.weight_opt.state for p in shared)
    run_.close()


def test_gumbel_copies_start_from_the_warmed_up_shared_weights():
    sm, _ = run(False, "gumbel", warmup_steps=6, search_steps=0)
    for layer in sm.policy_layers:
        for unit in layer.specialized:
            for a, b in zip(unit.parameters(), layer.shared.parameters()):
                assert torch.equal(a, b)


@pytest.mark.parametrize("weighting", ["equal", "uncertainty", "gradnorm"])
def test_conflict_measurement_equals_each_task_gradient_taken_apart(weighting):
    """A measured step derives the last task's gradient from the step's own backward (G = Σ c_t g_t);
    the cosines must equal those of the T gradients taken one by one, under any loss-level balancer."""
    from automtl.search._run import _Search

    torch.manual_seed(0)
    tasks = [Task("a", kind="regression"), Task("b", kind="regression"), Task("c", kind="regression")]
    sm = supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
    run = _Search(sm, DataLoader(TwoTargets(32, False), batch_size=16), None,
                  SearchConfig(strategy="conflict", warmup_steps=0, search_steps=1, finetune_steps=0, quiet=True,
                               weighting=weighting, weighting_options={"alpha": 1.5} if weighting == "gradnorm" else {}),
                  None)
    run._enter("search")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, SIZE, SIZE, generator=g)
    targets = {t: torch.randn(8, 1, generator=g) for t in ("a", "b", "c")}
    if weighting == "uncertainty":  # coefficients other than 1
        with torch.no_grad():
            for p in run.weighting.parameters():
                p.copy_(torch.tensor([0.5, -1.0, 2.0]))
    losses, _ = run.forward_losses(run.strategy.net, x, targets, "search", 0, 0)
    ws = [layer.shared.conv.weight for layer in sm.policy_layers]
    direct = torch.stack([run.strategy._cosines(list(gs)) for gs in zip(
        *[torch.autograd.grad(losses[t], ws, retain_graph=True) for t in ("a", "b", "c")])]).double()
    total, _ = run.weighting(losses, shared_parameters=run.shared, step=0)
    measured = run.strategy._measure(losses, total)
    assert torch.allclose(measured, direct, atol=1e-4), (measured - direct).abs().max()


def test_conflict_measured_steps_train_exactly_like_plain_steps():
    """Measuring every step changes nothing in the weights: the search stage is hard-sharing training."""
    def weights(**cfg):
        torch.manual_seed(0)
        tasks = [Task("a", kind="regression"), Task("b", kind="regression")]
        sm = supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
        search(sm, TwoTargets(64, False), None, SearchConfig(quiet=True, checkpoint_every=0, batch_size=16,
                                                             finetune_schedule="constant", **cfg))
        return [p.detach().clone() for p in sm.policy_layers[-1].shared.parameters()]

    measured = weights(strategy="conflict", warmup_steps=0, search_steps=6, finetune_steps=0, conflict_every=1,
                       conflict_confidence=1e9)
    plain = weights(strategy="conflict", warmup_steps=6, search_steps=0, finetune_steps=0)
    assert all(torch.equal(a, b) for a, b in zip(measured, plain))


def test_a_branched_search_fine_tunes_at_equal_compute():
    """finetune_unit: compute — the fine-tune's length is fitted to the architecture the search chose."""
    _, res = run(False, "conflict", finetune_steps=10, finetune_unit="compute", log_every=1)
    assert res.macs > res.base_macs  # it branched
    steps = sum(1 for h in res.history if h["stage"] == "finetune")
    assert steps == round(10 * res.base_macs / res.macs) == res.steps["finetune"] < 10


def test_conflict_warns_when_the_search_cannot_measure_enough():
    with pytest.warns(UserWarning, match="too few for any conflict to be significant"):
        _, res = run(False, "conflict", search_steps=7)  # one measurement at conflict_every=4
    assert res.policy.evidence["steps"] == 1 and res.policy.counts()["specialize"] == 0
    import warnings  # one task has no pair to be in conflict: nothing to warn about (helper-78)

    torch.manual_seed(0)
    sm = supermodel("tiny", [Task("a", kind="regression")], torch.randn(1, 3, SIZE, SIZE))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*too few for any conflict")
        search(sm, DataLoader(TwoTargets(32, True), batch_size=16), None,
               SearchConfig(strategy="conflict", warmup_steps=1, search_steps=3, finetune_steps=0, quiet=True,
                            checkpoint_every=0))


def test_tasks_that_agree_branch_as_a_group():
    """The decision from measured cosines, three tasks: where a and b agree and c opposes both, c alone gets a
    copy and the pair keeps the shared layer; where all three agree, nothing branches."""
    from automtl.search._run import _Search

    torch.manual_seed(0)
    tasks = [Task("a", kind="regression"), Task("b", kind="regression"), Task("c", kind="regression")]
    sm = supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
    run = _Search(sm, DataLoader(TwoTargets(32, False), batch_size=16), None,
                  SearchConfig(strategy="conflict", warmup_steps=0, search_steps=0, finetune_steps=0, quiet=True,
                               budget="3x"), None)
    conflict = torch.tensor([[1.0, 0.9, -0.5], [0.9, 1.0, -0.5], [-0.5, -0.5, 1.0]], dtype=torch.float64)
    agree = torch.tensor([[1.0, 0.8, 0.8], [0.8, 1.0, 0.8], [0.8, 0.8, 1.0]], dtype=torch.float64)
    L, n = len(sm.layer_names), 20
    mean = torch.stack([conflict if l % 2 == 0 else agree for l in range(L)])
    st = run.strategy
    st.count, st.cos_sum, st.cos_sq = n, mean * n, (mean ** 2 + 0.01) * n  # per-step std 0.1
    policy, evidence = st.decide()
    for l, row in enumerate(policy.choices):
        assert row == ([SHARE, SHARE, SPECIALIZE] if l % 2 == 0 else [SHARE, SHARE, SHARE]), (l, row)
        assert evidence["scores"][l][2] == (0.5 if l % 2 == 0 else -0.8)
    assert not evidence["undecided"] and not evidence["over_budget"]


def test_conflict_stops_measuring_once_the_decision_is_settled():
    """Futility stopping: identical tasks agree from the first measurements, so conflict stops after the
    minimum; tasks that conflict are measured to the end; conflict_futility=0 always measures to the end."""
    from automtl.search.conflict import MIN_MEASUREMENTS

    _, same = run(True, "conflict")
    ev = same.policy.evidence
    assert ev["stopped_early"] and ev["steps"] == MIN_MEASUREMENTS < ev["planned_steps"] == 15
    _, apart = run(False, "conflict")
    assert not apart.policy.evidence["stopped_early"] and apart.policy.evidence["steps"] == 15
    assert apart.policy.counts()["specialize"] >= 1
    from automtl.report import _policy_lines
    assert f"gradients measured {MIN_MEASUREMENTS} of 15 planned times; then stopped" in "\n".join(_policy_lines(same.policy))
    _, always = run(True, "conflict", conflict_futility=0.0)
    assert not always.policy.evidence["stopped_early"] and always.policy.evidence["steps"] == 15


def test_a_conflict_run_that_shares_everything_is_hard_sharing_at_equal_compute():
    """What the futility stop saves goes to the fine-tune (finetune_unit: compute), at the constant rate
    before the anneal: a conflict run that decides all-share trains bitwise the weights of hard sharing
    given the same steps and the same annealing."""
    def weights(policy=None, **cfg):
        torch.manual_seed(0)
        tasks = [Task("a", kind="regression"), Task("b", kind="regression")]
        sm = supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
        res = search(sm, TwoTargets(64, True), None, SearchConfig(quiet=True, checkpoint_every=0, batch_size=16,
                                                                  finetune_unit="compute", **cfg), policy=policy)
        return res, [p.detach().clone() for p in sm.weight_parameters()]

    res, conflict = weights(strategy="conflict", warmup_steps=6, search_steps=24, finetune_steps=10, budget="2x")
    ev = res.policy.evidence
    assert res.policy.counts()["specialize"] == 0 and ev["stopped_early"]
    extra = round((ev["planned_steps"] - ev["steps"]) * 0.8)  # protocol.STEP_COST: 0.8 FBE a skipped measurement
    assert extra > 0 and res.steps["finetune"] == 10 + extra
    total = 6 + 24 + 10 + extra
    share = Policy.uniform(res.policy.layers, res.policy.tasks, "share")
    # as the quality benchmark's hard sharing runs (convert's config): the unused copies end as the shared operator
    _, hard = weights(share, strategy="conflict", finetune_steps=total, finetune_decay_fraction=10 / total)
    assert all(torch.equal(a, b) for a, b in zip(conflict, hard))


@pytest.mark.parametrize("crash", [11, 18])  # in the search after the stop (step 6), in the lengthened fine-tune
def test_a_run_resumed_after_the_futility_stop_ends_bitwise_equal(tmp_path, crash, crash_after):
    """The stop and the compute it frees are part of the checkpoint: a run killed after conflict stopped
    measuring resumes to the same fine-tune length and the same weights."""
    def go(data, out, resume=False):
        torch.manual_seed(0)
        tasks = [Task("a", kind="regression"), Task("b", kind="regression")]
        sm = supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
        cfg = SearchConfig(strategy="conflict", warmup_steps=2, search_steps=12, finetune_steps=4, conflict_every=1,
                           finetune_unit="compute", checkpoint_every=1, batch_size=16, quiet=True,
                           out_dir=str(out), resume=resume)
        res = search(sm, data, None, cfg)
        return res, [p.detach().clone() for p in sm.weight_parameters()]

    straight, w_straight = go(TwoTargets(64, True), tmp_path / "a")
    assert straight.policy.evidence["stopped_early"] and straight.steps["finetune"] == 4 + 6  # 8 skipped x 0.8
    with pytest.raises(RuntimeError, match="went away"):
        go(crash_after(TwoTargets(64, True), 16 * crash), tmp_path / "b")
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["global_step"] == crash
    resumed, w_resumed = go(TwoTargets(64, True), tmp_path / "b", resume=True)
    assert resumed.steps == straight.steps and resumed.policy.evidence == straight.policy.evidence
    assert all(torch.equal(a, b) for a, b in zip(w_straight, w_resumed))


def test_the_freed_compute_buys_steps_of_the_branched_architecture():
    """A branched policy: the nominal fine-tune and the freed compute are both counted in MACs of the
    hard-sharing model, so both shrink by MACs(all share) / MACs(policy); the anneal covers the nominal part."""
    from automtl.search._run import _Search

    torch.manual_seed(0)
    tasks = [Task("a", kind="regression"), Task("b", kind="regression")]
    sm = supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
    run = _Search(sm, DataLoader(TwoTargets(32, False), batch_size=16), None,
                  SearchConfig(strategy="conflict", warmup_steps=0, search_steps=40, finetune_steps=30, quiet=True,
                               finetune_unit="compute", finetune_decay_fraction=0.5, lr=0.01), None)
    run.strategy.count, run.strategy.stopped = 4, True  # 6 of 10 planned measurements skipped: 4.8 FBE
    choices = [[SHARE, SHARE] for _ in sm.layer_names]
    choices[-1] = [SHARE, SPECIALIZE]
    run.policy = Policy(sm.layer_names, sm.task_names, choices)
    run._fit_finetune()
    ratio = run.base_macs / sm.policy_mac_count(run.policy)
    assert ratio < 1
    steps = next(n for name, n, _ in run.plan if name == "finetune")
    assert steps == round(30 * ratio) + round(4.8 * ratio) and run.decay_steps == round(round(30 * ratio) * 0.5)
    lrs = []
    for i in range(steps):
        run._finetune_lr(i)
        lrs.append(run.weight_opt.param_groups[0]["lr"])
    constant = steps - run.decay_steps
    assert lrs[:constant + 1] == [0.01] * (constant + 1) and lrs[constant + 1] < 0.01 and lrs[-1] < 0.01 * 0.05


@pytest.mark.parametrize("value", [0.5, 0.9])
def test_futility_from_one_half_on_is_refused(value):
    # from 0.5 on, a pair significantly in conflict now could count as futile and the stop would hide it
    with pytest.raises(ConfigError, match="'conflict_futility' must be at least 0 and below 0.5"):
        SearchConfig(conflict_futility=value)
    with pytest.raises(ConfigError, match="'conflict_futility' must be non-negative"):
        SearchConfig(conflict_futility=-0.1)


def test_a_run_whose_fine_tune_the_stop_lengthened_resumes_from_its_last_checkpoint(tmp_path):
    """Under finetune_unit: compute the futility stop lengthens the fine-tune: the run's last checkpoint lies past
    warm-up + search + finetune_steps, and a resume from it (the checkpoint check fits the fine-tune first) ends
    the run as it was."""
    _, first = run(True, "conflict", tmp_path, finetune_steps=10, finetune_unit="compute", checkpoint_every=5)
    assert first.policy.evidence["stopped_early"] and first.steps["finetune"] > 10
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 30 + 60 + first.steps["finetune"]
    _, again = run(True, "conflict", tmp_path, finetune_steps=10, finetune_unit="compute", checkpoint_every=5,
                   resume=True)
    assert again.steps == first.steps and again.policy.choices == first.policy.choices


def test_gumbel_says_when_its_policy_steps_cannot_read_held_out_data():
    """Too few samples for a held-out part: the split was dropped without a word and the policy trained on the
    training batches, which the strategy exists to avoid."""
    from automtl.search import _Search

    tasks = [Task("a", kind="regression"), Task("b", kind="regression")]
    sm = supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
    with pytest.warns(UserWarning, match=r"gumbel's policy steps read the training batches of 'train', not a held-out "
                                         r"part: a share of 0.2 of its 24 samples leaves 5 held out and 19 to train, "
                                         r"and each part needs two batches of 8 \(16 samples\)"):
        run_ = _Search(sm, DataLoader(TwoTargets(24, True), batch_size=8), None, SearchConfig(quiet=True), None)
    assert set(run_.streams) == {""}
    run_.close()
    import warnings
    with warnings.catch_warnings():  # no policy step: nothing to say
        warnings.simplefilter("error")
        _Search(sm, DataLoader(TwoTargets(24, True), batch_size=8), None, SearchConfig(quiet=True, search_steps=0),
                None).close()
    with pytest.warns(UserWarning, match="it is not a map-style data set; pass a Dataset, or a DataLoader over one"):
        run_ = _Search(sm, [next(iter(DataLoader(TwoTargets(8, True), batch_size=8)))], None, SearchConfig(quiet=True),
                       None)
    run_.close()


@pytest.mark.parametrize("finetune_steps", [0, 6])
def test_a_hand_edited_policy_specializes_from_the_trained_shared_operator(finetune_steps):
    """helper-78: a conflict run's unused copies held the backbone's initial weights, so `automtl compact RUN_DIR
    --policy edited.yaml` that specialized one more layer dropped segmentation's mIoU from 45.2 to 29.7. Every copy
    the policy does not use now holds the (fine-tuned) shared operator: specializing it by hand computes, until it
    is trained, exactly what sharing did."""
    from automtl.compact import compact

    sm, res = run(False, "conflict", finetune_steps=finetune_steps)
    own = res.policy
    unused = [(l, t) for l, row in enumerate(own.choices) for t, c in enumerate(row) if c != SPECIALIZE]
    assert unused and any(c == SPECIALIZE for row in own.choices for c in row)  # it branched, and left copies unused
    for l, t in unused:
        layer = sm.policy_layers[l]
        copy, shared = layer.specialized[t].state_dict(), layer.shared.state_dict()
        assert all(torch.equal(copy[k], shared[k]) for k in shared)
    edited = [list(row) for row in own.choices]
    l, t = next((l, t) for l, t in unused if own.choices[l][t] == SHARE)
    edited[l][t] = SPECIALIZE
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        before = compact(sm.eval(), own)(x)
        after = compact(sm.eval(), Policy(own.layers, own.tasks, edited))(x)
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)


def test_a_task_that_shares_for_want_of_evidence_is_undecided_whichever_pair_links_it():
    """helper-78: normal's least agreement (with segmentation: mean cosine -0.044, s.e. 0.002) was significant, so its
    score showed as decided, but a noisy pair (with depth: -0.052, s.e. 0.10) linked it to the others and it shared.
    A task with a positive score that stays with other tasks is undecided; one that a significant conflict parts
    from every other task is decided, whether it branches or keeps the shared operator."""
    from types import SimpleNamespace

    from automtl.search.conflict import Conflict

    tasks = [Task(n, kind="regression") for n in ("segmentation", "depth", "normal")]
    sm = supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
    L, n = len(sm.layer_names), 10

    def decided(pairs):
        """Conflict's decision when every layer's pair (a, b) has mean cosine m and standard error e."""
        strategy = Conflict(SimpleNamespace(sm=sm, budget=None, config=SearchConfig(strategy="conflict", search_steps=n,
                                                                                    conflict_every=1)))
        mean, var = torch.full((3, 3), 0.5, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
        for (a, b), (m, e) in pairs.items():
            mean[a, b] = mean[b, a] = m
            var[a, b] = var[b, a] = e * e * (n - 1)
        strategy.count, strategy.cos_sum, strategy.cos_sq = n, (n * mean).expand(L, 3, 3), (n * (var + mean ** 2)).expand(L, 3, 3)
        policy, evidence = strategy.decide()
        return policy.choices[0], sorted({t for _, t in evidence["undecided"]}), evidence["scores"][0]

    noisy = {(0, 1): (0.3, 0.01), (0, 2): (-0.044, 0.002), (1, 2): (-0.052, 0.10)}
    choices, undecided, scores = decided(noisy)
    assert choices == [SHARE, SHARE, SHARE] and scores[2] > 0 and undecided == [2]
    parted = {(0, 1): (0.3, 0.01), (0, 2): (-0.044, 0.002), (1, 2): (-0.052, 0.002)}
    choices, undecided, scores = decided(parted)
    assert choices == [SHARE, SHARE, SPECIALIZE] and undecided == []
    apart = {(0, 1): (-0.3, 0.01), (0, 2): (-0.3, 0.01), (1, 2): (-0.3, 0.01)}  # segmentation keeps the shared one
    choices, undecided, scores = decided(apart)
    assert choices == [SHARE, SPECIALIZE, SPECIALIZE] and min(scores) > 0 and undecided == []


def test_a_sampled_choice_is_judged_by_its_own_margin_not_the_argmax_margin():
    """discretize="sample": the evidence for a drawn choice is its probability minus the best other
    choice's, negative where the draw is not the most probable, so ``min_margin`` sends it to share."""
    sm, res = run(False, "gumbel", discretize="sample", min_margin=0.02, seed=1)
    ev = res.policy.evidence
    probs = sm.policy_probabilities().detach()
    drawn = sm.discretize(sample=True, seed=1).choices
    assert any(score < 0 for row in ev["scores"] for score in row)  # some draws are not the argmax
    for l, row in enumerate(drawn):
        for t, c in enumerate(row):
            others = [float(probs[l, t, o]) for o in range(3) if o != c]
            assert ev["scores"][l][t] == pytest.approx(float(probs[l, t, c]) - max(others), abs=1e-4)
            undecided = ev["scores"][l][t] < 0.02
            assert ((l, t) in ev["undecided"]) == undecided
            assert res.policy.choices[l][t] == (SHARE if undecided else c)


@pytest.mark.parametrize("n", [2, 4, 20])
def test_the_false_conflict_rate_is_phi_of_minus_z_whatever_the_number_of_measurements(n):
    """Under the null (pairs whose cosines scatter around the threshold), conflict parts a pair at the
    one-sided rate Φ(-conflict_confidence), 2.3 %: the standard error comes from the same n cosines, so
    the critical value is Student's t with n - 1 degrees of freedom (z alone parted 15 % at n = 2)."""
    from types import SimpleNamespace

    from automtl.search.conflict import Conflict

    pairs = 40_000
    cos = torch.randn(n, pairs, 2, 2, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 0.1
    cos = 0.5 * (cos + cos.transpose(-1, -2))  # symmetric, as measured
    strategy = Conflict.__new__(Conflict)
    strategy.run = SimpleNamespace(config=SearchConfig(conflict_confidence=2.0, conflict_threshold=0.0))
    strategy.cos_sum, strategy.cos_sq, strategy.count = cos.sum(0), (cos ** 2).sum(0), n
    mean, se = strategy.statistics()
    crit = strategy.critical_value()
    split = sum(len(Conflict._groups(mean[p], se[p], 0.0, crit)) > 1 for p in range(0, pairs, 10)) / (pairs // 10)
    assert split == pytest.approx(0.02275, abs=0.008), (n, crit, split)
    naive = float(((mean + 2.0 * se)[:, 0, 1] < 0).double().mean())  # the normal quantile on an estimated s.d.
    assert crit > 2.0 and (n > 4 or naive > 0.05)


@pytest.mark.parametrize("search_steps,every", [(6, 4), (7, 3), (3, 4), (8, 1)])
def test_run_cost_charges_the_measurements_the_search_takes(search_steps, every):
    """protocol.run_cost charges conflict's search stage measure_cost for each measurement it takes, and
    it takes search_steps // conflict_every of them (a partial last cycle measures nothing)."""
    from automtl.protocol import STEP_COST, measure_cost, run_cost

    _, res = run(False, "conflict", search_steps=search_steps, conflict_every=every, conflict_futility=0.0)
    taken = res.policy.evidence["steps"]
    assert taken == search_steps // every
    plain = 30 * STEP_COST["conflict"]["warmup"] + search_steps * STEP_COST["conflict"]["search"]
    assert run_cost("conflict", 30, search_steps, 0, 2, every) == pytest.approx(plain + taken * measure_cost(2))


@pytest.mark.parametrize("overrides", [{}, {"seed": 3, "reg_weight": 0.0, "policy_lr": 0.05}])  # the second: a layer
def test_gumbel_delivers_a_policy_within_its_budget(overrides):                      # where every task specializes
    """gumbel's budget term only penalizes the expected size, so its argmax can exceed the budget; the
    choices that cost size go back to share, weakest margin first, until it fits (budget_weight 0 here:
    the same search as without a budget, so the two policies differ exactly where choices went back). In a
    layer no task shares, one choice back saves nothing alone: the layer's others go back with it."""
    import warnings

    _, free = run(False, "gumbel", budget=None, budget_weight=0.0, min_margin=0.0, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all-share fits 1.0x: no warning that the budget cannot be met
        _, tight = run(False, "gumbel", budget="1.0x", budget_weight=0.0, min_margin=0.0, **overrides)
    assert free.policy.evidence["budget"]["used"] > 1.0 and tight.within_budget
    back = tight.policy.evidence["over_budget"]
    assert back and all(free.policy.choices[l][t] != SHARE for l, t in back)
    for l, row in enumerate(tight.policy.choices):
        for t, c in enumerate(row):
            assert c == (SHARE if (l, t) in back else free.policy.choices[l][t])


def test_gumbel_sends_back_the_weakest_choices_first_and_a_layer_no_task_shares_whole():
    from types import SimpleNamespace

    from automtl.search.gumbel import Gumbel

    tasks = [Task("a", kind="regression"), Task("b", kind="regression")]
    sm = supermodel("tiny", tasks, torch.randn(1, 3, SIZE, SIZE))
    layers, names = sm.layer_names, sm.task_names
    share = [[SHARE, SHARE] for _ in layers]
    base = sm.policy_parameter_count(Policy(layers, names, share))
    strategy = Gumbel.__new__(Gumbel)
    strategy.run = SimpleNamespace(sm=sm, budget=1.0, budget_params=base, budget_macs=None, dist=SimpleNamespace(main=True),
                                   config=SimpleNamespace(budget_metric="params"))
    margin = [[0.5, 0.5] for _ in layers]
    # layer 1: both tasks specialize (one back alone saves nothing); layer 2: one copy, with a weaker margin
    choices = [list(r) for r in share]
    choices[1], choices[2] = [SPECIALIZE, SPECIALIZE], [SHARE, SPECIALIZE]
    margin[1], margin[2] = [0.2, 0.3], [0.5, 0.1]
    strategy.run.budget_params = sm.policy_parameter_count(Policy(layers, names, [share[0], choices[1], *share[2:]]))
    back = strategy._within_budget(layers, names, choices, margin)
    assert back == [(2, 1)] and choices[1] == [SPECIALIZE, SPECIALIZE]  # the weakest went back, and was enough
    strategy.run.budget_params = base
    back = strategy._within_budget(layers, names, choices, margin)
    assert back == [(1, 0), (1, 1)] and choices == share


def test_the_undecided_legend_names_the_critical_value_or_too_few_measurements():
    from automtl.policy import undecided_meaning

    assert "of 2.87 standard errors" in undecided_meaning({"kind": "conflict", "confidence": 2.0, "critical_value": 2.87})
    assert "too few gradient measurements" in undecided_meaning({"kind": "conflict", "confidence": 2.0,
                                                                 "critical_value": None})
    assert "of 2.0 standard errors" in undecided_meaning({"kind": "conflict", "confidence": 2.0})  # an older policy
