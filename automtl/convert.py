"""The whole pipeline in one call: backbone + tasks + data -> searched, compacted, exported model.

``automtl convert`` is a thin wrapper around :func:`convert`. A :class:`ConvertConfig` fixes a
run; the resolved config is written next to the results as ``config.yaml`` and can be fed back.
The steps one at a time (``automtl search`` / ``compact``), through a run directory, are
:mod:`automtl.runs`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import yaml
from torch.utils.data import Subset

from .config import MAX_INPUT_SIZE, MAX_SAMPLES, KeywordChecked, SearchConfig, check_keys
from .cost import check_budget
from .errors import ConfigError
from .fileio import read_yaml
from .supermodel import SuperModel, supermodel
from .tasks import Task, check_unique_names, parse_task

#: The default run is sized to finish in a few minutes on 2 CPU cores.
#: ``conflict`` is the default strategy: on the equal-compute quality benchmark (benchmarks/quality.py,
#: README) it delivers a better model than ``gumbel``; gumbel's policy_lr / reg_weight were calibrated
#: there on tuning seeds (100 on), kept apart from the benchmark's seeds (0-2).
DEFAULT_SCHEDULE = dict(strategy="conflict", warmup_steps=80, search_steps=80, finetune_steps=120,
                        weight_steps_per_policy_step=2, batch_size=16, tau_every=10, tau_decay=0.9, log_every=5,
                        checkpoint_every=50, val_batches=None, budget="1.5x", reg_weight=0.5, policy_lr=0.1)

#: Train and validation samples a run makes of a generated or composed data set when train_samples / val_samples
#: are null; a data set read from disk (NYUv2, Cityscapes) is then used whole, as its benchmarks use it.
DEFAULT_SAMPLES = {"synthetic": (512, 128), "multifashion": (512, 128)}

OUTPUT_FILES = ("model.automtl", "model.pt2", "policy.yaml", "sharing.svg", "report.json", "config.yaml")
_SHORTCUTS = ("budget", "device", "seed")  # top-level keys that belong to the search section


@dataclass
class ConvertConfig(metaclass=KeywordChecked):
    """Everything a conversion needs. ``tasks: None`` takes the data set's natural tasks."""

    backbone: str = "resnet18"
    weights: Optional[str] = None
    pretrained: bool = False
    feature_node: Optional[str] = None
    input_size: int = 64
    tasks: Optional[list] = None
    data: str = "synthetic"
    train_samples: Optional[int] = None  # None: DEFAULT_SAMPLES for a made data set, all of one read from disk
    val_samples: Optional[int] = None
    search: SearchConfig = field(default_factory=lambda: SearchConfig(**DEFAULT_SCHEDULE))

    def __post_init__(self) -> None:
        if isinstance(self.search, Mapping):
            self.search = SearchConfig.from_dict({**DEFAULT_SCHEDULE, **self.search}, "config section 'search'")
        if not isinstance(self.search, SearchConfig):
            raise ConfigError(f"search must be a SearchConfig or a mapping of its fields, got {type(self.search).__name__}")
        for name in ("backbone", "data"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} must be a name, got {str(getattr(self, name))[:60]!r}; give the "
                                  + ("backbone's name (automtl backbones lists them)" if name == "backbone" else
                                     "data set's name (synthetic, multifashion, nyuv2:ROOT, cityscapes:ROOT)"))
        if isinstance(self.weights, os.PathLike):
            self.weights = os.fspath(self.weights)
        for name in ("weights", "feature_node"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string or null, got {getattr(self, name)!r}")
        if not isinstance(self.pretrained, bool):
            raise ConfigError(f"pretrained must be true or false, got {self.pretrained!r}")
        if (not isinstance(self.input_size, int) or isinstance(self.input_size, bool)
                or not 8 <= self.input_size <= MAX_INPUT_SIZE):
            raise ConfigError(f"input_size must be a whole number of pixels from 8 to {MAX_INPUT_SIZE}, got {self.input_size!r}; "
                              "resize or crop larger images first")
        for name in ("train_samples", "val_samples"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or null, got {v!r}")
            if v is not None and v > MAX_SAMPLES:
                raise ConfigError(f"{name} is {v}, more than the {MAX_SAMPLES} samples automtl generates or reads from a "
                                  "data set at once; use fewer")
        if self.tasks is not None:
            if isinstance(self.tasks, (str, Task, Mapping)) or not isinstance(self.tasks, Sequence) or not self.tasks:
                raise ConfigError(f"tasks must be a non-empty list of tasks (or null for the data set's own), got {self.tasks!r}")
            self.tasks = [_task_dict(t) for t in self.tasks]
            check_unique_names(t["name"] for t in self.tasks)

    def validate(self) -> "ConvertConfig":
        """Check every field again, the search section's too: a field assigned after the config was made
        is not checked by the dataclass. Returns the config; raises ConfigError naming the field."""
        from .search._strategy import strategy_class
        from .weighting import make_weighting

        self.__post_init__()
        self.search.validate()
        strategy_class(self.search.strategy)  # names that only the search would look up: refused up front
        make_weighting(self.search.weighting, [t.name for t in self.task_objects()], **self.search.weighting_options)
        return self

    def task_objects(self) -> list[Task]:
        from .data import default_tasks

        if self.tasks is None:
            return default_tasks(self.data)
        return [Task(**t) for t in self.tasks]

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "search"}
        out["tasks"] = [t.describe() for t in self.task_objects()]
        out["search"] = self.search.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> "ConvertConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a mapping of key: value, got {type(data).__name__}")
        data = dict(data)
        search = data.pop("search", None)
        search = {} if search is None else search
        if not isinstance(search, Mapping):
            raise ConfigError(f"{where}: 'search' must be a mapping of search options (key: value), "
                              f"got {type(search).__name__} {str(search)[:40]!r}")
        search = dict(search)
        for key in _SHORTCUTS:
            if key in data:
                if key in search:
                    raise ConfigError(f"{where} gives {key!r} twice, at the top level and under 'search'; give it once")
                search[key] = data.pop(key)
        known = [f.name for f in dataclasses.fields(cls)] + list(_SHORTCUTS)
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known + SearchConfig.fields(), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys are {', '.join(known)}"
                if close and close[0] in SearchConfig.fields() and close[0] not in known:
                    hint = f"; did you mean {close[0]!r} (under 'search:')?"
                raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        return cls(**data, search=SearchConfig.from_dict({**DEFAULT_SCHEDULE, **search}, f"{where}, section 'search'"))

    @classmethod
    def from_yaml(cls, path) -> "ConvertConfig":
        return cls.from_dict(_read_yaml(path, "config file"), f"config file {os.fspath(path)!r}")


def _task_dict(t) -> dict:
    if isinstance(t, Task):
        return t.describe()
    if isinstance(t, str):
        return parse_task(t).describe()
    if isinstance(t, Mapping):
        unknown = set(t) - {"name", "kind", "classes", "ignore_index"}
        if unknown or "name" not in t:
            raise ConfigError(f"task {dict(t)!r} must have 'name', 'kind' and optionally 'classes' (unknown: {sorted(unknown)})")
        Task(**t)  # validates
        return dict(t)
    raise ConfigError(f"task {t!r} must be a mapping like {{name: depth, kind: depth}} or 'name:kind[:classes]'")


#: ConvertConfig fields that :func:`resolve_config` takes; every other option is a SearchConfig field.
_TOP_LEVEL = ("backbone", "tasks", "data", "weights", "pretrained", "feature_node", "input_size", "train_samples",
              "val_samples")


def resolve_config(config_path=None, **options) -> ConvertConfig:
    """A run's config: the file ``config_path`` (else the defaults) with ``options`` on top.

    ``options`` are ConvertConfig fields (``backbone``, ``tasks`` as ``"name:kind[:classes]"``
    strings or mappings, ``data``, ``weights``, ``pretrained``, ``feature_node``, ``input_size``,
    ``train_samples``, ``val_samples``) or SearchConfig fields (``budget``, ``device``, ``seed``,
    ``strategy``, ``weighting``, ``tensorboard_dir``, ``warmup_steps``, ...). ``None`` (and an
    empty ``tasks``) means "not given": the file's or the default value stays.

    Raises:
        ConfigError: an unreadable file, an unknown option (with a did-you-mean) or a bad value;
            the merged config is validated as a whole.

    Example:
        >>> cfg = resolve_config("runs/r18/config.yaml", budget="2x", seed=1)
    """
    cfg = ConvertConfig.from_yaml(config_path) if config_path else ConvertConfig()
    given = {k: v for k, v in options.items() if v is not None and not (k == "tasks" and not v)}
    check_keys(given, [*_TOP_LEVEL, *SearchConfig.fields()], "resolve_config")
    top = {k: v for k, v in given.items() if k in _TOP_LEVEL}
    search = {k: v for k, v in given.items() if k not in _TOP_LEVEL}
    if top:
        cfg = dataclasses.replace(cfg, **top)  # re-runs the field checks; tasks become mappings
    if search:
        cfg.search = cfg.search.replace(**search)
    return ConvertConfig.from_dict(cfg.to_dict())  # re-validate the merged config


def _read_yaml(path, what: str):
    return read_yaml(path, what, exponent_floats=True) or {}


# ---- building -------------------------------------------------------------------------
def build_supermodel(cfg: ConvertConfig, download: bool = True, max_elements: Optional[int] = None) -> SuperModel:
    """Backbone (+ weights) and tasks of ``cfg`` turned into a supermodel. ``download=False``: a pretrained
    backbone is built with its input statistics but without its weights (a run's own weights come next);
    ``max_elements``: see :func:`automtl.supermodel`."""
    from .backbones import build_backbone, load_weights
    from .backbones.external import is_external

    if cfg.pretrained and not is_external(cfg.backbone):
        raise ConfigError(f"pretrained weights are downloaded for timm:NAME and torchvision:NAME backbones only, "
                          f"not {cfg.backbone!r}; pass a state dict with --weights instead")
    backbone = build_backbone(cfg.backbone, **({("pretrained" if download else "input_statistics"): True}
                                               if cfg.pretrained else {}))
    if cfg.weights:
        load_weights(backbone, cfg.weights)
    example = torch.randn(1, 3, cfg.input_size, cfg.input_size)
    return supermodel(backbone, cfg.task_objects(), example, feature_node=cfg.feature_node, max_elements=max_elements)


def build_data(cfg: ConvertConfig, tasks: Sequence[Task]):
    """Train and validation datasets of ``cfg``, checked against the tasks."""
    from .data import check_targets, make_dataset, parse_spec

    name, _ = parse_spec(cfg.data)
    sized = name in ("synthetic", "multifashion")  # made (or read) at that many samples; the others: the first ones
    extra = {"size": cfg.input_size} if name == "synthetic" else {}

    def dataset(split: str, n: Optional[int]):
        data = make_dataset(cfg.data, split, for_tasks=tasks, **({"n": n} if sized and n else {}), **extra)
        return Subset(data, range(min(n, len(data)))) if n and not sized else data

    made = DEFAULT_SAMPLES.get(name, (None, None))
    train = dataset("train", cfg.train_samples if cfg.train_samples is not None else made[0])
    val = dataset("val", cfg.val_samples if cfg.val_samples is not None else made[1])
    check_targets(train, tasks)
    return train, val


def prepare_run(cfg: ConvertConfig):
    """Seed, supermodel, datasets and the budget check of a run: what convert and search share."""
    cfg.validate()
    torch.manual_seed(cfg.search.seed)  # heads and skip projections start from the run's seed
    sm = build_supermodel(cfg)
    check_budget(sm, cfg.search)  # before the data is read: no policy may be able to meet the budget
    train, val = build_data(cfg, sm.tasks)
    return sm, train, val


# ---- the whole pipeline -------------------------------------------------------------------
def convert(cfg: ConvertConfig, out, resume: bool = False, quiet: bool = False,
            log: Callable[[str], None] = lambda msg: None, overwrite: bool = False) -> dict:
    """Run capture -> supermodel -> search -> compact -> save/export/render; return the report.

    The six result files appear in ``out`` only when the whole run succeeded (each is staged in
    a temporary directory and moved in at the end); search checkpoints live in ``out/checkpoints``
    so that ``resume=True`` continues a killed run. ``out`` is locked while the run is live, and a
    folder that holds an earlier run is refused unless ``resume`` or ``overwrite`` is given
    (:class:`automtl.rundir.RunDirectory`).

    Raises:
        AutomtlError: a bad config, data or budget; ``out`` busy, not writable or holding a run.
        StorageError: the disk filled up or became unwritable while results were written.
    """
    from .rundir import RunDirectory

    from .render import _require_dot

    cfg.validate()  # before the run directory exists (or an old run is overwritten): a bad field leaves nothing on disk
    _require_dot()  # the run ends by rendering: say so now, not after the training
    with RunDirectory(out, resume=resume, overwrite=overwrite) as run:
        return _convert(cfg, run.path, resume, quiet, log)


def _convert(cfg: ConvertConfig, out: Path, resume: bool, quiet: bool, log: Callable[[str], None]) -> dict:
    from .compact import compact
    from .fileio import storage_error
    from .report import compare
    from .search import search

    started = time.time()
    log(f"building the supermodel of {cfg.backbone} for tasks {', '.join(t.name for t in cfg.task_objects())}")
    sm, train, val = prepare_run(cfg)
    search_cfg = cfg.search.replace(out_dir=str(out / "checkpoints"), resume=resume or cfg.search.resume,
                                    quiet=quiet or cfg.search.quiet)
    log(f"searching: {search_cfg.warmup_steps} warm-up, {search_cfg.search_steps} search and "
        f"{search_cfg.finetune_steps} fine-tune steps"
        f"{' (of hard-sharing compute)' if search_cfg.finetune_unit == 'compute' else ''} on {cfg.data}")
    t0 = time.time()
    result = search(sm, train, val, search_cfg)
    search_seconds = time.time() - t0
    log("compacting, exporting and rendering")
    # the files and the report's accounting are the CPU's whatever device trained: model.pt2 runs where there is no
    # GPU, and latency is CPU latency as the README's report says
    sm.cpu()
    model = compact(sm, result.policy).eval()
    size = (1, 3, cfg.input_size, cfg.input_size)
    stats = compare(sm, model, (8, 3, cfg.input_size, cfg.input_size), repeats=5)
    report = {
        "automtl": _version(),
        "config": cfg.to_dict(),
        "policy": {"counts": result.policy.counts(), "strategy": result.strategy,
                   "evidence": result.policy.to_dict().get("evidence")},
        "metrics": result.metrics,
        "steps": result.steps,  # optimizer steps each stage ran (the fine-tune's as fitted)
        "accounting": stats,
        "budget": {"multiple": cfg.search.budget_multiple, "params": result.params, "budget_params": result.budget_params,
                   "used": round(result.params / result.base_params, 4)},
        "search_seconds": round(search_seconds, 2),
        "total_seconds": None,
    }
    stage = Path(tempfile.mkdtemp(prefix=".automtl-stage-", dir=out))
    try:
        with _named_as_written(stage, out):
            _stage_outputs(model, stage, report, result.policy, cfg, torch.randn(*size), started)
        if "model.automtl" not in report["files"]:
            (out / "model.automtl").unlink(missing_ok=True)  # an earlier run's would pass for this one's
        for name in report["files"]:
            os.replace(stage / name, out / name)
    except (OSError, RuntimeError) as exc:
        error = storage_error(out, exc)
        if error is None:
            raise
        raise error from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def _stage_outputs(model, stage: Path, report: dict, policy, cfg: ConvertConfig, example: torch.Tensor,
                   started: float) -> None:
    """Write the run's files into ``stage``; ``report["files"]`` lists them. A model the bundle cannot describe (an
    operation off its vocabulary, a weight tie) is written as ``model.pt2`` only, with a warning that says why."""
    from .errors import FileFormatError, first_line
    from .formats import export, save
    from .render import render

    report["files"] = list(OUTPUT_FILES)
    try:
        save(model, stage / "model.automtl")
    except FileFormatError as exc:
        reason = first_line(exc, limit=None).removesuffix("; write a .pt2 with automtl.export() instead")
        report["files"].remove("model.automtl")
        report["not_written"] = {"model.automtl": reason}
        warnings.warn(f"model.automtl is not written ({reason}); model.pt2 holds the compact model")
    export(model, stage / "model.pt2", example_input=example)
    policy.save(stage / "policy.yaml")
    render(model, stage / "sharing.svg")
    (stage / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    report["total_seconds"] = round(time.time() - started, 2)
    (stage / "report.json").write_text(json.dumps(json_safe(report), indent=2, default=_jsonable, allow_nan=False) + "\n")


@contextlib.contextmanager
def _named_as_written(stage: Path, out: Path):
    """Warnings raised while the outputs are staged name the files where the run leaves them, not the staging
    folder, which is gone when the run ends."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for w in caught:
            warnings.warn_explicit(str(w.message).replace(str(stage), str(out)), w.category, w.filename, w.lineno)


def _version() -> str:
    from . import __version__

    return __version__


def json_safe(obj):
    """``obj`` with every non-finite float replaced by None: JSON has no NaN or infinity."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _jsonable(obj):
    if isinstance(obj, (Path,)):
        return os.fspath(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def format_summary(report: dict, out) -> str:
    """What ``automtl convert`` prints after a run: the files written, the policy's counts, the compact
    model's size against the models it replaces, and each task's validation metrics."""
    acc = report["accounting"]
    counts = report["policy"]["counts"]
    compact_stats = acc["compact"]
    budget = ((report["policy"].get("evidence") or {}).get("budget") or {})
    # the budget's unit is hard sharing (the backbone and every task's head): an all-share model is 1.00x of it
    used = (f"{budget['used']:.2f}x hard sharing{' in MACs' if budget.get('metric') == 'macs' else ''} (the "
            "budget's unit), ") if isinstance(budget.get("used"), (int, float)) else ""
    lines = [
        f"wrote {', '.join(report.get('files', OUTPUT_FILES))} into {out}",
        f"policy: {counts['share']} share, {counts['specialize']} specialize, {counts['skip']} skip choices",
        f"compact model: {compact_stats['parameters']:,} parameters "
        f"({used}{acc['ratios']['parameters_vs_backbone']:.2f}x one backbone and head, "
        f"{acc['ratios']['parameters_vs_separate']:.2f}x the single-task models)",
    ]
    for task, metrics in report["metrics"].items():
        shown = ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        lines.append(f"  {task}: {shown}")
    return "\n".join(lines) + "\n"
