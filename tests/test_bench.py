"""bench.py runs and reports every variant (a smoke run on a tiny shape; timings are never asserted)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

import bench

# Small, but with a few MB of activations: the CPU peak-memory reading has a resolution of ~0.2 MB.
TINY = ["--hidden", "64", "--intermediate", "96", "--layers", "4", "--heads", "4", "--kv-heads", "2",
        "--vocab", "2000", "--seq", "256", "--repeats", "2", "--warmup", "1"]


@pytest.mark.slow
def test_bench_json_has_every_key():
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), *TINY, "--json"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout.strip().splitlines()[-1])
    for v in bench.VARIANTS:
        for key in (f"{v}_s", f"{v}_min_s", f"{v}_max_s", f"{v}_tokens_per_s", f"{v}_peak_mb"):
            assert isinstance(r[key], float) and r[key] >= 0, key
        assert r[f"{v}_min_s"] <= r[f"{v}_s"] <= r[f"{v}_max_s"]
    for key in ("focusft_over_sft", "authors_way_over_focusft", "focusft_over_authors_way_memory",
                "focusft_no_inner_ckpt_over_sft", "focusft_no_inner_ckpt_over_focusft_memory"):
        assert r[key] > 0
    assert r["response_tokens"] == 64 and r["mask"] == "hybrid"


def test_bench_table_prints_all_rows(capsys):
    bench.main([*TINY, "--no-memory", "--causal", "--no-grad-ckpt", "--inner-ckpt"])
    out = capsys.readouterr().out
    for v in bench.VARIANTS:
        assert f"| {v} |" in out
    assert "FocuSFT / SFT step time" in out and "authors' way / FocuSFT step time" in out
    assert "causal mask, activation checkpointing off, inner checkpointing on" in out


def test_flops_estimate_orders_the_variants():
    args = bench.parse_args(TINY)
    config = bench.make_config(args)
    f = {v: bench.flops_per_step(config, 256, v, args, 64) for v in bench.VARIANTS}
    assert f["sft"] < f["focusft"] < f["authors_way"]
    # --inner-ckpt (the default) recomputes the top layers in FocuSFT's inner steps and outer pass, and
    # nothing else
    args = bench.parse_args([*TINY, "--no-inner-ckpt"])
    f = {v: bench.flops_per_step(config, 256, v, args, 64) for v in bench.VARIANTS}
    inner = bench.parse_args(TINY)
    g = {v: bench.flops_per_step(config, 256, v, inner, 64) for v in bench.VARIANTS}
    assert g["focusft"] > f["focusft"] and g["sft"] == f["sft"] and g["authors_way"] == f["authors_way"]
    assert g["focusft_no_inner_ckpt"] == f["focusft_no_inner_ckpt"] == f["focusft"]


def test_bench_profile_mode(capsys):
    shares = bench.main([*TINY, "--profile", "focusft"])
    assert "matrix products" in shares and "share of self CPU time" in capsys.readouterr().out
