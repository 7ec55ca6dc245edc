"""scripts/plot_metrics.py: SFT beside FocuSFT from real runs, runs under one label as their mean, one-line
errors."""

import importlib.util
import sys

import pytest
from conftest import ROOT, cli_error, train_in_process

import focusft

spec = importlib.util.spec_from_file_location("plot_metrics", ROOT / "scripts" / "plot_metrics.py")
plot_metrics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_metrics)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Standard SFT and FocuSFT, 2 steps each (the diagnostics at steps 0 and 2): {name: metrics rows}, and
    their common directory."""
    root = tmp_path_factory.mktemp("plots")
    flags = ["--max-steps", "2", "--grad-accum", "1", "--lr", "1e-3", "--rank", "4", "--ckpt-every", "0"]
    train_in_process(tiny, root / "sft", *flags, "--no-bilevel", "--causal")
    train_in_process(tiny, root / "focusft", *flags)
    return {name: focusft.read_metrics(root / name / "metrics.jsonl") for name in ("sft", "focusft")}, root


def drawn(fig) -> dict[str, dict[str, tuple[list, list]]]:
    """{panel title: {legend label: (x, y)}} of a figure."""
    return {ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
            for ax in fig.axes}


def series(rows, key, sub=None):
    picked = [r for r in rows if key in r]
    return [r["step"] for r in picked], [r[key] if sub is None else r[key][sub] for r in picked]


def test_sft_beside_focusft(runs, capsys):
    rows, root = runs
    assert plot_metrics.main([str(root / "sft"), str(root / "focusft")]) == 0
    for name in ("training.png", "diagnostics.png"):  # in the runs' common directory
        assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    figs = plot_metrics.figures({"sft": [rows["sft"]], "focusft": [rows["focusft"]]})
    training, diagnostics = drawn(figs["training.png"]), drawn(figs["diagnostics.png"])
    assert training["loss"] == {"sft": series(rows["sft"], "loss"), "focusft": series(rows["focusft"], "loss"),
                                "focusft, before the inner loop": series(rows["focusft"], "inner_first")}
    assert training["learning rate"]["focusft"] == series(rows["focusft"], "lr") and series(rows["sft"], "lr")[0]
    assert training["gradient norm"]["sft"] == series(rows["sft"], "grad_norm")
    assert diagnostics["sink mass of response queries"] == {
        "sft": series(rows["sft"], "attn_base", "sink_mass"),
        "focusft": series(rows["focusft"], "attn_base", "sink_mass"),
        "focusft, with fast weights": series(rows["focusft"], "attn_fast", "sink_mass")}
    assert diagnostics["sink mass of response queries"]["sft"][0] == [0, 2]


def test_runs_under_one_label_are_their_mean(runs):
    rows, _ = runs
    loss = drawn(plot_metrics.figures({"both": [rows["sft"], rows["focusft"]]})["training.png"])["loss"]
    (_, sft), (steps, focus) = series(rows["sft"], "loss"), series(rows["focusft"], "loss")
    assert loss == {"both": (steps, [(a + b) / 2 for a, b in zip(sft, focus, strict=True)])}  # SFT: no inner loss


def test_errors_are_one_line(runs, tmp_path, monkeypatch):
    _, root = runs
    assert cli_error(plot_metrics.main, [tmp_path]) == f"plot_metrics.py: error: {tmp_path}: no metrics.jsonl " \
                                                      "(not a focusft.py output directory)"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss"\n')
    assert "metrics.jsonl: not focusft.py's metrics" in cli_error(plot_metrics.main, [tmp_path])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as when it is not installed
    assert cli_error(plot_metrics.main, [root / "sft"]) == (
        "plot_metrics.py: error: matplotlib is not installed (pip install matplotlib)")
