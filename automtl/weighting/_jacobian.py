"""Gradient-level balancers from torchjd (extra ``automtl[torchjd]``): an aggregator turns the
Jacobian of the task losses (one gradient per task) into the update, which can express gradient
surgery (PCGrad, MGDA, CAGrad, Nash-MTL, ...) that a weighted sum of losses cannot."""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, first_line
from ._base import LossWeighting, check_number_option, register_weighting

__all__ = ["STATEFUL_BALANCERS", "TORCHJD_BALANCERS", "JacobianWeighting"]

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
#: The balancers whose aggregator keeps state between steps outside its parameters and buffers
#: (torchjd's ``Stateful``: GradVac's moving cosine targets, Nash-MTL's last weights and step count):
#: their state goes into the search's checkpoint through ``get_extra_state``.
STATEFUL_BALANCERS = ("nashmtl", "gradvac")


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
        signature = inspect.signature(getattr(aggregation, cls_name).__init__).parameters
        options = {name: check_number_option(self.balancer, name, value, defaults.get(name, signature[name].default))
                   if name in signature else value for name, value in options.items()}
        opts = {**defaults, **options}
        self._options = opts
        if cls_name == "NashMTL":
            opts.setdefault("n_tasks", len(self.task_names))
        try:
            self.aggregator = getattr(aggregation, cls_name)(**opts)
        except ImportError as exc:  # the solvers some aggregators need (quadprog, cvxpy, scipy)
            raise ConfigError(f"loss weighting {self.balancer!r} needs more of torchjd ({exc}); "
                              "pip install 'automtl[torchjd]'") from None
        except (TypeError, ValueError, AttributeError, RuntimeError) as exc:  # what torchjd raises on its options
            raise ConfigError(f"loss weighting {self.balancer!r} cannot use the option(s) given ({first_line(exc)}); "
                              "fix weighting_options") from None
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


class _StatefulJacobianWeighting(JacobianWeighting):
    """A balancer whose torchjd aggregator is ``Stateful``: its state between steps is the module's extra
    state, so ``state_dict`` and therefore the search's checkpoint hold it, and a resumed search ends
    bitwise equal to an uninterrupted one. The state is what the aggregator's ``Stateful`` modules hold
    (attributes and buffers: tensors, arrays, numbers) that differs from a freshly built aggregator with
    the same options; settings, equal in both, are not part of it. Objects that are not data (Nash-MTL's
    cvxpy problem) are rebuilt from the restored state.

    Raises (``load_state_dict``): RuntimeError for a state saved with other tasks, or by a torchjd whose
    aggregator no longer has an attribute the state names."""

    def _fresh(self):
        import torchjd.aggregation as aggregation

        return getattr(aggregation, TORCHJD_BALANCERS[self.balancer][0])(**self._options)

    def get_extra_state(self) -> dict:
        from torchjd import Stateful

        fresh = dict(self._fresh().named_modules())
        modules = {}
        for name, module in self.aggregator.named_modules():
            if not isinstance(module, Stateful):
                continue
            start = fresh[name]
            # buffers torchjd registers as None and fills later (GradVac's targets): restored with the attributes,
            # before load_state_dict reaches the submodule that holds them (it loads a parent's extra state first)
            now = {**{k: v for k, v in vars(module).items() if k not in _MODULE_ATTRIBUTES}, **module._buffers}
            before = {**vars(start), **start._buffers}
            changed = {k: _encode(v) for k, v in now.items() if not _same(v, before.get(k, _MISSING))}
            modules[name] = {k: v for k, v in changed.items() if v is not None}
        return {"tasks": list(self.task_names), "modules": modules}

    def set_extra_state(self, state: dict) -> None:
        if list(state.get("tasks", [])) != list(self.task_names):
            raise RuntimeError(f"the {self.balancer} state was saved for tasks {state.get('tasks')}, not {list(self.task_names)}")
        modules = dict(self.aggregator.named_modules())
        for name, attrs in state["modules"].items():
            module = modules.get(name)
            missing = [k for k in attrs if module is None or not (hasattr(module, k) or k in module._buffers)]
            if missing:
                raise RuntimeError(f"torchjd's {type(self.aggregator).__name__} has no state {name or 'aggregator'}."
                                   f"{missing[0]} (the checkpoint was written with another torchjd version)")
            for k, enc in attrs.items():
                if k in module._buffers:
                    module._buffers[k] = _decode(enc)
                else:
                    setattr(module, k, _decode(enc))
            if getattr(module, "step", 0) and hasattr(module, "_init_optim_problem") and not hasattr(module, "prob"):
                module._init_optim_problem()  # Nash-MTL builds its problem at step 0 and reuses it after


_MISSING = object()
_MODULE_ATTRIBUTES = frozenset(vars(nn.Module()))  # torch's own bookkeeping (parameters, hooks, ...)


def _same(a, b) -> bool:
    import numpy as np

    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a plain equality (solver objects) are not state we keep
        return True


def _encode(value):
    """A tagged, checkpoint-safe copy (tensors and plain values only) of an aggregator's attribute, or None
    for what is not data (modules, hooks, solver objects)."""
    import numpy as np

    if isinstance(value, Tensor):
        return ("tensor", value.detach().clone())
    if isinstance(value, (np.ndarray, np.generic)):  # np.float64 is a float: an array keeps its type
        return ("ndarray" if isinstance(value, np.ndarray) else "npscalar", torch.from_numpy(np.array(value)))
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    if isinstance(value, torch.dtype):
        return ("dtype", str(value).removeprefix("torch."))
    if isinstance(value, tuple):
        items = [_encode(v) for v in value]
        return None if any(i is None for i in items) else ("tuple", items)
    return None


def _decode(enc):
    kind, value = enc
    if kind == "tensor":
        return value.clone()
    if kind == "ndarray":
        return value.numpy().copy()
    if kind == "npscalar":
        return value.numpy()[()]
    if kind == "dtype":
        return getattr(torch, value)
    if kind == "tuple":
        return tuple(_decode(v) for v in value)
    return value


def _jacobian_class(name: str):
    base = _StatefulJacobianWeighting if name in STATEFUL_BALANCERS else JacobianWeighting
    return type(f"{TORCHJD_BALANCERS[name][0]}Weighting", (base,), {"balancer": name,
                "__doc__": f"torchjd's {TORCHJD_BALANCERS[name][0]}: {TORCHJD_BALANCERS[name][2]}."})




for _name in TORCHJD_BALANCERS:
    register_weighting(_name)(_jacobian_class(_name))
