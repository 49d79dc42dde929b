"""Gradient-level balancers from torchjd (extra ``automtl[torchjd]``): an aggregator turns the
Jacobian of the task losses (one gradient per task) into the update, which can express gradient
surgery (PCGrad, MGDA, CAGrad, Nash-MTL, ...) that a weighted sum of losses cannot."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..errors import ConfigError
from ._base import LossWeighting, register_weighting

__all__ = ["TORCHJD_BALANCERS", "JacobianWeighting"]

#: name -> (torchjd aggregator class, default options, paper)
TORCHJD_BALANCERS = {
    "upgrad": ("UPGrad", {}, "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, 2024"),
    "mgda": ("MGDA", {}, "Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018"),
    "pcgrad": ("PCGrad", {}, "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020"),
    "cagrad": ("CAGrad", {"c": 0.4}, "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021"),
    "nashmtl": ("NashMTL", {}, "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022"),
    "imtlg": ("IMTLG", {}, "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021"),
    "alignedmtl": ("AlignedMTL", {}, "Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023"),
    "dualproj": ("DualProj", {}, "Quinton & Rey, 2024 (the projection of GEM, Lopez-Paz & Ranzato, NeurIPS 2017)"),
    "graddrop": ("GradDrop", {}, "Chen et al., Just Pick a Sign: Gradient Sign Dropout, NeurIPS 2020"),
    "config": ("ConFIG", {}, "Liu et al., ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks, ICLR 2025"),
    "fairgrad": ("FairGrad", {"alpha": 1.0}, "Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024"),
    "gradvac": ("GradVac", {}, "Wang et al., Gradient Vaccine, ICLR 2021"),
}


class JacobianWeighting(LossWeighting):
    """A gradient-level balancer: torchjd's aggregator turns the Jacobian of the task losses (one
    gradient per task) into the update. ``forward`` returns the plain sum (what the log and a
    gumbel policy step read) and keeps the losses; the search then calls :meth:`backward` instead
    of ``total.backward()``. ``weights`` are the aggregator's task weights where it has them
    (filled in by :meth:`backward`). Options go to the torchjd aggregator (e.g. ``c`` of CAGrad)."""

    jacobian = True
    balancer = "upgrad"

    def __init__(self, task_names: Sequence[str], **options):
        super().__init__(task_names)
        try:
            import torchjd.aggregation as aggregation
        except ImportError:
            raise ConfigError(f"loss weighting {self.balancer!r} needs torchjd: pip install 'automtl[torchjd]'") from None
        cls_name, defaults, _ = TORCHJD_BALANCERS[self.balancer]
        opts = {**defaults, **options}
        if cls_name == "NashMTL":
            opts.setdefault("n_tasks", len(self.task_names))
        try:
            self.aggregator = getattr(aggregation, cls_name)(**opts)
        except ImportError as exc:  # the solvers some aggregators need (quadprog, cvxpy, scipy)
            raise ConfigError(f"loss weighting {self.balancer!r} needs more of torchjd ({exc}); "
                              "pip install 'automtl[torchjd]'") from None
        except TypeError as exc:
            raise ConfigError(f"loss weighting {self.balancer!r} does not take option(s) given ({exc})") from None
        self._losses: list = []
        self._weights: dict = {}

    def forward(self, losses, shared_parameters=None, step=None):
        stacked = self._stack(losses)
        self._step(step)
        self._losses = [losses[n].reshape(()) for n in self.task_names]
        self._weights = {n: None for n in self.task_names}
        return stacked.sum(), self._weights

    def backward(self, params: Sequence[Tensor]) -> None:
        """Set ``.grad`` of ``params`` to the aggregated Jacobian of the last losses; a parameter no loss
        reaches keeps ``grad = None``, as after ``total.backward()``."""
        from torchjd.autojac import backward, jac_to_grad

        params = [p for p in params if p.requires_grad]
        losses, self._losses = self._losses, []
        backward(losses, inputs=params)
        unused = [p for p in params if p.jac is None or not bool(p.jac.any())]
        weights = jac_to_grad(params, self.aggregator)
        for p in unused:
            p.grad = None
        if weights is not None:
            self._weights.update({n: float(w) for n, w in zip(self.task_names, weights.detach().reshape(-1).tolist())})


def _jacobian_class(name: str):
    return type(f"{TORCHJD_BALANCERS[name][0]}Weighting", (JacobianWeighting,), {"balancer": name,
                "__doc__": f"torchjd's {TORCHJD_BALANCERS[name][0]}: {TORCHJD_BALANCERS[name][2]}."})




for _name in TORCHJD_BALANCERS:
    register_weighting(_name)(_jacobian_class(_name))
