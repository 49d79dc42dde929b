"""Sampled paths: run one discrete choice per layer and task, computing what tasks share once.

A soft search step of the supermodel computes all three operators of every layer for every task
(AutoMTL's formulation): about 2T backbones of work for T tasks. A *sampled path* runs, per layer
and task, only the operator a Gumbel-max sample of the policy picked (single-path training, as in
GDAS, Dong & Yang, CVPR 2019), and computes each value once for all the tasks that agree on it:
task t's value at a node is identified by the node and by task t's values of its inputs, so tasks
whose sampled choices agree over a node's whole ancestor cone hold the same tensor and compute it
once. It is the compact model's rule (:mod:`automtl.compact`) applied at run time to a policy that
changes every step, with no graph to compile.

Policy steps use the straight-through Gumbel estimator (GDAS): the sampled operator's output of
task t is multiplied by a gate whose value is 1 and whose gradient reaches the sampled choice's
Gumbel-softmax weight. Gated values are per task (a task's policy gradient then comes from its own
loss only), so a policy step computes each task's path apart.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch
from torch import fx

from .heads import finish
from .policy import SHARE, SPECIALIZE
from .policy_layer import ConvUnit, batch_norm_per_group, module_per_group, repeat_tasks, taskwise_batch_norm, taskwise_norm
from .supergraph import is_mix


class PathRunner:
    """Executes a supermodel's graph for one discrete path per task (see the module docstring).

    Built once per graph (eval or train mode); :meth:`__call__` takes the path.
    """

    def __init__(self, sm, net: fx.GraphModule):
        self.sm = sm
        self.net = net
        self.layer_index = {name: i for i, name in enumerate(sm.layer_names)}
        self.nodes = list(net.graph.nodes)
        last_use: dict = {}
        for i, node in enumerate(self.nodes):
            for inp in node.all_input_nodes:
                last_use[inp] = i
        # the nodes whose values can be dropped after node i ran
        self.free_after: list = [[] for _ in self.nodes]
        for node, i in last_use.items():
            self.free_after[i].append(node)
        self.modules = dict(net.named_modules())

    def __call__(self, x, choices: Sequence[Sequence[int]], gates: Optional[torch.Tensor] = None,
                 ops_used: Optional[set] = None) -> list:
        """The feature map of every task, as a list of T tensors (tasks that share it: the same tensor).

        ``x``: one batch (B, C, H, W) for all tasks, or a list of T per-task batches.
        ``choices``: (layers, tasks) operator indices (SHARE / SPECIALIZE / SKIP), legal ones only.
        ``gates``: optional (layers, tasks) tensor of straight-through gates (value 1); when given, every
        task's path is computed apart and each operator output is multiplied by its gate.
        ``ops_used``: when a set, receives every operator module that ran (for the optimizer's bookkeeping).
        """
        T = self.sm.num_tasks
        env: dict = {}
        for i, node in enumerate(self.nodes):
            if node.op == "placeholder":
                if is_mix(node):
                    env[node] = [None] * T
                else:
                    env[node] = list(x) if isinstance(x, (list, tuple)) else [x] * T
            elif node.op == "output":
                (feat,) = node.args
                return list(env[feat])
            elif node.op == "call_module" and node.target in self.layer_index:
                env[node] = self._layer(node, env, choices[self.layer_index[node.target]],
                                        None if gates is None else gates[self.layer_index[node.target]], ops_used)
            elif self._passthrough(node):
                env[node] = env[node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else [None] * T
            else:
                env[node] = self._grouped(node, env, T)
            for dead in self.free_after[i]:
                env.pop(dead, None)
        raise AssertionError("the graph has no output node")

    @staticmethod
    def _passthrough(node: fx.Node) -> bool:
        """Nodes that only serve the folded batch: the mix rows and repeat_tasks (a value per group needs neither)."""
        if node.op == "call_function" and node.target is repeat_tasks:
            return True
        return (node.op == "call_function" and node.target is operator.getitem
                and isinstance(node.args[0], fx.Node) and is_mix(node.args[0]))

    def _grouped(self, node: fx.Node, env: dict, T: int) -> list:
        """Evaluate ``node`` once per group of tasks that agree on all of its inputs."""
        if node.op == "call_function" and node.target in (taskwise_norm, taskwise_batch_norm):
            return self._norm_per_group(node, env, T)
        inputs = node.all_input_nodes
        out: list = [None] * T
        done: dict = {}
        for t in range(T):
            key = tuple(id(env[i][t]) for i in inputs)
            if key not in done:
                args = fx.map_arg(node.args, lambda n: env[n][t])
                kwargs = fx.map_arg(node.kwargs, lambda n: env[n][t])
                done[key] = self._eval(node, args, kwargs)
            out[t] = done[key]
        return out

    def _norm_per_group(self, node: fx.Node, env: dict, T: int) -> list:
        """A norm over per-task rows: one batch per group of tasks that agree on its input, its running
        statistics moved once for all tasks (:func:`automtl.policy_layer.one_update`)."""
        groups: dict = {}
        for t in range(T):
            groups.setdefault(tuple(id(env[i][t]) for i in node.all_input_nodes), []).append(t)
        members = [tuple(m) for m in groups.values()]
        args = [fx.map_arg(node.args, lambda n: env[n][m[0]]) for m in members]
        if node.target is taskwise_norm:
            ys = module_per_group(args[0][0], [a[1] for a in args], members)
        else:
            kwargs = fx.map_arg({k: v for k, v in node.kwargs.items() if k != "num_tasks"}, lambda n: env[n][members[0][0]])
            ys = batch_norm_per_group([a[0] for a in args], members, *args[0][1:], **kwargs)
        out: list = [None] * T
        for m, y in zip(members, ys):
            for t in m:
                out[t] = y
        return out

    def _eval(self, node: fx.Node, args, kwargs):
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "get_attr":
            obj = self.net
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise AssertionError(f"unexpected node kind {node.op!r}")

    def _layer(self, node: fx.Node, env: dict, row: Sequence[int], gates: Optional[torch.Tensor],
               ops_used: Optional[set]) -> list:
        """A policy layer: each task's sampled operator, batched over the groups that run the same module."""
        layer = self.modules[node.target]
        xs = env[node.args[0]]
        T = len(row)
        apart = gates is not None
        # one call per distinct (operator module, input) pair; the pairs of one module run as one batch
        calls: dict = {}  # id(module) -> (module, {input key: input})
        tasks_of: dict = {}  # (id(module), input key) -> the tasks that run it
        key_of: list = []
        for t, c in enumerate(row):
            op = layer.shared if c == SHARE else layer.specialized[t] if c == SPECIALIZE else layer.skip
            if op is None:
                raise ValueError(f"layer {node.target!r}: task {t} chose skip, which is illegal there")
            k = (id(xs[t]), t) if apart else id(xs[t])
            calls.setdefault(id(op), (op, {}))[1].setdefault(k, xs[t])
            key_of.append((id(op), k))
            tasks_of.setdefault((id(op), k), []).append(t)
        results: dict = {}
        for op_id, (op, inputs) in calls.items():
            if ops_used is not None:
                ops_used.add(op)
            keys = list(inputs)
            if not isinstance(op, ConvUnit):  # identity skip: the input itself (the graph is out-of-place)
                ys = [op(inputs[k]) for k in keys]
            elif len(keys) == 1:
                ys = [op(inputs[keys[0]])]
            else:  # one conv on every input, a batch norm per input, its running statistics moved once for the tasks
                ys = op.forward_tasks(torch.cat([inputs[k] for k in keys]), len(keys),
                                      [tuple(tasks_of[(op_id, k)]) for k in keys]).chunk(len(keys))
            results.update({(op_id, k): y for k, y in zip(keys, ys)})
        out = [results[key_of[t]] for t in range(T)]
        if apart:
            out = [y * gates[t].to(y.dtype) for t, y in enumerate(out)]
        return out


def run_paths(sm, x, choices, gates: Optional[torch.Tensor] = None, ops_used: Optional[set] = None) -> dict:
    """``{task: output}`` of ``sm`` on one sampled path per task; see :class:`PathRunner`.

    ``x`` is an image batch (B, C, H, W) or a dict of per-task batches; ``choices`` a (layers, tasks)
    nested sequence of operator indices; ``gates`` optional straight-through gates (layers, tasks).
    """
    if isinstance(x, dict):
        xs = [x[name] for name in sm.task_names]
        size = xs[0].shape[-2:]
    else:
        xs, size = x, x.shape[-2:]
    feats = sm.path_runner()(xs, choices, gates, ops_used)
    return {t.name: finish(t, sm.heads[t.name](f), size) for t, f in zip(sm.tasks, feats)}


def deepest_parameters(sm, ops_used: set) -> list:
    """The parameters of the operators that ran in the deepest policy layer where any parametrised one ran
    (what GradNorm reads as "the last shared layer" on a sampled path); empty when none ran."""
    for layer in reversed(sm.policy_layers):
        params = [p for op in (layer.shared, layer.skip, *layer.specialized)
                  if op is not None and op in ops_used for p in op.parameters()]
        if params:
            return params
    return []
