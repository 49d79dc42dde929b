"""Reporting of a search: the tqdm progress bar, TensorBoard event files, and the policy
probabilities in the JSONL log that `automtl plot` draws."""
import io
import json

import pytest
import torch

from automtl.data import SyntheticScenes
from automtl.errors import ConfigError
from automtl.search import SearchConfig, search
from automtl.search._util import _Progress
from automtl.supermodel import supermodel

SIZE = 32



class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_tqdm_on_a_tty_and_silent_otherwise():
    tty, pipe = _TTY(), io.StringIO()
    for stream in (tty, pipe):
        bar = _Progress(True, stream)
        bar.start("search", 4, 1)
        for i in range(2, 5):
            bar.update(i, 0.25)
        bar.close()
    assert "search" in tty.getvalue() and "4/4" in tty.getvalue() and "loss 0.2500" in tty.getvalue()
    assert pipe.getvalue() == ""
    quiet = _TTY()
    bar = _Progress(False, quiet)
    bar.start("warmup", 3)
    bar.update(1, 1.0)
    bar.close()
    assert quiet.getvalue() == ""


def _tiny_search(tmp_path, **kw):
    train = SyntheticScenes(32, size=SIZE, seed=0)
    val = SyntheticScenes(16, size=SIZE, seed=1, split="val")
    torch.manual_seed(0)
    sm = supermodel("tiny", train.tasks, torch.randn(1, 3, SIZE, SIZE))
    cfg = SearchConfig(warmup_steps=2, search_steps=4, finetune_steps=2, batch_size=8, log_every=1, budget="2x",
                       weight_steps_per_policy_step=1, val_every=4, val_batches=1, device="cpu", quiet=True,
                       out_dir=str(tmp_path / "run"), **kw)
    return sm, search(sm, train, val, cfg)


def test_gumbel_log_records_carry_policy_probs(tmp_path):
    sm, result = _tiny_search(tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    with_probs = [r for r in recs if "policy_probs" in r]
    assert with_probs and all(r["stage"] == "search" for r in with_probs)
    probs = with_probs[-1]["policy_probs"]
    assert set(probs) == set(sm.task_names)
    for layers in probs.values():
        assert list(layers) == list(sm.layer_names)
        for p in layers.values():
            assert len(p) == 3 and abs(sum(p) - 1) < 1e-3


def test_tensorboard_event_file_holds_the_named_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'automtl[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    sm, result = _tiny_search(tmp_path, tensorboard_dir=str(tb))
    assert list(tb.glob("events.out.tfevents.*")), "no event file written"
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    task, layer = sm.task_names[0], sm.layer_names[0]
    expected = {f"loss/{t}" for t in sm.task_names} | {
        "loss/total", "search/tau", "size/expected_params", "size/budget_params", "size/expected_vs_budget",
        f"policy/{task}/{layer}/share", f"policy/{task}/{layer}/specialize", f"policy/{task}/{layer}/skip",
    } | {f"val/{t}/{m}" for t, ms in result.metrics.items() for m in ms} | {f"val_loss/{t}" for t in sm.task_names}
    missing = expected - tags
    assert not missing, f"missing scalars {sorted(missing)}; have {sorted(tags)[:20]}"
    taus = acc.Scalars("search/tau")
    assert len(taus) == 4 and all(e.value > 0 for e in taus)
    share = acc.Scalars(f"policy/{task}/{layer}/share")
    assert all(0 <= e.value <= 1 for e in share)
    assert len(acc.Scalars(f"loss/{task}")) == 8  # every step of the three stages (log_every=1)


def test_tensorboard_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match="automtl\\[tensorboard\\]"):
        _tiny_search(tmp_path, tensorboard_dir=str(tmp_path / "tb"))


@pytest.mark.parametrize("command", ["search", "convert"])
def test_cli_tensorboard_option(tmp_path, command):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'automtl[tensorboard]')")
    from click.testing import CliRunner
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from automtl.cli import main

    tb = tmp_path / "tb"
    args = [command, "tiny", "--steps", "2,3,2", "--samples", "16,8", "--input-size", "32", "--quiet",
            "--strategy", "gumbel", "--tensorboard", str(tb), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "search/tau" in tags and any(t.startswith("policy/") for t in tags) and any(t.startswith("val/") for t in tags)
