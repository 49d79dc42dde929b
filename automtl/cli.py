"""The ``automtl`` command line. It parses arguments and calls the Python API; nothing more.

A user mistake (:class:`AutomtlError`) is printed as one sentence with exit code 2;
``--debug`` shows its traceback as well.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional

import click

from .config import MAX_INPUT_SIZE, MAX_SAMPLES, parse_numbers
from .errors import AutomtlError
from .fileio import STORAGE_ERRNOS


#: OS errors that mean "this machine or this path cannot take the read or write", not a bug: one sentence, exit 2.
_USER_OS_ERRNOS = STORAGE_ERRNOS | {errno.EMFILE, errno.ENFILE, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.ENOENT}
#: Commands that keep a run directory and continue with --resume after an interruption.
_RESUMABLE = ("convert", "search")


class _Path(click.Path):
    """click's Path, without the empty string: ``--out ""`` (an unset shell variable) wrote a run into the current
    folder."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; give a path", param, ctx)
        return super().convert(value, param, ctx)


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit code 2; Ctrl-C into exit 130 and how to resume."""

    def main(self, args=None, *rest, **kwargs):
        self.argv = list(args) if args is not None else sys.argv[1:]  # for the resume hint after Ctrl-C
        self.started = time.time()  # a checkpoint older than this is not this run's
        self.sigint = False
        # Ctrl-C noted as well as raised: a KeyboardInterrupt that library code swallows (one landing in a lazy import
        # inside torch leaves a half-imported module, whose AttributeError comes later) still ends the command as one
        watch = threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if watch:
            signal.signal(signal.SIGINT, self._on_sigint)
        try:
            return super().main(args, *rest, **kwargs)
        finally:
            if watch:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    def _on_sigint(self, signum, frame):
        self.sigint = True
        signal.default_int_handler(signum, frame)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            _interrupted(self, ctx, getattr(self, "argv", sys.argv[1:]), getattr(self, "started", 0.0))
        except Exception as exc:  # MemoryError included
            if getattr(self, "sigint", False):  # the error of an interrupt some library caught: the interrupt
                if ctx.obj and ctx.obj.get("debug"):
                    raise
                _interrupted(self, ctx, getattr(self, "argv", sys.argv[1:]), getattr(self, "started", 0.0))
            message = _user_message(exc)
            if message is None:
                raise
            if ctx.obj and ctx.obj.get("debug"):  # the traceback too, and still the user's mistake's exit code
                traceback.print_exc()
            _fail(message)


def _user_message(exc: Exception) -> Optional[str]:
    """The one sentence for a user's mistake or a machine's limit; None for a bug, which keeps its traceback."""
    if isinstance(exc, click.ClickException):  # a bad option or argument: click's own message, on one line
        return " ".join(exc.format_message().split()).rstrip(".") + "; see --help"
    if isinstance(exc, AutomtlError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _USER_OS_ERRNOS:
        where = f" {exc.filename!r}" if exc.filename else ""
        return f"cannot read or write{where} ({exc.strerror or exc}); free space, fix the permissions or choose another path"
    if isinstance(exc, MemoryError) or _out_of_memory(exc):
        return "ran out of memory; use a smaller --input-size, --batch-size or model, or a machine with more memory"
    return None


def _out_of_memory(exc: Exception) -> bool:
    """torch's allocators out of memory: a GPU's (``torch.OutOfMemoryError``) and the CPU's, whose refusal is a
    plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _fail(message: str) -> None:
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(2)


def _sweep_interrupted(args: list) -> None:
    click.echo(f"interrupted; finished runs are kept, continue the sweep with: {_again(args)}", err=True)
    sys.exit(130)


def _interrupted(group: click.Group, ctx, args: list, started: float) -> None:
    """Ctrl-C: exit 130 with what is left on disk — a checkpoint to continue from, or nothing."""
    args = [str(a) for a in args]
    command = ctx.invoked_subcommand
    if command == "sweep":  # (an interrupt some library swallowed; the sweep's own handler says the same)
        _sweep_interrupted(args)
    if command not in _RESUMABLE:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
    params = group.get_command(ctx, command).make_context(
        command, args[args.index(command) + 1:], resilient_parsing=True).params
    from .rundir import RunDirectory

    run = RunDirectory(params["out"])
    written = run.checkpoint_written()
    # a resumed run continues from any checkpoint; a new run only from one it wrote itself
    resumable = written is not None and (params["resume"] or written >= started)
    if resumable:
        click.echo(f"interrupted; the run is checkpointed, continue it with: {_again(args)}", err=True)
    else:
        kept = "; the earlier run in --out is as it was" if params["overwrite"] and run.earlier_run() else ""
        click.echo(f"interrupted before the first checkpoint, so there is nothing to continue{kept}; "
                   "run the command again", err=True)
    sys.exit(130)


def _again(args: list) -> str:
    """The command line that continues an interrupted run: ``args`` with ``--resume`` (and without
    ``--overwrite``, which would start it over), under ``torchrun`` with as many processes where it ran
    under torchrun (``WORLD_SIZE`` > 1): a checkpoint holds each rank's state and resumes on that many."""
    args = [a for a in args if a != "--overwrite"]
    command = ["automtl"]
    world = _env_int("WORLD_SIZE")
    if world > 1:
        local = _env_int("LOCAL_WORLD_SIZE") or world
        nodes = ["--nnodes", str(world // local)] if world > local else []
        command = ["torchrun", *nodes, "--nproc-per-node", str(local), "-m", "automtl"]
    return shlex.join([*command, *args, *([] if "--resume" in args else ["--resume"])])


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "1"))
    except ValueError:
        return 1


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback of errors.")
@click.version_option(package_name="automtl")
@click.pass_context
def main(ctx, debug):
    """automtl: turn a single-task CNN into a compact multi-task model."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if not debug:  # a warning is one line, like an error (--debug: Python's form, with the source line)
        warnings.showwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {str(message).strip()}", err=True)


@main.command()
@click.option("--source", type=click.Choice(["builtin", "timm", "torchvision"]), default="builtin", show_default=True,
              help="Which backbones to list: automtl's own, or the models timm or torchvision offer (by name only).")
@click.option("--filter", "pattern", metavar="GLOB", help="Only names matching this pattern, e.g. 'resnet*'.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backbones(source, pattern, as_json):
    """List the builtin backbones with their parameter and convolution counts, or timm's or torchvision's models.

    Example: automtl backbones --source timm --filter 'resnet*'
    """
    from .listing import backbone_catalog, format_catalog

    rows = backbone_catalog(source, pattern)
    click.echo(json.dumps(rows, indent=2) if as_json else format_catalog(rows, source))


# ---- shared options ---------------------------------------------------------------------------
def _pipeline_options(f):
    """Options shared by convert and search: what to convert, on what data, how to search."""
    opts = [
        click.argument("backbone", required=False),
        click.option("--task", "tasks", multiple=True, metavar="NAME:KIND[:CLASSES]",
                     help="A task, repeatable, e.g. --task seg:segmentation:13 --task depth:depth. "
                          "Default: the data set's own tasks."),
        click.option("--config", "config_path", type=_Path(dir_okay=False), metavar="FILE.yaml",
                     help="A config file (backbone, tasks, data, search schedule, budget, device, seed); "
                          "options given on the command line win."),
        click.option("--data", help="synthetic (default), multifashion[:ROOT], nyuv2:ROOT or cityscapes:ROOT."),
        click.option("--weights", type=_Path(dir_okay=False), help="A state dict for the backbone (e.g. torchvision's)."),
        click.option("--feature-node", help="Cut the backbone at this node name or module path, e.g. layer4 (default: "
                                            "the deepest feature map before global pooling and any classifier)."),
        click.option("--pretrained", is_flag=True, default=None,
                     help="Download the ImageNet weights of a timm:NAME or torchvision:NAME backbone (needs the internet; else --weights); the backbone then standardises its [0, 1] input with the weights' mean and std."),
        click.option("--budget", help="Parameter budget as a multiple of one backbone + heads, e.g. 1.5x; 'none' for no limit."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train (default auto)."),
        click.option("--seed", type=int, help="Seed of the whole run (data order, Gumbel noise, initial heads)."),
        click.option("--strategy", metavar="NAME",
                     help="How the policy is searched: conflict (branch where the tasks' gradients conflict, after "
                          "Recon) or gumbel (AutoMTL's Gumbel-softmax search). Default: the config's, else conflict."),
        click.option("--weighting", metavar="NAME",
                     help="Loss balancer: equal, static, uncertainty, dwa, gradnorm, rlw, or a gradient-level one from "
                          "torchjd (upgrad, mgda, pcgrad, cagrad, nashmtl, imtlg, alignedmtl, dualproj, graddrop, config, "
                          "fairgrad, gradvac; pip install 'automtl[torchjd]'). Default: the config's, else equal."),
        click.option("--steps", metavar="WARMUP,SEARCH,FINETUNE", help="Stage lengths in optimizer steps, e.g. 40,80,60."),
        click.option("--input-size", type=click.IntRange(8, MAX_INPUT_SIZE), help="Image side of the synthetic data and of the example input."),
        click.option("--samples", metavar="TRAIN,VAL", help="How many samples to train and validate on, e.g. 512,128 (synthetic, MultiFashion: how many to make, 512,128 by default; a data set read from disk: its first ones, all by default)."),
        click.option("--out", "out", type=_Path(file_okay=False), default="automtl-out", show_default=True,
                     help="Directory for the results."),
        click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint in --out."),
        click.option("--overwrite", is_flag=True, help="Start over in an --out that holds an earlier run, replacing its checkpoint, log and results (kept if the new run fails before its first checkpoint)."),
        click.option("--tensorboard", "tensorboard", type=_Path(file_okay=False), metavar="DIR",
                     help="Also write TensorBoard event files into DIR: losses per task, policy probabilities, tau, "
                          "expected size against the budget, validation metrics (pip install 'automtl[tensorboard]')."),
        click.option("--quiet", is_flag=True, help="No progress bars or progress messages (warnings still go to stderr)."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _resolve_config(backbone, tasks, config_path, data, weights, pretrained, budget, device, seed, steps, input_size, samples,
                    strategy=None, tensorboard=None, weighting=None, feature_node=None):
    from .convert import resolve_config

    train_samples, val_samples = parse_numbers("--samples", samples, 2, "TRAIN,VAL, e.g. 512,128", positive=True)
    warmup, search, finetune = parse_numbers("--steps", steps, 3, "WARMUP,SEARCH,FINETUNE, e.g. 60,120,120")
    return resolve_config(config_path, backbone=backbone, tasks=list(tasks), data=data, weights=weights,
                          feature_node=feature_node, pretrained=pretrained, input_size=input_size,
                          train_samples=train_samples, val_samples=val_samples, budget=budget, device=device, seed=seed, strategy=strategy,
                          tensorboard_dir=tensorboard, weighting=weighting, warmup_steps=warmup, search_steps=search,
                          finetune_steps=finetune)


def _echo_json(report) -> None:
    from .convert import json_safe

    click.echo(json.dumps(json_safe(report), indent=2, default=str))


def _say(quiet):
    return (lambda msg: None) if quiet else (lambda msg: click.echo(f"automtl: {msg}", err=True))


# ---- the whole pipeline -------------------------------------------------------------------------
@main.command()
@_pipeline_options
def convert(backbone, tasks, config_path, data, weights, feature_node, pretrained, budget, device, seed, strategy, weighting, steps, input_size, samples, out, resume,
            overwrite, tensorboard, quiet, as_json):
    """Run the whole pipeline on BACKBONE and write the results into --out.

    BACKBONE is a builtin name (see `automtl backbones`), timm:NAME or torchvision:NAME
    (`automtl backbones --source timm`), path/to/file.py:Class or package.module:factory. Writes model.automtl, model.pt2, policy.yaml, sharing.svg,
    report.json and config.yaml (re-run it with --config).

    Example: automtl convert resnet18 --task segmentation:segmentation:4 --task depth:depth --budget 1.5x --out runs/r18
    """
    from .convert import convert as run_convert

    cfg = _resolve_config(backbone, tasks, config_path, data, weights, pretrained, budget, device, seed, steps, input_size, samples,
                          strategy, tensorboard, weighting, feature_node)
    _say_if_nothing_to_resume(out, resume, overwrite)
    report = run_convert(cfg, out, resume=resume, quiet=quiet, log=_say(quiet), overwrite=overwrite)
    if as_json:
        _echo_json(report)
    elif not quiet:
        from .convert import format_summary

        click.echo(format_summary(report, out), nl=False)


# ---- the steps one at a time ------------------------------------------------------------------
@main.command("supermodel")
@click.argument("backbone")
@click.option("--task", "tasks", multiple=True, metavar="NAME:KIND[:CLASSES]", help="A task, repeatable (default: the synthetic scenes' three).")
@click.option("--input-size", type=click.IntRange(8, MAX_INPUT_SIZE), default=64, show_default=True, help="Side of the example input.")
@click.option("--feature-node", help="Cut the backbone at this node name or module path, e.g. layer4 (default: the deepest feature map before global pooling and any classifier).")
@click.option("--pretrained", is_flag=True, help="Download the ImageNet weights of a timm:NAME or torchvision:NAME backbone.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def supermodel_cmd(backbone, tasks, input_size, feature_node, pretrained, as_json):
    """Build the supermodel of BACKBONE and show its policy layers and parameter counts.

    Example: automtl supermodel mobilenet_v2 --task seg:segmentation:13 --task depth:depth
    """
    from .convert import ConvertConfig, build_supermodel
    from .listing import format_supermodel_summary, supermodel_summary

    cfg = ConvertConfig(backbone=backbone, tasks=list(tasks) or None, input_size=input_size,
                        feature_node=feature_node, pretrained=pretrained)
    summary = {"backbone": backbone, **supermodel_summary(build_supermodel(cfg))}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(format_supermodel_summary(summary), nl=False)


def _say_if_nothing_to_resume(out: str, resume: bool, overwrite: bool = False) -> None:
    """--resume where no checkpoint is (a typo in --out, a run stopped before its first one) runs from the start:
    said, not silent (with --overwrite too, or where a live run holds the folder, the command is refused instead:
    nothing to say first)."""
    from .rundir import CHECKPOINTS, in_use
    from .search import CHECKPOINT_NAME

    if resume and not overwrite and not os.path.lexists(os.path.join(out, CHECKPOINTS, CHECKPOINT_NAME)) \
            and not in_use(out):
        warnings.warn(f"--resume: {out!r} holds no checkpoint to continue, so the run starts from the beginning",
                      stacklevel=2)


@main.command("search")
@_pipeline_options
def search_cmd(backbone, tasks, config_path, data, weights, feature_node, pretrained, budget, device, seed, strategy, weighting, steps, input_size, samples, out,
               resume, overwrite, tensorboard, quiet, as_json):
    """Search a sharing policy and fine-tune it; keep the run in --out for `automtl compact`.

    Writes supermodel.yaml + supermodel.pt (the trained supermodel), policy.yaml (edit it by
    hand and pass it to `automtl compact --policy`), metrics.json and checkpoints/.

    Example: automtl search resnet18 --steps 60,120,120 --out runs/r18
    """
    from .runs import RUN_OUTPUT_FILES, search_run

    cfg = _resolve_config(backbone, tasks, config_path, data, weights, pretrained, budget, device, seed, steps, input_size, samples,
                          strategy, tensorboard, weighting, feature_node)
    _say_if_nothing_to_resume(out, resume, overwrite)
    payload = search_run(cfg, out, resume=resume, overwrite=overwrite, quiet=quiet)
    if as_json:
        click.echo(json.dumps(payload, indent=2, default=str))
    elif not quiet:
        click.echo(f"wrote {', '.join(RUN_OUTPUT_FILES)} into {out}")


@main.command("compact")
@click.argument("run_dir", type=_Path(file_okay=False))
@click.option("--policy", "policy_path", type=_Path(dir_okay=False), help="A policy YAML (default: RUN_DIR/policy.yaml), e.g. one edited by hand.")
@click.option("--finetune-steps", type=click.IntRange(min=0), default=0, show_default=True, help="Fine-tune the policy's architecture this many steps first.")
@click.option("--out", "out", type=_Path(dir_okay=False), default="model.automtl", show_default=True,
              help="The model file to write: .automtl, or .pt2 / .onnx (as automtl export writes them).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (a fine-tuned model may be the only copy).")
@click.option("--quiet", is_flag=True, help="No progress bars or progress messages (warnings still go to stderr).")
@click.option("--backbone", "backbone", metavar="SPEC",
              help="The backbone as path/to/file.py:Class or package.module:factory, where RUN_DIR's is code: a run "
                   "folder runs no code it names, so give (and vouch for) it here.")
def compact_cmd(run_dir, policy_path, finetune_steps, out, overwrite, quiet, backbone):
    """Compile the supermodel of RUN_DIR (from `automtl search`) under a policy into a compact model.

    Example: automtl compact runs/r18 --policy my-policy.yaml --finetune-steps 100 --out r18.automtl
    """
    from .formats import writer_for
    from .runs import compact_run

    write = writer_for(out)  # the format follows the suffix; an unknown one is refused before any work
    _refuse_existing(out, overwrite)
    model = compact_run(run_dir, policy=policy_path, finetune_steps=finetune_steps, out=None, quiet=quiet, backbone=backbone)
    _refuse_existing(out, overwrite)  # again: another command may have written it during the fine-tune
    write(model, out)
    if not quiet:
        click.echo(f"wrote {out}: {model.num_parameters():,} parameters")


@main.command("export")
@click.argument("model_path", type=_Path(dir_okay=False))
@click.argument("out", type=_Path(dir_okay=False))
@click.option("--batch", type=click.IntRange(1, 1024), default=2, show_default=True, help="Batch size of the example input (the batch dimension stays dynamic).")
@click.option("--input-size", "input_size", metavar="SIDE|H,W",
              help="Height and width in pixels a .pt2 or .onnx takes (it takes no other); default the model's input shape.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export_cmd(model_path, out, batch, input_size, overwrite):
    """Export a .automtl model to OUT: .pt2 (torch.export), .onnx (needs automtl[onnx]) or another .automtl.

    A .pt2 or .onnx takes any batch size at one height and width: the model's input shape, or --input-size.

    Example: automtl export model.automtl model.pt2 --input-size 480,640
    """
    from .formats import check_input_size, load, write, writer_for

    writer_for(out)  # an unknown suffix is refused before the model is read
    size = _input_size(input_size)
    check_input_size(out, size)
    _refuse_existing(out, overwrite)
    model = load(model_path)
    _refuse_existing(out, overwrite)  # again: another command may have written it meanwhile
    write(model, out, batch=batch, input_size=size)
    click.echo(f"wrote {out}")


def _input_size(text: Optional[str]) -> Optional[tuple]:
    """``--input-size`` of ``export``: "SIDE" or "H,W", whole numbers from 1 to MAX_INPUT_SIZE pixels."""
    from .errors import ConfigError

    if text is None:
        return None
    parts = text.split(",")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and 1 <= int(p) <= MAX_INPUT_SIZE for p in parts):
        raise ConfigError(f"--input-size {text!r} must be one side or a height,width in whole pixels from 1 to "
                          f"{MAX_INPUT_SIZE}, like 64 or 480,640")
    return (int(parts[0]), int(parts[-1]))


def _refuse_existing(out: str, overwrite: bool) -> None:
    """A command's output file is never replaced unasked (it may be the only copy of something)."""
    from .errors import ConfigError

    if os.path.lexists(out) and not overwrite:
        raise ConfigError(f"{out!r} already exists; replace it with --overwrite or choose another output path")


@main.command("render")
@click.argument("source", type=_Path(dir_okay=False))
@click.argument("out", type=_Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def render_cmd(source, out, overwrite):
    """Draw the sharing decisions of a .automtl model (graph and grid) or a policy.yaml (grid) to OUT (.svg, .png or .pdf).

    Example: automtl render model.automtl sharing.png
    """
    from .formats import load
    from .policy import Policy
    from .render import drawing_format, render

    drawing_format(out)  # a suffix that is no drawing format is refused before the model is read
    _refuse_existing(out, overwrite)
    obj = Policy.load(source) if source.endswith((".yaml", ".yml")) else load(source)
    _refuse_existing(out, overwrite)
    path = render(obj, out)
    click.echo(f"wrote {path}")


@main.command("inspect")
@click.argument("model_path", type=_Path(dir_okay=False))
@click.option("--latency", is_flag=True, help="Also time the model on random inputs (this runs it; the rest is read from the graph's shapes).")
def inspect_cmd(model_path, latency):
    """Print the parameters and multiply-accumulates of a .automtl model, and its policy.

    Counts come from the graph's static shapes: the model is not run unless --latency asks for timings.

    Example: automtl inspect model.automtl
    """
    from .report import inspect_text

    click.echo(inspect_text(model_path, latency=latency))


@main.command("eval")
@click.argument("model_path", type=_Path(dir_okay=False))
@click.option("--data", default="synthetic", show_default=True, help="synthetic, multifashion[:ROOT], nyuv2:ROOT or cityscapes:ROOT.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="val", show_default=True, help="Which split to evaluate.")
@click.option("--samples", type=click.IntRange(min=1, max=MAX_SAMPLES), help="Use only the first N samples (synthetic: how many to generate).")
@click.option("--input-size", type=click.IntRange(8, MAX_INPUT_SIZE),
              help="Image side of the synthetic data. Default: the side of the input the model was converted at "
                   "(its recorded input shape, where square), else 64.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=16, show_default=True, help="Samples per evaluation batch.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def eval_cmd(model_path, data, split, samples, input_size, batch_size, as_json):
    """Evaluate a .automtl model on a data set: the metrics of every task.

    Example: automtl eval model.automtl --data synthetic --samples 256
    """
    from .evaluation import evaluate_model, format_metrics
    from .formats import load

    model = load(model_path)
    metrics = evaluate_model(model, data, split=split, samples=samples, input_size=input_size, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
    else:
        click.echo(format_metrics(metrics), nl=False)


@main.command("plot")
@click.argument("run_dir", type=_Path(exists=True))
@click.option("--out", "out", type=_Path(file_okay=False), help="Directory for the PNGs (default: RUN_DIR/plots).")
def plot_cmd(run_dir, out):
    """Draw a run's loss curves, validation metrics and policy probabilities as PNGs (needs automtl[plot]).

    RUN_DIR is the --out of `automtl convert` or `automtl search` (it reads checkpoints/log.jsonl).

    Example: automtl plot runs/r18
    """
    from .plot import plot_run

    for path in plot_run(run_dir, out):
        click.echo(f"wrote {path}")


# ---- the budget sweep -----------------------------------------------------------------------------
@main.command("sweep")
@_pipeline_options
@click.option("--budgets", required=True, metavar="B1,B2,...",
              help="The budgets to convert at, separated by commas, e.g. 1.0x,1.5x,2.0x (one full convert each).")
def sweep_cmd(backbone, tasks, config_path, data, weights, feature_node, pretrained, budget, device, seed, strategy, weighting, steps, input_size,
              samples, out, resume, overwrite, tensorboard, quiet, as_json, budgets):
    """Convert BACKBONE once per budget and set the models beside hard sharing and single-task models.

    The baselines are trained for the same compute as one convert run. Writes one convert run per
    budget (budget-1.5x/ ...), hard-sharing/, single-TASK/, sweep.json (parameters, MACs, latency,
    metrics and Δ_MTL of every model, Pareto marks) and sweep.png (Δ_MTL against parameters and
    against latency; needs automtl[plot]) into --out. --resume keeps the finished runs.

    Example: automtl sweep resnet18 --budgets 1.0x,1.5x,2.0x --out runs/sweep
    """
    from .errors import ConfigError
    from .plot import plot_sweep
    from .sweep import format_sweep, parse_budgets, sweep

    if budget is not None:
        raise ConfigError("automtl sweep takes its budgets from --budgets; leave out --budget")
    parse_budgets(budgets)  # a bad list fails before the config is read
    cfg = _resolve_config(backbone, tasks, config_path, data, weights, pretrained, None, device, seed, steps, input_size, samples,
                          strategy, tensorboard, weighting, feature_node)
    try:
        result = sweep(cfg, budgets, out, resume=resume, overwrite=overwrite, quiet=quiet, log=_say(quiet), plot=False)
    except KeyboardInterrupt as exc:
        argv = getattr(click.get_current_context().find_root().command, "argv", sys.argv[1:])
        if getattr(exc, "earlier_kept", False):  # SweepInterrupted: an --overwrite stopped before it changed a run
            click.echo("interrupted before any run changed, so the earlier sweep is as it was; run the command again",
                       err=True)
            sys.exit(130)
        _sweep_interrupted(argv)
    if as_json:
        _echo_json(result)
    elif not quiet:
        click.echo(format_sweep(result), nl=False)
    plot_sweep(result, Path(out) / "sweep.png")
    if not quiet and not as_json:
        click.echo(f"wrote sweep.json and sweep.png into {out}")
