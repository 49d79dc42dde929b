"""render: the graphviz drawing of a compact model's sharing decisions and its policy grid."""
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
import torch

from automtl.compact import compact
from automtl.errors import AutomtlError
from automtl.policy import SHARE, SKIP, SPECIALIZE, Policy
from automtl.render import PALETTE, block_names, block_of, render, to_dot
from automtl.supermodel import supermodel
from automtl.tasks import Task

TASKS = [Task("segment", "segmentation", classes=4), Task("depth", "depth"), Task("normal", "normal")]
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz 'dot' is not installed")


@pytest.fixture(scope="module")
def tiny_sm():
    torch.manual_seed(0)
    return supermodel("tiny", TASKS, torch.randn(1, 3, 32, 32)).eval()


@pytest.fixture(scope="module")
def tiny_mixed(tiny_sm):
    """Every choice occurs: shared stem, a specialized and a skipped layer, a branch."""
    rows = {
        "stem.0": [SHARE, SHARE, SHARE],
        "block1_conv1.0": [SHARE, SHARE, SHARE],
        "block1_conv2.0": [SHARE, SHARE, SKIP],
        "block2_conv1.0": [SPECIALIZE, SKIP, SHARE],
        "block2_conv2.0": [SPECIALIZE, SHARE, SPECIALIZE],
        "block2_down.0": [SHARE, SHARE, SHARE],
        "head.0": [SPECIALIZE, SPECIALIZE, SHARE],
    }
    policy = Policy(tiny_sm.layer_names, tiny_sm.task_names, [rows[l] for l in tiny_sm.layer_names])
    return compact(tiny_sm, policy)


def graph_nodes(source: str) -> list:
    """Names of the model-graph nodes in a DOT source (everything but the grid and layout edges)."""
    return re.findall(r"^\s*(n\d+(?:_split)?) \[", source, flags=re.M)


# ---- files --------------------------------------------------------------------------
@needs_dot
@pytest.mark.parametrize("suffix", ["svg", "png", "pdf"])
def test_each_format_is_written(tiny_mixed, tmp_path, suffix):
    out = render(tiny_mixed, tmp_path / f"sharing.{suffix}")
    assert out == tmp_path / f"sharing.{suffix}" and out.stat().st_size > 0
    head = out.read_bytes()[:8]
    assert {"png": head.startswith(b"\x89PNG"), "pdf": head.startswith(b"%PDF"), "svg": b"<" in head}[suffix]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary files left


@needs_dot
def test_svg_names_every_task_and_the_legend(tiny_mixed, tmp_path):
    svg = render(tiny_mixed, tmp_path / "s.svg", title="tiny, mixed").read_text()
    text = " ".join(t.text or "" for t in ET.fromstring(svg).iter() if t.tag.endswith("text"))
    for word in ["segment", "depth", "normal", "share", "specialize", "skip", "Policy", "Tasks",
                 "tiny, mixed", "input"]:
        assert word in text, word


@needs_dot
def test_policy_alone_gives_the_grid(tiny_sm, tmp_path):
    policy = Policy.random(tiny_sm.layer_names, tiny_sm.task_names, tiny_sm.skip_legal, seed=3)
    dot = to_dot(policy)
    assert graph_nodes(dot.source) == [] and "grid [" in dot.source and "legend [" in dot.source
    svg = render(policy, tmp_path / "policy.svg").read_text()
    text = " ".join(t.text or "" for t in ET.fromstring(svg).iter() if t.tag.endswith("text"))
    assert all(w in text for w in ["segment", "depth", "normal", "share", "specialize", "skip", "stem"])
    assert text.count("block1_conv1") == 1  # one row per layer, named once


@needs_dot
def test_supermodel_with_hard_policy_is_compiled_first(tiny_sm, tiny_mixed, tmp_path):
    tiny_sm.hard(tiny_mixed.policy)
    try:
        assert render(tiny_sm, tmp_path / "sm.svg").stat().st_size > 0
    finally:
        tiny_sm.warmup()
    with pytest.raises(AutomtlError, match="hard"):
        render(tiny_sm, tmp_path / "nope.svg")
    assert not (tmp_path / "nope.svg").exists()


# ---- errors -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sharing.jpg", "sharing", "sharing.dot"])
def test_unknown_suffix_is_refused(tiny_mixed, tmp_path, name):
    with pytest.raises(AutomtlError, match=r"\.svg, \.png, \.pdf"):
        render(tiny_mixed, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_path_is_refused_as_empty(tiny_mixed):
    with pytest.raises(AutomtlError, match=r"empty path.*\.svg, \.png or \.pdf"):
        render(tiny_mixed, "")


def test_explicit_format_overrides_the_suffix(tiny_mixed, tmp_path):
    if shutil.which("dot") is None:
        pytest.skip("graphviz 'dot' is not installed")
    out = render(tiny_mixed, tmp_path / "drawing.out", format="SVG")
    assert out.read_text().lstrip().startswith("<")


def test_missing_dot_says_how_to_install(tiny_mixed, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AutomtlError, match="apt-get install graphviz.*brew install graphviz"):
        render(tiny_mixed, tmp_path / "s.svg")
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(AutomtlError, match="not installed"):
        render(tiny_mixed, tmp_path / "s.png")
    assert list(tmp_path.iterdir()) == []


def test_wrong_input_is_refused(tmp_path):
    with pytest.raises(AutomtlError, match="CompactModel"):
        to_dot(torch.nn.Linear(2, 2))


def test_a_policy_grid_too_large_to_draw_is_refused_before_graphviz_runs(tmp_path):
    """A policy file within the YAML bounds (1000 layers x 190 tasks, 2.6 MB) took graphviz 1.8 GB and 37 s to draw;
    a grid over MAX_GRID_CELLS is one sentence, and nothing is written."""
    from automtl.render import MAX_GRID_CELLS

    tasks = [f"t{i}" for i in range(101)]
    layers = [f"l{i}" for i in range(MAX_GRID_CELLS // len(tasks) + 1)]
    policy = Policy(layers, tasks, [[0] * len(tasks) for _ in layers])
    with pytest.raises(AutomtlError, match=r"100 layers x 101 tasks, more than the 10000 cells"):
        render(policy, tmp_path / "grid.svg")
    assert not (tmp_path / "grid.svg").exists()


@needs_dot
def test_failed_render_leaves_nothing_behind(tiny_mixed, tmp_path, monkeypatch):
    import graphviz

    target = tmp_path / "sharing.svg"

    def unsupported(self, *a, **k):
        raise subprocess.CalledProcessError(1, ["dot"], stderr=b'Format: "png" not recognized. Use one of: svg\n')

    def broken(self, *a, **k):
        raise subprocess.CalledProcessError(1, ["dot"], stderr=b"Error: syntax error in line 1\n")

    monkeypatch.setattr(graphviz.Digraph, "pipe", unsupported)
    with pytest.raises(AutomtlError, match="cannot write png.*svg"):
        render(tiny_mixed, tmp_path / "sharing.png")
    monkeypatch.setattr(graphviz.Digraph, "pipe", broken)
    with pytest.raises(subprocess.CalledProcessError):  # our bug, not the user's: keeps its traceback
        render(tiny_mixed, target)
    assert list(tmp_path.iterdir()) == []

    # a failure while writing keeps an existing drawing whole and leaves no temporary file
    monkeypatch.undo()
    target.write_text("old drawing")
    import pathlib

    real_write = pathlib.Path.write_bytes

    def disk_full(self, data):
        real_write(self, data[:10])
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_full)
    with pytest.raises(OSError):
        render(tiny_mixed, target)
    assert target.read_text() == "old drawing"
    assert [p.name for p in tmp_path.iterdir()] == ["sharing.svg"]


# ---- the collapsing rule --------------------------------------------------------------
def test_block_names():
    assert block_of("layer3.2.conv1") == "layer3.2"
    assert block_of("layer3.0.downsample.0") == "layer3.0"
    assert block_of("features.7.conv.0.0") == "features.7"
    assert block_of("layers.8.0.layers.3") == "layers.8.0"
    assert block_of("features.0.0") == "features.0"
    assert block_of("conv1") == "conv1"
    names = block_names(["stem.0", "block1.0", "features.0", "features.3"])
    assert names == {"stem.0": "stem", "block1.0": "block1", "features.0": "features.0", "features.3": "features.3"}


def test_tiny_graph_shows_branches_skips_and_joins(tiny_mixed):
    src = to_dot(tiny_mixed).source
    assert "_split" in src                              # tasks branch somewhere
    assert "skip block1_conv2" in src or "skipped" in src  # normal's identity skip is marked
    assert "dashed" in src
    assert 'label=<+>' in src                           # a branch rejoining a shared shortcut
    for t, colour in zip(["segment", "depth", "normal"], PALETTE):
        assert re.search(rf'<B>{t}</B>.*fillcolor="{colour}"', src)  # task-coloured output node
    assert src.index("input") < src.index("head")


def _acyclic(edges) -> bool:
    out: dict = {}
    for a, b in edges:
        out.setdefault(a, []).append(b)
    state: dict = {}

    def visit(n):
        if state.get(n) == 1:
            return False
        if state.get(n) == 2:
            return True
        state[n] = 1
        ok = all(visit(m) for m in out.get(n, []))
        state[n] = 2
        return ok

    return all(visit(n) for n in list(out))


def test_collapsed_graph_is_acyclic_for_random_policies(tiny_sm):
    from automtl.render_graph import collapse as _collapse

    for seed in range(6):
        p = Policy.random(tiny_sm.layer_names, tiny_sm.task_names, tiny_sm.skip_legal, seed=seed)
        m = compact(tiny_sm, p)
        for limit in (1000, 8):
            d = _collapse(m, p, limit)
            assert _acyclic(d.edges)
            heads = [k for k, b in d.boxes.items() if b.kind == "head"]
            assert len(heads) == 3


@pytest.fixture(scope="module")
def resnet50_staged():
    """Shares everything up to layer3, then the tasks branch in layer4, with a skip."""
    torch.manual_seed(0)
    sm = supermodel("resnet50", TASKS, torch.randn(1, 3, 64, 64)).eval()
    rows = []
    for name in sm.layer_names:
        if not name.startswith("layer4"):
            rows.append([SHARE, SHARE, SHARE])
        elif name.startswith("layer4.0"):
            rows.append([SPECIALIZE, SHARE, SHARE])
        else:
            rows.append([SPECIALIZE, SPECIALIZE, SKIP if name == "layer4.1.conv2" else SHARE])
    return compact(sm, Policy(sm.layer_names, sm.task_names, rows))


def test_resnet50_stays_legible(resnet50_staged):
    src = to_dot(resnet50_staged, title="resnet50").source
    nodes = graph_nodes(src)
    assert 20 <= len(nodes) <= 60
    assert "layer3.5" in src and "3 convs" in src        # one box per block
    assert src.count("_split [") >= 1                     # the branch point is drawn
    assert "skip conv2" in src                            # normal's identity skip in layer4.1


def test_max_boxes_merges_runs(resnet50_staged):
    src = to_dot(resnet50_staged, max_boxes=20).source
    assert len(graph_nodes(src)) <= 20
    assert "&#8211;" in src  # a merged run "layer1.0 - layer2.3"


@needs_dot
def test_resnet50_renders_png(resnet50_staged, tmp_path):
    out = render(resnet50_staged, tmp_path / "resnet50.png")
    assert out.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("evidence", [{"threshold": 10 ** 400}, {"confidence": -10 ** 400},
                                      {"budget": {"metric": "params", "used": 10 ** 400}},
                                      {"budget": {"metric": "params", "used": 1.0, "limit": 10 ** 400}},
                                      {"note": 10 ** 400}, {"scores": {"l0": {"a": 10 ** 400, "b": 0.0}}}])
def test_a_policy_file_s_400_digit_number_is_refused_in_one_sentence(tmp_path, evidence):
    """An integer no float holds in a policy's evidence: math.isfinite raised OverflowError out of `render`; now the
    file is refused in one sentence (exit code 2) that does not quote the 400 digits."""
    import yaml
    from click.testing import CliRunner
    from automtl.cli import main
    from automtl.errors import FileFormatError

    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"tasks": ["a", "b"], "layers": {"l0": {"a": "share", "b": "specialize"}},
                                    "evidence": {"kind": "conflict", **evidence}}))
    with pytest.raises(FileFormatError, match="evidence"):
        Policy.load(path)
    result = CliRunner().invoke(main, ["render", str(path), str(tmp_path / "grid.svg")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "0" * 100 not in lines[0], result.output
    assert not (tmp_path / "grid.svg").exists()
