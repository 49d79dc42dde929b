"""Loss-level balancers: each turns the task losses into one weighted sum (the weights may be
learnt, as in uncertainty weighting and GradNorm, or drawn, as in RLW)."""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..seeding import stable_seed
from ._base import LossWeighting, rank_mean, register_weighting

__all__ = ["EqualWeighting", "StaticWeighting", "UncertaintyWeighting", "DWA", "GradNorm", "RLW"]


@register_weighting("equal")
class EqualWeighting(LossWeighting):
    """Plain sum of the task losses: the baseline every balancer is compared with."""

    def forward(self, losses, shared_parameters=None, step=None):
        self._step(step)
        stacked = self._stack(losses)
        return self._out(stacked, torch.ones_like(stacked))


@register_weighting("static")
class StaticWeighting(LossWeighting):
    """Fixed, hand-chosen weights (``weights={task: w}``), e.g. from a grid search."""

    def __init__(self, task_names, weights: Optional[Mapping[str, float]] = None):
        super().__init__(task_names)
        if not isinstance(weights, Mapping):
            raise ConfigError("static weighting needs weights={task: weight} for every task")
        missing = [n for n in self.task_names if n not in weights]
        if missing:
            raise ConfigError(f"static weighting has no weight for task(s) {', '.join(missing)}; add them to weights=")
        extra = [n for n in weights if n not in self.task_names]
        if extra:
            raise ConfigError(
                f"static weighting got weights for unknown task(s) {', '.join(map(str, extra))}; "
                f"the tasks are {', '.join(self.task_names)}"
            )
        vals = []
        for n in self.task_names:
            try:
                v = float(weights[n])
            except (TypeError, ValueError):
                raise ConfigError(f"static weight of task {n!r} is {weights[n]!r}, not a number") from None
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"static weight of task {n!r} is {v}; use a finite, non-negative number")
            vals.append(v)
        self.register_buffer("weights", torch.tensor(vals, dtype=torch.float32))

    def forward(self, losses, shared_parameters=None, step=None):
        self._step(step)
        return self._out(self._stack(losses), self.weights)


@register_weighting("uncertainty")
class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018).

    Learns s_t = log σ_t² per task; total = Σ exp(-s_t) L_t + s_t. The s_t are parameters of
    this module: hand ``weighting.parameters()`` to the optimizer. Reported weights are exp(-s_t).
    """

    def __init__(self, task_names, init: float = 0.0):
        super().__init__(task_names)
        self.log_vars = nn.Parameter(torch.full((len(self.task_names),), float(init)))

    def forward(self, losses, shared_parameters=None, step=None):
        self._step(step)
        stacked = self._stack(losses)
        s = self.log_vars.to(device=stacked.device, dtype=stacked.dtype)
        w = torch.exp(-s)
        total = (w * stacked + s).sum()
        return total, {n: float(v) for n, v in zip(self.task_names, w.detach().cpu().tolist())}


@register_weighting("dwa")
class DWA(LossWeighting):
    """Dynamic Weight Average (Liu, Johns, Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019).

    w_t = T·exp(r_t / temperature) / Σ_i exp(r_i / temperature), r_t = L̄_t(k-1) / L̄_t(k-2),
    where L̄_t(k) is task t's mean loss over window k of ``window`` steps (the paper's window is
    one epoch: pass the number of steps per epoch). The first two windows use weight 1.
    Window averages are buffers, so a resumed run continues with the same weights.
    """

    def __init__(self, task_names, window: int = 100, temperature: float = 2.0):
        super().__init__(task_names)
        if int(window) < 1:
            raise ConfigError(f"dwa window must be a positive number of steps, got {window!r}")
        if float(temperature) <= 0:
            raise ConfigError(f"dwa temperature must be positive, got {temperature!r}")
        self.window = int(window)
        self.temperature = float(temperature)
        t = len(self.task_names)
        self.register_buffer("history", torch.zeros(2, t, dtype=torch.float64))  # [k-2, k-1]
        self.register_buffer("completed", torch.zeros((), dtype=torch.long))  # windows averaged
        self.register_buffer("current", torch.full((), -1, dtype=torch.long))  # window being summed
        self.register_buffer("acc", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("acc_n", torch.zeros((), dtype=torch.long))

    def _close_window(self) -> None:
        if int(self.acc_n) > 0:
            self.history[0] = self.history[1]
            self.history[1] = rank_mean(self.acc / self.acc_n)
            self.completed += 1
        self.acc.zero_()
        self.acc_n.zero_()

    def current_weights(self) -> Tensor:
        """The weights for the current window, from the two windows before it."""
        t = len(self.task_names)
        if int(self.completed) < 2:
            return torch.ones(t, dtype=torch.float64)
        r = self.history[1] / self.history[0].clamp_min(1e-12)
        return t * torch.softmax(r / self.temperature, dim=0)

    def forward(self, losses, shared_parameters=None, step=None):
        s = self._step(step)
        stacked = self._stack(losses)
        k = s // self.window
        if k != int(self.current):
            if int(self.current) >= 0:
                self._close_window()
            self.current.fill_(k)
        w = self.current_weights().to(stacked.device)
        self.acc += stacked.detach().to(self.acc.device, torch.float64)
        self.acc_n += 1
        return self._out(stacked, w)


@register_weighting("gradnorm")
class GradNorm(LossWeighting):
    """GradNorm (Chen, Badrinarayanan, Lee, Rabinovich, ICML 2018), alpha = 1.5 by default.

    Design: the task weights w_t are a parameter of this module that it trains *itself*, with
    its own Adam (``lr``; moments kept in buffers), inside ``forward``; the caller only passes the last shared layer's
    weight as ``shared_parameters``. Each training call

    1. returns total = Σ w_t L_t with the current weights *detached*, so the caller's
       backward never moves w (the paper trains w only through the GradNorm loss);
    2. computes G_t = ‖∇_W (w_t L_t)‖ = w_t ‖∇_W L_t‖ (``autograd.grad`` with
       ``retain_graph=True``; w_t is a scalar factor, so no double backward is needed for the
       gradient w.r.t. w), the inverse training rates r_t = L̃_t / mean(L̃) with
       L̃_t = L_t / L_t(0), and the GradNorm loss Σ_t |G_t - mean(G)·r_t^alpha| with the target
       held constant;
    3. takes one Adam step on w, clamps it positive and renormalises so Σ w_t = T.

    The weights reported are those used in ``total`` (before the update). Outside training
    (``eval()`` or ``torch.no_grad()``) it only weights the losses. ``grad_norms`` and
    ``gradnorm_loss`` hold the last step's values for logging. L_t(0) is each task's first
    non-zero loss, so a first batch without labels for a task does not divide by zero.
    """

    def __init__(self, task_names, alpha: float = 1.5, lr: float = 0.025):
        super().__init__(task_names)
        self.alpha = float(alpha)
        self.lr = float(lr)
        t = len(self.task_names)
        self.task_weights = nn.Parameter(torch.ones(t))
        self.register_buffer("initial_losses", torch.zeros(t))
        # Adam moments as buffers: they follow .to() and state_dict(), so a resume is exact
        self.register_buffer("adam_m", torch.zeros(t))
        self.register_buffer("adam_v", torch.zeros(t))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.long))
        self.grad_norms: dict[str, float] = {}
        self.gradnorm_loss: Optional[float] = None

    @torch.no_grad()
    def _adam_step(self, grad: Tensor, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        """One Adam step on the task weights (torch.optim.Adam's update, without its import cost)."""
        self.adam_steps += 1
        k = int(self.adam_steps)
        self.adam_m.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.adam_v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = self.adam_m / (1 - beta1**k)
        v_hat = self.adam_v / (1 - beta2**k)
        self.task_weights.sub_(self.lr * m_hat / (v_hat.sqrt() + eps))

    def forward(self, losses, shared_parameters=None, step=None):
        self._step(step)
        stacked = self._stack(losses)
        w_now = self.task_weights.detach().clone()
        total, weights = self._out(stacked, w_now)
        if not (self.training and torch.is_grad_enabled()):
            return total, weights
        params = [p for p in (shared_parameters or []) if isinstance(p, Tensor) and p.requires_grad]
        if not params:
            raise ConfigError(
                "gradnorm needs shared_parameters=[the last shared layer's weight] in training; "
                "pass it, or use another weighting"
            )
        dev = self.task_weights.device
        norms = []
        for i in range(len(self.task_names)):
            grads = torch.autograd.grad(stacked[i], params, retain_graph=True, allow_unused=True)
            sq = torch.zeros((), dtype=torch.float64, device=dev)
            for gr in grads:
                if gr is not None:
                    sq = sq + gr.detach().to(dev, torch.float64).pow(2).sum()
            norms.append(sq.sqrt())
        raw = rank_mean(torch.stack(norms).float())  # ‖∇_W L_t‖, no host sync
        L = rank_mean(stacked.detach().to(dev, torch.float32))
        with torch.no_grad():
            unset = (self.initial_losses == 0) & (L > 0)
            self.initial_losses[unset] = L[unset]
            ratio = torch.where(self.initial_losses > 0, L / self.initial_losses.clamp_min(1e-12), torch.ones_like(L))
            r = ratio / ratio.mean().clamp_min(1e-12)
        G = self.task_weights * raw
        target = (G.mean() * r.pow(self.alpha)).detach()
        gn_loss = (G - target).abs().sum()
        (grad,) = torch.autograd.grad(gn_loss, self.task_weights)  # .grad stays None for the caller
        self._adam_step(grad)
        with torch.no_grad():
            t = len(self.task_names)
            self.task_weights.clamp_(min=1e-4)
            self.task_weights.mul_(t / self.task_weights.sum())
        self.grad_norms = {n: float(v) for n, v in zip(self.task_names, G.detach().cpu().tolist())}
        self.gradnorm_loss = float(gn_loss.detach())
        return total, weights


@register_weighting("rlw")
class RLW(LossWeighting):
    """Random Loss Weighting (Lin et al., "Reasonable Effectiveness of Random Weighting",
    TMLR 2022 / arXiv 2111.10603, 2021).

    Each step draws z ~ N(0, I) and weights the losses by T·softmax(z). The paper's weights sum
    to 1; here they sum to T, the sum of ``equal``'s weights, so switching balancers keeps the
    loss scale (and the effective learning rate). The draw comes from a generator seeded by
    (``seed``, step): reproducible, the same on every DDP rank, and the same after a resume.
    """

    def __init__(self, task_names, seed: int = 0):
        super().__init__(task_names)
        self.seed = int(seed)

    def weights_at(self, step: int) -> Tensor:
        g = torch.Generator().manual_seed(stable_seed("rlw", self.seed, int(step)))
        z = torch.randn(len(self.task_names), generator=g)
        return len(self.task_names) * torch.softmax(z, dim=0)

    def forward(self, losses, shared_parameters=None, step=None):
        s = self._step(step)
        stacked = self._stack(losses)
        return self._out(stacked, self.weights_at(s).to(stacked.device))


