"""experiments/attention.py at toy size (the tiny random model, --quick): every stage, the issue's
attention.json schema, a resumed rerun, and the statistics it reports."""

import importlib.util
import json
import sys

import pytest
import torch
from conftest import ROOT, batch_of


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


attention = load("attention")


def test_key_profile_agrees_with_focusft_diagnostics(tiny):
    import focusft
    import qwen2

    model = qwen2.from_pretrained(tiny.model, dtype=torch.float32)
    batch = {k: v[:1] for k, v in batch_of(tiny, n=1).items()}
    for name in ("causal", "hybrid"):
        mask = attention.mask_of(name, batch)
        profile = attention.key_profile(model, batch, mask)  # (S,)
        diag = focusft.attention_diagnostics(model, batch["input_ids"], batch["loss_mask"],
                                             batch["attention_mask"], mask)
        context = (batch["loss_mask"][0] == 0)
        context[: attention.SINK] = False
        assert float(profile.sum()) == pytest.approx(1.0, abs=1e-5)
        assert float(profile[: attention.SINK].sum()) == pytest.approx(diag["sink_mass"], abs=1e-5)
        assert float(profile[context].sum()) == pytest.approx(diag["context_engagement"], abs=1e-5)


def test_bootstrap_interval_holds_the_mean_and_narrows_with_data():
    mean, lo, hi = attention.bootstrap({0: [0.1, 0.3], 1: [0.2, 0.4], 2: [0.3, 0.5]})
    assert mean == pytest.approx(0.3)
    assert lo < mean < hi
    wide = hi - lo
    mean, lo, hi = attention.bootstrap({s: [0.1, 0.3, 0.2, 0.4, 0.3, 0.5] * 4 for s in range(3)})
    assert hi - lo < wide
    assert attention.bootstrap({0: [0.7]}) == (0.7, 0.7, 0.7)


def test_ratio_and_paired_difference():
    point, lo, hi = attention.ratio_bootstrap({0: [0.4, 0.6], 1: [0.5]}, {0: [0.1, 0.1], 1: [0.1]})
    assert point == pytest.approx(5.0)
    assert lo <= point <= hi
    res = {"a.x": {"sink_mass": {0: [0.5, 0.7]}}, "b.x": {"sink_mass": {0: [0.1, 0.2]}}}
    d = attention.compare(res, "a.x", "b.x", "sink_mass")
    assert d[0] == pytest.approx(0.45)
    assert "higher" in attention.verdict(d)
    # The base model's values (one group) pair with every seed's, sample by sample.
    res["base.causal"] = {"sink_mass": {0: [0.1, 0.2]}}
    res["a.x"]["sink_mass"][1] = [0.3, 0.3]
    assert attention.compare(res, "a.x", "base.causal", "sink_mass")[0] == pytest.approx((0.45 + 0.15) / 2)


def test_quick_writes_the_schema_and_resumes(tiny, tmp_path):
    out = tmp_path / "att"
    argv = ["--model", str(tiny.model), "--out", str(out), "--quick"]
    assert attention.main(argv) == 0
    result = json.loads((out / "attention.json").read_text())
    assert set(result) == {"base", "sft", "sft_bidir", "causal_bilevel", "focusft"}
    assert set(result["base"]) == {"causal", "hybrid"}
    for key in ("sft", "sft_bidir", "causal_bilevel", "focusft"):
        assert set(result[key]) == {"train_start", "train_end", "inference_end"}
    for leaves in result.values():
        for leaf in leaves.values():
            assert set(leaf) == {"sink_mass", "context_engagement"}
            assert 0 <= leaf["sink_mass"] <= 1 and 0 <= leaf["context_engagement"] <= 1
    # Under the hybrid mask the untrained model's response queries see the same keys as under the causal
    # one (all earlier turns) but context keys attend both ways: the two regimes must differ.
    assert result["base"]["causal"] != result["base"]["hybrid"]
    report = (out / "report.md").read_text()
    assert "Status: complete." in report and "30.1" in report and "529x" in report
    try:
        import matplotlib  # noqa: F401
        assert {p.name for p in (out / "figures").iterdir()} == {"profile.png", "map.png", "diagnostics.png"}
    except ImportError:
        assert "Figures skipped" in report
    stages = sorted([*out.glob("train/*/final/model.safetensors"), *out.glob("inference/*.json")])
    assert len(stages) == 4 + 5  # 4 trained models; the base's and their inference-time measurements
    written = {p: p.stat().st_mtime_ns for p in stages}
    assert attention.main(argv) == 0  # everything is there: nothing is trained or measured again
    assert {p: p.stat().st_mtime_ns for p in stages} == written
    assert json.loads((out / "attention.json").read_text()) == result
    # A partial run: --report-only reports what is finished, says what is not, and runs nothing.
    (out / "inference" / "focusft-s0.json").unlink()
    assert attention.main([*argv, "--report-only"]) == 0
    assert not (out / "inference" / "focusft-s0.json").exists()
    assert "Status: **PARTIAL** -- not run yet: focusft-s0." in (out / "report.md").read_text()
    assert "inference_end" not in json.loads((out / "attention.json").read_text())["focusft"]


def test_another_size_in_the_same_out_is_one_clear_error(tiny, tmp_path):
    out = tmp_path / "att"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"size": {"name": "full"}, "model": str(tiny.model)}))
    with pytest.raises(SystemExit) as e:
        attention.main(["--model", str(tiny.model), "--out", str(out), "--quick"])
    assert "holds a run of another size or model" in str(e.value) and "\n" not in str(e.value)


def test_a_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        attention.main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "att"), "--quick"])
    message = str(e.value)
    assert message.startswith("experiments/attention.py: error: ") and "nowhere" in message and "\n" not in message
