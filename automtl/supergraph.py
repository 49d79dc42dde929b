"""The fx rewrite inside step 2: a captured graph becomes the supermodel's graph, tasks folded into the batch.

:func:`build_supergraph` copies the captured graph and routes each converted conv (+norm) through
its policy layer, which reads its row of the ``mix`` input (layers, tasks, 3). With a shared input
the nodes that depend only on it stay at batch B, and a ``repeat_tasks`` node is inserted where
they meet per-task values; a BatchNorm that sees per-task rows normalises each task's rows apart.
"""
from __future__ import annotations

import operator
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import BackboneError
from .graphpasses import user_line
from .policy_layer import (FUSABLE_NORMS, batch_statistics_in_mode, repeat_tasks, taskwise_batch_norm, taskwise_norm,
                           tracks_running_stats)


def build_supergraph(captured: fx.Graph, root: nn.Module, layer_names: Sequence[str], fused: Mapping[str, str],
                     num_tasks: int, shared_input: bool) -> fx.Graph:
    """The supermodel's graph over ``root``'s modules (see the module docstring).

    ``layer_names`` are the policy layers' module paths (their order is the row of ``mix``), and
    ``fused`` maps a policy layer to the norm module that was folded into it (its call is removed).
    """
    return _SuperGraph(captured, root, layer_names, fused, num_tasks, shared_input).build()


#: Node meta marking the supermodel graph's second input, the policy's mixing weights (layers x tasks x choices).
MIX = "automtl_mix"


def is_mix(node: fx.Node) -> bool:
    """The placeholder of the mixing weights (told by its meta: its name is the backbone's to clash with)."""
    return node.op == "placeholder" and bool(node.meta.get(MIX))


class _SuperGraph:
    """One rewrite: the copied graph, and which of its nodes are per task or depend on the input."""

    def __init__(self, captured: fx.Graph, root: nn.Module, layer_names: Sequence[str], fused: Mapping[str, str],
                 num_tasks: int, shared_input: bool):
        self.root, self.fused, self.T, self.shared_input = root, fused, num_tasks, shared_input
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        graph = self.graph = fx.Graph()
        env: dict = {}
        out_val = graph.graph_copy(captured, env)
        graph.output(out_val)
        x = next(n for n in graph.nodes if n.op == "placeholder")
        with graph.inserting_after(x):
            self.mix = graph.placeholder("mix")  # named mix_1 where the backbone has a "mix" of its own
        self.mix.meta[MIX] = True
        self.per_task: set = set()  # nodes whose value differs between tasks
        self.depends_on_input: set = {x}
        self.repeats: dict = {}
        self.copies: dict = {}
        self.erased: set = set()

    def build(self) -> fx.Graph:
        graph = self.graph
        for node in list(graph.nodes):
            if node.op in ("placeholder", "output") or node in self.erased:
                continue
            inputs = node.all_input_nodes
            if any(i in self.depends_on_input for i in inputs):
                self.depends_on_input.add(node)
            if node.op == "call_module" and node.target in self.layer_index:
                self._route_policy_layer(node)
                continue
            self._mark_per_task(node, inputs)
            self._normalise_taskwise(node)
        out = next(n for n in graph.nodes if n.op == "output")
        (feat,) = out.args
        if feat not in self.per_task:
            out.replace_input_with(feat, self._as_per_task(feat, out))
        graph.lint()
        return graph

    def _route_policy_layer(self, node: fx.Node) -> None:
        """Call the policy layer with its row of ``mix``; drop the call of the norm fused into it."""
        graph = self.graph
        (inp,) = node.args[:1]
        src_is_shared = self.shared_input and inp not in self.per_task
        with graph.inserting_before(node):
            row = graph.call_function(operator.getitem, (self.mix, self.layer_index[node.target]))
        node.args = (inp, row)
        node.kwargs = {"shared_input": True} if src_is_shared else {}
        self.per_task.add(node)
        if node.target in self.fused:
            (bn_node,) = node.users
            bn_node.replace_all_uses_with(node)
            graph.erase_node(bn_node)
            self.erased.add(bn_node)

    def _mark_per_task(self, node: fx.Node, inputs: list) -> None:
        """Mark ``node`` per task if it is; a shared input of a per-task node is read in its per-task form."""
        if not self.shared_input:
            if node in self.depends_on_input:
                self.per_task.add(node)
        elif any(i in self.per_task for i in inputs):
            self.per_task.add(node)
            for i in inputs:
                if i not in self.per_task and i in self.depends_on_input:
                    node.replace_input_with(i, self._per_task_form(i, node))

    def _normalise_taskwise(self, node: fx.Node) -> None:
        """A batch norm over per-task rows normalises each task's rows apart."""
        if node not in self.per_task:
            return
        if node.op == "call_module" and _per_task_norm(self.root.get_submodule(node.target)):
            if len(node.args) != 1 or node.kwargs:
                raise BackboneError(
                    f"the backbone calls {node.target!r}, a module it does not trace into that holds a norm with "
                    f"batch or running statistics, with more than one argument{user_line(node)}; automtl runs such a "
                    "module on each task's rows apart and can split one tensor only: mark a smaller module (the norm "
                    "itself) as the leaf")
            new = _taskwise(self.graph, node, self.T)
            self.per_task.add(new)
            if node in self.depends_on_input:
                self.depends_on_input.add(new)
        elif node.op == "call_function" and node.target is F.batch_norm:
            node.target = taskwise_batch_norm
            node.kwargs = {**node.kwargs, "num_tasks": self.T}
        elif node.op == "call_function" and node.target in _UNGROUPED_NORM_FUNCTIONS:
            at, flag = _UNGROUPED_NORM_FUNCTIONS[node.target]
            stats = node.kwargs.get("running_mean", node.args[at] if len(node.args) > at else None)
            moves = node.kwargs.get(flag, node.args[5] if len(node.args) > 5 else True)
            if isinstance(stats, fx.Node) and moves is not False:
                name = f"{node.target.__module__.replace('torch.nn.functional', 'F')}.{node.target.__name__}"
                raise BackboneError(
                    f"the backbone calls {name} with running statistics{user_line(node)} where tasks can have rows "
                    "of their own; automtl keeps running statistics per task only for norm modules and "
                    "F.batch_norm: use a norm module (e.g. nn.InstanceNorm2d(track_running_stats=True)) instead")

    def _as_per_task(self, node: fx.Node, before: fx.Node) -> fx.Node:
        if node not in self.repeats:
            with self.graph.inserting_before(before):
                self.repeats[node] = self.graph.call_function(repeat_tasks, (node, self.T))
        return self.repeats[node]

    def _per_task_form(self, node, before: fx.Node):
        """``node`` computed from the per-task form of the input (for sizes read from it)."""
        if not isinstance(node, fx.Node) or node in self.per_task or node not in self.depends_on_input:
            return node
        if _is_batched(node):
            return self._as_per_task(node, before)
        if node not in self.copies:
            args = fx.map_arg(node.args, lambda a: self._per_task_form(a, before))
            kwargs = fx.map_arg(node.kwargs, lambda a: self._per_task_form(a, before))
            with self.graph.inserting_before(before):
                self.copies[node] = self.graph.create_node(node.op, node.target, args, kwargs)
            self.copies[node].meta = dict(node.meta)
        return self.copies[node]


def _per_task_norm(module: nn.Module) -> bool:
    """A module that must see each task's rows apart: a BatchNorm (batch statistics), any norm with running
    statistics (one update for all tasks), a norm subclass whose own forward uses its batch's statistics in a mode
    (:func:`automtl.policy_layer.batch_statistics_in_mode`), or a module called as one (a leaf) that holds one."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) or tracks_running_stats(m)
               or isinstance(m, FUSABLE_NORMS) and (batch_statistics_in_mode(m, False) or batch_statistics_in_mode(m, True))
               for m in module.modules())


#: Functions that move running statistics they are handed: on rows of several tasks the compact model would call
#: them once per class of tasks, the supermodel once (F.batch_norm alone is rewritten to keep them per task).
#: Each maps to the position of ``running_mean`` and the name of the flag that makes them move (the sixth
#: argument of each; only F.instance_norm's defaults to moving them).
_UNGROUPED_NORM_FUNCTIONS = {F.instance_norm: (1, "use_input_stats"), torch.instance_norm: (3, "use_input_stats"),
                             torch.batch_norm: (3, "training")}


def _taskwise(graph: fx.Graph, node: fx.Node, num_tasks: int) -> fx.Node:
    """Replace the BatchNorm call ``node`` by ``taskwise_norm(module, x, T)``."""
    with graph.inserting_before(node):
        mod = graph.get_attr(node.target)
        new = graph.call_function(taskwise_norm, (mod, node.args[0], num_tasks))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    new.name = node.name
    return new


def _is_batched(node: fx.Node) -> bool:
    """A tensor whose first dimension carries the batch (not one made from the input's sizes only, such as a
    coordinate map: see :data:`automtl.capture.META_BATCHED`)."""
    meta = node.meta.get("tensor_meta")
    return hasattr(meta, "shape") and len(meta.shape) >= 1 and node.meta.get("automtl_batched", True)
