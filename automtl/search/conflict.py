"""The ``conflict`` strategy: branch where the tasks' gradients conflict (after Recon, Shi et al., ICLR 2023).

Warm-up trains the hard-sharing model (every task shares every layer; one backbone pass a step).
The search stage trains it on while measuring, once every ``conflict_every`` steps and in every policy
layer, the cosine similarity of each pair of tasks' gradients on the layer's shared weights (a measured
step trains exactly like the others: its own backward is reused). Then, per layer:

* the *conflict score* of a task is ``conflict_threshold`` minus its best agreement with another
  task (the largest mean cosine); positive means it agrees with no one there;
* two tasks stay together unless their mean cosine is below the threshold significantly: by more
  than the critical value of a one-sided Student's t test at the false-conflict rate Φ(−z) of
  ``conflict_confidence`` z, in standard errors of the mean over the n measured steps (n − 1
  degrees of freedom: the standard error comes from the same cosines); the connected groups
  that remain branch apart, the largest group keeps the shared operator and the others get their
  own copies, initialised from the trained shared weights so that no training is thrown away;
* layers are taken in order of conflict while the compact model stays within the budget.

A task whose score is positive but that no significant conflict parts from every other task (its least
agreement may be significant while another pair's is noise) is *undecided* and shares. Fine-tune trains on.

Why 0 is the natural threshold: to first order in the learning rate η, giving task t its own copy of a
layer changes the summed task loss of one step by ``+2η <g_t, Σ_{j≠t} g_j>`` against the shared step
(t's copy follows ``g_t`` alone, the shared operator loses t's term), so a copy helps where t's gradient
opposes the others' and is neutral where they are orthogonal. What a copy gains beyond that is capacity,
a second-order effect these statistics do not see (``benchmarks/branch_oracle.py`` measures one case).

Measuring stops early once more measurements could not change the decision (*futility stopping*,
stochastic curtailment after Lan, Simon & Halperin, 1982): from the fourth measurement on, when
every pair of tasks in every layer either conflicts beyond doubt (below the threshold by t's critical
value at Φ(−z), Bonferroni-corrected for the planned looks) or has a
*conditional power* below ``conflict_futility`` — the probability, were the cosines to go on as
measured so far, that the pair would be found in conflict at the last planned measurement. The rest
of the search stage trains without measuring; under ``finetune_unit: compute`` the compute the
measurements would have cost goes to the fine-tune. Stopping for futility can only keep tasks
together, never branch them; the early stop on conflicts beyond doubt spends at most the false-conflict
rate of the final test, Φ(-z), over all its looks, so false conflicts stay below about 2 Φ(-z). With
``conflict_futility`` below 0.5 (the config enforces it) a pair significant at z is never futile, so
the decision at the stop is the one the check saw.
"""
from __future__ import annotations

import functools
import math
import warnings
from statistics import NormalDist

import torch

from ..policy import SHARE, SPECIALIZE, Policy
from ..protocol import measure_cost
from ._strategy import Strategy, register_strategy

#: Measurements before the futility check may stop: a standard deviation from fewer is too rough.
MIN_MEASUREMENTS = 4


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer ``df`` >= 1 of degrees of freedom, t >= 0: the finite
    series of Abramowitz & Stegun 26.7.3 in θ = atan(t / √df)."""
    theta = math.atan(t / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # (2/π)[θ + sin θ (cos θ + 2/3 cos³θ + ... + 2·4···(df−3)/(1·3···(df−2)) cos^(df−2) θ)]
        term, total = math.cos(theta), 0.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= 2 * j / (2 * j + 1) * cos2
        a = 2 / math.pi * (theta + sin * total)
    else:  # sin θ [1 + 1/2 cos²θ + ... + 1·3···(df−3)/(2·4···(df−2)) cos^(df−2) θ]
        term, total = 1.0, 0.0
        for j in range(df // 2):
            total += term
            term *= (2 * j + 1) / (2 * j + 2) * cos2
        a = sin * total
    return 0.5 + 0.5 * a


@functools.lru_cache(maxsize=1024)
def t_critical(tail: float, df: int) -> float:
    """The one-sided critical value of Student's t test: the t with P(T > t) = ``tail`` under ``df``
    degrees of freedom (``df`` >= 1; 0 < ``tail`` <= 0.5). It is what a mean must clear, in standard errors
    estimated from ``df + 1`` measurements, for a false-positive rate of ``tail``: 13.97 for
    ``tail`` = Φ(−2) at df 1, 2.32 at df 9, 2.03 at df 74, and Φ's 2.0 as df grows. By bisection on the
    series for df up to 400; above, the Cornish-Fisher expansion in 1/df. Relative error below 1e-5 for
    tails from 1e-9 (checked against scipy); smaller tails lose digits to ``1 - tail``, and a tail of 0
    (``conflict_confidence`` from about 8.4, where Φ(−z) underflows) gives infinity: no conflict."""
    if tail >= 0.5:
        return 0.0
    z = -NormalDist().inv_cdf(tail)
    if df > 400:
        return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
    target = 1.0 - tail
    lo, hi = 0.0, max(z, 1.0)
    while _t_cdf(hi, df) < target:
        lo, hi = hi, hi * 2
        if hi > 1e300:
            return math.inf
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < target:
            lo = mid
        else:
            hi = mid
    return hi


@register_strategy("conflict")
class Conflict(Strategy):
    def __init__(self, run):
        super().__init__(run)
        L, T = len(run.sm.layer_names), run.sm.num_tasks
        self.cos_sum = torch.zeros(L, T, T, dtype=torch.float64)
        self.cos_sq = torch.zeros(L, T, T, dtype=torch.float64)
        self.count = 0
        self.stopped = False  # the futility check ended the measurements

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
        cfg = self.run.config
        if cfg.search_steps // cfg.conflict_every < 2 and self.run.dist.main and self.run.sm.num_tasks > 1:
            warnings.warn(f"conflict measures the gradients {cfg.search_steps // cfg.conflict_every} time(s) in "
                          f"{cfg.search_steps} search steps (one every conflict_every={cfg.conflict_every}), too few "
                          "for any conflict to be significant, so every layer will share; raise search_steps or "
                          "lower conflict_every", stacklevel=2)

    # ---- one step: train hard sharing, measure the gradient cosines --------------------
    def search_step(self, i: int, g: int, iters: dict, log: bool) -> dict:
        run = self.run
        x, targets = run._batch(iters)
        run.sync_buffers()
        losses, values = run.forward_losses(self.net, x, targets, "search", i, g)
        total, weights = run.weighting(losses, shared_parameters=run.shared, step=g)
        measure = not self.stopped and (i + 1) % run.config.conflict_every == 0
        cos = None
        if measure:
            cos = self._measure(losses, total)
            run.dist.all_reduce_mean([cos])  # every rank keeps the same statistics
            self.cos_sum += cos.cpu()
            self.cos_sq += cos.cpu() ** 2
            self.count += 1
            self.stopped = self._settled()
        else:
            run.weight_step(total, run.weight_opt)
        rec = run.record("search", i, g, "weight", values, weights, total, run.weight_opt)
        if log:
            T = len(run.tasks)
            off = ~torch.eye(T, dtype=torch.bool)
            rec["mean_cosine"] = float(cos[:, off].mean()) if cos is not None and T > 1 else None
        return rec

    def _measure(self, losses: dict, total: torch.Tensor) -> torch.Tensor:
        """Take this step's optimizer step and return the cosines (L, T, T) of the per-task gradients
        on every policy layer's shared weights.

        With a loss-level balancer the step's own backward is reused: ``total`` reaches the weights
        only through the task losses, so its gradient is ``G = Σ_t c_t g_t`` with ``c_t = ∂total/∂L_t``;
        T-1 per-task backwards give all but one ``g_t``, and ``G`` the last. The step costs one forward
        and T backwards (a plain step: one and one). A torchjd aggregator needs its own Jacobian, so
        there every task's gradient is taken apart before the aggregated step, as under ``amp``.
        """
        run = self.run
        ws = [layer.shared.conv.weight for layer in run.sm.policy_layers]
        names = run.tasks
        coef = None
        # the derivation is exact in fp32; under bf16 autocast G's rounding would reach the derived gradient
        if not getattr(run.weighting, "jacobian", False) and len(names) > 1 and not run.config.amp:
            coef = torch.autograd.grad(total, [losses[t] for t in names], retain_graph=True, allow_unused=True)
            coef = [0.0 if c is None else float(c) for c in coef]
        if coef is None or max(abs(c) for c in coef) == 0.0:
            grads = [self._grads(losses[t], ws) for t in names]
            run.weight_step(total, run.weight_opt)
        else:
            last = max(range(len(names)), key=lambda k: abs(coef[k]))  # the task derived from G
            grads = [None if k == last else self._grads(losses[t], ws) for k, t in enumerate(names)]
            run.weight_opt.zero_grad(set_to_none=True)
            total.backward()
            G = [torch.zeros_like(w) if w.grad is None else w.grad.detach().clone() for w in ws]
            for k, gk in enumerate(grads):
                if gk is not None and coef[k] != 0.0:
                    for a, b in zip(G, gk):
                        a.sub_(b, alpha=coef[k])
            grads[last] = [a.div_(coef[last]) for a in G]
            run.weight_step(None, run.weight_opt)  # the rank average, clipping and the step
        return torch.stack([self._cosines([grads[t][l] for t in range(len(names))])
                            for l in range(len(ws))]).double()

    @staticmethod
    def _grads(loss: torch.Tensor, ws: list) -> list:
        grads = torch.autograd.grad(loss, ws, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(w) if gr is None else gr for gr, w in zip(grads, ws)]

    @staticmethod
    def _cosines(grads: list) -> torch.Tensor:
        """The (T, T) cosine similarities of T gradients of one weight (dot products, no (T, n) copy)."""
        flat = [gr.detach().reshape(-1) for gr in grads]
        T = len(flat)
        pairs = [(a, b) for a in range(T) for b in range(a, T)]
        values = torch.stack([torch.dot(flat[a], flat[b]) for a, b in pairs]).double().cpu()  # one device copy
        dots = torch.empty(T, T, dtype=torch.float64)
        for (a, b), v in zip(pairs, values):
            dots[a, b] = dots[b, a] = v
        norms = dots.diagonal().clamp_min(0.0).sqrt().clamp_min(1e-12)
        return dots / norms[:, None] / norms[None, :]

    # ---- when to stop measuring -------------------------------------------------------
    def planned(self) -> int:
        """Measurements the search stage plans: one every ``conflict_every`` of its ``search_steps``."""
        cfg = self.run.config
        return cfg.search_steps // cfg.conflict_every

    def _settled(self) -> bool:
        """True when no further measurement is likely to change the decision (see the module docstring)."""
        cfg = self.run.config
        if cfg.conflict_futility <= 0 or self.count < MIN_MEASUREMENTS or self.count >= self.planned():
            return False
        return not bool(self.open_pairs().any())

    def open_pairs(self) -> torch.Tensor:
        """(L, pairs) mask, pairs in ``torch.triu_indices(T, T, 1)`` order: the task pairs that neither conflict
        beyond doubt nor are futile after the measurements so far.

        For a pair with mean cosine ``m`` and sample standard deviation ``s`` over ``n`` of ``K`` planned
        measurements, the conditional power under the current trend is
        ``Φ((K (thr - m) - t_K s √K) / (s √(K - n)))``: the chance that the mean of all K falls ``t_K``
        standard errors below the threshold ``thr``, ``t_K`` the final test's critical value
        (:meth:`critical_value` at K measurements). A pair below the threshold by Bonferroni's t over the
        K looks conflicts beyond doubt.
        """
        cfg = self.run.config
        K, n, T = self.planned(), self.count, self.run.sm.num_tasks
        thr = cfg.conflict_threshold
        mean, se = self.statistics()
        a, b = torch.triu_indices(T, T, 1)
        m, se = 0.5 * (mean[:, a, b] + mean[:, b, a]), se[:, a, b]  # (L, pairs)
        s = (se * math.sqrt(n)).clamp_min(1e-12)
        t_stop = self.critical_value(n, looks=K)  # Bonferroni over the K looks
        conflicting = torch.where(se > 0, m + t_stop * se, m) < thr  # (inf x 0 would be nan)
        t_end = self.critical_value(K)  # the final test's, at the K-th measurement
        power = torch.special.ndtr((K * (thr - m) - t_end * s * math.sqrt(max(K, 1))) / (s * math.sqrt(max(K - n, 1))))
        return ~(conflicting | (power < cfg.conflict_futility))

    def unspent_compute(self) -> float:
        """FBE of the planned measurements the futility stop skipped (each would have cost
        ``protocol.measure_cost(T)`` more than the plain step that replaced it)."""
        if not self.stopped:
            return 0.0
        return (self.planned() - self.count) * measure_cost(self.run.sm.num_tasks)

    # ---- the decision ----------------------------------------------------------------
    def critical_value(self, n: int | None = None, looks: int = 1) -> float:
        """Standard errors a mean cosine must fall below the threshold by to count as a conflict after
        ``n`` measurements (default: those taken): Student's t at the false-conflict rate Φ(−z) of
        ``conflict_confidence`` z (divided by ``looks``, Bonferroni's correction for that many tests), with
        n − 1 degrees of freedom, since the standard error is estimated from the same n cosines (z itself
        would let through 15 % false conflicts at n = 2 and 7 % at n = 4, not 2.3 %). Infinite below two
        measurements: no conflict without a spread."""
        n = self.count if n is None else n
        tail = NormalDist().cdf(-self.run.config.conflict_confidence) / max(looks, 1)
        return t_critical(tail, n - 1) if tail > 0 and n > 1 else math.inf

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
        crit = self.critical_value()
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
                scores[l][t] = round(thr - float(mean[l, t, ally]), 4)
            groups = self._groups(mean[l], se[l], thr, crit)
            keep = max(groups, key=lambda grp: (len(grp), -min(grp)))
            if len(groups) > 1:
                branch = sorted(t for grp in groups if grp is not keep for t in grp)
                candidates.append((max(scores[l][t] for t in branch), l, branch))
            # agrees with no one, yet no significant conflict parts it from every other task: it shares with them
            undecided.extend((l, t) for t in keep if len(keep) > 1 and scores[l][t] > 0)
        choices = [[SHARE] * T for _ in range(L)]
        over_budget = []
        for priority, l, branch in sorted(candidates, key=lambda c: (-c[0], c[1])):
            trial = [list(r) for r in choices]
            for t in branch:
                trial[l][t] = SPECIALIZE
            if self.fits(Policy(sm.layer_names, sm.task_names, trial)):
                choices = trial
            else:
                over_budget.extend((l, t) for t in branch)
        policy = Policy(sm.layer_names, sm.task_names, choices)
        self._inherit(policy)
        evidence = {"kind": "conflict", "threshold": thr, "confidence": z, "critical_value": round(crit, 4) if math.isfinite(crit) else None,
                    "steps": self.count,
                    "planned_steps": self.planned(), "stopped_early": self.stopped,
                    "scores": scores, "undecided": undecided, "over_budget": over_budget}
        return policy, evidence

    @staticmethod
    def _groups(mean: torch.Tensor, se: torch.Tensor, thr: float, crit: float) -> list:
        """Connected components of the tasks, linking every pair whose mean cosine is not below ``thr``
        by more than ``crit`` standard errors (not significantly in conflict)."""
        T = mean.shape[0]
        parent = list(range(T))

        def root(a):
            while parent[a] != a:
                a = parent[a]
            return a

        for a in range(T):
            for b in range(a + 1, T):
                m = 0.5 * float(mean[a, b] + mean[b, a])
                if not (m + crit * float(se[a, b]) < thr):
                    parent[root(b)] = root(a)
        groups: dict = {}
        for t in range(T):
            groups.setdefault(root(t), []).append(t)
        return list(groups.values())

    def _inherit(self, policy: Policy) -> None:
        """Each new task-owned copy starts from the trained shared operator (weights and statistics); so does every
        copy the policy leaves unused (none of them trained here), so that a policy edited by hand specializes
        from trained weights too (:meth:`stage_done` brings them up to the fine-tuned shared operator)."""
        self._copies_from_shared(self.run.sm.policy_layers, [[True] * len(row) for row in policy.choices])

    def stage_done(self, stage: str) -> None:
        """After the fine-tune, every copy the policy does not use holds the fine-tuned shared operator: a hand-edited
        policy that specializes a layer starts from what the delivered model computes (``automtl compact RUN_DIR
        --policy``, ``examples/edit_policy.py``); before, those copies held the backbone's initial weights."""
        if stage == "finetune" and self.run.policy is not None:
            unused = [[c != SPECIALIZE for c in row] for row in self.run.policy.choices]
            self._copies_from_shared(self.run.sm.policy_layers, unused)

    @staticmethod
    def _copies_from_shared(layers, which: list) -> None:
        """``layer.specialized[t]`` := ``layer.shared`` (state dict) wherever ``which[l][t]``."""
        with torch.no_grad():
            for layer, row in zip(layers, which):
                state = layer.shared.state_dict()
                for t, copy in enumerate(row):
                    if copy:
                        layer.specialized[t].load_state_dict(state)

    # ---- checkpoint ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"cos_sum": self.cos_sum.clone(), "cos_sq": self.cos_sq.clone(), "count": self.count,
                "stopped": self.stopped}

    def check_state(self, state: dict) -> None:
        """More measurements than planned or fewer than none (a negative count made the fitted fine-tune ~10^12
        steps), non-finite sums, a stop flag that is not one: no run reaches them."""
        if not state:
            return
        count, planned = state["count"], self.planned()
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= planned:
            raise ValueError(f"its conflict measurements number {count!r}, not 0 to the {planned} planned")
        if not isinstance(state.get("stopped", False), bool):
            raise ValueError(f"its futility stop is {state['stopped']!r}, not True or False")
        if not (torch.isfinite(state["cos_sum"]).all() and torch.isfinite(state["cos_sq"]).all()):
            raise ValueError("its conflict sums are not finite")

    def load_state_dict(self, state: dict) -> None:
        self.check_state(state)
        if state:
            self.cos_sum = state["cos_sum"].clone()
            self.cos_sq = state["cos_sq"].clone()
            self.count = int(state["count"])
            self.stopped = bool(state.get("stopped", False))
