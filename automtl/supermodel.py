"""Step 2 of the pipeline: the fx pass that turns a captured backbone into a multi-task supermodel.

Every Conv2d (with the BatchNorm right after it, when there is one) becomes a
:class:`PolicyLayer` that offers each task three operators: **share** the backbone's
operator, **specialize** (a task-owned copy, initialised from it) or **skip** (identity, or a
1x1 projection with the layer's stride where the shape changes; see :mod:`automtl.policy_layer`).

All tasks run in one pass: activations carry the task axis folded into the batch, task-major
(row ``t*B + b`` is sample ``b`` of task ``t``). Nodes that only depend on a shared input run
once at batch ``B``; a policy layer fed by such a node computes its shared and skip operators
once and broadcasts them.
"""
from __future__ import annotations

import operator
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from .capture import Capture, capture, count_parameters
from .errors import AutomtlError, ConfigError
from .flops import macs_of
from .heads import build_head, finish
from .paths import PathRunner
from .policy import SHARE, SKIP, SPECIALIZE, Policy
from .policy_layer import (  # noqa: F401  (re-exported: the pieces of a supermodel)
    FUSABLE_NORMS, ConvUnit, LayerInfo, PolicyLayer, _conv_macs, _skip_operator, repeat_tasks, taskwise_batch_norm,
    taskwise_norm, uses_batch_statistics,
)
from .tasks import Task, check_tasks

MODES = ("warmup", "soft", "hard")


def _fusable_bn(gm: fx.GraphModule, conv_node: fx.Node, uses: dict) -> Optional[fx.Node]:
    """The normalisation node (see FUSABLE_NORMS) that only this conv feeds, if any: it follows the conv's choice.

    Not when the conv module is called at several places (each call site may have its own norm),
    nor when the norm module is called elsewhere too.
    """
    if len(conv_node.users) != 1 or uses[conv_node.target] != 1:
        return None
    (user,) = conv_node.users
    if (user.op == "call_module" and isinstance(gm.get_submodule(user.target), FUSABLE_NORMS)
            and uses[user.target] == 1 and user.args[:1] == (conv_node,) and len(user.all_input_nodes) == 1
            and user.meta.get("tensor_meta") is not None
            and tuple(user.meta["tensor_meta"].shape) == tuple(conv_node.meta["tensor_meta"].shape)):
        return user
    return None


def _read_directly(graphs: Sequence[fx.Graph]) -> set:
    """Module paths whose tensors some node reads directly (a tied decoder reading ``self.enc.weight``)."""
    paths: set = set()
    for graph in graphs:
        for n in graph.nodes:
            if n.op == "get_attr":
                parts = n.target.split(".")
                paths.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return paths


class SuperModel(nn.Module):
    """The multi-task supermodel: the converted backbone, one head per task, and the policy logits.

    The policy logits (layers, tasks, 3) are a parameter group apart from the weights:
    see :meth:`weight_parameters` and :meth:`policy_parameters`.
    """

    def __init__(self, cap: Capture, tasks: Sequence[Task]):
        super().__init__()
        self.tasks = list(tasks)
        self.task_names = [t.name for t in self.tasks]
        T = len(self.tasks)
        gm = cap.graph_module
        self.input_shape = cap.input_shape
        self.feature_shape = cap.feature_shape
        self.feature_node = cap.feature_node
        graphs = [gm.graph] + ([cap.train_graph] if cap.train_graph is not None else [])

        uses: dict = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                uses[n.target] = uses.get(n.target, 0) + 1
        read_directly = _read_directly(graphs)
        self.layer_names: list[str] = []
        self.layer_info: list[LayerInfo] = []
        fused: dict = {}  # conv module path -> the norm module path fused with it
        for node in cap.conv_nodes:
            if node.target in self.layer_names or node.target in read_directly:
                continue  # a conv module called twice is one policy layer; one whose weight is read directly stays as is
            conv = gm.get_submodule(node.target)
            bn_node = _fusable_bn(gm, node, uses)
            if bn_node is not None and cap.train_graph is not None and not _fused_in(cap.train_graph, node.target, bn_node.target):
                bn_node = None
            bn = gm.get_submodule(bn_node.target) if bn_node is not None else None
            in_shape = tuple(node.args[0].meta["tensor_meta"].shape)
            out_shape = tuple(node.meta["tensor_meta"].shape)
            skip, skip_kind = _skip_operator(conv, in_shape, out_shape)
            unit = ConvUnit(conv, bn)
            gm.add_submodule(node.target, PolicyLayer(unit, T, skip))
            if bn_node is not None:
                fused[node.target] = bn_node.target
            self.layer_names.append(node.target)
            self.layer_info.append(LayerInfo(
                name=node.target, in_shape=in_shape, out_shape=out_shape,
                unit_params=count_parameters(unit), skip_params=count_parameters(skip) if skip is not None else 0,
                macs=_conv_macs(conv, out_shape),
                skip_macs=_conv_macs(skip.conv, out_shape) if skip_kind == "projection" else 0,
                skip_kind=skip_kind,
            ))
        for target in fused.values():
            gm.delete_submodule(target)
        self._captured_graphs = {False: gm.graph, True: cap.train_graph}
        self._fused = fused
        self.net = fx.GraphModule(gm, self._build_graph(shared_input=True, train=False, root=gm), "SuperNet")
        self._nets: dict = {}  # the other graphs over self.net's modules, built on first use
        self._runners: dict = {}  # train mode -> PathRunner (sampled paths), built on first use

        channels = self.feature_shape[1]
        self.heads = nn.ModuleDict({t.name: build_head(t, channels) for t in self.tasks})
        L = len(self.layer_names)
        self.policy_logits = nn.Parameter(torch.zeros(L, T, 3))
        legal = torch.ones(L, 3, dtype=torch.bool)
        legal[:, SKIP] = torch.tensor([info.skip_legal for info in self.layer_info], dtype=torch.bool)
        self.register_buffer("legal", legal, persistent=False)
        self.mode = "warmup"
        self.tau = 1.0
        self.policy: Optional[Policy] = None

    # ---- the fx pass ----------------------------------------------------------------
    def _build_graph(self, shared_input: bool, train: bool = False, root: Optional[nn.Module] = None) -> fx.Graph:
        """Copy the captured graph (of eval or train mode) and route each conv (+norm) through its policy layer.

        With ``shared_input`` the input is one batch for all tasks: nodes that depend only on it
        stay at batch B, and a ``repeat_tasks`` node is inserted where they meet per-task values
        (sizes read from the input are read again from its per-task form there). A BatchNorm that
        sees per-task rows normalises each task's rows apart (:func:`taskwise_norm`).
        """
        root = self.net if root is None else root
        old = self._captured_graphs[train] if train and self._captured_graphs[True] is not None else self._captured_graphs[False]
        graph = fx.Graph()
        env: dict = {}
        out_val = graph.graph_copy(old, env)
        graph.output(out_val)
        x = next(n for n in graph.nodes if n.op == "placeholder")
        with graph.inserting_after(x):
            mix = graph.placeholder("mix")
        layer_index = {name: i for i, name in enumerate(self.layer_names)}
        T = len(self.tasks)
        per_task: set = set()  # nodes whose value differs between tasks
        depends_on_input: set = {x}
        repeats: dict = {}
        copies: dict = {}

        def as_per_task(node, before):
            if node not in repeats:
                with graph.inserting_before(before):
                    repeats[node] = graph.call_function(repeat_tasks, (node, T))
            return repeats[node]

        def per_task_form(node, before):
            """``node`` computed from the per-task form of the input (for sizes read from it)."""
            if not isinstance(node, fx.Node) or node in per_task or node not in depends_on_input:
                return node
            if _is_batched(node):
                return as_per_task(node, before)
            if node not in copies:
                args = fx.map_arg(node.args, lambda a: per_task_form(a, before))
                kwargs = fx.map_arg(node.kwargs, lambda a: per_task_form(a, before))
                with graph.inserting_before(before):
                    copies[node] = graph.create_node(node.op, node.target, args, kwargs)
                copies[node].meta = dict(node.meta)
            return copies[node]

        erased: set = set()
        for node in list(graph.nodes):
            if node.op in ("placeholder", "output") or node in erased:
                continue
            inputs = node.all_input_nodes
            if any(i in depends_on_input for i in inputs):
                depends_on_input.add(node)
            if node.op == "call_module" and node.target in layer_index:
                (inp,) = node.args[:1]
                src_is_shared = shared_input and inp not in per_task
                with graph.inserting_before(node):
                    row = graph.call_function(operator.getitem, (mix, layer_index[node.target]))
                node.args = (inp, row)
                node.kwargs = {"shared_input": True} if src_is_shared else {}
                per_task.add(node)
                if node.target in self._fused:
                    (bn_node,) = node.users
                    bn_node.replace_all_uses_with(node)
                    graph.erase_node(bn_node)
                    erased.add(bn_node)
                continue
            if not shared_input:
                if node in depends_on_input:
                    per_task.add(node)
            elif any(i in per_task for i in inputs):
                per_task.add(node)
                for i in inputs:
                    if i not in per_task and i in depends_on_input:
                        node.replace_input_with(i, per_task_form(i, node))
            if node in per_task and node.op == "call_module" and isinstance(
                    root.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
                new = _taskwise(graph, node, T)
                per_task.add(new)
                if node in depends_on_input:
                    depends_on_input.add(new)
            elif node in per_task and node.op == "call_function" and node.target is F.batch_norm:
                node.target = taskwise_batch_norm
                node.kwargs = {**node.kwargs, "num_tasks": T}
        out = next(n for n in graph.nodes if n.op == "output")
        (feat,) = out.args
        if feat not in per_task:
            out.replace_input_with(feat, as_per_task(feat, out))
        graph.lint()
        return graph

    def _net_for(self, per_task_input: bool, train: Optional[bool] = None) -> fx.GraphModule:
        """The graph module for one batch (or per-task batches), in eval or train mode (default: the current mode)."""
        train = (self.training if train is None else train) and self._captured_graphs[True] is not None
        if not per_task_input and not train:
            return self.net
        key = (per_task_input, train)
        if key not in self._nets:
            # Shares every submodule with self.net; kept out of the module tree so state_dict has no copies.
            self._nets[key] = fx.GraphModule(self.net, self._build_graph(not per_task_input, train), "SuperNet")
        return self._nets[key]

    def path_runner(self) -> PathRunner:
        """The executor of sampled paths over the current mode's graph (see :mod:`automtl.paths`)."""
        train = self.training and self._captured_graphs[True] is not None
        if train not in self._runners:
            self._runners[train] = PathRunner(self, self._net_for(False, train))
        return self._runners[train]

    def sample_path(self, generator: Optional[torch.Generator] = None, uniform: bool = False) -> list:
        """A Gumbel-max sample of the policy (or, with ``uniform``, of the uniform policy over legal choices):
        (layers, tasks) operator indices, as nested lists.

        The tasks share one Gumbel noise vector per layer (a coupling): each task's choice is still an exact
        sample of its own policy, and tasks whose policies agree at a layer draw the same choice there, so
        that a sampled path computes their shared work once (:mod:`automtl.paths`).
        """
        with torch.no_grad():
            logits = self.masked_logits().detach()
            if uniform:
                logits = torch.zeros_like(logits).masked_fill(~self.legal.unsqueeze(1), float("-inf"))
            device = generator.device if generator is not None else logits.device
            L = logits.shape[0]
            u = torch.rand((L, 1, 3), generator=generator, device=device).to(logits.device)
            return (logits - torch.log(-torch.log(u.clamp_(1e-10, 1 - 1e-7)))).argmax(-1).tolist()

    # ---- policy layers and parameters -----------------------------------------------
    @property
    def policy_layers(self) -> list[PolicyLayer]:
        return [self.net.get_submodule(n) for n in self.layer_names]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def policy_parameters(self) -> list[nn.Parameter]:
        return [self.policy_logits]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p is not self.policy_logits]

    @property
    def skip_legal(self) -> list[bool]:
        return [info.skip_legal for info in self.layer_info]

    # ---- modes -------------------------------------------------------------------
    def warmup(self) -> "SuperModel":
        """Every task uses every legal operator with equal weight."""
        return self._set_mode("warmup")

    def soft(self, tau: float = 1.0) -> "SuperModel":
        """Each forward draws a Gumbel-softmax sample of the policy at temperature ``tau``."""
        if not tau > 0:
            raise ConfigError(f"the Gumbel-softmax temperature must be positive, got {tau}")
        self.tau = float(tau)
        return self._set_mode("soft")

    def hard(self, policy: Policy) -> "SuperModel":
        """Run a discrete policy: each task computes only its chosen operator."""
        if not isinstance(policy, Policy):
            raise ConfigError(f"hard() needs an automtl.Policy, got {type(policy).__name__}")
        policy.check(self.layer_names, self.task_names, self.skip_legal)
        self.policy = policy
        for layer, row in zip(self.policy_layers, policy.choices):
            layer.choices = tuple(row)
        self.mode = "hard"
        return self

    def _set_mode(self, mode: str) -> "SuperModel":
        self.mode = mode
        self.policy = None
        for layer in self.policy_layers:
            layer.choices = None
        return self

    def masked_logits(self) -> torch.Tensor:
        return self.policy_logits.masked_fill(~self.legal.unsqueeze(1), float("-inf"))

    def policy_probabilities(self) -> torch.Tensor:
        """Softmax of the policy logits over legal choices, shape (layers, tasks, 3)."""
        return self.masked_logits().softmax(-1)

    def mixing_weights(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The (layers, tasks, 3) operator weights of the current mode for one forward.

        ``generator`` makes the Gumbel noise reproducible (and identical across DDP ranks).
        """
        L, T = len(self.layer_names), self.num_tasks
        if self.mode == "warmup":
            w = self.legal.to(self.policy_logits.dtype)
            return (w / w.sum(-1, keepdim=True)).unsqueeze(1).expand(L, T, 3)
        if self.mode == "soft":
            logits = self.masked_logits()
            device = generator.device if generator is not None else logits.device
            u = torch.rand(logits.shape, generator=generator, device=device).to(logits.device)
            gumbel = -torch.log(-torch.log(u.clamp_(1e-10, 1 - 1e-7)))
            return ((logits + gumbel) / self.tau).softmax(-1)
        onehot = torch.zeros(L, T, 3, device=self.policy_logits.device)
        choices = torch.tensor(self.policy.choices, device=onehot.device)
        return onehot.scatter_(-1, choices.unsqueeze(-1), 1.0)

    def discretize(self, sample: bool = False, seed: int = 0) -> Policy:
        """The discrete policy: the argmax of the logits, or a seeded sample from their softmax."""
        with torch.no_grad():
            if sample:
                g = torch.Generator().manual_seed(seed)
                probs = self.policy_probabilities().detach().cpu().reshape(-1, 3)
                choices = torch.multinomial(probs, 1, generator=g).view(len(self.layer_names), self.num_tasks)
            else:
                choices = self.masked_logits().argmax(-1)
        return Policy(list(self.layer_names), list(self.task_names), choices.tolist())

    # ---- forward -----------------------------------------------------------------
    def forward(
        self,
        x: Union[torch.Tensor, Mapping[str, torch.Tensor]],
        mix: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict:
        """Run all tasks in one pass and return ``{task: output}``.

        ``x`` is one batch for all tasks, or a dict of per-task batches of equal size.
        ``mix`` overrides the mode's operator weights (shape (layers, tasks, 3)).
        """
        per_task_input = isinstance(x, Mapping)
        if per_task_input:
            x = self._fold_inputs(x)
        elif not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise AutomtlError(
                f"the supermodel takes an image batch (N, C, H, W) or a dict of them per task, got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        feats = self._features(x, per_task_input, mix, generator)
        size = x.shape[-2:]
        return {t.name: finish(t, self.heads[t.name](f), size) for t, f in zip(self.tasks, feats)}

    def features(self, x, mix: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> dict:
        """The backbone feature map of every task (no heads), as ``{task: (B, C, h, w)}``."""
        per_task_input = isinstance(x, Mapping)
        if per_task_input:
            x = self._fold_inputs(x)
        return dict(zip(self.task_names, self._features(x, per_task_input, mix, generator)))

    def _features(self, x, per_task_input, mix, generator) -> tuple:
        if mix is None:
            mix = self.mixing_weights(generator)
        return self._net_for(per_task_input)(x, mix).chunk(self.num_tasks)

    def _fold_inputs(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if set(inputs) != set(self.task_names):
            raise AutomtlError(
                f"per-task inputs are given for {sorted(inputs)} but the tasks are {self.task_names}; give one batch per task"
            )
        xs = [inputs[n] for n in self.task_names]
        if len({tuple(t.shape) for t in xs}) != 1:
            raise AutomtlError(
                "per-task input batches must all have the same shape to run in one pass; "
                "use the same batch size for every task's loader"
            )
        return torch.cat(xs)

    # ---- accounting --------------------------------------------------------------
    def base_parameters(self) -> int:
        """Parameters outside the policy layers and the logits: heads and unfused backbone layers."""
        layer_params = {id(p) for layer in self.policy_layers for p in layer.parameters()}
        return sum(p.numel() for p in self.weight_parameters() if id(p) not in layer_params)

    def policy_parameter_count(self, policy: Policy) -> int:
        """Parameters of the compact model that ``policy`` compiles to."""
        total = self.base_parameters()
        for info, row in zip(self.layer_info, policy.choices):
            total += info.unit_params * ((SHARE in row) + row.count(SPECIALIZE))
            total += info.skip_params * (SKIP in row)
        return total

    def expected_parameter_count(self, probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Differentiable expected parameter count of the compact model under ``probs``."""
        probs = self.policy_probabilities() if probs is None else probs
        unit = torch.tensor([i.unit_params for i in self.layer_info], dtype=probs.dtype, device=probs.device)
        skip = torch.tensor([i.skip_params for i in self.layer_info], dtype=probs.dtype, device=probs.device)
        p_share_used = 1 - (1 - probs[..., SHARE]).prod(-1)
        p_skip_used = 1 - (1 - probs[..., SKIP]).prod(-1)
        n_spec = probs[..., SPECIALIZE].sum(-1)
        return self.base_parameters() + (unit * (p_share_used + n_spec) + skip * p_skip_used).sum()

    def head_macs(self) -> int:
        """Multiply-accumulates per sample of all task heads, counted by torch's FlopCounterMode.

        Measured once on a feature-shaped dummy input (heads in eval mode, so their BatchNorm
        statistics do not move), so custom heads are counted too, every op of them.
        """
        cached = getattr(self, "_head_macs", None)
        if cached is not None:
            return cached
        p = next(self.heads.parameters(), None)
        feat = torch.zeros(1, *self.feature_shape[1:], device=p.device if p is not None else "cpu",
                           dtype=p.dtype if p is not None else torch.float32)
        total = 0
        for head in self.heads.values():
            was_training = head.training
            try:
                with torch.no_grad():
                    total += macs_of(lambda: head.eval()(feat))
            finally:
                head.train(was_training)
        object.__setattr__(self, "_head_macs", int(total))
        return int(total)

    def policy_mac_count(self, policy: Policy) -> int:
        """Estimated multiply-accumulates per sample of the compact model that ``policy`` compiles to.

        A layer's operator is counted once per distinct input, where a task's input is
        identified by its choices in all earlier policy layers (layers in execution order, so
        parallel branches are counted conservatively); a specialized operator always counts.
        """
        total = self.head_macs()
        sig = [0] * self.num_tasks  # id of each task's current value
        ids: dict = {}
        for info, row in zip(self.layer_info, policy.choices):
            computed: set = set()
            new_sig = []
            for t, c in enumerate(row):
                key = (sig[t], c, t if c == SPECIALIZE else -1)
                if key not in computed:
                    computed.add(key)
                    total += info.skip_macs if c == SKIP else info.macs
                new_sig.append(ids.setdefault(key, len(ids) + 1))
            sig = new_sig
        return int(total)

    def expected_mac_count(self, probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Differentiable estimate of :meth:`policy_mac_count` under the policy distribution.

        A task whose choices so far were all *share* reads the common trunk; an operator on
        the trunk is computed once for all the tasks that pick it there, one off the trunk once
        per task (an upper bound: tasks that branched off may still agree with each other).
        """
        probs = self.policy_probabilities() if probs is None else probs
        dtype, device = probs.dtype, probs.device
        macs = torch.tensor([i.macs for i in self.layer_info], dtype=dtype, device=device)
        skip_macs = torch.tensor([i.skip_macs for i in self.layer_info], dtype=dtype, device=device)
        p_share, p_spec, p_skip = probs[..., SHARE], probs[..., SPECIALIZE], probs[..., SKIP]
        # q[l, t]: probability that task t's input at layer l is the trunk (shared everything before l)
        ones = torch.ones_like(p_share[:1])
        q = torch.cat([ones, torch.cumprod(p_share, 0)[:-1]], 0)
        share = 1 - (1 - q * p_share).prod(-1) + ((1 - q) * p_share).sum(-1)
        skip = 1 - (1 - q * p_skip).prod(-1) + ((1 - q) * p_skip).sum(-1)
        return self.head_macs() + (macs * (share + p_spec.sum(-1)) + skip_macs * skip).sum()

    def backbone_parameters(self) -> int:
        """Parameters of the converted single-task backbone (no heads)."""
        head_params = sum(p.numel() for p in self.heads.parameters())
        return self.policy_parameter_count(Policy.uniform(self.layer_names, self.task_names, "share")) - head_params


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


def _fused_in(graph: fx.Graph, conv: str, norm: str) -> bool:
    """True when ``graph`` calls ``conv`` and ``norm`` once each, the norm right on the conv's output alone."""
    convs = [n for n in graph.nodes if n.op == "call_module" and n.target == conv]
    norms = [n for n in graph.nodes if n.op == "call_module" and n.target == norm]
    return (len(convs) == 1 and len(norms) == 1 and list(convs[0].users) == norms
            and norms[0].args[:1] == (convs[0],) and len(norms[0].all_input_nodes) == 1)


def _is_batched(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return hasattr(meta, "shape") and len(meta.shape) >= 1


def supermodel(
    backbone: Union[nn.Module, str],
    tasks: Iterable[Task],
    example_input: Optional[torch.Tensor] = None,
    feature_node: Optional[str] = None,
    leaf_modules: Sequence[type] = (),
    concrete_args: Optional[dict] = None,
) -> SuperModel:
    """Convert ``backbone`` (a module, or a builtin/import name) into a multi-task supermodel.

    ``example_input`` fixes the shapes used to decide where skip is legal (default: one
    3x64x64 image). The backbone is copied; the original is never changed.
    """
    tasks = check_tasks(tasks)
    if isinstance(backbone, str):
        from .backbones import build_backbone

        backbone = build_backbone(backbone)
    if example_input is None:
        example_input = torch.randn(1, 3, 64, 64)
    cap = capture(backbone, example_input, feature_node, leaf_modules, concrete_args)
    return SuperModel(cap, tasks)
