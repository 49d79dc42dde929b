"""The ``conflict`` strategy: branch where the tasks' gradients conflict (after Recon, Shi et al., ICLR 2023).

Warm-up trains the hard-sharing model (every task shares every layer; one backbone pass a step).
The search stage trains it on while measuring, at every step and in every policy layer, the cosine
similarity of each pair of tasks' gradients on the layer's shared weights. Then, per layer:

* the *conflict score* of a task is ``conflict_threshold`` minus its best agreement with another
  task (the largest mean cosine); positive means it agrees with no one there;
* two tasks stay together unless their mean cosine is below the threshold by more than
  ``conflict_confidence`` standard errors of the mean over the measured steps; the connected groups
  that remain branch apart, the largest group keeps the shared operator and the others get their
  own copies, initialised from the trained shared weights so that no training is thrown away;
* layers are taken in order of conflict while the compact model stays within the budget.

A task whose score is positive but not significant is *undecided* and shares. Fine-tune trains on.
"""
from __future__ import annotations

import math

import torch

from ..policy import SHARE, SPECIALIZE, Policy
from ._strategy import Strategy, register_strategy


@register_strategy("conflict")
class Conflict(Strategy):
    def __init__(self, run):
        super().__init__(run)
        L, T = len(run.sm.layer_names), run.sm.num_tasks
        self.cos_sum = torch.zeros(L, T, T, dtype=torch.float64)
        self.cos_sq = torch.zeros(L, T, T, dtype=torch.float64)
        self.count = 0

    def held_out(self) -> float:
        return 0.0

    def _all_share(self) -> Policy:
        sm = self.run.sm
        return Policy.uniform(sm.layer_names, sm.task_names, "share")

    def enter_warmup(self):
        return self.run.hard_view(self._all_share())

    def warmup_mix(self):
        return None

    def enter_search(self) -> None:
        self.net = self.run.hard_view(self._all_share())
        self.run.stage_net = self.net

    # ---- one step: train hard sharing, measure the gradient cosines --------------------
    def search_step(self, i: int, g: int, iters: dict, log: bool) -> dict:
        run = self.run
        x, targets = run._batch(iters)
        run.sync_buffers()
        losses, values = run.forward_losses(self.net, x, targets, "search", i, g)
        weights_ = [layer.shared.conv.weight for layer in run.sm.policy_layers]
        per_task = []
        for t in run.tasks:
            grads = torch.autograd.grad(losses[t], weights_, retain_graph=True, allow_unused=True)
            per_task.append([torch.zeros_like(w) if gr is None else gr for gr, w in zip(grads, weights_)])
        cos = torch.stack([self._cosines([per_task[t][l] for t in range(len(run.tasks))])
                           for l in range(len(weights_))]).double()  # (L, T, T)
        run.dist.all_reduce_mean([cos])  # every rank keeps the same statistics
        self.cos_sum += cos.cpu()
        self.cos_sq += cos.cpu() ** 2
        self.count += 1
        total, weights = run.weighting(losses, shared_parameters=run.shared, step=g)
        run.weight_step(total, run.weight_opt)
        rec = run.record("search", i, g, "weight", values, weights, total, run.weight_opt)
        if log:
            T = len(run.tasks)
            off = ~torch.eye(T, dtype=torch.bool)
            rec["mean_cosine"] = float(cos[:, off].mean()) if T > 1 else None
        return rec

    @staticmethod
    def _cosines(grads: list) -> torch.Tensor:
        G = torch.stack([gr.detach().reshape(-1).float() for gr in grads])  # (T, n)
        G = G / G.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return G @ G.T

    # ---- the decision ----------------------------------------------------------------
    def statistics(self):
        """Mean pairwise cosine (L, T, T) and its standard error over the measured steps."""
        n = max(self.count, 1)
        mean = self.cos_sum / n
        var = (self.cos_sq / n - mean ** 2).clamp_min(0.0)
        se = (var / max(n - 1, 1)).sqrt() if self.count > 1 else torch.full_like(mean, math.inf)
        return mean, se

    def decide(self):
        sm, cfg = self.run.sm, self.run.config
        L, T = len(sm.layer_names), sm.num_tasks
        thr, z = cfg.conflict_threshold, cfg.conflict_confidence
        mean, se = self.statistics()
        scores = [[0.0] * T for _ in range(L)]
        undecided = []
        candidates = []
        for l in range(L):
            for t in range(T):
                if T == 1:
                    continue
                others = [j for j in range(T) if j != t]
                ally = max(others, key=lambda j: float(mean[l, t, j]))
                score = thr - float(mean[l, t, ally])
                scores[l][t] = round(score, 4)
                if score > 0 and score - z * float(se[l, t, ally]) <= 0:
                    undecided.append((l, t))
            groups = self._groups(mean[l], se[l], thr, z)
            if len(groups) > 1:
                keep = max(groups, key=lambda grp: (len(grp), -min(grp)))
                branch = sorted(t for grp in groups if grp is not keep for t in grp)
                candidates.append((max(scores[l][t] for t in branch), l, branch))
        choices = [[SHARE] * T for _ in range(L)]
        over_budget = []
        for priority, l, branch in sorted(candidates, key=lambda c: (-c[0], c[1])):
            trial = [list(r) for r in choices]
            for t in branch:
                trial[l][t] = SPECIALIZE
            if self._fits(Policy(sm.layer_names, sm.task_names, trial)):
                choices = trial
            else:
                over_budget.extend((l, t) for t in branch)
        policy = Policy(sm.layer_names, sm.task_names, choices)
        self._inherit(policy)
        evidence = {"kind": "conflict", "threshold": thr, "confidence": z, "steps": self.count,
                    "scores": scores, "undecided": undecided, "over_budget": over_budget}
        return policy, evidence

    @staticmethod
    def _groups(mean: torch.Tensor, se: torch.Tensor, thr: float, z: float) -> list:
        """Connected components of the tasks, linking every pair not significantly in conflict."""
        T = mean.shape[0]
        parent = list(range(T))

        def root(a):
            while parent[a] != a:
                a = parent[a]
            return a

        for a in range(T):
            for b in range(a + 1, T):
                m = 0.5 * float(mean[a, b] + mean[b, a])
                if not (m + z * float(se[a, b]) < thr):
                    parent[root(b)] = root(a)
        groups: dict = {}
        for t in range(T):
            groups.setdefault(root(t), []).append(t)
        return list(groups.values())

    def _fits(self, policy: Policy) -> bool:
        run = self.run
        if run.budget is None:
            return True
        if run.config.budget_metric == "macs":
            return run.sm.policy_mac_count(policy) <= run.budget_macs
        return run.sm.policy_parameter_count(policy) <= run.budget_params

    def _inherit(self, policy: Policy) -> None:
        """Each new task-owned copy starts from the trained shared operator (weights and statistics)."""
        with torch.no_grad():
            for layer, row in zip(self.run.sm.policy_layers, policy.choices):
                for t, c in enumerate(row):
                    if c == SPECIALIZE:
                        layer.specialized[t].load_state_dict(layer.shared.state_dict())

    # ---- checkpoint ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"cos_sum": self.cos_sum.clone(), "cos_sq": self.cos_sq.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.cos_sum = state["cos_sum"].clone()
            self.cos_sq = state["cos_sq"].clone()
            self.count = int(state["count"])
