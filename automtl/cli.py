"""The ``automtl`` command line. It parses arguments and calls the Python API; nothing more.

A user mistake (:class:`AutomtlError`) is printed as one sentence with exit code 2;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import json
import sys

import click

from .errors import AutomtlError


class _Group(click.Group):
    """Turns user errors into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AutomtlError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback of errors.")
@click.version_option(package_name="automtl")
@click.pass_context
def main(ctx, debug):
    """automtl: turn a single-task CNN into a compact multi-task model."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backbones(as_json):
    """List the builtin backbones with their parameter and convolution counts.

    Example: automtl backbones
    """
    from .backbones import count_convs, count_parameters, list_backbones

    rows = []
    for spec in list_backbones():
        model = spec.factory()
        rows.append({"name": spec.name, "parameters": count_parameters(model), "convolutions": count_convs(model),
                     "description": spec.description})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<18} {'parameters':>12} {'convs':>6}  description")
    for r in rows:
        click.echo(f"{r['name']:<18} {r['parameters']:>12,} {r['convolutions']:>6}  {r['description']}")


# ---- shared options ---------------------------------------------------------------------------
def _pipeline_options(f):
    """Options shared by convert and search: what to convert, on what data, how to search."""
    opts = [
        click.argument("backbone", required=False),
        click.option("--task", "tasks", multiple=True, metavar="NAME:KIND[:CLASSES]",
                     help="A task, repeatable, e.g. --task seg:segmentation:13 --task depth:depth. "
                          "Default: the data set's own tasks."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE.yaml",
                     help="A config file (backbone, tasks, data, search schedule, budget, device, seed); "
                          "options given on the command line win."),
        click.option("--data", help="synthetic (default), multifashion[:ROOT], nyuv2:ROOT or cityscapes:ROOT."),
        click.option("--weights", type=click.Path(dir_okay=False), help="A state dict for the backbone (e.g. torchvision's)."),
        click.option("--budget", help="Parameter budget as a multiple of one backbone + heads, e.g. 1.5x; 'none' for no limit."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train (default auto)."),
        click.option("--seed", type=int, help="Seed of the whole run (data order, Gumbel noise, initial heads)."),
        click.option("--strategy", metavar="NAME",
                     help="How the policy is searched: conflict (branch where the tasks' gradients conflict, after "
                          "Recon) or gumbel (AutoMTL's Gumbel-softmax search). Default: the config's, else gumbel."),
        click.option("--steps", metavar="WARMUP,SEARCH,FINETUNE", help="Stage lengths in optimizer steps, e.g. 40,80,60."),
        click.option("--input-size", type=int, help="Image side of the synthetic data and of the example input."),
        click.option("--samples", metavar="TRAIN,VAL", help="How many synthetic/MultiFashion samples to train and validate on, e.g. 512,128."),
        click.option("--out", "out", type=click.Path(file_okay=False), default="automtl-out", show_default=True,
                     help="Directory for the results."),
        click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint in --out."),
        click.option("--quiet", is_flag=True, help="No progress bars or messages."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _resolve_config(backbone, tasks, config_path, data, weights, budget, device, seed, steps, input_size, samples,
                    strategy=None):
    from .convert import ConvertConfig, _task_dict

    cfg = ConvertConfig.from_yaml(config_path) if config_path else ConvertConfig()
    if backbone:
        cfg.backbone = backbone
    if tasks:
        cfg.tasks = [_task_dict(t) for t in tasks]
    if data:
        cfg.data = data
    if weights:
        cfg.weights = weights
    if input_size is not None:
        cfg.input_size = input_size
    if samples:
        parts = samples.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            from .errors import ConfigError

            raise ConfigError(f"--samples {samples!r} must be two positive whole numbers TRAIN,VAL, e.g. 512,128")
        cfg.train_samples, cfg.val_samples = int(parts[0]), int(parts[1])
    changes = {}
    if budget is not None:
        changes["budget"] = budget
    if device is not None:
        changes["device"] = device
    if seed is not None:
        changes["seed"] = seed
    if strategy is not None:
        changes["strategy"] = strategy
    if steps:
        parts = steps.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            from .errors import ConfigError

            raise ConfigError(f"--steps {steps!r} must be three whole numbers WARMUP,SEARCH,FINETUNE, e.g. 60,120,120")
        changes.update(warmup_steps=int(parts[0]), search_steps=int(parts[1]), finetune_steps=int(parts[2]))
    if changes:
        cfg.search = cfg.search.replace(**changes)
    return ConvertConfig.from_dict(cfg.to_dict())  # re-validate the merged config


def _say(quiet):
    return (lambda msg: None) if quiet else (lambda msg: click.echo(f"automtl: {msg}", err=True))


# ---- the whole pipeline -------------------------------------------------------------------------
@main.command()
@_pipeline_options
def convert(backbone, tasks, config_path, data, weights, budget, device, seed, strategy, steps, input_size, samples, out, resume, quiet, as_json):
    """Run the whole pipeline on BACKBONE and write the results into --out.

    BACKBONE is a builtin name (see `automtl backbones`), path/to/file.py:Class or
    package.module:factory. Writes model.automtl, model.pt2, policy.yaml, sharing.svg,
    report.json and config.yaml (re-run it with --config).

    Example: automtl convert resnet18 --task segmentation:segmentation:4 --task depth:depth --budget 1.5x --out runs/r18
    """
    from .convert import convert as run_convert

    cfg = _resolve_config(backbone, tasks, config_path, data, weights, budget, device, seed, steps, input_size, samples,
                          strategy)
    report = run_convert(cfg, out, resume=resume, quiet=quiet, log=_say(quiet))
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    elif not quiet:
        _print_summary(report, out)


def _print_summary(report, out):
    acc = report["accounting"]
    click.echo(f"wrote {', '.join(__import__('automtl.convert', fromlist=['OUTPUT_FILES']).OUTPUT_FILES)} into {out}")
    counts = report["policy"]["counts"]
    click.echo(f"policy: {counts['share']} share, {counts['specialize']} specialize, {counts['skip']} skip choices")
    compact_stats = acc["compact"]
    click.echo(f"compact model: {compact_stats['parameters']:,} parameters "
               f"({acc['ratios']['parameters_vs_backbone']:.2f}x one backbone, "
               f"{acc['ratios']['parameters_vs_separate']:.2f}x the single-task models)")
    for task, metrics in report["metrics"].items():
        shown = ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        click.echo(f"  {task}: {shown}")


# ---- the steps one at a time ------------------------------------------------------------------
@main.command("supermodel")
@click.argument("backbone")
@click.option("--task", "tasks", multiple=True, metavar="NAME:KIND[:CLASSES]", help="A task, repeatable (default: the synthetic scenes' three).")
@click.option("--input-size", type=int, default=64, show_default=True, help="Side of the example input.")
@click.option("--feature-node", help="Cut the backbone at this node name or module path, e.g. layer4 (default: the deepest feature map before global pooling and any classifier).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def supermodel_cmd(backbone, tasks, input_size, feature_node, as_json):
    """Build the supermodel of BACKBONE and show its policy layers and parameter counts.

    Example: automtl supermodel mobilenet_v2 --task seg:segmentation:13 --task depth:depth
    """
    from .convert import ConvertConfig, build_supermodel, _task_dict

    cfg = ConvertConfig(backbone=backbone, tasks=[_task_dict(t) for t in tasks] or None, input_size=input_size,
                        feature_node=feature_node)
    sm = build_supermodel(cfg)
    from .capture import count_parameters
    from .policy import Policy

    rows = [{"layer": i.name, "in": list(i.in_shape[1:]), "out": list(i.out_shape[1:]), "parameters": i.unit_params,
             "skip": i.skip_kind} for i in sm.layer_info]
    summary = {
        "backbone": backbone, "tasks": sm.task_names, "policy_layers": len(rows),
        "backbone_parameters": sm.backbone_parameters(),
        "all_share_parameters": sm.policy_parameter_count(Policy.uniform(sm.layer_names, sm.task_names, "share")),
        "all_specialize_parameters": sm.policy_parameter_count(Policy.uniform(sm.layer_names, sm.task_names, "specialize")),
        "supermodel_parameters": count_parameters(sm),
    }
    if as_json:
        click.echo(json.dumps({**summary, "layers": rows}, indent=2))
        return
    click.echo(f"{'layer':<28} {'in (C,H,W)':<16} {'out (C,H,W)':<16} {'params':>10}  skip")
    for r in rows:
        click.echo(f"{r['layer']:<28} {str(tuple(r['in'])):<16} {str(tuple(r['out'])):<16} {r['parameters']:>10,}  {r['skip']}")
    for k, v in summary.items():
        if k.endswith("parameters") or k == "policy_layers":
            click.echo(f"{k.replace('_', ' ')}: {v:,}")


@main.command("search")
@_pipeline_options
def search_cmd(backbone, tasks, config_path, data, weights, budget, device, seed, strategy, steps, input_size, samples, out, resume, quiet, as_json):
    """Search a sharing policy and fine-tune it; keep the run in --out for `automtl compact`.

    Writes supermodel.yaml + supermodel.pt (the trained supermodel), policy.yaml (edit it by
    hand and pass it to `automtl compact --policy`), metrics.json and checkpoints/.

    Example: automtl search resnet18 --steps 60,120,120 --out runs/r18
    """
    from .convert import prepare_out_dir, prepare_run, save_run
    from .fileio import atomic_write_text
    from .search import search

    cfg = _resolve_config(backbone, tasks, config_path, data, weights, budget, device, seed, steps, input_size, samples,
                          strategy)
    out = prepare_out_dir(out)
    sm, train, val = prepare_run(cfg)
    result = search(sm, train, val, cfg.search.replace(out_dir=str(out / "checkpoints"), resume=resume, quiet=quiet))
    save_run(sm, cfg, out, result.policy)
    payload = {"metrics": result.metrics, "policy": result.policy.counts(), "parameters": result.params}
    atomic_write_text(out / "metrics.json", json.dumps(payload, indent=2, default=str) + "\n")
    if as_json:
        click.echo(json.dumps(payload, indent=2, default=str))
    elif not quiet:
        click.echo(f"wrote supermodel.yaml, supermodel.pt, policy.yaml and metrics.json into {out}")


@main.command("compact")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False), help="A policy YAML (default: RUN_DIR/policy.yaml), e.g. one edited by hand.")
@click.option("--finetune-steps", type=int, default=0, show_default=True, help="Fine-tune the policy's architecture this many steps first.")
@click.option("--out", "out", type=click.Path(dir_okay=False), default="model.automtl", show_default=True, help="The .automtl file to write.")
@click.option("--quiet", is_flag=True, help="No progress bars or messages.")
def compact_cmd(run_dir, policy_path, finetune_steps, out, quiet):
    """Compile the supermodel of RUN_DIR (from `automtl search`) under a policy into a compact model.

    Example: automtl compact runs/r18 --policy my-policy.yaml --finetune-steps 100 --out r18.automtl
    """
    from .compact import compact
    from .convert import build_data, load_run
    from .errors import ConfigError
    from .formats import save
    from .policy import Policy
    from .search import search

    sm, cfg, policy = load_run(run_dir)
    if policy_path:
        policy = Policy.load(policy_path)
    if policy is None:
        raise ConfigError(f"run directory {run_dir!r} has no policy.yaml; pass --policy FILE")
    policy.check(sm.layer_names, sm.task_names, sm.skip_legal)
    if finetune_steps > 0:
        train, val = build_data(cfg, sm.tasks)
        search(sm, train, val, cfg.search.replace(finetune_steps=finetune_steps, out_dir=None, quiet=quiet), policy=policy)
    model = compact(sm.eval(), policy)
    save(model, out)
    if not quiet:
        click.echo(f"wrote {out}: {model.num_parameters():,} parameters")


@main.command("export")
@click.argument("model_path", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--batch", type=int, default=2, show_default=True, help="Batch size of the example input (the batch dimension stays dynamic).")
def export_cmd(model_path, out, batch):
    """Export a .automtl model to OUT: .pt2 (torch.export) or .onnx (needs automtl[onnx]).

    Example: automtl export model.automtl model.pt2
    """
    import torch

    from .errors import ConfigError
    from .formats import export, export_onnx, load

    model = load(model_path)
    suffix = out.rsplit(".", 1)[-1].lower() if "." in out else ""
    if suffix == "pt2":
        export(model, out)
    elif suffix == "onnx":
        export_onnx(model, out)
    else:
        raise ConfigError(f"cannot export to {out!r}; name the file .pt2 (torch.export) or .onnx")
    click.echo(f"wrote {out}")


@main.command("render")
@click.argument("source", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
def render_cmd(source, out):
    """Draw the sharing decisions of a .automtl model (graph and grid) or a policy.yaml (grid) to OUT (.svg, .png or .pdf).

    Example: automtl render model.automtl sharing.png
    """
    from .formats import load
    from .policy import Policy
    from .render import render

    obj = Policy.load(source) if source.endswith((".yaml", ".yml")) else load(source)
    path = render(obj, out)
    click.echo(f"wrote {path}")


@main.command("inspect")
@click.argument("model_path", type=click.Path(dir_okay=False))
@click.option("--latency", is_flag=True, help="Also time the model on random inputs (this runs it; the rest is read from the graph's shapes).")
def inspect_cmd(model_path, latency):
    """Print the parameters and multiply-accumulates of a .automtl model, and its policy.

    Counts come from the graph's static shapes: the model is not run unless --latency asks for timings.

    Example: automtl inspect model.automtl
    """
    from .report import inspect_text

    click.echo(inspect_text(model_path, latency=latency))


@main.command("eval")
@click.argument("model_path", type=click.Path(dir_okay=False))
@click.option("--data", default="synthetic", show_default=True, help="synthetic, multifashion[:ROOT], nyuv2:ROOT or cityscapes:ROOT.")
@click.option("--split", default="val", show_default=True, help="Which split to evaluate.")
@click.option("--samples", type=int, help="Use only the first N samples (synthetic: how many to generate).")
@click.option("--input-size", type=int, default=64, show_default=True, help="Image side of the synthetic data.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def eval_cmd(model_path, data, split, samples, input_size, batch_size, as_json):
    """Evaluate a .automtl model on a data set: the metrics of every task.

    Example: automtl eval model.automtl --data synthetic --samples 256
    """
    from .evaluate import evaluate_model
    from .formats import load

    model = load(model_path)
    metrics = evaluate_model(model, data, split=split, samples=samples, input_size=input_size, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    for task, values in metrics.items():
        click.echo(f"{task}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
