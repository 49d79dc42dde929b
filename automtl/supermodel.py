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

from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import fx, nn

from . import cost
from .capture import Capture, capture, copy_constants, count_parameters, placement
from .errors import AutomtlError, ConfigError, TooLargeError
from .foldcheck import check_tasks_apart
from .heads import build_head, finish
from .paths import PathRunner
from .policy import SKIP, Policy
from .policy_layer import (  # noqa: F401  (re-exported: the pieces of a supermodel)
    FUSABLE_NORMS, ConvUnit, LayerInfo, PolicyLayer, _conv_macs, _skip_operator, repeat_tasks, taskwise_batch_norm,
    batch_statistics_in_mode, taskwise_norm, uses_batch_statistics,
)
from .supergraph import build_supergraph
from .tasks import Task, check_tasks

MODES = ("warmup", "soft", "hard")


def _fusable_bn(gm: fx.GraphModule, conv_node: fx.Node, uses: dict, read: set = frozenset()) -> Optional[fx.Node]:
    """The normalisation node (see FUSABLE_NORMS) that only this conv feeds, if any: it follows the conv's choice.

    Not when the conv module is called at several places (each call site may have its own norm),
    nor when the norm module is called elsewhere too, nor when the forward reads its tensors itself
    (``read``: NAM attention weighs channels by ``bn.weight``).
    """
    if len(conv_node.users) != 1 or uses[conv_node.target] != 1:
        return None
    (user,) = conv_node.users
    if (user.op == "call_module" and isinstance(gm.get_submodule(user.target), FUSABLE_NORMS)
            and user.target not in read
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


def _not_one_input(graphs: Sequence[fx.Graph]) -> set:
    """Module paths called somewhere with anything but one positional argument (a conv subclass taking a scale, a
    conv called as ``conv(input=x)``): a policy layer calls its operators on one input, so they stay as they are."""
    return {n.target for graph in graphs for n in graph.nodes
            if n.op == "call_module" and (len(n.args) != 1 or n.kwargs)}


def _off_the_input(graphs: Sequence[fx.Graph]) -> set:
    """Module paths called somewhere on a value that does not depend on the image input (a conv on a learned
    positional map): the same for every sample, so there is no per-task batch for a policy layer to run on."""
    paths: set = set()
    for graph in graphs:
        depends: set = set()
        for n in graph.nodes:
            if n.op == "placeholder" or any(i in depends for i in n.all_input_nodes):
                depends.add(n)
            elif n.op == "call_module":
                paths.add(n.target)
    return paths


class GraphsBuiltOnUse(nn.Module):
    """A module that builds some of its graph modules on first use (train mode, per-task inputs, task subsets).

    Such a graph holds the tensors it reads directly (a hand-written norm's running statistics) by reference, and
    ``.to()``/``.double()`` or ``load_state_dict(assign=True)`` put new tensors in the module: it then drops
    those graphs (:meth:`_forget_graphs`), to be built again over the new tensors when next used.
    """

    def _forget_graphs(self) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        before = [id(t) for t in self.buffers()]
        out = super()._apply(fn, recurse)
        if [id(t) for t in self.buffers()] != before:  # a .to() that changed nothing keeps them
            self._forget_graphs()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self._forget_graphs()
        super()._load_from_state_dict(*args, **kwargs)



def _check_custom_head(task: Task, head: nn.Module, feature_shape: tuple, place: dict) -> None:
    """Run a task's own head once on zeros of the features' shape (eval mode, no gradients, its mode put back):
    a head built for other features is refused here in one sentence, not at the first step (or, for a single task, in
    the search's cost count) as a traceback."""
    where = placement(head) or place
    x = torch.zeros((2, *feature_shape[1:]), **where)
    modes = {m: m.training for m in head.modules()}
    try:
        with torch.no_grad():
            head.eval()(x)
    except Exception as exc:
        raise ConfigError(f"the head of task {task.name!r} fails on the backbone's features, of shape "
                          f"(N, {', '.join(map(str, feature_shape[1:]))}) ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}); build it for "
                          f"{feature_shape[1]} input channels, or cut the features elsewhere with feature_node=") from None
    finally:
        for m, training in modes.items():
            m.training = training


def check_image_batch(x, input_shape: Optional[Sequence[int]], what: str, other: str = "") -> None:
    """Raise :class:`AutomtlError` unless ``x`` is an (N, C, H, W) tensor with the channels of ``input_shape`` (the
    example input the backbone was converted with)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise AutomtlError(f"{what} takes an image batch (N, C, H, W){' ' + other if other else ''}, got "
                           f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if input_shape is not None and x.shape[1] != input_shape[1]:
        raise AutomtlError(f"{what} takes images of {input_shape[1]} channel(s), as its example input "
                           f"{tuple(input_shape)} had, got {x.shape[1]} (input shape {tuple(x.shape)})")


class SuperModel(GraphsBuiltOnUse):
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
        #: The dtype of the images the backbone takes (its example input's).
        self.input_dtype: torch.dtype = cap.input_dtype
        self.feature_shape = cap.feature_shape
        self.feature_node = cap.feature_node
        graphs = [gm.graph] + ([cap.train_graph] if cap.train_graph is not None else [])
        # what the supermodel adds (skip projections, builtin heads, policy logits) is made where the backbone lives
        place = placement(gm)
        for m in gm.modules():  # probed now, before the task copies are made (they keep the answers), not in a forward
            if isinstance(m, FUSABLE_NORMS):
                batch_statistics_in_mode(m, False), batch_statistics_in_mode(m, True)

        uses: dict = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                uses[n.target] = uses.get(n.target, 0) + 1
        read = _read_directly(graphs)  # module paths whose tensors the forward reads itself: never fused away
        plain = read | _off_the_input(graphs) | _not_one_input(graphs)  # convs that stay plain modules
        self.layer_names: list[str] = []
        self.layer_info: list[LayerInfo] = []
        fused: dict = {}  # conv module path -> the norm module path fused with it
        for node in cap.conv_nodes:
            if node.target in self.layer_names or node.target in plain:
                continue  # a conv module called twice is one policy layer; one whose weight is read directly, or
                # that runs on a value the input does not reach, stays as is
            conv = gm.get_submodule(node.target)
            bn_node = _fusable_bn(gm, node, uses, read)
            if bn_node is not None and cap.train_graph is not None and not _fused_in(cap.train_graph, node.target, bn_node.target):
                bn_node = None
            bn = gm.get_submodule(bn_node.target) if bn_node is not None else None
            in_shape = tuple(node.args[0].meta["tensor_meta"].shape)
            out_shape = tuple(node.meta["tensor_meta"].shape)
            skip, skip_kind = _skip_operator(conv, in_shape, out_shape)
            if skip is not None:
                skip.to(**place)
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
        if cap.train_graph is not None:  # the GraphModule took what the eval graph reads; train mode reads more
            copy_constants(gm, self.net, cap.train_graph)
        self._nets: dict = {}  # the other graphs over self.net's modules, built on first use
        self._runners: dict = {}  # train mode -> PathRunner (sampled paths), built on first use

        channels = self.feature_shape[1]
        self.heads = nn.ModuleDict({t.name: build_head(t, channels) if t.head is not None else build_head(t, channels).to(**place)
                                    for t in self.tasks})
        for t in self.tasks:
            if t.head is not None:
                _check_custom_head(t, self.heads[t.name], self.feature_shape, place)
        L = len(self.layer_names)
        self.policy_logits = nn.Parameter(torch.zeros(L, T, 3, **place))
        legal = torch.ones(L, 3, dtype=torch.bool, device=place.get("device"))
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
        sees per-task rows normalises each task's rows apart (:func:`taskwise_norm`). The rewrite
        is :func:`automtl.supergraph.build_supergraph`.
        """
        root = self.net if root is None else root
        old = self._captured_graphs[train] if train and self._captured_graphs[True] is not None else self._captured_graphs[False]
        return build_supergraph(old, root, self.layer_names, self._fused, len(self.tasks), shared_input)

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

    def _forget_graphs(self) -> None:
        self._nets.clear()
        self._runners.clear()

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
            noise = _gumbel_noise((logits.shape[0], 1, 3), generator, logits.device)
            return (logits + noise).argmax(-1).tolist()

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
            return ((logits + _gumbel_noise(logits.shape, generator, logits.device)) / self.tau).softmax(-1)
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
        x = self._input(x)
        feats = self._features(x, per_task_input, mix, generator)
        size = x.shape[-2:]
        return {t.name: finish(t, self.heads[t.name](f), size) for t, f in zip(self.tasks, feats)}

    def features(self, x, mix: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> dict:
        """The backbone feature map of every task (no heads), as ``{task: (B, C, h, w)}``."""
        per_task_input = isinstance(x, Mapping)
        x = self._input(x)
        return dict(zip(self.task_names, self._features(x, per_task_input, mix, generator)))

    def _features(self, x, per_task_input, mix, generator) -> tuple:
        if mix is None:
            mix = self.mixing_weights(generator)
        return self._net_for(per_task_input)(x, mix).chunk(self.num_tasks)

    def _input(self, x) -> torch.Tensor:
        """One batch for all tasks (checked), or per-task batches folded into one."""
        if isinstance(x, Mapping):
            return self._fold_inputs(x)
        check_image_batch(x, self.input_shape, "the supermodel", "or a dict of them per task")
        return x

    def _fold_inputs(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if set(inputs) != set(self.task_names):
            raise AutomtlError(
                f"per-task inputs are given for {sorted(inputs)} but the tasks are {self.task_names}; give one batch per task"
            )
        xs = [inputs[n] for n in self.task_names]
        for n, t in zip(self.task_names, xs):
            check_image_batch(t, self.input_shape, f"the supermodel's input for task {n!r}")
        if len({tuple(t.shape) for t in xs}) != 1:
            raise AutomtlError(
                "per-task input batches must all have the same shape to run in one pass; "
                "use the same batch size for every task's loader"
            )
        return torch.cat(xs)

    # ---- accounting (see :mod:`automtl.cost`) --------------------------------------
    def base_parameters(self) -> int:
        """Parameters outside the policy layers and the logits: heads and unfused backbone layers."""
        return cost.base_parameters(self)

    def policy_parameter_count(self, policy: Policy) -> int:
        """Parameters of the compact model that ``policy`` compiles to."""
        return cost.policy_parameter_count(self, policy)

    def expected_parameter_count(self, probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Differentiable expected parameter count of the compact model under ``probs``."""
        return cost.expected_parameter_count(self, probs)

    def head_macs(self) -> int:
        """Multiply-accumulates per sample of all task heads (measured once, see :func:`automtl.cost.head_macs`)."""
        return cost.head_macs(self)

    def policy_mac_count(self, policy: Policy) -> int:
        """Estimated multiply-accumulates per sample of the compact model that ``policy`` compiles to."""
        return cost.policy_mac_count(self, policy)

    def expected_mac_count(self, probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Differentiable estimate of :meth:`policy_mac_count` under the policy distribution."""
        return cost.expected_mac_count(self, probs)

    def backbone_parameters(self) -> int:
        """Parameters of the converted single-task backbone (no heads)."""
        return cost.backbone_parameters(self)


def least_elements(cap: Capture, tasks: Sequence[Task]) -> int:
    """A lower bound of the parameter and buffer elements of ``SuperModel(cap, tasks)``, without making it: each
    task's copy of every convolution that becomes a policy layer, and the heads' state (made on the meta device; a
    head that cannot be made there counts 0)."""
    graphs = [cap.graph_module.graph] + ([cap.train_graph] if cap.train_graph is not None else [])
    plain = _read_directly(graphs) | _off_the_input(graphs) | _not_one_input(graphs)
    layers = {n.target for n in cap.conv_nodes if n.target not in plain}
    least = len(tasks) * sum(count_parameters(cap.graph_module.get_submodule(name)) for name in layers)
    channels = cap.feature_shape[1]
    for task in tasks:
        try:
            with torch.device("meta"):
                head = build_head(task, channels)
            least += sum(t.numel() for t in head.state_dict().values() if isinstance(t, torch.Tensor))
        except Exception:  # noqa: BLE001 - a kind's head that reads values while it is made: counted as 0, still a bound
            pass
    return least


def _fused_in(graph: fx.Graph, conv: str, norm: str) -> bool:
    """True when ``graph`` calls ``conv`` and ``norm`` once each, the norm right on the conv's output alone."""
    convs = [n for n in graph.nodes if n.op == "call_module" and n.target == conv]
    norms = [n for n in graph.nodes if n.op == "call_module" and n.target == norm]
    return (len(convs) == 1 and len(norms) == 1 and list(convs[0].users) == norms
            and norms[0].args[:1] == (convs[0],) and len(norms[0].all_input_nodes) == 1)


def _gumbel_noise(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """Standard Gumbel noise of ``shape`` on ``device``, drawn from ``generator`` (on its own device)."""
    u = torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)
    return -torch.log(-torch.log(u.to(device).clamp_(1e-10, 1 - 1e-7)))


def supermodel(
    backbone: Union[nn.Module, str],
    tasks: Iterable[Task],
    example_input: Optional[torch.Tensor] = None,
    feature_node: Optional[str] = None,
    leaf_modules: Sequence[type] = (),
    concrete_args: Optional[dict] = None,
    *,
    max_elements: Optional[int] = None,
) -> SuperModel:
    """Convert ``backbone`` (a module, or a builtin/import name) into a multi-task supermodel.

    ``example_input`` fixes the shapes used to decide where skip is legal (default: one
    3x64x64 image in the dtype and on the device of the backbone's first floating-point parameter or
    buffer). The backbone is copied; the original is never changed. The supermodel is in the backbone's mode
    (train or eval), every module of it; :func:`automtl.search` trains it in train mode.

    ``max_elements``: refuse, after the capture and before the task copies and heads are made, a supermodel that
    would hold more parameter and buffer elements than this (counted from below: each task's copy of every policy
    layer's convolution and the heads, sized on the meta device). A run folder's weights file sets it: what its
    config describes must fit in what it holds (:func:`automtl.runs.load_run`).

    Raises:
        TooLargeError: (a ConfigError) the supermodel would hold more than ``max_elements`` elements.
    """
    tasks = check_tasks(tasks)
    if isinstance(backbone, str):
        from .backbones import build_backbone

        backbone = build_backbone(backbone)
    if example_input is None:
        example_input = torch.randn(1, 3, 64, 64, **placement(backbone))
    cap = capture(backbone, example_input, feature_node, leaf_modules, concrete_args)
    if max_elements is not None and (least := least_elements(cap, tasks)) > max_elements:
        raise TooLargeError(f"the supermodel of {len(tasks)} task(s) on this backbone would hold at least {least} "
                            f"elements (each task's copy of every policy layer, and the heads), more than the "
                            f"{max_elements} allowed", least, max_elements)
    sm = SuperModel(cap, tasks)
    # in the backbone's mode, every module of it (the copied layers kept theirs; what the supermodel adds was made in
    # train mode): a backbone handed over in eval mode gives an eval-mode supermodel, not one whose flag says train
    # while its norms stay in eval
    sm.train(backbone.training)
    check_tasks_apart(sm)
    return sm
