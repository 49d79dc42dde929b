"""Step 4 of the pipeline: compile a supermodel and a discrete policy into a compact model.

This is cross-task common-subexpression elimination on the fx graph. For every node, the
tasks fall into classes by the choices made in the node's whole ancestor cone; the node is
emitted once per class. Tasks that share a prefix share its computation at run time; a
specialized layer becomes one branch per task; a skipped layer becomes nothing (identity) or
its 1x1 projection; operators no task uses are left out, with their parameters.
"""
from __future__ import annotations

import copy
import operator
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .capture import copy_constants, count_parameters, placement
from .errors import AutomtlError, ConfigError
from .heads import finish
from .policy import CHOICES, SHARE, SKIP, SPECIALIZE, Policy
from .policy_layer import batch_norm_per_group, holds_running_stats, module_per_group
from .supermodel import (GraphsBuiltOnUse, PolicyLayer, SuperModel, check_image_batch, repeat_tasks, taskwise_batch_norm,
                         taskwise_norm)
from .supergraph import is_mix
from .tasks import Task

#: node.meta keys set on every emitted node, read by render and the file format.
META_TASKS = "automtl_tasks"      # tuple of task names this node computes for
META_LAYER = "automtl_layer"      # policy layer name, for nodes that come from a policy layer
META_CHOICE = "automtl_choice"    # "share", "specialize" or "skip" for those nodes
META_SOURCE = "automtl_source"    # name of the node in the backbone graph


class CompactModel(GraphsBuiltOnUse):
    """The compiled multi-task model: ``forward(x, tasks=None) -> {task: output}``.

    ``graph_module`` is a plain fx GraphModule of standard torch modules and functions, so
    it can be exported, saved as data and drawn. Asking for a subset of tasks runs only
    the part of the graph those tasks need. ``input_shape`` is the example input shape the
    model was built at (the default example for export and accounting), or None.

    ``graph_module`` computes what the backbone computes in eval mode; it is what evaluation,
    ``save`` and ``export`` use. When the backbone behaves differently in train mode (dropout,
    stochastic depth written in its forward), ``train_graph`` is that behaviour over the same
    modules, and ``forward`` runs it while the model is in train mode.
    """

    def __init__(self, graph_module: fx.GraphModule, tasks: Sequence[Task], policy: Optional[Policy],
                 input_shape: Optional[Sequence[int]] = None, train_graph: Optional[fx.Graph] = None):
        super().__init__()
        self.graph_module = graph_module
        self.train_graph = train_graph
        self._train_gm: Optional[fx.GraphModule] = None
        self.tasks = list(tasks)
        self.task_names = [t.name for t in self.tasks]
        self.policy = policy
        self.input_shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
        #: The dtype of the images it takes, where known (a model compiled from a supermodel); None: not checked.
        self.input_dtype: Optional[torch.dtype] = None
        self._subsets: dict = {}
        #: Called with each input before it runs (a model read from a file checks new shapes first).
        self.input_check: Optional[Callable[[torch.Tensor], None]] = None
        #: In train mode ``forward`` leaves out what the backbone's forward does only in training: a model read from a
        #: file that could not describe it (dropout's random masks written in the forward, stochastic depth).
        self.trains_otherwise = False
        #: Such a model's first train-mode forward warns that it trains without that (then this turns False).
        self.train_mode_left_out = False

    def forward(self, x: torch.Tensor, tasks: Optional[Sequence[str]] = None) -> dict:
        check_image_batch(x, self.input_shape, "the model")  # first: a loaded model's shape check would blame the size
        self._check_dtype(x)
        if self.input_check is not None:
            self.input_check(x)
            if self.training and self.train_mode_left_out:
                self.train_mode_left_out = False
                warnings.warn("this model was read from a file that could not describe all its backbone's forward "
                              "does in training (random masks such as stochastic depth's, a tensor only training "
                              "builds, a BatchNorm of momentum None), so it trains without that; fine-tune the compact "
                              "model itself (automtl compact RUN_DIR --finetune-steps N) for that", UserWarning,
                              stacklevel=2)
            if not self.training and torch.is_grad_enabled() and not x.requires_grad:
                # a model read from a file runs inference without autograd: the load-time bound on what is
                # alive at once holds only then (autograd would keep every node's saved inputs); an input that
                # asks for gradients (saliency, adversarial examples) gets them
                with torch.no_grad():
                    return self.forward(x, tasks)
            try:  # a model read from a file: an operation failing at run time is named in one sentence
                return self._run(x, tasks)
            except (AutomtlError, MemoryError, torch.OutOfMemoryError):
                raise  # out of memory is the input's size, not the file: callers halve their batch on it
            except Exception as exc:
                failure = getattr(self.input_check, "failure", None)
                if failure is None:
                    raise
                raise failure(x, exc) from exc
        return self._run(x, tasks)

    def _apply(self, fn, recurse=True):
        """``.to``/``.double``/``.half``: images that were of the weights' dtype stay so (``input_dtype`` follows)."""
        before = placement(self).get("dtype")
        out = super()._apply(fn, recurse)
        after = placement(self).get("dtype")
        if getattr(self, "input_dtype", None) is not None and self.input_dtype == before and after is not None:
            self.input_dtype = after
        return out

    def _check_dtype(self, x: torch.Tensor) -> None:
        """Images of the weights' floating dtype, or of the backbone's example input (a backbone that casts its input
        itself, as HuggingFace's vision models do); under autocast any floating dtype: float64 images into float32
        weights were torch's "Input type (double) and bias type (float) should be the same" from inside a layer, or,
        for a loaded model, a failure blamed on the file."""
        computes = placement(self).get("dtype")
        if computes is None or x.dtype in (computes, self.input_dtype) or (
                x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
            return
        name = str(self.input_dtype or computes).split(".")[-1]
        how = f"x.to(torch.{name}) / 255" if x.dtype == torch.uint8 else f"x.to(torch.{name})"
        model = ", or the model (model.to(x.dtype))" if x.is_floating_point() else ""
        raise AutomtlError(f"the model takes {name} images, got {str(x.dtype).split('.')[-1]}; convert them "
                           f"({how}){model}")

    def _run(self, x: torch.Tensor, tasks: Optional[Sequence[str]]) -> dict:
        whole = tasks is None or list(tasks) == self.task_names
        gm = self._graph_module_for(self.training) if whole else self._subset(tuple(tasks), self.training)
        # nn.Module's call, not fx's wrapper around it: the wrapper prints the generated code's traceback to
        # stderr before re-raising, ahead of the caller's one-sentence error; hooks still run
        return nn.Module.__call__(gm, x)

    def _graph_module_for(self, train: bool) -> fx.GraphModule:
        if not train or self.train_graph is None:
            return self.graph_module
        if self._train_gm is None:
            # Shares every module with graph_module; not a registered child, so state_dict has no copies.
            object.__setattr__(self, "_train_gm", fx.GraphModule(self.graph_module, self.train_graph, "CompactNet"))
        return self._train_gm

    def _subset(self, tasks: tuple, train: bool = False) -> fx.GraphModule:
        unknown = [t for t in tasks if t not in self.task_names]
        if unknown:
            raise AutomtlError(f"the model has no task {unknown[0]!r}; its tasks are {', '.join(self.task_names)}")
        train = train and self.train_graph is not None
        if (tasks, train) not in self._subsets:
            self._subsets[(tasks, train)] = subset_graph_module(self._graph_module_for(train), tasks)
        return self._subsets[(tasks, train)]

    def num_parameters(self) -> int:
        return count_parameters(self)

    def _forget_graphs(self) -> None:
        self._subsets.clear()
        object.__setattr__(self, "_train_gm", None)

    def __getstate__(self):
        state = dict(self.__dict__)  # input_check stays: a copy of a loaded model checks new input shapes too
        state["_subsets"] = {}
        state["_train_gm"] = None
        return state


def subset_graph_module(gm: fx.GraphModule, tasks: Sequence[str]) -> fx.GraphModule:
    """A GraphModule (sharing gm's modules) that computes only ``tasks``; the rest is dead code."""
    graph = fx.Graph()
    env: dict = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output({t: out[t] for t in tasks})
    sub = fx.GraphModule(gm, graph, gm.__class__.__name__)
    sub.graph.eliminate_dead_code()
    while _narrow_group_calls(sub.graph):  # each narrowing frees branches that may feed another call
        sub.graph.eliminate_dead_code()
    sub.recompile()
    return sub


def _narrow_group_calls(graph: fx.Graph) -> bool:
    """In a subset of the train graph, a module_per_group / batch_norm_per_group call keeps only the classes whose
    results are still read: the other tasks' branches are not run, and the statistics move for these tasks."""
    narrowed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (module_per_group, batch_norm_per_group):
            continue
        first = 1 if node.target is module_per_group else 0  # the inputs' position
        inputs, members = node.args[first], node.args[first + 1]
        used = sorted({u.args[1] for u in node.users})
        if len(used) == len(inputs):
            continue
        args = list(node.args)
        args[first], args[first + 1] = tuple(inputs[j] for j in used), tuple(members[j] for j in used)
        node.args = tuple(args)
        for user in list(node.users):
            user.args = (node, used.index(user.args[1]))
        narrowed = True
    return narrowed


def grouped_train_graph(gm: fx.GraphModule, task_names: Sequence[str],
                        graph: Optional[fx.Graph] = None) -> tuple[Optional[fx.Graph], bool]:
    """The train graph of a compact model known by its eval graph alone (one read from an ``.automtl`` file): where a
    norm with running statistics runs for several classes of tasks at one call site of the backbone (nodes calling
    the same module, or ``F.batch_norm`` on the same statistics in train mode, noted with the same
    ``automtl_source``), one :func:`module_per_group` or :func:`batch_norm_per_group` call, as :func:`compact` emits
    in its own train graph, so the statistics move once a step and not once per class (a loaded model's moved 2-6
    times a step: its evaluation after one training step differed by up to 0.18).

    Args:
        gm: the eval graph's module (its modules are looked up).
        task_names: the model's tasks, in order.
        graph: the train-mode graph to group, over ``gm``'s modules (a file's notes switched in:
            :func:`automtl.formats.trainmode.switch_to_train`); default ``gm.graph``. Left as it is.

    Returns:
        ``(grouped, exact)``: the grouped copy of ``graph``, its nodes in an order that runs (stable topological), or
        None where no call site runs for several classes (``graph`` computes the same as it is); ``exact`` is False
        where a site runs for several classes but cannot be grouped (a class calls it twice, as a norm subclass that
        normalises twice in one forward; calls that feed each other), so its statistics move once per call.
    """
    import heapq

    graph = copy.deepcopy(gm.graph if graph is None else graph)
    index = {t: i for i, t in enumerate(task_names)}
    sites: dict = {}
    for node in graph.nodes:
        source, tasks = node.meta.get(META_SOURCE), node.meta.get(META_TASKS)
        if source is None or not tasks or any(t not in index for t in tasks):
            continue
        if (node.op == "call_module" and len(node.args) == 1 and not node.kwargs
                and holds_running_stats(gm.get_submodule(node.target))):
            sites.setdefault((node.target, source), []).append(node)
        elif node.op == "call_function" and node.target is F.batch_norm:
            site = _batch_norm_site(node)
            if site is not None:
                sites.setdefault((site, source), []).append(node)
    grouped, exact = False, True
    for nodes in sites.values():
        members = tuple(tuple(index[t] for t in n.meta[META_TASKS]) for n in nodes)
        if len(nodes) < 2 or len({t for m in members for t in m}) != sum(map(len, members)):
            # one class, or classes that overlap (a class calls the site twice): left as they are
            exact = exact and len(set(members)) < 2
            continue
        with graph.inserting_before(nodes[0]):
            if nodes[0].op == "call_module":
                call = graph.call_function(module_per_group, (graph.get_attr(nodes[0].target),
                                                              tuple(n.args[0] for n in nodes), members))
            else:
                rest = {k: v for k, v in nodes[0].kwargs.items() if k != "input"}
                call = graph.call_function(batch_norm_per_group, (tuple(n.kwargs["input"] for n in nodes), members),
                                           rest)
        call.meta = {**nodes[0].meta, META_TASKS: tuple(sorted((t for n in nodes for t in n.meta[META_TASKS]),
                                                               key=index.get))}
        for j, node in enumerate(nodes):
            with graph.inserting_after(call):
                get = graph.call_function(operator.getitem, (call, j))
            get.meta = dict(node.meta)
            node.replace_all_uses_with(get)
            graph.erase_node(node)
        grouped = True
    if not grouped:
        return None, exact
    # a class's input may come after the first class's call: order the nodes again, each as early as it was
    position = {n: i for i, n in enumerate(graph.nodes)}
    waiting = {n: len(set(n.all_input_nodes)) for n in graph.nodes}
    ready = [(position[n], n.name, n) for n, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, node = heapq.heappop(ready)
        order.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (position[user], user.name, user))
    if len(order) != len(position):
        return None, False  # calls noted as one site that feed each other (one call would need its own result)
    for before, node in zip(order, order[1:]):
        before.append(node)
    graph.lint()
    return graph, exact


def per_class_train_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of a train graph with every :func:`module_per_group` / :func:`batch_norm_per_group` call split into one
    call per class, as the eval graph makes them: what the file writer compares with the eval graph (the statistics
    then move once per class; the grouping is made again at load, :func:`grouped_train_graph`)."""
    graph = copy.deepcopy(graph)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (module_per_group, batch_norm_per_group):
            continue
        for user in list(node.users):
            j = user.args[1]
            with graph.inserting_before(user):
                if node.target is module_per_group:
                    call = graph.call_module(node.args[0].target, (node.args[1][j],))
                else:
                    call = graph.call_function(F.batch_norm, (node.args[0][j], *node.args[2:]), dict(node.kwargs))
            call.meta = dict(user.meta)
            user.replace_all_uses_with(call)
            graph.erase_node(user)
        module = node.args[0]
        graph.erase_node(node)
        if isinstance(module, fx.Node) and module.op == "get_attr" and not module.users:
            graph.erase_node(module)
    return graph


def _batch_norm_site(node: fx.Node) -> Optional[tuple]:
    """What an ``F.batch_norm`` call in a train graph normalises with, where it moves running statistics (the
    statistics' and affine attributes, the constants): calls at one site that agree on it run as one group. None
    for a call that moves none, or whose arguments are not by keyword (as :func:`switch_to_train` leaves them)."""
    kwargs = node.kwargs
    if node.args or "input" not in kwargs or not kwargs.get("training") or (
            kwargs.get("running_mean") is None and kwargs.get("running_var") is None):
        return None
    site = []
    for key, value in sorted(kwargs.items()):
        if key == "input":
            continue
        if isinstance(value, fx.Node):
            if value.op != "get_attr":
                return None
            value = ("attribute", value.target)
        site.append((key, value))
    return tuple(site)


def compact(sm: SuperModel, policy: Optional[Policy] = None, copy_weights: bool = True) -> CompactModel:
    """Compile ``sm`` under ``policy`` (default: the supermodel's current hard policy).

    The compact model owns a copy of the weights it uses: training it leaves the supermodel as is.
    In eval mode its outputs equal ``sm.hard(policy)(x)`` to float tolerance.
    ``copy_weights=False`` gives a view instead: the graph calls the supermodel's own modules, so
    training it trains the supermodel (the search's fine-tune stage runs this way: what tasks
    share is computed once, not once per task). Its in-place activations are then made
    out-of-place in the supermodel too, which changes no result.

    Raises:
        ConfigError: ``sm`` is not a :class:`SuperModel` (a backbone: build one with automtl.supermodel first), or
            ``policy`` is not a :class:`Policy` or does not fit ``sm``'s layers and tasks.
        AutomtlError: no policy given and ``sm`` has no hard one.
    """
    if not isinstance(sm, SuperModel):
        raise ConfigError(f"compact() compiles an automtl SuperModel (automtl.supermodel(backbone, tasks, example_input)), "
                          f"got a {type(sm).__name__}")
    if policy is None:
        if sm.policy is None:
            raise AutomtlError("compact() needs a policy: pass one, or call supermodel.hard(policy) first")
        policy = sm.policy
    if not isinstance(policy, Policy):
        raise ConfigError(f"compact() needs an automtl Policy (Policy.uniform, Policy.load, a search's result.policy), "
                           f"got {type(policy).__name__}")
    policy.check(sm.layer_names, sm.task_names, sm.skip_legal)
    root = nn.Module()
    root.net = sm.net
    root.heads = sm.heads
    graph = _Compiler(sm, policy).compile(sm._net_for(False, train=False).graph)
    train_source = sm._net_for(False, train=True)
    compiler = _Compiler(sm, policy, train=True)
    train_graph = compiler.compile(train_source.graph)
    if train_source is sm.net and not compiler.grouped:
        train_graph = None  # the eval graph computes the same in train mode
    gm = fx.GraphModule(root, graph, "CompactNet")
    if train_graph is not None:  # what only the train graph reads (a constant, a module's generator)
        copy_constants(root, gm, train_graph)
    if copy_weights:
        gm = copy.deepcopy(gm)  # own the weights
    _make_out_of_place(gm)
    if train_graph is not None:
        _make_out_of_place(fx.GraphModule(gm, train_graph, "CompactNet"))
    for g in (gm.graph, train_graph):
        for node in (g.nodes if g is not None else ()):  # deepcopy keeps node.meta; make sure every node carries its tasks
            node.meta.setdefault(META_TASKS, tuple(sm.task_names))
    model = CompactModel(gm, sm.tasks, policy, input_shape=sm.input_shape, train_graph=train_graph)
    model.input_dtype = getattr(sm, "input_dtype", None)
    model.train(sm.training)
    return model


def _make_out_of_place(gm: fx.GraphModule) -> None:
    """Turn in-place operations into out-of-place ones.

    After compaction one tensor can feed several task classes (a skipped layer passes its input
    on), so an in-place ReLU in one branch would change what another branch reads.
    """
    for m in gm.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    for node in gm.graph.nodes:
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
        if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
            if hasattr(torch.Tensor, node.target[:-1]):
                node.target = node.target[:-1]
        if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
            node.target = _INPLACE_OPERATORS[node.target]
    gm.recompile()


_INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub,
    operator.imul: operator.mul, operator.itruediv: operator.truediv,
}


class _Compiler:
    """One compilation of a supermodel graph under a policy: each source node is emitted once per class of tasks.

    ``classes[old]`` is a list of (tuple of task indices, new node or constant) for every source
    node seen so far; :meth:`lookup` reads a task's value of a source node from it.

    ``train``: compile the train-mode graph. There a module with running statistics (a norm, or a unit
    holding one) that runs for several classes of tasks is called through :func:`module_per_group`, so
    its statistics move once per step for all tasks as in the supermodel (:func:`automtl.policy_layer.one_update`);
    the eval graph, which files keep, calls it once per class.
    """

    def __init__(self, sm: SuperModel, policy: Policy, train: bool = False):
        self.sm, self.policy, self.train = sm, policy, train
        self.grouped = 0  # module_per_group / batch_norm_per_group nodes emitted
        self.names = sm.task_names
        self.T = len(self.names)
        self.ALL = tuple(range(self.T))
        self.layer_index = {n: i for i, n in enumerate(sm.layer_names)}
        self.graph = fx.Graph()
        self.classes: dict = {}
        self.x_new: Optional[fx.Node] = None
        self.feature: Optional[fx.Node] = None

    def compile(self, src: fx.Graph) -> fx.Graph:
        for old in src.nodes:
            if old.op == "output":
                self.feature = old.args[0]
                continue
            self.classes[old] = self.emit_node(old)
        self.emit_heads()
        self.graph.lint()
        return self.graph

    def lookup(self, old: fx.Node, task: int):
        for members, new in self.classes[old]:
            if task in members:
                return new
        raise AssertionError(f"task {task} has no value for {old.name}")

    def tag(self, new: fx.Node, members: tuple, old: fx.Node, layer: Optional[str] = None, choice: Optional[str] = None):
        new.meta[META_TASKS] = tuple(self.names[t] for t in members)
        new.meta[META_SOURCE] = old.name
        if layer is not None:
            new.meta[META_LAYER] = layer
            new.meta[META_CHOICE] = choice
        if "tensor_meta" in old.meta:
            new.meta["tensor_meta"] = old.meta["tensor_meta"]
        return new

    def _class_name(self, base: str, members: tuple) -> str:
        return self.graph._graph_namespace.create_name(f"{base}__{'_'.join(self.names[t] for t in members)}", None)

    def emit_node(self, old: fx.Node) -> list:
        """The classes of one source node (other than the output), its new nodes emitted."""
        ALL = self.ALL
        if old.op == "placeholder":
            if is_mix(old):
                return [(ALL, None)]
            self.x_new = self.graph.placeholder(old.name)
            return [(ALL, self.tag(self.x_new, ALL, old))]
        inputs = [i for i in old.all_input_nodes]
        if old.op == "call_function" and old.target is operator.getitem and inputs and is_mix(inputs[0]):
            return [(ALL, None)]
        if old.op == "call_function" and old.target is repeat_tasks:
            return self.classes[old.args[0]]
        if old.op == "get_attr" and any(u.target is taskwise_norm for u in old.users):
            return [(ALL, None)]  # a module handed to taskwise_norm
        if old.op == "call_function" and old.target is taskwise_norm:
            return self._emit_taskwise_norm(old)
        if old.op == "call_module" and old.target in self.layer_index:
            return self.emit_layer(old, self.layer_index[old.target])
        return self._emit_generic(old, inputs)

    def _emit_taskwise_norm(self, old: fx.Node) -> list:
        """One batch per class of tasks in the compact model: the plain norm call (in the train graph, for
        several classes, one :func:`module_per_group` call)."""
        module_node, value = old.args[0], old.args[1]
        target = f"net.{module_node.target}"
        classes = self.classes[value]
        if self._group_calls(target, len(classes)):
            return self._emit_per_group(target, classes, old.name, old)
        out = []
        for members, new_in in classes:
            new = self.graph.call_module(target, (new_in,))
            if len(classes) > 1 or len(members) < self.T:
                new.name = self._class_name(old.name, members)
            else:
                new.name = self.graph._graph_namespace.create_name(old.name, None)
            out.append((members, self.tag(new, members, old)))
        return out

    def _group_calls(self, target: str, calls: int) -> bool:
        """Whether the module at ``target``, run for ``calls`` classes, goes through :func:`module_per_group`."""
        return self.train and calls > 1 and holds_running_stats(self.sm.get_submodule(target))

    def _emit_per_group(self, target: str, classes: list, name: str, old: fx.Node, layer: Optional[str] = None,
                        choice: Optional[str] = None) -> list:
        """One :func:`module_per_group` call of the module at ``target`` on every class's value, and a getitem per class."""
        graph = self.graph
        module = graph.get_attr(target)
        members = tuple(m for m, _ in classes)
        union = tuple(sorted(t for m in members for t in m))
        call = graph.call_function(module_per_group, (module, tuple(v for _, v in classes), members))
        call.name = graph._graph_namespace.create_name(f"{name}_groups", None)
        self.tag(module, union, old)
        return self._unpack(call, members, name, old, layer, choice)

    def _unpack(self, call: fx.Node, members: tuple, name: str, old: fx.Node, layer: Optional[str] = None,
                choice: Optional[str] = None) -> list:
        """The classes of a per-group call (``members[j]``: the tasks of its ``j``-th result): a getitem each."""
        self.tag(call, tuple(sorted(t for m in members for t in m)), old, layer, choice)
        self.grouped += 1
        out = []
        for j, m in enumerate(members):
            new = self.graph.call_function(operator.getitem, (call, j))
            new.name = self._class_name(name, m)
            out.append((m, self.tag(new, m, old, layer, choice)))
        return out

    def _emit_generic(self, old: fx.Node, inputs: list) -> list:
        """Any other node: tasks that agree on every input stay together."""
        groups: dict = {}
        for t in range(self.T):
            key = tuple(id(self.lookup(i, t)) for i in inputs)
            groups.setdefault(key, []).append(t)
        if old.op == "call_function" and old.target is taskwise_batch_norm and self.train and len(groups) > 1:
            return self._emit_batch_norm_per_group(old, [tuple(m) for m in groups.values()])
        out = []
        for members in groups.values():
            members = tuple(members)
            new = self.graph.node_copy(old, lambda n: self.lookup(n, members[0]))
            if new.op in ("call_module", "get_attr"):
                new.target = f"net.{old.target}"
            if new.target is taskwise_batch_norm:  # one batch per class of tasks here
                new.target = F.batch_norm
                new.kwargs = {k: v for k, v in new.kwargs.items() if k != "num_tasks"}
            if len(members) < self.T:
                new.name = self._class_name(old.name, members)
            out.append((members, self.tag(new, members, old)))
        return out

    def _emit_batch_norm_per_group(self, old: fx.Node, groups: list) -> list:
        """A hand-written ``F.batch_norm`` on several classes in the train graph: one :func:`batch_norm_per_group` call."""
        graph = self.graph
        inputs = tuple(self.lookup(old.args[0], m[0]) for m in groups)
        rest = fx.map_arg(old.args[1:], lambda n: self.lookup(n, groups[0][0]))
        kwargs = fx.map_arg({k: v for k, v in old.kwargs.items() if k != "num_tasks"},
                            lambda n: self.lookup(n, groups[0][0]))
        call = graph.call_function(batch_norm_per_group, (inputs, tuple(groups), *rest), kwargs)
        call.name = graph._graph_namespace.create_name(f"{old.name}_groups", None)
        return self._unpack(call, tuple(groups), old.name, old)

    def emit_layer(self, old: fx.Node, index: int) -> list:
        """Emit a policy layer once per (input class, choice) and once per specializing task."""
        graph, sm = self.graph, self.sm
        layer_name = sm.layer_names[index]
        row = self.policy.choices[index]
        layer: PolicyLayer = sm.net.get_submodule(old.target)
        grouped = {}  # choice -> its classes, where one module_per_group call runs them (train graph)
        for choice in (SHARE, SKIP):
            part = "shared" if choice == SHARE else "skip"
            classes = [(users, value) for users, value in ((tuple(t for t in members if row[t] == choice), value)
                                                           for members, value in self.classes[old.args[0]]) if users]
            if self._group_calls(f"net.{old.target}.{part}", len(classes)):
                grouped[choice] = classes
        out = []
        for members, value in self.classes[old.args[0]]:
            for choice in (SHARE, SKIP):
                users = tuple(t for t in members if row[t] == choice)
                if not users or choice in grouped:
                    continue
                if choice == SKIP and isinstance(layer.skip, nn.Identity):
                    out.append((users, value))  # identity: the input flows through, no node
                    continue
                part = "shared" if choice == SHARE else "skip"
                new = graph.call_module(f"net.{old.target}.{part}", (value,))
                suffix = "" if len(users) == len(sm.task_names) else "__" + "_".join(sm.task_names[t] for t in users)
                new.name = graph._graph_namespace.create_name(f"{old.name}_{part}{suffix}", None)
                out.append((users, self.tag(new, users, old, layer_name, CHOICES[choice])))
            for t in members:
                if row[t] == SPECIALIZE:
                    new = graph.call_module(f"net.{old.target}.specialized.{t}", (value,))
                    new.name = graph._graph_namespace.create_name(f"{old.name}__{sm.task_names[t]}", None)
                    out.append(((t,), self.tag(new, (t,), old, layer_name, "specialize")))
        for choice, classes in grouped.items():
            part = "shared" if choice == SHARE else "skip"
            out += self._emit_per_group(f"net.{old.target}.{part}", classes, f"{old.name}_{part}", old,
                                        layer_name, CHOICES[choice])
        out.sort(key=lambda mv: mv[0][0])
        return out

    def emit_heads(self) -> None:
        """Heads, and each task's finish (the dense kinds' upsampling to the input size); the output."""
        graph, feature = self.graph, self.feature
        size = graph.call_function(operator.getitem, (graph.call_method("size", (self.x_new,)), slice(2, 4)))
        outputs = {}
        for t, task in enumerate(self.sm.tasks):
            feat = self.lookup(feature, t)
            y = graph.call_module(f"heads.{task.name}", (feat,))
            y.name = graph._graph_namespace.create_name(f"head_{task.name}", None)
            self.tag(y, (t,), feature)
            outputs[task.name] = _emit_finish(graph, task, y, size, lambda n: self.tag(n, (t,), feature))
        graph.output(outputs)


def _emit_finish(graph: fx.Graph, task: Task, y: fx.Node, size: fx.Node, tag) -> fx.Node:
    """The task's finish (:func:`automtl.heads.finish`, one definition per kind) traced onto ``graph``.

    The kind's ``finish`` runs on fx proxies, so the compact graph computes what the supermodel
    does with the same torch calls; every node it adds is tagged with the task.
    """
    count = len(graph.nodes)
    tracer = fx.proxy.GraphAppendingTracer(graph)
    out = finish(task, fx.Proxy(y, tracer), fx.Proxy(size, tracer))
    out = out.node if isinstance(out, fx.Proxy) else out
    if not isinstance(out, fx.Node) or out.graph is not graph:
        raise AutomtlError(f"the finish of task {task.name!r} ({task.kind}) did not compute on its head's output; "
                           "a kind's finish must use torch functions and tensor methods only")
    for node in list(graph.nodes)[count:]:
        tag(node)
    return out
