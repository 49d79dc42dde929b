"""The pipeline one step at a time, through a *run directory*.

:func:`search_run` searches and fine-tunes a policy and keeps the trained supermodel in a run
directory (``supermodel.yaml``: how to rebuild it; ``supermodel.pt``: its tensors; ``policy.yaml``;
``metrics.json``; ``checkpoints/``). :func:`compact_run` reads it back, optionally under another
policy (one edited by hand) and after more fine-tuning, and writes the compact model.
``automtl search`` and ``automtl compact`` are thin wrappers around the two.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Optional, Union

import torch
import yaml

from .config import SESSION_FIELDS, SearchConfig
from .convert import ConvertConfig, build_data, build_supermodel, json_safe, prepare_run
from .errors import ConfigError, FileFormatError, TooLargeError, first_line
from .fileio import atomic_path, atomic_write_text, ensure_dir, load_tensors, read_yaml, state_dict_of, state_misfits
from .policy import Policy
from .supermodel import SuperModel

__all__ = ["compact_run", "load_run", "save_run", "search_run", "supermodel_from_state"]

#: What :func:`search_run` writes into its run directory (besides ``checkpoints/``).
RUN_OUTPUT_FILES = ("supermodel.yaml", "supermodel.pt", "policy.yaml", "metrics.json")


def search_run(cfg: ConvertConfig, out: Union[str, os.PathLike], resume: bool = False, overwrite: bool = False,
               quiet: bool = False) -> dict:
    """Search a sharing policy for ``cfg`` and fine-tune it, keeping the run in the directory ``out``.

    Writes :data:`RUN_OUTPUT_FILES` into ``out`` and the search checkpoints into
    ``out/checkpoints`` (``resume=True`` continues a killed run from there). ``out`` is locked
    while the run is live and an earlier run in it is refused unless ``resume`` or ``overwrite``
    (:class:`automtl.rundir.RunDirectory`).

    Returns:
        ``{"metrics": {task: {metric: value}}, "policy": {"share"|"specialize"|"skip": count},
        "parameters": compact parameter count}``, as also written to ``metrics.json`` (non-finite
        numbers as null).

    Raises:
        AutomtlError: a bad config, data or budget; ``out`` busy, not writable or holding a run.
        StorageError: the disk filled up or became unwritable while results were written.

    Example:
        >>> cfg = ConvertConfig(backbone="resnet18")
        >>> search_run(cfg, "runs/r18"); compact_run("runs/r18", out="r18.automtl")
    """
    from .rundir import CHECKPOINTS, RunDirectory
    from .search import search

    cfg.validate()  # before the run directory exists (an overwrite would empty it first)
    with RunDirectory(out, resume=resume, overwrite=overwrite) as run:
        sm, train, val = prepare_run(cfg)
        result = search(sm, train, val, cfg.search.replace(out_dir=str(run.path / CHECKPOINTS), resume=resume, quiet=quiet))
        save_run(sm, cfg, run.path, result.policy)
        payload = json_safe({"metrics": result.metrics, "policy": result.policy.counts(), "parameters": result.params})
        atomic_write_text(run.path / "metrics.json", json.dumps(payload, indent=2, default=str, allow_nan=False) + "\n")
    return payload


def compact_run(run_dir: Union[str, os.PathLike], policy: Union[None, str, os.PathLike, Policy] = None,
                finetune_steps: int = 0, out: Union[None, str, os.PathLike] = "model.automtl", quiet: bool = False,
                backbone: Optional[str] = None):
    """Compile the supermodel of ``run_dir`` (from :func:`search_run`) under a policy into a compact model.

    Args:
        run_dir: a run directory written by :func:`search_run`.
        policy: a Policy or a policy YAML file; default the run's own ``policy.yaml``.
        finetune_steps: fine-tune the policy's architecture this many optimizer steps first (hard-sharing
            steps of compute when the run's config says ``finetune_unit: compute``), on the run's data and
            schedule (0: compile the weights as they are).
        out: the ``.automtl`` file to write atomically; None writes nothing.
        quiet: no progress bars during the fine-tune.
        backbone: the backbone spec, needed (and then used) where the run's backbone is code
            (``path/to/file.py:Net``, ``package.module:factory``): see :func:`load_run`.

    Returns:
        the :class:`automtl.CompactModel`, in eval mode, on the CPU (also where the fine-tune ran on a GPU).

    Raises:
        ConfigError: the run has no policy and none is given; the policy does not fit the run's layers and tasks;
            the run's backbone is code and ``backbone`` is not given.
        FileFormatError: ``run_dir`` is not a run directory, or its files are damaged or do not fit each other.

    Example:
        >>> model = compact_run("runs/r18", policy="my-policy.yaml", finetune_steps=100, out="r18.automtl")
    """
    from .compact import compact
    from .formats import save
    from .search import search

    sm, cfg, own = load_run(run_dir, backbone=backbone)
    if policy is not None and not isinstance(policy, Policy):
        policy = Policy.load(policy)
    policy = policy if policy is not None else own
    if policy is None:
        raise ConfigError(f"run directory {os.fspath(run_dir)!r} has no policy.yaml; pass --policy FILE")
    policy.check(sm.layer_names, sm.task_names, sm.skip_legal)
    if finetune_steps > 0:
        train, val = build_data(cfg, sm.tasks)
        search(sm, train, val, cfg.search.replace(finetune_steps=finetune_steps, out_dir=None, quiet=quiet), policy=policy)
    model = compact(sm.cpu().eval(), policy)  # on the CPU as load_run built it, also after a fine-tune on a GPU
    if out is not None:
        save(model, out)
    return model


def save_run(sm: SuperModel, cfg: ConvertConfig, directory, policy: Optional[Policy] = None) -> None:
    """Keep a supermodel as ``supermodel.yaml`` (how to rebuild it) + ``supermodel.pt`` (tensors), atomically each.

    The config's :data:`automtl.config.SESSION_FIELDS` (where this session wrote) are left out: a later session's own."""
    directory = ensure_dir(directory)
    with atomic_path(directory / "supermodel.pt") as tmp:
        torch.save(sm.state_dict(), tmp)
    spec = cfg.to_dict()
    spec["search"] = {k: v for k, v in spec["search"].items() if k not in SESSION_FIELDS}
    atomic_write_text(directory / "supermodel.yaml", yaml.safe_dump(spec, sort_keys=False))
    if policy is not None:
        policy.save(directory / "policy.yaml")


def load_run(directory, backbone: Optional[str] = None) -> tuple[SuperModel, ConvertConfig, Optional[Policy]]:
    """Rebuild the supermodel of a run directory written by :func:`save_run`: (supermodel, config, policy or None).

    A run directory is data someone may have handed over, so it runs no code of its own: the config's
    :data:`automtl.config.SESSION_FIELDS` are the defaults, whatever the file says (where a later session writes
    is its own), and a backbone recorded as code (``path/to/file.py:Net``, ``package.module:factory``) is built
    only from ``backbone``, the spec the caller gives (the run's, or where that code is now); builtin and
    ``timm:``/``torchvision:`` backbones are looked up by name as recorded.

    Raises:
        FileFormatError: no ``supermodel.yaml`` there, or a missing, damaged or mismatched ``supermodel.pt``.
        ConfigError: the run's backbone is code and ``backbone`` is not given.
    """
    from .backbones.registry import names_code

    directory = Path(directory)
    spec = directory / "supermodel.yaml"
    if not spec.exists():
        raise FileFormatError(f"{os.fspath(directory)!r} is not an automtl run directory (no supermodel.yaml); run automtl search first")
    cfg = ConvertConfig.from_dict(read_yaml(spec, "run file", exponent_floats=True) or {}, f"run file {os.fspath(spec)!r}")
    if backbone is not None:
        cfg.backbone = backbone
    elif names_code(cfg.backbone):
        code = str(cfg.backbone)[:200]
        raise ConfigError(f"run directory {os.fspath(directory)!r} records its backbone as code ({code!r}), which "
                          f"automtl does not run on a folder's say-so; if you trust that code, pass it yourself: "
                          f"--backbone {shlex.quote(code)} (Python: backbone=...)")
    cfg.weights = None  # the trained weights come from supermodel.pt; a pretrained backbone's input statistics stay
    cfg.search = cfg.search.replace(**{name: SearchConfig.__dataclass_fields__[name].default for name in SESSION_FIELDS})
    state = _read_state(directory / "supermodel.pt")
    if cfg.pretrained and not any(k.endswith("automtl_input_mean") for k in state):
        cfg.pretrained = False  # a run of an automtl that did not standardise a pretrained input trained without it
    sm = _load_state(_build_within(cfg, state, directory / "supermodel.pt"), state, directory / "supermodel.pt")
    pol_path = directory / "policy.yaml"
    return sm, cfg, Policy.load(pol_path) if pol_path.exists() else None


def _build_within(cfg: ConvertConfig, state: dict, path) -> SuperModel:
    """The supermodel ``cfg`` describes, built only as far as ``state`` (its weights file's tensors) can fill it: the
    tasks must be those the weights hold heads and policy logits for (checked before anything is built), and the
    supermodel no larger than the weights (checked after the backbone's capture, before the task copies and heads
    are made). A config is a file too: 64 tasks of 10^6 classes each took 7.5 GB to build before the weights were
    found not to fit."""
    fix = "keep the two files together, or run automtl search again"
    heads = {key.split(".")[1] for key in state if key.startswith("heads.") and key.count(".") >= 2}
    names = [t.name for t in cfg.task_objects()]
    logits = state.get("policy_logits")
    held = logits.shape[1] if isinstance(logits, torch.Tensor) and logits.dim() == 3 else None
    if not heads <= set(names) or held != len(names):  # a head without parameters holds no key
        raise FileFormatError(f"weights file {os.fspath(path)!r} holds heads for {_few(sorted(heads))} and policy "
                              f"logits for {held} task(s), not the {len(names)} its supermodel.yaml describes "
                              f"({_few(names)}); {fix}")
    elements = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    try:
        return build_supermodel(cfg, download=False, max_elements=elements)
    except TooLargeError as exc:
        raise FileFormatError(f"weights file {os.fspath(path)!r} holds {elements} elements, fewer than the at least "
                              f"{exc.least} of the supermodel its supermodel.yaml describes; {fix}") from None


def _few(names: list, most: int = 4) -> str:
    """Up to ``most`` names, quoted (each cut at 60 characters), and how many more."""
    shown = ", ".join(repr(str(n)[:60]) for n in names[:most])
    return (shown + (f" and {len(names) - most} more" if len(names) > most else "")) or "none"


def supermodel_from_state(sm: SuperModel, path) -> SuperModel:
    """``sm`` with the tensors-only state dict at ``path`` loaded (FileFormatError when missing, unreadable or not fitting)."""
    return _load_state(sm, _read_state(path), path)


def _read_state(path) -> dict:
    if not os.path.lexists(path):
        raise FileFormatError(f"weights file {os.fspath(path)!r} is missing; run automtl search again")
    fix = "run automtl search again"
    return state_dict_of(load_tensors(path, "weights file", FileFormatError, fix), f"weights file {os.fspath(path)!r}",
                         FileFormatError, fix)


def _load_state(sm: SuperModel, state: dict, path) -> SuperModel:
    misfit = state_misfits(state, sm.state_dict())
    missing, extra = misfit["missing"], misfit["unexpected"]
    unlike = misfit["reshaped"] + misfit["other_kind"]
    found = (f"it lacks {_few(missing, 2)}" if missing else f"it holds {_few(extra, 2)}, which the supermodel does not have"
             if extra else f"{unlike[0]} (file vs supermodel)" if unlike else "")
    if not found:
        try:
            sm.load_state_dict(state)
            return sm
        except RuntimeError as exc:  # what the key, shape and kind checks cannot see
            found = first_line(exc)[:300]
    raise FileFormatError(f"weights file {os.fspath(path)!r} does not fit its supermodel.yaml ({found}); keep the two "
                          "files together")
