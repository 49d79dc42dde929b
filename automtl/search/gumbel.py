"""The ``gumbel`` strategy: AutoMTL's search (Zhang, Liu, Guan, NeurIPS 2022), repaired.

Warm-up trains the hard-sharing model, and every task's copy then starts from its trained weights
(with ``paths="soft"``: every operator under the uniform mix, as AutoMTL). The search alternates
``weight_steps_per_policy_step`` weight steps on the training part of the data with one policy
step on a held-out part (``holdout_fraction`` of a map-style training set, as AutoMTL and AdaShare
alternate over two splits), each forward a Gumbel-softmax sample of the policy at an annealed
temperature τ. With ``paths="sampled"`` (the default) every forward runs one Gumbel-max path per
task, what tasks share computed once (:mod:`automtl.paths`), and policy steps learn through the
straight-through gates of GDAS (Dong & Yang, CVPR 2019). With ``paths="soft"`` every forward mixes
all three operators of every layer (AutoMTL). The policy objective is the task losses, plus
``reg_weight`` times a depth-weighted
pull toward *share* averaged (not summed) over layers, so its strength does not grow with depth,
plus ``budget_weight`` times the hinge of the expected compact-model size over the budget. That term is
a penalty, not a bound: where the discrete policy still exceeds the budget, its choices that cost size
go back to share, weakest margin first, until it fits (``over_budget`` in the evidence).

Evidence: the margin of each choice, its probability minus the best other choice's (negative for a
``discretize="sample"`` draw that is not the most probable). Below ``min_margin`` the choice is
undecided and falls back to share.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..paths import deepest_parameters, run_paths
from ..policy import SHARE, SKIP, SPECIALIZE, Policy
from ._strategy import Strategy, register_strategy
from ._util import _seed


#: A choice whose probability is below this for every task that could take it is ruled out: the
#: weight optimizer's state of its operator is freed (sampled paths; it is then sampled under 1% of steps).
RULED_OUT = 0.01


@register_strategy("gumbel")
class Gumbel(Strategy):
    def held_out(self) -> float:
        return self.run.config.holdout_fraction

    def enter_search(self) -> None:
        self.run.sm.soft(self.run.config.tau_start)

    def is_policy_step(self, i: int) -> bool:
        r = self.run.config.weight_steps_per_policy_step
        return i % (r + 1) == r

    def tau(self, i: int) -> float:
        cfg = self.run.config
        done = i // (cfg.weight_steps_per_policy_step + 1)  # policy steps taken before step i
        return max(cfg.tau_min, cfg.tau_start * cfg.tau_decay ** (done // cfg.tau_every))

    def sharing_reg(self) -> torch.Tensor:
        """Mean over layers of (L-l)/L times the mean over tasks of -log p(share): depth-weighted, and the
        same strength for a 10-layer and a 50-layer backbone."""
        sm = self.run.sm
        L = len(sm.layer_names)
        depth = ((L - torch.arange(L, dtype=torch.float32)) / L).to(sm.policy_logits.device)
        logp = sm.masked_logits().log_softmax(-1)[..., SHARE]
        return (depth[:, None] * -logp).mean()

    def resource(self):
        """Hinge of the expected compact-model size over the budget, and the expectation."""
        run = self.run
        if run.budget is None:
            return None, None
        probs = run.sm.policy_probabilities()
        if run.config.budget_metric == "macs":
            expected, limit = run.sm.expected_mac_count(probs), run.budget_macs
        else:
            expected, limit = run.sm.expected_parameter_count(probs), run.budget_params
        return F.relu(expected / limit - 1.0), expected

    def enter_warmup(self):
        """Sampled paths: warm-up trains the hard-sharing model (one backbone pass a step); soft: every
        operator under the uniform mix (AutoMTL)."""
        if self.run.config.paths == "soft":
            return super().enter_warmup()
        sm = self.run.sm
        return self.run.hard_view(Policy.uniform(sm.layer_names, sm.task_names, "share"))

    def stage_done(self, stage: str) -> None:
        """After a hard-sharing warm-up, every task's copy starts from the trained shared operator, so
        that specializing throws no training away."""
        if stage != "warmup" or self.run.config.paths == "soft":
            return
        with torch.no_grad():
            for layer in self.run.sm.policy_layers:
                state = layer.shared.state_dict()
                for unit in layer.specialized:
                    unit.load_state_dict(state)

    def shared_parameters(self):
        """On a sampled path: the deepest layer's operators that ran (GradNorm's "last shared layer")."""
        used = getattr(self, "ops_used", None)
        return deepest_parameters(self.run.sm, used) if used else self.run.shared

    def search_step(self, i: int, g: int, iters: dict, log: bool) -> dict:
        run, sm, cfg = self.run, self.run.sm, self.run.config
        policy_step = self.is_policy_step(i)
        x, targets = run._batch(iters, "policy" if policy_step else "")
        gen = torch.Generator().manual_seed(_seed("automtl-gumbel", cfg.seed, g))
        sm.tau = tau = self.tau(i)
        mix, net, self.ops_used = None, None, None
        if cfg.paths == "soft" or policy_step:
            with torch.set_grad_enabled(policy_step):
                mix = sm.mixing_weights(gen)  # a Gumbel-softmax sample at temperature tau, (layers, tasks, 3)
        if cfg.paths == "sampled":
            self.ops_used = used = set()
            if policy_step:
                # straight-through (GDAS): value 1, gradient into the sampled choice's Gumbel-softmax weight;
                # independent noise per task, each task's path apart (its policy gradient from its own loss)
                choices = mix.detach().argmax(-1)
                soft = mix.gather(-1, choices.unsqueeze(-1)).squeeze(-1)
                gates = 1.0 - soft.detach() + soft
                net = lambda inp: run_paths(sm, inp, choices.tolist(), gates=gates, ops_used=used)  # noqa: E731
            else:
                path = sm.sample_path(gen)  # one noise per layer for all tasks: agreeing tasks compute once
                net = lambda inp: run_paths(sm, inp, path, ops_used=used)  # noqa: E731
        run.sync_buffers()
        losses, values = run.forward_losses(net, x, targets, "search", i, g, mix)
        total, weights = run.weighting(losses, shared_parameters=self.shared_parameters(), step=g)
        rec = run.record("search", i, g, "policy" if policy_step else "weight", values, weights, total, run.weight_opt)
        rec["tau"] = tau
        if policy_step:
            self._policy_update(total, rec, i, g)
        else:
            run.weight_step(total, run.weight_opt)
        if log:
            with torch.no_grad():
                rec.setdefault("expected_params", float(sm.expected_parameter_count()))
                if cfg.budget_metric == "macs":
                    rec.setdefault("expected_macs", float(sm.expected_mac_count()))
                probs = sm.policy_probabilities().detach().cpu().tolist()  # (layers, tasks, 3)
            # {task: {layer: [p_share, p_specialize, p_skip]}}: what `automtl plot` draws
            rec["policy_probs"] = {t: {layer: [round(p, 5) for p in probs[l][k]] for l, layer in enumerate(sm.layer_names)}
                                   for k, t in enumerate(run.tasks)}
        return rec

    def _policy_update(self, total, rec: dict, i: int, g: int) -> None:
        run, sm, cfg = self.run, self.run.sm, self.run.config
        reg = self.sharing_reg()
        objective = total + cfg.reg_weight * reg
        resource, expected = self.resource()
        if expected is not None:
            rec["expected_" + cfg.budget_metric] = float(expected.detach())
        if resource is not None:
            objective = objective + cfg.budget_weight * resource
            rec["resource"] = float(resource.detach())
        rec["reg"] = float(reg.detach())
        run._check_finite(objective.detach().reshape(1), ["search objective"], "search", i, g)
        (grad,) = torch.autograd.grad(objective, [sm.policy_logits])
        sm.policy_logits.grad = grad
        run.dist.all_reduce_mean([grad])
        run.policy_opt.step()
        run.policy_opt.zero_grad(set_to_none=True)
        rec["objective"] = float(objective.detach())
        if cfg.paths == "sampled":
            rec["optimizer_state_freed"] = self._free_ruled_out()

    def _free_ruled_out(self) -> int:
        """Drop the weight optimizer's state of operators the policy has ruled out (probability below
        ``RULED_OUT`` for every task that could pick them); returns the number of tensors freed. Should a
        sample pick one again, its state starts afresh, as for an operator trained for the first time."""
        run, sm = self.run, self.run.sm
        with torch.no_grad():
            probs = sm.policy_probabilities().detach().cpu()  # (layers, tasks, 3)
        state, freed = run.weight_opt.state, 0
        for layer, p in zip(sm.policy_layers, probs):
            out = [layer.specialized[t] for t in range(p.shape[0]) if p[t, SPECIALIZE] < RULED_OUT]
            if bool((p[:, SHARE] < RULED_OUT).all()):
                out.append(layer.shared)
            if layer.skip is not None and bool((p[:, SKIP] < RULED_OUT).all()):
                out.append(layer.skip)
            for op in out:
                for param in op.parameters():
                    freed += state.pop(param, None) is not None
        return freed

    def decide(self):
        """Argmax (or a seeded sample) of the policy. The evidence for a choice is its margin: its
        probability minus the best other choice's, negative where a sample picked a choice that is not
        the most probable. A choice whose margin is below ``min_margin`` is undecided and shares
        (``min_margin`` 0 keeps every choice, sampled ones included)."""
        sm, cfg = self.run.sm, self.run.config
        policy = sm.discretize(sample=cfg.discretize == "sample", seed=cfg.seed)
        with torch.no_grad():
            probs = sm.policy_probabilities().detach().cpu()  # (layers, tasks, 3)
        chosen = torch.tensor(policy.choices, dtype=torch.long).unsqueeze(-1)
        p_chosen = probs.gather(-1, chosen).squeeze(-1)
        best_other = probs.scatter(-1, chosen, float("-inf")).amax(dim=-1)
        margin = (p_chosen - best_other).tolist()
        choices = [list(row) for row in policy.choices]
        undecided = []
        for l, row in enumerate(choices):
            for t, c in enumerate(row):
                if cfg.min_margin > 0 and margin[l][t] < cfg.min_margin:
                    undecided.append((l, t))
                    row[t] = SHARE
        over_budget = self._within_budget(policy.layers, policy.tasks, choices, margin)
        evidence = {"kind": "margin", "threshold": cfg.min_margin,
                    "scores": [[round(m, 4) for m in row] for row in margin], "undecided": undecided,
                    "over_budget": over_budget}
        return Policy(policy.layers, policy.tasks, choices), evidence

    def _within_budget(self, layers, tasks, choices, margin) -> list:
        """The budget term is a penalty on the expected size, so the discrete policy can exceed the budget
        (3.8x at a 1.2x budget was seen). Its choices that cost size (a task's copy; a skip whose
        projection has weights) go back to share, weakest margin first (with the rest of its layer where one
        alone saves nothing: no task of the layer shares), until the model fits; all-share fits any budget
        from 1.0x. Returns the ``(layer, task)`` choices sent back (``choices`` is changed in
        place); warns where the model still does not fit."""
        current = Policy(layers, tasks, choices)
        if self.fits(current):
            return []
        size = self.size(current)
        back = []
        for _, l, t in sorted((margin[l][t], l, t) for l, row in enumerate(choices) for t, c in enumerate(row) if c != SHARE):
            if choices[l][t] == SHARE:  # sent back with its layer below
                continue
            # one choice back to share; where no other task of the layer shares, that brings the shared operator
            # back and saves nothing alone, so the layer's other choices go back with it
            for group in ([t], [k for k, c in enumerate(choices[l]) if c != SHARE]):
                was = [choices[l][k] for k in group]
                for k in group:
                    choices[l][k] = SHARE
                smaller = self.size(Policy(layers, tasks, choices))
                if smaller < size:
                    break
                for k, c in zip(group, was):
                    choices[l][k] = c
            else:  # sharing costs as much here (a skip without weights): keep the choices
                continue
            size = smaller
            back.extend((l, k) for k in group)
            if self.fits(Policy(layers, tasks, choices)):
                return back
        if self.run.dist.main:
            warnings.warn(f"gumbel's policy exceeds the budget of {self.run.budget:g}x ({self.run.config.budget_metric}) "
                          "even with every choice that costs size back to share; raise the budget", stacklevel=2)
        return back
