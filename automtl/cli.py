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
