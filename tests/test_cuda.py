"""The CUDA path: the same properties as on the CPU, with the model and data on a GPU.

Skipped unless pytest is given ``--gpu`` (the rest of the suite hides GPUs without it, so that it runs on the CPU
as in CI) on a machine where torch sees a CUDA device: ``python -m pytest -q --gpu tests/test_cuda.py``. A GPU rounds differently (TF32 convolutions,
other kernels), so outputs are compared with a tolerance relative to their scale, never bitwise across
devices.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from automtl.backbones import list_backbones
from automtl.compact import compact
from automtl.data import SyntheticScenes, make_loader
from automtl.policy import Policy
from automtl.search import SearchConfig, evaluate, search
from automtl.supermodel import supermodel
from automtl.tasks import Task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and pytest --gpu")

CUDA = torch.device("cuda")
SIZE = 32
TASKS = [Task("segment", "segmentation", classes=4), Task("depth", "depth"), Task("label", "classification", classes=5)]


def close(got, want, rel=2e-2):
    """Within ``rel`` of ``want``'s scale: TF32 convolutions keep about 10 bits of mantissa."""
    scale = want.abs().max().clamp_min(1e-3)
    return bool(((got.float() - want.float()).abs().max() / scale) <= rel)


@pytest.mark.parametrize("name", [s.name for s in list_backbones()])
def test_compact_equals_supermodel_and_the_cpu_on_the_gpu(name):
    torch.manual_seed(0)
    sm = supermodel(name, TASKS, torch.randn(1, 3, SIZE, SIZE)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    for seed in range(3):
        pol = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed)
        model = compact(sm, pol).eval()
        with torch.no_grad():
            on_cpu = model(x)
            sm_gpu, model_gpu = sm.to(CUDA), model.to(CUDA)
            want, got = sm_gpu.hard(pol)(x.to(CUDA)), model_gpu(x.to(CUDA))
            sm.cpu()
        for task in sm.task_names:
            assert got[task].device.type == "cuda", (name, seed, task)
            assert close(got[task], want[task], rel=1e-3), (name, seed, task, "compact != supermodel on the GPU")
            assert close(got[task].cpu(), on_cpu[task]), (name, seed, task, "GPU != CPU")


@pytest.fixture(scope="module")
def scenes():
    return SyntheticScenes(96, size=SIZE, seed=0), SyntheticScenes(32, size=SIZE, seed=1, split="val")


@pytest.mark.parametrize("strategy", ["conflict", "gumbel"])
@pytest.mark.parametrize("amp", [False, True])
def test_a_search_on_the_gpu_trains_and_keeps_its_evidence(scenes, strategy, amp, tmp_path):
    train, val = scenes
    torch.manual_seed(0)
    sm = supermodel("tiny", train.tasks, torch.randn(1, 3, SIZE, SIZE))
    before = evaluate(sm, make_loader(val, 16))[0]  # on the CPU, where the model is
    cfg = SearchConfig(strategy=strategy, warmup_steps=8, search_steps=16, finetune_steps=8, budget="2x",
                       device="cuda", amp=amp, log_every=4, checkpoint_every=8, out_dir=str(tmp_path), quiet=True)
    res = search(sm, make_loader(train, 8, shuffle=True), make_loader(val, 16), cfg)
    assert next(sm.parameters()).device.type == "cuda"
    assert res.policy.tasks == sm.task_names and res.policy.current_evidence
    losses = [h["total"] for h in res.history if "total" in h]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    after = evaluate(sm, make_loader(val, 16))[0]  # on the GPU, where the search left it
    assert after["depth"]["abs_err"] < before["depth"]["abs_err"], (before, after)
    model = compact(sm, res.policy).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, SIZE, SIZE, device=next(model.parameters()).device))
    assert set(out) == set(sm.task_names)


def test_a_model_trained_on_the_gpu_is_saved_and_loaded_on_the_cpu(tmp_path):
    import warnings

    from automtl.formats import export, load, load_pt2, save

    torch.manual_seed(0)
    sm = supermodel("resnet18", TASKS, torch.randn(1, 3, SIZE, SIZE)).eval()
    model = compact(sm, Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=4)).eval().to(CUDA)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model(x.to(CUDA))
    save(model, tmp_path / "m.automtl")
    loaded = load(tmp_path / "m.automtl")
    assert next(loaded.parameters()).device.type == "cpu"
    with torch.no_grad():
        got = loaded(x)
        again = loaded.to(CUDA)(x.to(CUDA))
    for task in want:
        assert close(got[task], want[task].cpu()), task
        assert torch.equal(again[task], want[task]), task
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a program holding the GPU's tensors is written with a warning: load_pt2 refuses it
        export(model, tmp_path / "m.pt2")
    assert next(model.parameters()).device.type == "cuda"  # exported from a CPU copy; the model stays
    with torch.no_grad():
        program = load_pt2(tmp_path / "m.pt2").module()(x)
    for task in want:
        assert close(program[task], want[task].cpu()), task


def test_convert_on_the_gpu_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "automtl", "convert", "tiny", "--steps", "4,8,4", "--samples", "32,16",
           "--input-size", "32", "--device", "cuda", "--quiet", "--json", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "error"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["search"]["device"] == "cuda", report["config"]
    from automtl.formats import load

    model = load(out / "model.automtl")
    with torch.no_grad():
        out_cpu = model(torch.rand(2, 3, SIZE, SIZE))
    assert all(torch.isfinite(v).all() for v in out_cpu.values())
    exported = torch.export.load(str(out / "model.pt2")).module()
    with torch.no_grad():
        assert set(exported(torch.rand(2, 3, SIZE, SIZE))) == set(out_cpu)
