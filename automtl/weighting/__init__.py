"""Loss balancing: how the per-task losses become the one loss that is back-propagated.

Every balancer is a :class:`LossWeighting` with the same call::

    total, weights = weighting(losses, shared_parameters=[last_shared.weight], step=step)

``losses`` maps task name to a scalar loss; ``weights`` maps task name to the float weight
used in ``total`` (for logging). ``shared_parameters`` is only read by GradNorm; ``step`` is
the global training step (``None``: the balancer counts its own calls), which makes
step-driven balancers (DWA, RLW) resumable and identical on every DDP rank. Balancers that
read local statistics (DWA's window means, GradNorm's losses and gradient norms) average them
over ranks under ``torch.distributed``, so every rank uses the same weights.

Balancers with learnable state are ``nn.Module`` parameters or buffers, so they follow
``.to(device)`` and ``state_dict()``. Uncertainty weighting's log-variances are trained by the
caller's optimizer (pass ``weighting.parameters()`` to it); GradNorm trains its weights itself.

Two kinds live apart, under one registry (:data:`WEIGHTINGS`, the ``--weighting`` names):
loss-level balancers that weight the losses (:mod:`._loss`: equal, static, uncertainty, dwa,
gradnorm, rlw) and gradient-level ones from torchjd that aggregate the per-task gradients
(:mod:`._jacobian`). Each is registered where it is written, with :func:`register_weighting`.
"""
from ._base import WEIGHTINGS, LossWeighting, make_weighting, register_weighting
from ._loss import DWA, RLW, EqualWeighting, GradNorm, StaticWeighting, UncertaintyWeighting
from ._jacobian import STATEFUL_BALANCERS, TORCHJD_BALANCERS, JacobianWeighting

__all__ = [
    "LossWeighting",
    "EqualWeighting",
    "StaticWeighting",
    "UncertaintyWeighting",
    "DWA",
    "GradNorm",
    "RLW",
    "JacobianWeighting",
    "STATEFUL_BALANCERS",
    "TORCHJD_BALANCERS",
    "WEIGHTINGS",
    "make_weighting",
    "register_weighting",
]

