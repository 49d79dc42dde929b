"""What a task is: a name, a kind, and the head, loss and metric that go with the kind.

A registered kind (:mod:`automtl.kinds`) brings its head, loss and metric; a custom task passes its own.
"""
from __future__ import annotations

import inspect
import keyword
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from torch import fx, nn

from .errors import ConfigError
from .kinds import KINDS, TaskKind

#: The most classes a task may have (ImageNet-21k has 21,841).
MAX_CLASSES = 1_000_000
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
#: Names a module uses for itself (``eval``, ``to``, ``forward``, an instance's ``_modules`` or ``_graph``): the
#: class's attributes and an instance's own. Generated code reaches submodules as attributes, so a submodule, a
#: task (its head and branches are modules named after it) or a bundle's module path may not take one.
MODULE_ATTRIBUTES = (frozenset(dir(fx.GraphModule)) | frozenset(vars(fx.GraphModule(nn.Module(), fx.Graph())))
                     | {"graph", "code", "meta"})
#: and for a task, the head dict's methods and Python's keywords (generated code reads ``heads.<task>``)
_TASK_NAMES_TAKEN = MODULE_ATTRIBUTES | frozenset(dir(nn.ModuleDict)) | frozenset(keyword.kwlist)


@dataclass
class Task:
    """One task of the multi-task model.

    ``kind`` picks the builtin head, loss and metric; ``classes`` is the number of
    classes (classification, multilabel, segmentation) or of outputs (regression).
    A missing label is marked by ``ignore_index`` for label kinds and by NaN for
    real-valued kinds; such samples do not count in the loss or the metrics.
    ``head``, ``loss`` and ``metric`` override the builtin ones (``kind="custom"``
    needs all three).
    """

    name: str
    kind: str = "custom"
    classes: Optional[int] = None
    head: Optional[nn.Module] = None
    loss: Optional[Callable[..., Any]] = None
    metric: Optional[Callable[[], Any]] = None
    ignore_index: Optional[int] = None
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(
                f"task name {str(self.name)[:70]!r} is not a valid identifier; use up to 64 letters, digits and underscores, "
                "starting with a letter"
            )
        if self.name in _TASK_NAMES_TAKEN or self.name.startswith("__"):
            raise ConfigError(f"task name {self.name!r} is a name torch modules or Python use for themselves (a "
                              f"method or attribute of nn.Module, a keyword); choose another, e.g. {self.name.strip('_') + '_task'!r}")
        if not isinstance(self.kind, str) or (self.kind not in KINDS and self.kind != "custom"):
            raise ConfigError(
                f"task {self.name!r} has unknown kind {str(self.kind)[:40]!r}; choose one of {', '.join(KINDS)} "
                "(or register one with automtl.register_kind), or pass head=, loss= and metric= for a custom task"
            )
        if self.head is not None and not isinstance(self.head, nn.Module):
            raise ConfigError(f"task {self.name!r}: head= takes an nn.Module, got a {type(self.head).__name__}")
        if self.loss is not None and not callable(self.loss):
            raise ConfigError(f"task {self.name!r}: loss= takes a function (pred, target) -> loss, got a "
                              f"{type(self.loss).__name__}")
        if self.loss is not None and not _takes_two_arguments(self.loss):
            raise ConfigError(f"task {self.name!r}: loss= is called as loss(pred, target), which a function of "
                              f"{inspect.signature(self.loss)} cannot take; give it those two arguments")
        if self.metric is not None and (not callable(self.metric) or (
                not isinstance(self.metric, type) and callable(getattr(self.metric, "update", None))
                and callable(getattr(self.metric, "compute", None)))):  # an instance (torchmetrics': a callable one)
            raise ConfigError(f"task {self.name!r}: metric= takes a class (or a function) that makes a fresh metric, "
                              f"e.g. metric=RegressionMetric, not RegressionMetric(); got a {type(self.metric).__name__}")
        spec = self.spec
        if spec is None and (self.head is None or self.loss is None or self.metric is None):
            raise ConfigError(f"custom task {self.name!r} needs head=, loss= and metric=")
        if spec is not None and spec.needs_classes and self.classes is None and self.head is None:
            raise ConfigError(f"task {self.name!r} of kind {self.kind!r} needs a class count: classes=N in Python, "
                              f"--task {self.name}:{self.kind}:N on the command line")
        if self.classes is not None and (not isinstance(self.classes, int) or isinstance(self.classes, bool)
                                         or not 1 <= self.classes <= MAX_CLASSES):
            raise ConfigError(f"task {self.name!r}: classes must be a whole number from 1 to {MAX_CLASSES}, "
                              f"got {str(self.classes)[:40]!r}")
        if spec is not None and spec.fixed_outputs is not None and self.classes not in (None, spec.fixed_outputs) \
                and self.head is None:
            raise ConfigError(f"task {self.name!r} of kind {self.kind!r} has {spec.fixed_outputs} output channel(s), "
                              f"not classes={self.classes}; leave classes out")
        if self.ignore_index is None:  # not given: the kind's own (-1 for classification), else 255
            self.ignore_index = self.default_ignore_index
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool) or abs(self.ignore_index) > 2**31:
            raise ConfigError(f"task {self.name!r}: ignore_index must be an integer label value, got {str(self.ignore_index)[:40]!r}")

    @property
    def default_ignore_index(self) -> int:
        """The label value that marks a missing label when ``ignore_index`` is not given: the kind's own
        (``-1`` for classification, ``255`` for segmentation), 255 for a custom task."""
        return self.spec.default_ignore_index if self.spec is not None else 255

    @property
    def spec(self) -> Optional[TaskKind]:
        """The registered kind of the task (:mod:`automtl.kinds`); None for a custom task."""
        return KINDS.get(self.kind)

    def builtin(self, what: str) -> TaskKind:
        """The task's kind, to build its builtin ``what`` (head, loss, metric); ConfigError for a custom task."""
        spec = self.spec
        if spec is None:
            raise ConfigError(f"task {self.name!r} of kind {self.kind!r} has no builtin {what}; pass {what}= to its Task")
        return spec

    @property
    def dense(self) -> bool:
        """True when the output is a map at the input resolution."""
        return self.spec is not None and self.spec.dense

    @property
    def outputs(self) -> int:
        """Number of output channels of the builtin head."""
        return self.builtin("head").outputs(self)

    def describe(self) -> dict:
        """Plain-data description (YAML-able) of the task; ``ignore_index`` only where it is not the kind's default."""
        out = {"name": self.name, "kind": self.kind}
        if self.classes is not None:
            out["classes"] = self.classes
        if self.ignore_index != self.default_ignore_index:
            out["ignore_index"] = self.ignore_index
        return out

    @classmethod
    def from_description(cls, data: dict) -> "Task":
        """Rebuild a task from its stored description (``describe()`` plus ``ignore_index``).

        A model file holds no Python code, so a custom task comes back description-only: kind
        ``"custom"`` with no head, loss or metric. It names and describes the model's output;
        to train it again, pass the task with its head, loss and metric.
        """
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ConfigError(f"a task description needs at least a 'name'; got {str(data)[:80]!r}")
        kind = data.get("kind", "custom")
        classes = data.get("classes")
        if kind != "custom":  # a kind must be registered in this process (the error says so)
            extra = {"ignore_index": data["ignore_index"]} if isinstance(data.get("ignore_index"), int) else {}
            return cls(data["name"], kind=kind, classes=classes, **extra)
        if not _NAME.match(data["name"]):
            raise ConfigError(
                f"task name {data['name'][:70]!r} is not a valid identifier; use letters, digits and underscores, "
                "starting with a letter"
            )
        if classes is not None and (not isinstance(classes, int) or isinstance(classes, bool) or not 1 <= classes <= MAX_CLASSES):
            raise ConfigError(f"task {data['name']!r}: classes must be a whole number from 1 to {MAX_CLASSES}, "
                              f"got {str(classes)[:40]!r}")
        if isinstance(data.get("ignore_index"), int) and abs(data["ignore_index"]) > 2**31:
            raise ConfigError(f"task {data['name']!r}: ignore_index {str(data['ignore_index'])[:40]} is not a label value")
        task = cls.__new__(cls)  # skips __post_init__, which demands head/loss/metric for custom tasks
        task.name, task.kind, task.classes = data["name"], "custom", classes
        task.head = task.loss = task.metric = None
        task.ignore_index = data["ignore_index"] if isinstance(data.get("ignore_index"), int) else 255
        task.options = {}
        return task


def parse_task(spec: str) -> Task:
    """Parse a command-line task ``name:kind[:classes]``, e.g. ``segment:segmentation:13``."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(
            f"task {spec!r} is not of the form name:kind[:classes]; for example --task segment:segmentation:13"
        )
    classes = None
    if len(parts) == 3:
        try:
            classes = int(parts[2])
        except ValueError:
            raise ConfigError(f"task {spec!r}: the class count {parts[2]!r} is not an integer") from None
    return Task(parts[0], kind=parts[1], classes=classes)


def _takes_two_arguments(fn: Callable) -> bool:
    """Whether ``fn(a, b)`` binds to its signature (True where it has none to read, e.g. a builtin)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(None, None)
    except TypeError:
        return False
    return True


def check_tasks(tasks) -> list[Task]:
    """Validate a task list: at least one, unique names, all :class:`Task`."""
    if isinstance(tasks, Task):
        raise ConfigError(f"tasks must be a list of automtl.Task, got the one task {tasks.name!r}; pass [task]")
    if isinstance(tasks, Mapping):
        raise ConfigError("tasks must be a list of automtl.Task, got a mapping; pass list(tasks.values())")
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Iterable):
        raise ConfigError(f"tasks must be a list of automtl.Task, got a {type(tasks).__name__}")
    tasks = list(tasks)
    if not tasks:
        raise ConfigError("no tasks given; pass at least one Task (or --task name:kind)")
    for t in tasks:
        if not isinstance(t, Task):
            raise ConfigError(f"expected automtl.Task objects, got {type(t).__name__}")
    check_unique_names([t.name for t in tasks])
    return tasks


def check_unique_names(names) -> None:
    """Raise :class:`ConfigError` naming the task names given more than once."""
    names = list(names)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"task names must be unique; {', '.join(map(repr, dup))} given more than once")
