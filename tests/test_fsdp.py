"""--fsdp (FSDP2, fp32 master weights): the same training as DDP, an HF export, exact resume."""

import subprocess

import pytest
import torch
from conftest import ENV, REFERENCE_FLAGS, command, report, run, step_rows
from test_resume import SLOW, assert_bitwise_equal, kill_when, patched

import focusft
import qwen2

pytestmark = pytest.mark.slow  # every test here launches training processes


@pytest.fixture(scope="module")
def fsdp_focusft(tiny, tmp_path_factory):
    """A 2-process FSDP run with the flags of the shared DDP reference run (conftest.reference)."""
    out = tmp_path_factory.mktemp("fsdp") / "focusft"
    result = run(command(tiny, out, "--fsdp", *REFERENCE_FLAGS, "--ckpt-every", "0", nproc=2))
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.mark.parametrize("method", [[], ["--no-bilevel", "--causal"]], ids=["focusft", "sft"])
def test_fsdp_trains_like_ddp(tiny, tmp_path, reference, fsdp_focusft, method):
    """2 gloo processes: FSDP2 (every layer sharded, the inner loop gathering them through FSDP's
    hooks, the fast weights per rank) ends where DDP ends, to fp32 rounding: every step's loss and gradient
    norm, and the final weights. Only in a stable regime (conftest.command's --alpha 16) does that prove
    anything: at the default scale alpha / rank = 16 the inner loop's SGD at lr 1.0 amplifies rounding ~100x
    per step, so DDP against itself with one ulp changed in one initial weight ends as far apart as FSDP
    against DDP (step 5's grad norm 35.6 vs 17.5), and no tolerance tells a bug from reduction order."""
    if not method:  # FocuSFT: the shared runs
        runs, result = {"ddp": reference[2], "fsdp": fsdp_focusft[0]}, fsdp_focusft[1]
    else:
        runs = {}
        for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
            out = tmp_path / name
            result = run(command(tiny, out, *method, *extra, *REFERENCE_FLAGS, "--ckpt-every", "0", nproc=2))
            assert result.returncode == 0, result.stderr
            runs[name] = out
    assert "sharded (FSDP) over 2" in result.stdout
    a, b = qwen2.from_pretrained(runs["fsdp"] / "final"), qwen2.from_pretrained(runs["ddp"] / "final")
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        report(f"fsdp vs ddp {n}", p, q)
        assert torch.allclose(p, q, atol=1e-5), n  # 1% of one Adam step (lr 1e-3): reduction order only
    rows = {k: focusft.read_metrics(v / "metrics.jsonl") for k, v in runs.items()}
    for key in ("loss", "grad_norm"):  # every step, the global clip active at each (grad norm > 1)
        steps = {k: [r[key] for r in v if key in r] for k, v in rows.items()}
        assert len(steps["fsdp"]) == 6 and steps["fsdp"] == pytest.approx(steps["ddp"], rel=1e-6), key
    # the diagnostics ran under FSDP too (weights gathered on every rank), with the same numbers
    fsdp_diag = [r["attn_base"]["sink_mass"] for r in rows["fsdp"] if "attn_base" in r]
    ddp_diag = [r["attn_base"]["sink_mass"] for r in rows["ddp"] if "attn_base" in r]
    assert len(fsdp_diag) >= 2 and fsdp_diag == pytest.approx(ddp_diag, abs=1e-6)
    # the export, gathered from the shards, is a normal HF checkpoint
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(runs["fsdp"] / "final").eval()
    ids = torch.randint(0, tiny.tokenizer.get_vocab_size(), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert report("fsdp export: qwen2 vs transformers", a(ids), theirs(ids).logits) <= 1e-5


def test_fsdp_sigkill_then_resume_is_bitwise_identical(tiny, tmp_path, fsdp_focusft):
    reference = fsdp_focusft[0]  # the same trajectory (checkpointing and diagnostics change no weight)
    out = tmp_path / "run"
    cmd = command(tiny, out, "--fsdp", *REFERENCE_FLAGS, nproc=2, script=patched(tmp_path, SLOW))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    kill_when(proc, out / "checkpoints" / "step-000003")
    assert sorted(p.name for p in (out / "checkpoints" / "step-000003").glob("optimizer-rank*.pt")) == [
        "optimizer-rank0.pt", "optimizer-rank1.pt"]  # each rank's shard of the AdamW states
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert_bitwise_equal(out / "final", reference / "final")


def test_fsdp_one_process_mixed_precision(tiny, tmp_path):
    """World size 1 without torchrun, bf16 compute over fp32 master weights: it trains, the fast
    weights follow the activations' dtype, and the export is in the compute dtype."""
    out = tmp_path / "run"
    result = run(command(tiny, out, "--fsdp", "--dtype", "bf16", "--ckpt-every", "0"))
    assert result.returncode == 0, result.stderr
    assert "sharded (FSDP) over 1" in result.stdout
    assert qwen2.from_pretrained(out / "final").dtype == torch.bfloat16
    rows = step_rows(out)
    assert all(r["loss"] == r["loss"] for r in rows) and len(rows) == 6
