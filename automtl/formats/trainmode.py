"""What a lowered graph does only in training, kept as data: the constants a call takes in train mode instead.

Lowering writes a module it inlines in its eval-mode branch. timm's ``BatchNormAct2d`` (a BatchNorm2d subclass
that also applies its activation) calls ``F.batch_norm(x, running_mean, running_var, weight, bias,
training=self.training, momentum, eps)``, so its eval graph normalises with the running statistics. Where the
train-mode branch is the same call with other constants at the parameters of :data:`SWITCHES` (batch_norm's
``training`` and ``momentum``, dropout's ``training``), the file notes those constants on the node
(``train: {training: true}``), and a loaded model's train graph (:func:`automtl.compact.grouped_train_graph`)
calls it with them: it normalises with its batch's statistics and moves its running statistics, as the saved
model does. A train-mode branch that differs otherwise (stochastic depth's random mask) is not described; the
file then says that its model trains otherwise (``trains_otherwise``).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch.nn.functional as F
from torch import fx

from ..errors import FileFormatError, finite_number

#: node.meta key: ``{parameter: value}``, the constants a call takes in train mode instead of its own.
META_TRAIN = "automtl_train"

#: The functions whose call may take other constants in train mode, each parameter with the kinds its value
#: may have. Nothing here changes a result's shape or what a call allocates.
SWITCHES: dict = {
    F.batch_norm: {"training": (bool,), "momentum": (float,)},
    F.dropout: {"training": (bool,)},
    F.dropout2d: {"training": (bool,)},
}


def bound_arguments(node: fx.Node) -> Optional[dict]:
    """``node``'s call as ``{parameter: value}`` with every default filled in; None when it does not bind."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def train_switches(eval_graph: fx.Graph, train_graph: fx.Graph) -> Optional[dict]:
    """``{eval node: {parameter: train value}}`` where ``train_graph`` computes what ``eval_graph`` computes but for
    other constants at :data:`SWITCHES`' parameters (an empty dict where they compute the same), None where they
    differ otherwise.

    Nodes are matched by what they compute (operation, target and arguments, inputs matched first), not by name
    or position: a train graph's node order and names may differ (a dead train-only node took a name)."""
    ids: dict = {}  # node -> the number of what it computes (equal computations get equal numbers)
    table: dict = {}  # key of a computation -> its number (eval graph's only)
    reduced: dict = {}  # key of a switchable call without its switches -> its eval node
    copies: dict = {}  # number -> how many eval nodes compute it
    for node in eval_graph.nodes:
        ids[node] = number = table.setdefault(_key(node, ids), len(table))
        copies[number] = copies.get(number, 0) + 1
        if node.op == "call_function" and node.target in SWITCHES and bound_arguments(node) is not None:
            reduced.setdefault(_key(node, ids, reduced=True), node)
    switches: dict = {}
    for node in train_graph.nodes:
        number = table.get(_key(node, ids))
        if number is None:
            found = reduced.get(_key(node, ids, reduced=True)) if node.op == "call_function" and node.target in SWITCHES else None
            change = _switched(found, node) if found is not None else None
            # a call the eval graph makes twice (two dropouts of one value): which of them switches is not known
            if change is None or copies[ids[found]] > 1 or found in switches:
                return None
            if change:
                switches[found] = change
            number = ids[found]
        ids[node] = number
        if node.op == "output" and number != ids[next(n for n in eval_graph.nodes if n.op == "output")]:
            return None
    return switches


def _key(node: fx.Node, ids: dict, reduced: bool = False):
    """What ``node`` computes, its inputs by number; ``reduced``: a switchable call's arguments but its switches."""
    values = (node.args, node.kwargs)
    if reduced:
        bound = bound_arguments(node)
        values = {k: v for k, v in (bound or {}).items() if k not in SWITCHES[node.target]}
    if node.op == "placeholder":
        return ("placeholder",)
    return (node.op, node.target, repr(fx.map_arg(values, lambda n: _Ref(ids.get(n)))))


class _Ref:
    """A node in a key: the number of what it computes (None: not matched, so no key holding it matches)."""

    def __init__(self, number):
        self.number = number

    def __repr__(self) -> str:
        return f"%{self.number}" if self.number is not None else f"%?{id(self)}"


def _switched(eval_node: fx.Node, train_node: fx.Node) -> Optional[dict]:
    """The switches whose constants differ between two calls that agree on everything else, if of their kinds."""
    mine, theirs = bound_arguments(eval_node), bound_arguments(train_node)
    allowed = SWITCHES[eval_node.target]
    changed = {k: theirs[k] for k in allowed if not _equal(theirs[k], mine[k])}
    return changed if all(isinstance(v, allowed[k]) for k, v in changed.items()) else None


def _equal(a, b) -> bool:
    return a is b or (type(a) is type(b) and not isinstance(a, fx.Node) and a == b)


def check_switches(node: fx.Node, raw, where: str) -> dict:
    """The train-mode constants a file notes on ``node``, checked: a call of :data:`SWITCHES`, its parameters, values
    of their kinds; a batch_norm that trains has a momentum in [0, 1] and moves only attributes, never a computed
    tensor (which attributes: :func:`check_statistics`).

    Raises:
        FileFormatError: one sentence naming the node and what is wrong.
    """
    allowed = SWITCHES.get(node.target) if node.op == "call_function" else None
    if allowed is None:
        raise FileFormatError(f"{where} notes train-mode arguments, which only a batch_norm or dropout call takes; "
                              "the file is crafted or corrupted, save the model again")
    bound = bound_arguments(node)
    if bound is None:
        raise FileFormatError(f"{where} notes train-mode arguments for a call whose own arguments do not fit it; "
                              "the file is crafted or corrupted, save the model again")
    if not isinstance(raw, dict) or not raw:
        raise FileFormatError(f"{where} notes train-mode arguments that are no mapping of parameters to values; "
                              "the file is crafted or corrupted, save the model again")
    for key, value in raw.items():
        kinds = allowed.get(key) if isinstance(key, str) else None
        if kinds is None or not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise FileFormatError(f"{where} notes the train-mode argument {str(key)[:30]!r} = {str(value)[:30]!r}, "
                                  "which it does not take; the file is crafted or corrupted, save the model again")
    training = {**bound, **raw}
    if node.target is F.batch_norm and (training.get("training") or "momentum" in raw):
        momentum = training.get("momentum")  # its own, or the note's: eval mode never reads it
        if not finite_number(momentum) or not 0 <= momentum <= 1:  # a 400-digit integer too: no float holds it
            raise FileFormatError(f"{where} trains with a momentum of {str(momentum)[:30]}, not a number in [0, 1]; "
                                  "the file is crafted or corrupted, save the model again")
        for key in ("running_mean", "running_var"):
            value = bound.get(key)
            if value is not None and not (isinstance(value, fx.Node) and value.op == "get_attr"):
                raise FileFormatError(f"{where} would move the statistics in a computed tensor ({key}) in train mode, "
                                      "which no model does; the file is crafted or corrupted, save the model again")
    return dict(raw)


def switch_to_train(graph: fx.Graph) -> bool:
    """Give every call noted with :data:`META_TRAIN` its train-mode constants (by keyword). True if any."""
    switched = False
    for node in graph.nodes:
        change = node.meta.get(META_TRAIN)
        bound = bound_arguments(node) if change else None
        if bound is None:
            continue
        bound.update(change)
        node.args, node.kwargs = (), bound
        switched = True
    return switched


def check_statistics(gm: fx.GraphModule, where: str) -> None:
    """The attributes a noted batch_norm moves in train mode are running statistics and nothing else: floating
    buffers, not parameters (a crafted note could train a weight by moving it as a mean), inside no module the graph
    calls, read by the graph only as the running statistics of batch_norm calls.

    Raises:
        FileFormatError: one sentence naming the attribute.
    """
    moved = set()
    for node in gm.graph.nodes:
        note = node.meta.get(META_TRAIN)
        if note and node.target is F.batch_norm and {**bound_arguments(node), **note}.get("training"):
            moved.update(v.target for k, v in bound_arguments(node).items()
                         if k in ("running_mean", "running_var") and isinstance(v, fx.Node))
    if not moved:
        return
    parameters = {name for name, _ in gm.named_parameters()}
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    for target in sorted(moved):
        tensor = gm
        for part in target.split("."):
            tensor = getattr(tensor, part)
        inside = next((m for m in called if target.startswith(f"{m}.")), None)
        if target in parameters or not tensor.is_floating_point() or inside is not None:
            raise FileFormatError(f"{where} moves {target[:80]!r} as running statistics in train mode, though it is "
                                  f"{'a parameter' if target in parameters else 'a tensor of module ' + repr(inside) if inside else 'not floating'}; "
                                  "the file is crafted or corrupted, save the model again")
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in moved:
            continue
        for user in node.users:
            bound = bound_arguments(user) if user.op == "call_function" and user.target is F.batch_norm else None
            if bound is None or any(v is node for k, v in bound.items() if k not in ("running_mean", "running_var")):
                raise FileFormatError(f"{where} moves {node.target[:80]!r} as running statistics in train mode and "
                                      f"reads it otherwise too (node {user.name!r}); the file is crafted or corrupted, "
                                      "save the model again")
