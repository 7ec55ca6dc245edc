"""scripts/gpu_check.py: the --cpu-smoke run exercises every part of the GPU check on the CPU, so the script
cannot rot before a GPU appears; time limits keep what finished; flags are found however a script spells them."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

SCRIPT = ROOT / "scripts" / "gpu_check.py"


def run(out, *flags, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *flags], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path):
    result = run(tmp_path, "--cpu-smoke", "--time-scale", "5")  # generous limits: CI machines are busy
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == list(gpu_check.PARTS) and all(p["status"] == "ok" for p in parts.values())
    r = {name: p["results"] for name, p in parts.items()}
    assert all("errors" not in results for results in r.values())

    rows = r["numerics"]["qwen2_vs_transformers"]
    assert len(rows) == 4 and all(row["within"] for row in rows)
    assert {(row["dtype"], row["mask"]) for row in r["numerics"]["focusft_step_vs_reference"]} == {
        (d, m) for d in ("bfloat16", "float32") for m in ("hybrid", "causal")}
    kernels = r["sdpa"]["kernels"]
    assert len(kernels) == 3 and all(row["picked_forward"] != "none seen" for row in kernels)
    assert all(isinstance(row["math_ms"], float) for row in kernels)  # the math kernel runs everything
    runs = r["train"]["runs"]  # focusft.py's default setting first, then the other
    assert sorted(row["inner_ckpt"] for row in runs) == [False, True]
    assert all(row["finite"] and row["weights_finite"] and row["steps"] == 2 for row in runs)
    assert runs[0]["resumed_weights_max_diff"] == 0.0  # CPU fp32: a resumed run ends bit for bit the same
    steps = r["bench7b"]["steps"]
    default = steps[0]["inner_ckpt"]  # bench.py's default setting for all three variants, then FocuSFT's other
    assert [(row["variant"], row["inner_ckpt"]) for row in steps] == [
        ("sft", default), ("focusft", default), ("authors_way", default), ("focusft_no_inner_ckpt", not default)]
    assert r["bench7b"]["longest_fitting_seq"] == 768
    assert [row["length"] for row in r["generation"]["generation"]] == ["0k", "1k"]
    assert all(row["identical_outputs"] for row in r["generation"]["generation"])

    md = (tmp_path / "gpu_check.md").read_text()
    for name in gpu_check.PARTS:
        assert f"## {name}: ok" in md
    assert "| variant | inner_ckpt | step_s | tokens_per_s | mfu | peak_gb |" in md
    assert "[gpu_check] part generation: ok" in (tmp_path / "gpu_check.log").read_text()


def test_a_part_past_its_time_limit_is_cut_and_the_next_still_runs(tmp_path):
    # Limits of about 0.1 s: no part can even import torch; each is stopped, recorded, and the next one runs.
    result = run(tmp_path, "--cpu-smoke", "--parts", "sdpa", "numerics", "--time-scale", "0.001", timeout=120)
    assert result.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["parts"]) == ["sdpa", "numerics"]
    assert all(p["status"].startswith("time limit") for p in report["parts"].values())
    assert "## numerics: time limit" in (tmp_path / "gpu_check.md").read_text()


def test_without_cuda_the_gpu_run_refuses_in_one_line(tmp_path, capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(tmp_path)])
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_markdown_renders_rows_and_values():
    report = {"started": "now", "mode": "m", "command": "c", "environment": {"device": "d", "torch": "t", "cuda": None},
              "parts": {"x": {"status": "ok", "seconds": 1.0, "limit_s": 2.0,
                              "results": {"rows": [{"a": 1.23456, "b": None}, {"a": 2, "c": "z"}], "v": 0.5}}}}
    md = gpu_check.markdown(report)
    assert "| a | b | c |" in md and "| 1.235 | - | - |" in md and "| 2 | - | z |" in md and "- v: 0.5" in md
