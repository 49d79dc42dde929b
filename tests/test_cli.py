"""The command line as a user drives it: every command, and every bad input as one clear sentence, exit 2."""
import re
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import automtl
import torch
from click.testing import CliRunner

from automtl.cli import main
from automtl.convert import OUTPUT_FILES

SMALL = ["--steps", "2,3,2", "--samples", "16,8", "--input-size", "32", "--quiet"]


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("convert")
    run("convert", "tiny", *SMALL, "--out", out)
    return out


def test_backbones_lists_every_builtin_with_counts():
    out = run("backbones").output
    assert "resnet34" in out and "21,284,672" in out and "mobilenet_v2" in out
    rows = json.loads(run("backbones", "--json").output)
    assert {r["name"]: r["convolutions"] for r in rows}["resnet34"] == 36


def test_convert_writes_every_file(converted):
    assert sorted(p.name for p in converted.iterdir() if p.is_file()) == sorted(OUTPUT_FILES)
    report = json.loads((converted / "report.json").read_text())
    assert set(report["metrics"]) == {"segmentation", "depth", "normal"}
    for key in ("compact", "backbone", "separate", "supermodel"):
        assert report["accounting"][key]["parameters"] > 0
    assert report["search_seconds"] > 0
    assert report["steps"] == {"warmup": 2, "search": 3, "finetune": 2}
    assert "<svg" in (converted / "sharing.svg").read_text()
    assert not [p for p in converted.iterdir() if p.name.startswith(".")], "staging files left behind"


def test_the_resolved_config_reruns(converted, tmp_path):
    again = tmp_path / "again"
    run("convert", "--config", converted / "config.yaml", "--quiet", "--out", again)
    assert (again / "policy.yaml").read_text() == (converted / "policy.yaml").read_text()


def test_config_files_take_numbers_in_exponent_form(tmp_path):
    """PyYAML reads YAML 1.1, where 1e-3 is a string; config files read it as the number users mean."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone: tiny\ninput_size: 32\ntrain_samples: 16\nval_samples: 8\n"
                   "search: {lr: 1e-3, finetune_lr: 5E-4, warmup_steps: 1, search_steps: 1, finetune_steps: 1}\n")
    run("convert", "--config", cfg, "--quiet", "--out", tmp_path / "o")
    back = (tmp_path / "o" / "config.yaml").read_text()
    assert "lr: 0.001" in back and "finetune_lr: 0.0005" in back


def test_pt2_runs_in_plain_torch(converted):
    model = torch.export.load(str(converted / "model.pt2")).module()
    out = model(torch.rand(3, 3, 32, 32))
    assert out["depth"].shape == (3, 1, 32, 32)


def test_json_output(tmp_path):
    result = run("convert", "tiny", *SMALL, "--json", "--out", tmp_path / "j")
    assert "metrics" in json.loads(result.stdout)  # warnings go to stderr


def test_steps_one_at_a_time(tmp_path, converted):
    run_dir = tmp_path / "run"
    run("search", "tiny", *SMALL, "--out", run_dir)
    assert {"supermodel.yaml", "supermodel.pt", "policy.yaml", "metrics.json"} <= {p.name for p in run_dir.iterdir()}
    model = tmp_path / "m.automtl"
    run("compact", run_dir, "--out", model, "--quiet")
    first = model.read_bytes()
    refused = CliRunner().invoke(main, ["compact", str(run_dir), "--out", str(model), "--quiet"])
    assert refused.exit_code == 2 and "already exists" in refused.output and "--overwrite" in refused.output
    assert model.read_bytes() == first
    run("compact", run_dir, "--policy", run_dir / "policy.yaml", "--finetune-steps", "2", "--out", model, "--quiet",
        "--overwrite")
    run("export", model, tmp_path / "m.pt2")
    assert (tmp_path / "m.pt2").stat().st_size > 0
    run("compact", run_dir, "--out", tmp_path / "c.pt2", "--quiet")  # the format follows --out's suffix
    automtl.load_pt2(tmp_path / "c.pt2")
    for wrong in ("c.yaml", "c.pt"):
        refused = CliRunner().invoke(main, ["compact", str(run_dir), "--out", str(tmp_path / wrong), "--quiet"])
        assert refused.exit_code == 2 and "name the file .pt2" in refused.output and not (tmp_path / wrong).exists()
    with pytest.raises(automtl.errors.ConfigError, match="would hold another format than its name says"):
        automtl.save(automtl.load(model), tmp_path / "m.pt2")
    run("render", model, tmp_path / "m.png")
    run("render", run_dir / "policy.yaml", tmp_path / "grid.svg")
    text = run("inspect", model).output
    assert "parameters" in text.lower() and "layer" in text.lower()
    metrics = json.loads(run("eval", model, "--samples", "8", "--input-size", "32", "--json").output)
    assert set(metrics) == {"segmentation", "depth", "normal"}
    # without --input-size, eval generates images of the size the model was converted at (32 here), not 64
    assert automtl.load(model).input_shape[2:] == (32, 32)
    assert json.loads(run("eval", model, "--samples", "8", "--json").output) == metrics
    assert json.loads(run("eval", model, "--samples", "8", "--input-size", "64", "--json").output) != metrics
    out = run("supermodel", "mobilenet_v2", "--task", "seg:segmentation:13").output
    assert "policy layers: 52" in out


@pytest.mark.parametrize("command", ["convert", "search", "compact", "export", "render", "inspect", "eval",
                                     "backbones", "supermodel"])
def test_every_help_has_an_example(command):
    assert "Example: automtl" in run(command, "--help").output


def bad(*args):
    """Run a command that must fail on user input: exit 2 and one sentence, no traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    return result.output


def test_unknown_backbone(tmp_path):
    out = bad("convert", "resnet35", *SMALL, "--out", tmp_path / "o")
    assert "resnet35" in out and "did you mean" in out
    assert not (tmp_path / "o" / "model.automtl").exists()


def test_malformed_task(tmp_path):
    assert "name:kind" in bad("convert", "tiny", "--task", "depth", *SMALL, "--out", tmp_path)
    assert "unknown kind" in bad("convert", "tiny", "--task", "d:dept", *SMALL, "--out", tmp_path)


@pytest.mark.parametrize("field", ["lr", "tau_start", "budget", "momentum", "grad_clip", "conflict_confidence",
                                   "holdout_fraction", "min_margin", "finetune_decay_fraction"])
def test_a_400_digit_number_in_a_config_file_is_one_sentence(tmp_path, field):
    """A config file's number no float holds (1 and 400 zeros): float() and math.isfinite raised OverflowError, exit
    code 1 with a traceback; now one sentence, exit code 2, that does not quote the 400 digits."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"backbone: tiny\ninput_size: 32\nsearch: {{{field}: 1{'0' * 400}}}\n")
    out = bad("convert", "--config", cfg, "--quiet", "--out", tmp_path / "o")
    assert field in out and len(out.strip().splitlines()) == 1 and "0" * 100 not in out, out


def test_bad_yaml_names_its_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone: tiny\ntasks: [a\nseed: 1\n")
    assert "line" in bad("convert", "--config", cfg, "--out", tmp_path / "o")


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    """YAML loaders keep the last of two equal keys silently; a hand-edited config or policy names its line instead."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone: tiny\nsearch:\n  lr: 0.1\n  lr: 0.2\n")
    said = bad("convert", "--config", cfg, "--out", tmp_path / "o")
    assert "at line 4 (found the key 'lr' twice; keep one)" in said and not (tmp_path / "o").exists()
    from automtl.errors import FileFormatError
    from automtl.policy import Policy
    policy = tmp_path / "p.yaml"
    policy.write_text("layers: [a]\ntasks: [x]\nlayers: [b]\nchoices: [[share]]\n")
    with pytest.raises((FileFormatError, automtl.errors.ConfigError), match="found the key 'layers' twice"):
        Policy.load(policy)
    from automtl.fileio import parse_yaml  # a merge key may give a merged key again: that is what it is for
    merged = parse_yaml("a: {<<: {lr: 0.1, m: 0.9}, lr: 0.2}\n", "x", automtl.errors.ConfigError)
    assert merged == {"a": {"lr": 0.2, "m": 0.9}}


def test_mistakes_in_options_name_the_mistake(tmp_path):
    """Each message names what is wrong: a file given as a data root, a task named twice, a margin above 1."""
    f = tmp_path / "file"
    f.write_text("x")
    assert f"cityscapes root {f} is a file, not a folder" in bad("convert", "tiny", "--data", f"cityscapes:{f}", *SMALL,
                                                                  "--out", tmp_path / "o")
    assert "task names must be unique; 'a' given more than once" in bad(
        "convert", "tiny", "--task", "a:depth", "--task", "a:depth", *SMALL, "--out", tmp_path / "o")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone: tiny\nsearch:\n  min_margin: 2\n")
    assert "'min_margin' is a margin between two probabilities: at most 1" in bad("convert", "--config", cfg, "--out",
                                                                                 tmp_path / "o")
    assert "holds no automtl log records (none of its 1 line(s)" in bad("plot", f)
    assert not (tmp_path / "o").exists()


def test_unknown_config_key_suggests(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone: tiny\nwarmup_step: 3\n")
    assert "did you mean 'warmup_steps'" in bad("convert", "--config", cfg, "--out", tmp_path / "o")
    cfg.write_text("backbone: tiny\nsearch:\n  budjet: 2x\n")
    assert "did you mean 'budget'" in bad("convert", "--config", cfg, "--out", tmp_path / "o")


def test_an_unknown_python_option_suggests_the_field(tmp_path):
    """resolve_config(input_sise=32) listed the search keys only, with no did-you-mean (the config file's path had one)."""
    from automtl.convert import resolve_config
    from automtl.errors import ConfigError

    with pytest.raises(ConfigError, match="resolve_config: unknown key 'input_sise'; did you mean 'input_size'"):
        resolve_config(None, input_sise=32)


def test_missing_data_path(tmp_path):
    out = bad("convert", "tiny", "--data", f"nyuv2:{tmp_path / 'nope'}", *SMALL, "--out", tmp_path / "o")
    assert "nope" in out


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_output_dir_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    assert "not writable" in bad("convert", "tiny", *SMALL, "--out", locked / "o")


def test_output_dir_that_is_a_file_or_under_one(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in bad("convert", "tiny", *SMALL, "--out", f)
    assert "not writable" in bad("convert", "tiny", *SMALL, "--out", f / "sub")


@pytest.mark.parametrize("command, name", [("export", "m.pt2"), ("export", "m.automtl"), ("render", "m.svg")])
def test_a_file_written_under_a_file_is_refused_in_one_sentence(converted, tmp_path, command, name):
    """Every writer goes through one atomic write: a folder of the path that is a file, or a name too long for the
    file system, is one sentence and exit 2, and nothing is left beside the file."""
    f = tmp_path / "file"
    f.write_text("x")
    assert f"{str(f)!r} is a file, not a folder" in bad(command, converted / "model.automtl", f / "sub" / name)
    assert "the name is too long" in bad(command, converted / "model.automtl", tmp_path / ("x" * 300 + name))
    assert "the name is too long" in bad(command, converted / "model.automtl", tmp_path / ("x" * 300) / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and f.read_text() == "x"


@pytest.mark.parametrize("command, name", [("export", "m.pt2"), ("export", "m.automtl"), ("render", "m.svg")])
def test_an_existing_output_file_is_replaced_only_with_overwrite(converted, tmp_path, command, name):
    """export and render write one file: one that is there (perhaps the only copy of something) is refused in one
    sentence and left as it was; --overwrite replaces it."""
    out = tmp_path / name
    out.write_bytes(b"the user's own file")
    said = bad(command, converted / "model.automtl", out)
    assert "already exists; replace it with --overwrite" in said and out.read_bytes() == b"the user's own file"
    run(command, converted / "model.automtl", out, "--overwrite")
    assert out.read_bytes() != b"the user's own file" and out.stat().st_size > 0


def test_export_at_another_input_size(converted, tmp_path):
    """A .pt2 takes one height and width (any batch); a model saved at one size had no way to be exported at another,
    which the loaded .automtl computes."""
    run("export", converted / "model.automtl", tmp_path / "m.pt2", "--input-size", "24,40")
    x = torch.rand(3, 3, 24, 40)
    got = automtl.load_pt2(tmp_path / "m.pt2").module()(x)
    want = automtl.load(converted / "model.automtl")(x)
    assert all(torch.allclose(got[t], want[t].detach(), atol=1e-5) for t in want)
    for wrong in ("0", "24,40,3", "big", "2000"):
        assert "must be one side or a height,width in whole pixels" in bad(
            "export", converted / "model.automtl", tmp_path / "w.pt2", "--input-size", wrong)
    assert "runs at any input size" in bad("export", converted / "model.automtl", tmp_path / "w.automtl",
                                           "--input-size", "24")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]


def test_the_python_exports_refuse_a_name_of_another_format(converted, tmp_path):
    model = automtl.load(converted / "model.automtl")
    with pytest.raises(automtl.errors.ConfigError, match="would hold another format than its name says; name it .pt2"):
        automtl.export(model, tmp_path / "m.txt")
    from automtl.formats.onnx import export_onnx
    with pytest.raises(automtl.errors.ConfigError, match="name it .onnx"):
        export_onnx(model, tmp_path / "m.pt2")
    assert not any(tmp_path.iterdir())


def test_budget_below_any_policy(tmp_path):
    out = bad("convert", "tiny", *SMALL, "--budget", "0.1x", "--out", tmp_path / "o")
    assert "below what any policy can reach" in out
    assert not any((tmp_path / "o").glob("*.automtl"))


def test_bad_steps_and_samples(tmp_path):
    assert "WARMUP,SEARCH,FINETUNE" in bad("convert", "tiny", "--steps", "1,2", "--out", tmp_path)
    assert "TRAIN,VAL" in bad("convert", "tiny", "--samples", "x", "--out", tmp_path)


def test_file_errors(tmp_path):
    assert "does not exist" in bad("inspect", tmp_path / "missing.automtl")
    junk = tmp_path / "junk.automtl"
    junk.write_bytes(b"not a zip")
    bad("export", junk, tmp_path / "x.pt2")
    assert "supermodel.yaml" in bad("compact", tmp_path)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "run"
    run("search", "tiny", *SMALL, "--out", out)
    return out


def test_a_run_directory_does_not_say_where_a_later_session_writes(searched, tmp_path):
    """A run directory is data someone may hand over: where its supermodel.yaml says logs, TensorBoard events,
    checkpoints or a policy file are (a search's own settings) is not where `automtl compact --finetune-steps`
    writes or reads (it created folders and replaced a log.jsonl anywhere on disk). The writer leaves them out."""
    import shutil

    import yaml
    from automtl.config import SESSION_FIELDS

    spec = yaml.safe_load((searched / "supermodel.yaml").read_text())
    assert not set(SESSION_FIELDS) & set(spec["search"])
    handed = tmp_path / "run"
    shutil.copytree(searched, handed)
    elsewhere = tmp_path / "elsewhere"
    spec["search"].update(log_dir=str(elsewhere / "logs"), tensorboard_dir=str(elsewhere / "tb"),
                          out_dir=str(elsewhere / "ckpt"), policy_file=str(elsewhere / "policy.yaml"), resume=True)
    (handed / "supermodel.yaml").write_text(yaml.safe_dump(spec))
    run("compact", handed, "--finetune-steps", "2", "--out", tmp_path / "m.automtl", "--quiet")
    assert not elsewhere.exists() and (tmp_path / "m.automtl").exists()


def test_a_run_directory_runs_no_code_it_names(searched, tmp_path):
    """A handed-over run folder whose supermodel.yaml names its backbone as code (a .py file beside it, any
    installed module's callable) ran that code under `automtl compact` (os:abort aborted it); it is refused until
    the user gives the backbone, and then the user's spec is what is built."""
    import shlex
    import shutil

    import yaml

    handed = tmp_path / "run"
    shutil.copytree(searched, handed)
    marker = tmp_path / "ran"
    (tmp_path / "payload.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                         "from automtl.backbones import build_backbone\n"
                                         "def Net():\n    return build_backbone('tiny')\n")
    spec = yaml.safe_load((handed / "supermodel.yaml").read_text())
    for code in (f"{tmp_path / 'payload.py'}:Net", "os:abort"):
        (handed / "supermodel.yaml").write_text(yaml.safe_dump({**spec, "backbone": code}))
        message = bad("compact", handed, "--out", tmp_path / "m.automtl")
        assert "records its backbone as code" in message and f"--backbone {shlex.quote(code)}" in message
        assert not marker.exists() and not (tmp_path / "m.automtl").exists()
    with pytest.raises(automtl.ConfigError, match=r"--backbone os:abort \(Python: backbone=\.\.\.\)"):
        automtl.compact_run(handed, out=None)
    run("compact", handed, "--backbone", f"{tmp_path / 'payload.py'}:Net", "--out", tmp_path / "m.automtl")
    assert marker.exists() and (tmp_path / "m.automtl").exists()  # the user's spec, vouched for, is built


@pytest.mark.parametrize("content", ["list", "tensor", "integer name", "no tensor"])
def test_a_weights_file_that_is_not_a_state_dict_is_refused(searched, tmp_path, content):
    """A run's supermodel.pt must map names to tensors; anything else torch's tensors-only reader builds (a list, a
    bare tensor, an integer key, a None) is one sentence, not a TypeError or AttributeError traceback."""
    import shutil

    handed = tmp_path / "run"
    shutil.copytree(searched, handed)
    value = {"list": [torch.zeros(1)], "tensor": torch.zeros(2), "integer name": {1: torch.zeros(1)},
             "no tensor": {"stem.weight": None}}[content]
    torch.save(value, handed / "supermodel.pt")
    assert "not a state dict" in bad("compact", handed, "--out", tmp_path / "m.automtl")
    assert not (tmp_path / "m.automtl").exists()


@pytest.mark.parametrize("case", ["more tasks", "more classes", "a layer missing", "another dtype"])
def test_a_run_config_is_built_only_as_far_as_its_weights_fill_it(searched, tmp_path, monkeypatch, case):
    """supermodel.yaml is data too: a handed-over run folder whose config named 64 tasks of 10^6 classes took 7.5 GB
    to build before its supermodel.pt was found not to fit. The tasks are checked against the weights' heads and
    policy logits before anything is built, the supermodel's size against theirs after the capture, before the task
    copies and heads are made; what still does not fit is named by its first keys."""
    import importlib
    import shutil

    import yaml

    supermodel_module = importlib.import_module("automtl.supermodel")
    handed = tmp_path / "run"
    shutil.copytree(searched, handed)
    spec = yaml.safe_load((handed / "supermodel.yaml").read_text())
    state = torch.load(handed / "supermodel.pt", weights_only=True)
    names = [t["name"] for t in spec["tasks"]]
    if case == "more tasks":
        spec["tasks"] = [{"name": f"t{i}", "kind": "classification", "classes": 10**6} for i in range(64)]
        match = rf"holds heads for {', '.join(repr(n) for n in sorted(names))} and policy logits for {len(names)} task"
    elif case == "more classes":  # the heads and logits the config names, each a few elements
        spec["tasks"] = [{"name": n, "kind": "classification", "classes": 10**6} for n in names]
        state = {k: v for k, v in state.items() if not k.startswith("heads.")}
        state.update({f"heads.{n}.fc.bias": torch.zeros(1) for n in names})
        match = r"holds \d+ elements, fewer than the at least \d+ of the supermodel its supermodel.yaml describes"
    elif case == "another dtype":  # load_state_dict cast integers into the float weights without a word
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name] = state[name].long()
        match = rf"does not fit its supermodel.yaml \({re.escape(name)} int64 vs float32 \(file vs supermodel\)\)"
    else:  # small enough, and without one task's copy of the first layer
        gone = [k for k in state if k.startswith("net.") and ".specialized.0." in k][:5]
        state = {k: v for k, v in state.items() if k not in gone}
        match = rf"does not fit its supermodel.yaml \(it lacks {re.escape(repr(gone[0]))}, .* and 3 more\)"
    (handed / "supermodel.yaml").write_text(yaml.safe_dump(spec))
    torch.save(state, handed / "supermodel.pt")
    built = []
    real = supermodel_module.SuperModel.__init__
    monkeypatch.setattr(supermodel_module.SuperModel, "__init__", lambda self, *a: built.append(1) or real(self, *a))
    message = bad("compact", handed, "--out", tmp_path / "m.automtl")
    assert re.search(match, " ".join(message.split())), message
    assert built == ([1] if case in ("a layer missing", "another dtype") else []) and not (tmp_path / "m.automtl").exists()


def test_debug_shows_the_traceback(tmp_path):
    """--debug adds the traceback to a user's mistake, which keeps its exit code 2 (it was 1; helper-78)."""
    result = CliRunner().invoke(main, ["--debug", "convert", "resnet35", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback (most recent call last)" in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ") and "resnet35" in result.output


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "automtl"
    proc = subprocess.run([str(exe), "convert", "resnet35", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.endswith(errors[0] + "\n") and "Traceback" not in proc.stderr


def test_resume_where_there_is_no_checkpoint_says_it_starts_from_the_beginning(tmp_path):
    result = run("convert", "tiny", *SMALL, "--out", tmp_path / "o", "--resume")
    assert "holds no checkpoint to continue, so the run starts from the beginning" in result.output + result.stderr


_EINSUM_BACKBONE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.mix = nn.Parameter(torch.eye(8))

    def forward(self, x):
        return torch.relu(self.b(torch.einsum("nchw,dc->ndhw", torch.relu(self.a(x)), self.mix)))
'''


def test_convert_writes_the_pt2_alone_where_the_bundle_cannot_describe_the_model(tmp_path):
    """An operation off the bundle's vocabulary (einsum) failed the whole run at its end, after the training, with
    the advice to call automtl.export(): now the run's files are written but model.automtl, and a warning says why."""
    (tmp_path / "net.py").write_text(_EINSUM_BACKBONE)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["convert", f"{tmp_path / 'net.py'}:Net", *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "model.automtl is not written (node 'einsum' calls torch.functional.einsum" in result.output
    assert ".automtl-stage-" not in result.output  # warnings name the files where they are left
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(set(OUTPUT_FILES) - {"model.automtl"})
    report = json.loads((out / "report.json").read_text())
    assert "model.automtl" not in report["files"] and "einsum" in report["not_written"]["model.automtl"]
    program = torch.export.load(str(out / "model.pt2"))  # our own file (load_pt2 lists no aten.einsum)
    assert set(program.module()(torch.randn(2, 3, 32, 32))) == set(report["metrics"])


@pytest.mark.parametrize("error", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 2415919104 bytes.")],
                         ids=["python", "gpu", "cpu-allocator"])
def test_running_out_of_memory_is_one_sentence(tmp_path, monkeypatch, error):
    """torch's CPU allocator refuses with a plain RuntimeError: that ended the command in a traceback and exit 1."""
    import automtl.report

    def exhausted(*args, **kwargs):
        raise error
    monkeypatch.setattr(automtl.report, "inspect_text", exhausted)
    assert "ran out of memory; use a smaller --input-size" in bad("inspect", tmp_path / "m.automtl")


@pytest.mark.parametrize("args, message", [
    (["convert", "tiny", "--out", ""], "Invalid value for '--out': is empty; give a path"),
    (["convert", "tiny", "--budget", ""], "the budget is empty; write it like '1.5x', or 'none' for no budget"),
    (["convert", "tiny", "--steps", ""], "--steps '' must be three whole numbers"),
    (["convert", "tiny", "--samples", " "], "--samples ' ' must be two positive whole numbers"),
    (["convert", "", "--steps", "1,1,1"], "backbone must be a name, got ''; give the backbone's name"),
    (["convert", "tiny", "--data", ""], "data must be a name, got ''; give the data set's name"),
    (["export", "m.automtl", ""], "Invalid value for 'OUT': is empty; give a path"),
    (["render", "", "m.svg"], "Invalid value for 'SOURCE': is empty; give a path"),
], ids=["out", "budget", "steps", "samples", "backbone", "data", "export", "render"])
def test_an_empty_value_is_refused_not_read_as_left_out(tmp_path, monkeypatch, args, message):
    """An unset shell variable: `--out ""` wrote a whole run into the current folder, `--steps ""` ran the full
    default schedule, `--budget ""` switched the budget off."""
    monkeypatch.chdir(tmp_path)
    out = [] if "--out" in args or args[0] != "convert" else ["--out", "run"]
    assert message in bad(*args, *out)
    assert not any(tmp_path.iterdir())


def test_the_summary_states_the_size_in_the_budget_s_unit():
    """helper-78: an all-share model was printed as "2.03x one backbone" beside "budget used: 1.0x" (one backbone
    there is one backbone and the first task's head; the budget's unit is hard sharing, every task's head)."""
    from automtl.convert import format_summary

    report = {"accounting": {"compact": {"parameters": 41176},
                             "ratios": {"parameters_vs_backbone": 2.0276, "parameters_vs_separate": 0.6773}},
              "policy": {"counts": {"share": 6, "specialize": 0, "skip": 0},
                         "evidence": {"budget": {"metric": "params", "used": 1.0, "limit": 1.5}}},
              "metrics": {"depth": {"abs_err": 3.1}}, "files": ["model.automtl"]}
    text = format_summary(report, "runs/x")
    assert ("compact model: 41,176 parameters (1.00x hard sharing (the budget's unit), 2.03x one backbone and head, "
            "0.68x the single-task models)") in text
    report["policy"]["evidence"] = None  # a given policy's run: no budget to state
    assert "(2.03x one backbone and head, 0.68x" in format_summary(report, "runs/x")


def test_the_pipeline_commands_take_a_feature_node(tmp_path):
    """helper-78: `automtl supermodel` and the config took `feature_node`, convert, search and sweep did not."""
    import yaml

    run("search", "tiny", *SMALL, "--feature-node", "block2_conv2", "--out", tmp_path / "s")
    spec = yaml.safe_load((tmp_path / "s" / "supermodel.yaml").read_text())
    assert spec["feature_node"] == "block2_conv2"
    message = bad("convert", "tiny", *SMALL, "--feature-node", "block9", "--out", tmp_path / "c")
    assert "block9" in message and not (tmp_path / "c").exists()
    for command in ("convert", "sweep"):
        assert "--feature-node" in run(command, "--help").output
