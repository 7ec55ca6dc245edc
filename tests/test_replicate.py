"""experiments/replicate.py: its statistics, and --quick end to end (every stage, then a resumed rerun)."""

import importlib.util
import json
import sys

import pytest
from conftest import ROOT


def load_replicate():
    spec = importlib.util.spec_from_file_location("replicate", ROOT / "experiments" / "replicate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["replicate"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


replicate = load_replicate()


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I: 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775.
    assert replicate.wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert replicate.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)


def test_difference_interval_matches_newcombe():
    # Newcombe (1998), Statistics in Medicine 17:873, method 10: 56/70 - 48/80 -> 0.0524 to 0.3339.
    d, lo, hi = replicate.diff_interval(56, 70, 48, 80)
    assert (d, lo, hi) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)


def test_base_rule_takes_the_strongest_sink_among_models_that_read():
    def run(sink, acc):
        return {"curve": [{"sink_mass": sink, "uniform": 0.1, "short_accuracy": acc}]}
    # 'c' has the largest sink but reads far worse than the best: the rule skips it.
    assert replicate.choose_base({"a": run(0.1, 0.9), "b": run(0.2, 0.8), "c": run(0.5, 0.3)}) == "b"


@pytest.mark.slow
def test_quick_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "rep"
    assert replicate.main(["--out", str(out), "--quick"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert {"settings", "command", "times_s", "missing", "pretrain", "base", "accuracy", "diagnostics"} <= set(result)
    assert result["missing"] == []
    assert set(result["pretrain"]) == set(replicate.RECIPES)
    assert result["base"] in replicate.RECIPES
    assert set(result["accuracy"]) == set(replicate.VARIANTS)
    lengths = replicate.eval_lengths(replicate.SIZES["quick"])
    for v in replicate.VARIANTS:
        assert set(result["accuracy"][v]["pooled"]) == set(lengths)
        assert all(n > 0 for _, n in result["accuracy"][v]["pooled"].values())
        assert result["diagnostics"][v][0][0]["sink_mass"] >= 0
    for curve in (r["curve"] for r in result["pretrain"].values()):
        assert {"step", "sink_mass", "uniform", "short_accuracy"} <= set(curve[-1])
    report = (out / "report.md").read_text()
    assert "## Protocol" in report and "Status: complete." in report and "FocuSFT" in report
    try:
        import matplotlib  # noqa: F401
        figures = ["pretraining.png", "accuracy.png", "training.png", "diagnostics.png", "attention_map.png"]
        assert all((out / "figures" / f).is_file() for f in figures)
    except ImportError:
        assert "Figures skipped: matplotlib is not installed" in report
    # A rerun finds every stage done: nothing is trained or evaluated again.
    capsys.readouterr()
    assert replicate.main(["--out", str(out), "--quick"]) == 0
    assert "focusft.py" not in capsys.readouterr().out
    # --eval-samples: the same models evaluated again, more samples, into their own files; no training.
    assert replicate.main(["--out", str(out), "--quick", "--eval-samples", "2"]) == 0
    assert "focusft.py" not in capsys.readouterr().out
    more = json.loads((out / "results-eval2.json").read_text())
    assert all(n == 2 for v in more["accuracy"].values() for _, n in v["pooled"].values())
    assert (out / "report-eval2.md").is_file() and (out / "figures-eval2").is_dir() == (out / "figures").is_dir()
    first = json.loads((out / "results.json").read_text())  # the first evaluation's files are left as they were
    assert all(n == 1 for v in first["accuracy"].values() for _, n in v["pooled"].values())


def test_figures_are_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert replicate.figures({"pretrain": {}, "accuracy": {}, "diagnostics": {}}, replicate.SIZES["quick"],
                             tmp_path, {}, {}) == []


def test_sink_mass_of_uniform_attention_is_the_uniform_baseline():
    # A random model with tiny weights attends almost uniformly: its sink mass must match the baseline,
    # which is the mean over queries q >= SINK_FROM of 5 / (q + 1).
    import torch

    config = replicate.qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    model = replicate.qwen2.random_model(config, seed=0, dtype=torch.float32, std=0.002)
    mass, uniform = replicate.sink_mass(model, torch.randint(0, 64, (2, 48)))
    assert uniform == pytest.approx(sum(5 / (q + 1) for q in range(16, 48)) / 32)
    assert mass == pytest.approx(uniform, rel=0.02)
