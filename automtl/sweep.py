"""A budget sweep: one conversion per budget, beside hard sharing and single-task models at equal compute.

``automtl sweep BACKBONE --budgets 1.0x,1.5x,2.0x`` (:func:`sweep`) lays out ``--out`` as::

    budget-1.0x/ ...        one automtl convert run per budget (model.automtl, report.json, ...)
    hard-sharing/           the all-share policy trained from the same seed (model.automtl, metrics.json)
    single-<task>/          one single-task model per task (model.automtl, metrics.json)
    sweep.json              one row per model: size, MACs, latency, metrics, Δ_MTL, Pareto marks
    sweep.png               Δ_MTL against parameters and against latency, Pareto front marked

**Equal compute.** One convert run costs C backbone forward+backward equivalents (FBE,
:func:`automtl.protocol.run_cost`: its warm-up, search and fine-tune steps times the measured cost
of a step of its strategy; the fine-tune counted in hard-sharing steps of compute, ``finetune_unit:
compute``, so a branched architecture trains fewer steps). Hard sharing and every single-task model are trained for round(C)
optimizer steps of the fine-tune stage (1 FBE each for hard sharing; the T single-task models get
T x C in all, a generous reference, as in ``benchmarks/quality.py``); hard sharing's learning rate is
constant and then annealed over the same last part of C as the convert runs' fine-tune (the same
schedule shape), the single-task models' over all of C. Every model is evaluated on
the same validation split with the same metrics and measured in the same process.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .convert import ConvertConfig, json_safe
from .errors import AutomtlError, ConfigError, FileFormatError
from .fileio import atomic_write_text, read_json

__all__ = ["sweep", "parse_budgets", "pareto_front", "format_sweep"]

SWEEP_FILES = ("sweep.json", "sweep.png")
#: Marks an --overwrite under way (with its configuration's fingerprint), so that a --resume after Ctrl-C goes on.
OVERWRITING = ".automtl-sweep-overwriting.json"
#: Search fields that do not change a member run's numbers: a resumed sweep may differ in them.
_FREE = {"out_dir", "log_dir", "tensorboard_dir", "log_every", "checkpoint_every", "resume", "quiet", "device",
         "val_every", "val_batches"}


def parse_budgets(budgets: Union[str, Sequence[str]]) -> list[tuple[str, float]]:
    """``"1.0x,1.5x,2.0x"`` (or a list of such strings) as ``[(label, multiple), ...]`` in the given order.

    The label is the budget as written, with an ``x`` added when missing (it names ``budget-LABEL/``).

    Raises:
        ConfigError: the list is empty, a budget is not a positive multiple, or two budgets are equal.
    """
    from .config import parse_budget

    items = budgets.split(",") if isinstance(budgets, str) else list(budgets)
    items = [str(b).strip() for b in items]
    if not items or not all(items):
        raise ConfigError(f"--budgets {budgets!r} must list budgets separated by commas, e.g. 1.0x,1.5x,2.0x")
    out: list[tuple[str, float]] = []
    for item in items:
        try:
            mult = parse_budget(item)
        except ConfigError as exc:
            raise ConfigError(f"--budgets {budgets!r}: {exc}") from None
        if mult is None or not math.isfinite(mult):
            raise ConfigError(f"--budgets {budgets!r}: {item!r} is no limit; a sweep compares finite budgets such as 1.5x")
        if any(mult == m for _, m in out):
            raise ConfigError(f"--budgets {budgets!r} repeats the budget {item!r}; give each budget once")
        out.append((item if item.lower().endswith("x") else f"{item}x", mult))
    return out


def pareto_front(points: Sequence[tuple[Optional[float], Optional[float]]]) -> list[bool]:
    """Which ``(cost, score)`` points are on the Pareto front (lower cost and higher score are better).

    A point is on the front when no other point has a cost as low and a score as high, one of them
    strictly; equal points are all on it. A point with a missing or non-finite value is never on
    the front and hides no other point. Returns one bool per point, in order.
    """
    ok = [c is not None and s is not None and math.isfinite(c) and math.isfinite(s) for c, s in points]
    marks = []
    for i, (c, s) in enumerate(points):
        marks.append(ok[i] and not any(
            ok[j] and points[j][0] <= c and points[j][1] >= s and (points[j][0] < c or points[j][1] > s)
            for j in range(len(points))))
    return marks


def sweep(cfg: ConvertConfig, budgets: Union[str, Sequence[str]], out: Union[str, os.PathLike], *,
          resume: bool = False, overwrite: bool = False, quiet: bool = False,
          log: Callable[[str], None] = lambda msg: None, batch: int = 8, repeats: int = 10, plot: bool = True) -> dict:
    """Convert ``cfg`` once per budget into ``out/budget-LABEL/``, train the equal-compute baselines,
    measure every model and write ``out/sweep.json`` (and ``out/sweep.png`` with ``plot=True``).

    Returns the content of ``sweep.json``: ``rows`` (one per model: ``name``, ``kind`` automtl |
    hard-sharing | single-task, ``budget`` label or None, ``params`` (count), ``params_vs_hard_sharing``
    (None where hard sharing has no parameters), ``macs`` (per sample), ``latency_ms`` (median of
    ``repeats`` CPU runs of a batch of ``batch`` images, every model timed in the same rounds; the
    single-task row is its T models one after another), ``metrics`` {task: {metric: value}}, ``delta_mtl`` (%, against the single-task row;
    None where a baseline metric is 0), ``train_fbe``, ``pareto_params`` and ``pareto_latency``), and
    the protocol (``compute``, ``latency``, ``delta_metrics``: the metrics Δ_MTL averages per task).

    ``out`` is locked while the sweep runs; one that holds an earlier sweep is refused unless
    ``resume`` (keep the finished runs, continue the rest from their checkpoints) or ``overwrite``
    (replace each run as the new sweep reaches it; a sweep that fails before it changed any run leaves
    the earlier one as it was, its summary included).

    Raises:
        ConfigError: a bad budget list, a budget no policy can reach, or a strategy without a
            measured step cost; a resumed run whose configuration differs from this one.
        AutomtlError: ``out`` busy or holding a sweep; matplotlib missing for the PNG (after
            ``sweep.json`` was written; ``pip install 'automtl[plot]'``).
        StorageError: the disk filled up or became unwritable.

    Example:
        >>> cfg = ConvertConfig(backbone="tiny", input_size=16, train_samples=16, val_samples=8)  # doctest: +SKIP
        >>> sweep(cfg, "1.0x,1.5x", "runs/sweep")["rows"][0]["name"]  # doctest: +SKIP
        'conflict@1.0x'
    """
    from .rundir import RunDirectory

    parsed = parse_budgets(budgets)
    cfg.validate()  # before the sweep's folder exists
    with RunDirectory(out, resume=resume, overwrite=overwrite) as run:
        aside = None
        try:
            aside = _claim(run.path, cfg, resume, overwrite)
            result = _Sweep(cfg, run.path, resume, overwrite, quiet, log).run(parsed, batch, repeats)
            text = json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n"
            atomic_write_text(run.path / "sweep.json", text)
        except KeyboardInterrupt:
            raise SweepInterrupted(aside is not None and aside.settle()) from None
        except BaseException:
            if aside is not None:
                aside.settle()
            raise
        (run.path / OVERWRITING).unlink(missing_ok=True)
        if aside is not None:
            aside.drop()
        if plot:
            from .plot import plot_sweep

            plot_sweep(result, run.path / "sweep.png")
    return result


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep. ``earlier_kept``: an ``--overwrite`` stopped before it changed any run, so the
    earlier sweep is back as it was (there is nothing of the new one to resume)."""

    def __init__(self, earlier_kept: bool):
        super().__init__()
        self.earlier_kept = earlier_kept


def _claim(path: Path, cfg: ConvertConfig, resume: bool, overwrite: bool) -> Optional["_SetAside"]:
    """Refuse a folder that holds an earlier sweep unless resumed or overwritten. On overwrite, set the earlier
    sweep's summary aside (returned) and mark the overwrite as under way. What a killed overwrite left set aside
    is settled first."""
    from .rundir import _own_folder

    linked = next((d for d in sorted(path.iterdir()) if d.is_symlink() and d.is_dir()), None) if path.is_dir() else None
    if linked is not None:  # a member run (or anything the sweep reads as one) would be run in the link's target
        raise AutomtlError(f"output directory {os.fspath(path)!r} holds {linked.name!r} as a link to a folder, where a "
                           "sweep keeps its runs; remove the link or choose another --out")
    for folder in sorted(path.glob(_SetAside.PREFIX + "*")):
        if _own_folder(folder):  # not a link to another folder, whose files would be moved out of it
            _SetAside(path, folder).settle()
    earlier = [n for n in SWEEP_FILES if (path / n).exists()]
    earlier += [d.name for d in _member_dirs(path) if _has_run(d)]
    if earlier and not (resume or overwrite):
        raise AutomtlError(
            f"output directory {os.fspath(path)!r} already holds a sweep ({', '.join(earlier[:3])}); continue it with "
            "--resume (finished runs are kept), start over with --overwrite (which replaces its runs), or choose another --out")
    return _SetAside.create(path, _fingerprint(cfg)) if overwrite and earlier else None


def _member_dirs(path: Path) -> list:
    return sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def _mark_overwriting(path: Path, fingerprint: dict, started: list) -> None:
    """Write the marker of an --overwrite under way: its configuration and the member runs it has started."""
    atomic_write_text(path / OVERWRITING, json.dumps({"config": fingerprint, "started": started}) + "\n")


def _overwriting(path: Path, cfg: ConvertConfig) -> Optional[list]:
    """The member runs an --overwrite of this very sweep had started when it stopped, None when there is none
    under way: --resume continues those and replaces the earlier sweep's others, whatever their options."""
    try:
        marker = read_json(path / OVERWRITING, "sweep marker", ConfigError, "")
        return list(marker["started"]) if marker["config"] == _fingerprint(cfg) else None
    except (ConfigError, KeyError, TypeError):  # none under way, or not one automtl wrote: nothing to continue
        return None


class _SetAside:
    """An overwritten sweep's summary (``sweep.json``, ``sweep.png``) and any earlier overwrite's marker, kept in
    a hidden folder while the new sweep runs, with a record of its member runs' files (sizes and modification
    times). Dropped when the new sweep has written its own summary; put back, in place of the new marker, when the
    new sweep failed with every member run as it was (each member run puts its own earlier run back when it fails
    before its first checkpoint): only then does it still describe the folder."""

    PREFIX = ".automtl-sweep-replaced-"
    RECORD = "members.json"
    KEPT = (*SWEEP_FILES, OVERWRITING)

    def __init__(self, path: Path, folder: Path):
        self.path, self.folder = path, folder

    @classmethod
    def create(cls, path: Path, fingerprint: dict) -> "_SetAside":
        import shutil
        import tempfile

        aside, ours = cls(path, Path(tempfile.mkdtemp(prefix=cls.PREFIX, dir=path))), False
        try:
            atomic_write_text(aside.folder / cls.RECORD, json.dumps(aside._members()))
            for name in cls.KEPT:
                if (path / name).exists():
                    shutil.move(path / name, aside.folder / name)
            ours = True  # from here on the marker in ``path`` is this overwrite's
            _mark_overwriting(path, fingerprint, [])
        except BaseException:  # nothing half set aside
            aside._put_back(ours)
            aside.drop()
            raise
        return aside

    def _members(self) -> dict:
        from .rundir import RUN_PATHS

        found = {}
        for member in _member_dirs(self.path):
            for rel in RUN_PATHS:
                if (member / rel).is_file():
                    st = (member / rel).stat()
                    found[f"{member.name}/{rel.as_posix()}"] = [st.st_size, st.st_mtime_ns]
        return found

    def _put_back(self, ours: bool = True) -> None:
        """Move the earlier files back; ``ours``: the marker in the folder is the new overwrite's, to go."""
        if ours and not (self.folder / OVERWRITING).exists():
            (self.path / OVERWRITING).unlink(missing_ok=True)  # there was none before this overwrite
        for name in self.KEPT:
            if (self.folder / name).exists():
                os.replace(self.folder / name, self.path / name)

    def settle(self) -> bool:
        """The new sweep failed (or was killed): put the earlier files back if the member runs are as recorded
        (after each has settled what a killed run of its own left set aside). Returns whether it did."""
        from .rundir import REPLACED_PREFIX, RunDirectory

        try:
            for member in _member_dirs(self.path):
                if any(member.glob(REPLACED_PREFIX + "*")):
                    with RunDirectory(member, resume=True):
                        pass  # entering settles it, under the member's lock
            unchanged = read_json(self.folder / self.RECORD, "sweep record", ConfigError, "") == self._members()
            if unchanged:
                self._put_back()
        except (OSError, ValueError, AutomtlError):
            unchanged = False  # settling must not hide the error that brought it here
        self.drop()
        return unchanged

    def drop(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _fingerprint(cfg: ConvertConfig) -> dict:
    """What decides a member run's numbers: the config less the fields a resume may change."""
    data = json.loads(json.dumps(cfg.to_dict(), default=str))
    data["search"] = {k: v for k, v in data["search"].items() if k not in _FREE}
    data.pop("weights", None)  # convert's report keeps the path; the tensors are what counted
    return data


def _finished(member: Path, marker: str, cfg: ConvertConfig, key: str = "config") -> Optional[dict]:
    """The marker file's content when ``member`` finished under ``cfg``, None when it did not finish.

    Raises ConfigError when it finished under another configuration."""
    path = member / marker
    if not (path.is_file() and (member / "model.automtl").is_file()):
        return None
    fix = "start the sweep over with --overwrite"
    data = read_json(path, "sweep member file", ConfigError, fix)
    policy = data.get("policy") if marker == "report.json" and isinstance(data, dict) else {"counts": {}}
    counts = policy.get("counts") if isinstance(policy, dict) else None
    if not (isinstance(data, dict) and isinstance(data.get(key), dict) and isinstance(counts, dict)
            and all(isinstance(n, int) and not isinstance(n, bool) for n in counts.values())):
        raise ConfigError(f"sweep member file {os.fspath(path)!r} is not the {marker} automtl writes (it lacks its "
                          f"{key!r} mapping or its policy counts); {fix}")
    if _fingerprint(ConvertConfig.from_dict(data[key])) != _fingerprint(cfg):
        raise ConfigError(f"{os.fspath(member)!r} was run with another configuration than this sweep's; "
                          "run the sweep with the same options, or start over with --overwrite")
    return data


def _has_run(member: Path) -> bool:
    from .rundir import RunDirectory

    return member.is_dir() and bool(RunDirectory(member).earlier_run())


class _Sweep:
    """The member runs of one sweep and their measurement (one object: the options are shared)."""

    def __init__(self, cfg: ConvertConfig, path: Path, resume: bool, overwrite: bool, quiet: bool, log):
        self.cfg, self.path, self.resume, self.overwrite, self.quiet, self.log = cfg, path, resume, overwrite, quiet, log
        # an --overwrite (new, or stopped and now resumed) records each member run it starts in its marker
        self.started = [] if overwrite else _overwriting(path, cfg) if resume else None

    def _start(self, member: Path, marker: str, cfg: ConvertConfig) -> tuple:
        """(what the member run finished with or None, resume, overwrite) for one member run."""
        if self.started is not None and member.name not in self.started:
            # an --overwrite has not reached it: the earlier sweep's run, replaced whatever its options
            self.started.append(member.name)
            _mark_overwriting(self.path, _fingerprint(self.cfg), self.started)
            return None, False, self.overwrite or _has_run(member)
        if not self.resume:
            return None, False, self.overwrite
        return _finished(member, marker, cfg), True, False

    def member_cfg(self, name: str, **search_changes) -> ConvertConfig:
        tb = self.cfg.search.tensorboard_dir
        if tb is not None:
            search_changes["tensorboard_dir"] = os.path.join(tb, name)
        return dataclasses.replace(self.cfg, search=self.cfg.search.replace(**search_changes))

    def run(self, budgets: list[tuple[str, float]], batch: int, repeats: int) -> dict:
        from .protocol import STEP_COST, finetune_share, run_cost, step_cost

        s = self.cfg.search
        if s.strategy not in STEP_COST:
            raise ConfigError(f"strategy {s.strategy!r} has no measured step cost, so its baselines cannot get equal "
                              f"compute; sweep with --strategy {' or '.join(STEP_COST)}")
        tasks, val = self._check(budgets)
        ntasks = len(tasks)
        fbe = run_cost(s.strategy, s.warmup_steps, s.search_steps, s.finetune_steps, ntasks, s.conflict_every)
        steps = max(1, round(fbe))
        members = [self._convert(label, k, len(budgets), fbe) for k, (label, _) in enumerate(budgets)]
        # hard sharing anneals over the same last part of the compute as a convert run's fine-tune (the same
        # schedule shape); the single-task references anneal over all of it
        decay = finetune_share(s.strategy, s.warmup_steps, s.search_steps, s.finetune_steps, ntasks, s.conflict_every)
        members.append(self._baseline("hard-sharing", None, steps, decay=decay))
        singles = [self._baseline(f"single-{t['name']}", t, steps) for t in tasks]
        self.log(f"measuring {len(members) + len(singles)} models on the same validation split")
        shape = (batch, 3, self.cfg.input_size, self.cfg.input_size)
        rows, reference = _measure_rows(self.path, members, singles, val, shape, repeats, {t["name"]: t["kind"] for t in tasks},
                             s.batch_size)
        return {"backbone": self.cfg.backbone, "data": self.cfg.data, "tasks": tasks, "strategy": s.strategy,
                "budgets": [label for label, _ in budgets], "rows": rows, "config": self.cfg.to_dict(),
                "compute": {"unit": "backbone forward+backward equivalents (FBE)", "fbe_per_run": round(fbe, 2),
                            "baseline_steps": steps, "step_cost": step_cost(s.strategy, ntasks, s.conflict_every)},
                "delta_metrics": {task: list(names) for task, names in reference.items()},
                "latency": {"batch": batch, "input_size": self.cfg.input_size, "repeats": repeats, "device": "cpu",
                            "statistic": "median"}}

    def _check(self, budgets):
        """Every budget reachable, before anything trains; the tasks and the shared validation split."""
        from .convert import build_data, build_supermodel
        from .cost import check_budget

        sm = build_supermodel(self.cfg)
        for label, _ in budgets:
            try:
                check_budget(sm, self.cfg.search.replace(budget=label))
            except ConfigError as exc:
                raise ConfigError(f"--budgets: {str(exc).rsplit('; ', 1)[0]}; raise it in --budgets") from None
        _, val = build_data(self.cfg, sm.tasks)
        tasks = self.cfg.tasks or [t.describe() for t in self.cfg.task_objects()]
        return [dict(t) for t in tasks], val

    def _convert(self, label: str, k: int, n: int, fbe: float) -> dict:
        from .convert import convert

        member = self.path / f"budget-{label}"
        # equal compute: a branched architecture fine-tunes fewer steps (finetune_unit: compute)
        cfg = self.member_cfg(f"budget-{label}", budget=label, finetune_unit="compute")
        report, resume, overwrite = self._start(member, "report.json", cfg)
        if report is None:
            self.log(f"budget {label} ({k + 1}/{n}): converting into {os.fspath(member)}")
            report = convert(cfg, member, resume=resume, quiet=self.quiet, overwrite=overwrite)
        else:
            self.log(f"budget {label}: finished earlier, kept")
        return {"name": f"{cfg.search.strategy}@{label}", "kind": "automtl", "budget": label, "dirs": [member.name],
                "policy": report["policy"]["counts"], "train_fbe": round(fbe, 2)}

    def _baseline(self, name: str, task: Optional[dict], steps: int, decay: float = 1.0) -> dict:
        """Train the all-share policy (on every task, or on ``task`` alone) for ``steps`` fine-tune steps, the
        learning rate annealed over their last ``decay`` fraction."""
        from .compact import compact
        from .convert import prepare_run
        from .formats import save
        from .policy import Policy
        from .rundir import RunDirectory
        from .search import search

        member = self.path / name
        cfg = self.member_cfg(name, budget=None, finetune_decay_fraction=decay)
        if task is not None:
            cfg = dataclasses.replace(cfg, tasks=[task])
        row = {"name": name, "kind": "single-task" if task else "hard-sharing", "budget": None, "dirs": [member.name],
               "train_fbe": steps}
        done, resume, overwrite = self._start(member, "metrics.json", cfg)
        if done is not None:
            self.log(f"{name}: finished earlier, kept")
            return row
        self.log(f"{name}: training the all-share policy for {steps} steps (equal compute) in {os.fspath(member)}")
        with RunDirectory(member, resume=resume, overwrite=overwrite) as run:
            sm, train, val = prepare_run(cfg)
            policy = Policy.uniform(sm.layer_names, sm.task_names, "share")
            search(sm, train, val, cfg.search.replace(warmup_steps=0, search_steps=0, finetune_steps=steps,
                                                      out_dir=str(run.path / "checkpoints"), resume=resume,
                                                      quiet=self.quiet), policy=policy)
            save(compact(sm, policy).eval(), run.path / "model.automtl")
            atomic_write_text(run.path / "metrics.json", json.dumps({"config": cfg.to_dict(), "steps": steps},
                                                                    indent=2, default=str) + "\n")
        return row


def _measure_rows(path: Path, members: list, singles: list, val, shape: tuple, repeats: int, kinds: dict,
                  batch_size: int) -> tuple[list[dict], dict]:
    """Metrics, size and latency of every member; the single-task members joined into one row; Δ_MTL against
    that row; each row's place on the two Pareto fronts (parameters and latency against Δ_MTL). Returns the
    rows and the reference: the single-task metrics that enter Δ_MTL."""
    from .protocol import delta_metrics, delta_or_none

    names = list(kinds)
    expected = [names] * len(members) + [[n] for n in names]  # the singles in the tasks' order
    measured = _measure(path, members + singles, expected, val, shape, repeats, batch_size)
    rows, parts = measured[:len(members)], measured[len(members):]
    single = {"name": "single-task", "kind": "single-task", "budget": None, "dirs": [p["dirs"][0] for p in parts],
              "train_fbe": sum(p["train_fbe"] for p in parts),
              "params": sum(p["params"] for p in parts), "macs": sum(p["macs"] for p in parts),
              "latency_ms": sum(p["latency_ms"] for p in parts),
              "metrics": {t: v for p in parts for t, v in p["metrics"].items()},
              "members": [{k: p[k] for k in ("name", "params", "macs", "latency_ms")} for p in parts]}
    rows.append(single)
    reference = delta_metrics(single["metrics"], kinds)
    hard = next(r for r in rows if r["kind"] == "hard-sharing")
    for r in rows:
        r["delta_mtl"] = delta_or_none(delta_metrics(r["metrics"], kinds), reference)
        r["params_vs_hard_sharing"] = round(r["params"] / hard["params"], 4) if hard["params"] else None
    for cost in ("params", "latency"):
        key = "latency_ms" if cost == "latency" else cost
        marks = pareto_front([(r[key], r["delta_mtl"]) for r in rows])
        for r, mark in zip(rows, marks):
            r[f"pareto_{cost}"] = mark
    return rows, reference


def _measure(path: Path, members: list, expected: list, val, shape: tuple, repeats: int, batch_size: int) -> list[dict]:
    """Each member with its validation metrics, parameters, MACs per sample and median latency (ms per batch
    of ``shape``; all models timed in the same rounds, :func:`automtl.report.interleaved_latency`).

    Raises:
        FileFormatError: a member's model is not for the tasks ``expected`` of it (a folder kept from another sweep
            or handed over; its model is data).
    """
    from .formats import load
    from .report import interleaved_latency, model_stats
    from .search import evaluate

    models = []
    for m, tasks in zip(members, expected):
        file = path / m["dirs"][0] / "model.automtl"
        model = load(file)
        if list(model.task_names) != list(tasks):
            raise FileFormatError(f"{os.fspath(file)!r} is a model for the tasks {list(model.task_names)[:8]}, not "
                                  f"{list(tasks)[:8]} as this sweep's {m['name']!r}; remove the folder "
                                  f"{os.fspath(file.parent)!r} to train it again")
        models.append(model)
    timings = interleaved_latency(models, shape, repeats=repeats)
    out = []
    for m, model, timing in zip(members, models, timings):
        metrics, _ = evaluate(model, val, batch_size=batch_size)
        stats = model_stats(model, shape, latency=False)
        out.append({**m, "params": stats["parameters"], "macs": stats["macs"], "latency_ms": timing["latency_s"] * 1e3,
                    "metrics": metrics})
    return out


def format_sweep(result: dict) -> str:
    """A plain-text table of ``sweep.json``: one line per model, ``*`` on the Pareto fronts."""
    header = ("model", "params", "MACs", "latency", "Δ_MTL", "front")
    lines = []
    for r in result["rows"]:
        front = "/".join(k for k, key in (("params", "pareto_params"), ("latency", "pareto_latency")) if r.get(key))
        delta = "n/a" if r["delta_mtl"] is None else f"{r['delta_mtl']:+.2f} %"
        lines.append((r["name"], f"{r['params'] / 1e6:.2f} M", f"{r['macs'] / 1e6:.1f} M",
                      f"{r['latency_ms']:.1f} ms", delta, front or "-"))
    widths = [max(len(x[i]) for x in lines + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lat = result["latency"]
    head = (f"{result['backbone']} on {result['data']}: latency per batch of {lat['batch']} at "
            f"{lat['input_size']} px (CPU, median of {lat['repeats']}); Δ_MTL against the single-task models")
    return "\n".join([head, fmt.format(*header)] + [fmt.format(*x) for x in lines]) + "\n"
