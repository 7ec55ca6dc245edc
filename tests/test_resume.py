"""Long runs survive faults: exact resume after SIGKILL, atomic checkpoints, SIGTERM, non-finite steps,
a dying rank, failing disks. Each test drives the real CLI in subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import qwen2

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
STEPS = 6


def command(tiny, out: Path, *extra: str, nproc: int = 1, script: Path | None = None) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 \
        else [sys.executable]
    return launcher + [str(script or ROOT / "focusft.py"), "--model", str(tiny.model), "--data", str(tiny.data),
                       "--out", str(out), "--max-steps", str(STEPS), "--grad-accum", "2", "--lr", "1e-3",
                       "--rank", "4", "--ckpt-every", "1", "--keep", "3", *extra]


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def patched(tmp_path: Path, code: str) -> Path:
    """A launcher script that patches focusft (fault injection, test-side only), then runs its CLI."""
    script = tmp_path / "patched_focusft.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport focusft, qwen2\n{code}\n"
                      "focusft.main()\n")
    return script


# Slows each micro-batch down (numerics untouched), so a test can act in the middle of a run.
SLOW = """
import time
original_step = focusft.focusft_step
def slow_step(*a, **k):
    time.sleep(0.25)
    return original_step(*a, **k)
focusft.focusft_step = slow_step
"""


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return qwen2.from_pretrained(directory).state_dict()


def assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun starts its workers in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_when(proc: subprocess.Popen, ready: Path, timeout: float = 240) -> None:
    """SIGKILL the run and every process it started (a preempted machine) as soon as `ready` exists."""
    deadline = time.time() + timeout
    while not ready.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, f"{ready} never appeared"
        time.sleep(0.05)
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted runs every interrupted one must reproduce bit for bit (1 and 2 processes)."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for nproc in (1, 2):
        out = root / f"nproc{nproc}"
        result = run(command(tiny, out, nproc=nproc))
        assert result.returncode == 0, result.stderr
        runs[nproc] = out
    return runs


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_is_bitwise_identical(tiny, tmp_path, reference, nproc):
    out = tmp_path / "run"
    cmd = command(tiny, out, nproc=nproc, script=patched(tmp_path, SLOW))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    kill_when(proc, out / "checkpoints" / "step-000003")
    assert not (out / "final").exists()
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert_bitwise_equal(out / "final", reference[nproc] / "final")
    assert losses(out) == losses(reference[nproc])  # metrics logged after the checkpoint were rewritten


def test_interrupted_save_leaves_previous_checkpoint(tiny, tmp_path, reference):
    out = tmp_path / "run"
    cmd = command(tiny, out, script=patched(tmp_path, SLOW))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    kill_when(proc, out / "checkpoints" / "step-000002")
    # What a kill in the middle of writing step 5 leaves: a .tmp directory with a truncated file.
    newest = sorted((out / "checkpoints").glob("step-??????"))[-1]
    partial = out / "checkpoints" / "step-000005.tmp"
    partial.mkdir()
    data = (newest / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(data[: len(data) // 3])
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {newest}" in resumed.stdout
    assert_bitwise_equal(out / "final", reference[1] / "final")


def test_keep_and_finished_run(tiny, reference):
    out = reference[1]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-000003", "step-000004", "step-000005"]  # --keep 3, no checkpoint at the end
    # A checkpoint is an HF checkpoint too.
    assert qwen2.from_pretrained(out / "checkpoints" / "step-000005").config.num_hidden_layers == 4
    again = run(command(tiny, out))
    assert again.returncode == 0 and "finished" in again.stdout and "nothing to do" in again.stdout


def test_resume_refuses_other_settings(tiny, reference):
    result = run(command(tiny, reference[1], "--seed", "7"))
    assert result.returncode == 1
    assert "holds a run with other settings: --seed 1234 (now 7)" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run(command(tiny, reference[2]))  # written by 2 processes, resumed by 1
    assert result.returncode == 1 and "resume it with the same number (now 1)" in result.stderr


def test_resume_flag_without_checkpoint(tiny, tmp_path):
    result = run(command(tiny, tmp_path / "fresh", "--resume"))
    assert result.returncode == 1 and "--resume: no training checkpoint in" in result.stderr
    assert not (tmp_path / "fresh").exists()


def test_sigterm_checkpoints_and_exits_zero(tiny, tmp_path, reference):
    out = tmp_path / "run"
    cmd = command(tiny, out, "--ckpt-every", "0", script=patched(tmp_path, SLOW))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by a signal after step" in stdout and "resume with the same command" in stdout
    stopped_at = int(stdout.split("stopped by a signal after step ")[1].split(":")[0])
    assert stopped_at < STEPS and [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{stopped_at:06d}"]
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(out / "final", reference[1] / "final")


NAN_ON_STEP_2 = """
calls = {"n": 0}
original = focusft.focusft_step
def step(*a, **k):
    calls["n"] += 1
    out = original(*a, **k)
    if calls["n"] in (3, 4) and os.environ.get("RANK", "0") == os.environ.get("NAN_RANK", "0"):
        out.loss = out.loss * float("nan")  # both micro-batches of optimizer step 2
    return out
focusft.focusft_step = step
"""


@pytest.mark.parametrize("nproc", [1, 2])
def test_non_finite_step_is_skipped_on_every_rank(tiny, tmp_path, nproc):
    out = tmp_path / "run"
    env = {**ENV, "NAN_RANK": str(nproc - 1)}  # under DDP only rank 1 sees the NaN
    result = subprocess.run(command(tiny, out, nproc=nproc, script=patched(tmp_path, NAN_ON_STEP_2)),
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if "skipped" in r]
    assert [r["step"] for r in skipped] == [2]
    assert len(skipped[0]["samples"]) == 2 * nproc and all(":" in s for s in skipped[0]["samples"])
    assert "1 skipped non-finite step(s)" in result.stdout
    assert "step 2: non-finite loss or gradient norm, optimizer step skipped" in result.stdout + result.stderr


def test_too_many_bad_steps_stop_with_a_clear_error(tiny, tmp_path):
    out = tmp_path / "run"
    always = ("original = focusft.focusft_step\n"
              "def step(*a, **k):\n"
              "    out = original(*a, **k)\n"
              "    out.loss = out.loss * float('inf')\n"
              "    return out\n"
              "focusft.focusft_step = step\n")
    result = run(command(tiny, out, "--max-bad-steps", "2", script=patched(tmp_path, always)))
    assert result.returncode == 1
    assert "3 optimizer steps in a row had a non-finite loss or gradient norm (--max-bad-steps 2)" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "checkpoints" / "step-000003").is_dir()  # the last good weights, kept
    assert_bitwise_equal(out / "checkpoints" / "step-000003", tiny.model)  # nothing was ever applied


def test_a_rank_that_raises_stops_the_others(tiny, tmp_path):
    raising = ("original = focusft.focusft_step\n"
               "def step(*a, **k):\n"
               "    if os.environ['RANK'] == '1' and os.path.exists(os.environ['FAIL_FLAG']):\n"
               "        raise RuntimeError('injected failure on rank 1')\n"
               "    return original(*a, **k)\n"
               "focusft.focusft_step = step\n")
    flag = tmp_path / "fail-now"
    flag.touch()
    env = {**ENV, "FAIL_FLAG": str(flag)}
    start = time.time()
    result = subprocess.run(command(tiny, tmp_path / "run", nproc=2, script=patched(tmp_path, raising)),
                            capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    assert time.time() - start < 200  # rank 0 did not hang in a collective


DISK_FULL = """
import errno
original = qwen2.save_weights
def save(state, config, directory, *a, **k):
    if os.path.basename(str(directory)).startswith(tuple(os.environ["FULL_ON"].split(","))):
        raise OSError(errno.ENOSPC, "No space left on device")
    return original(state, config, directory, *a, **k)
qwen2.save_weights = save
"""


def test_disk_full_keeps_previous_checkpoint_and_training_goes_on(tiny, tmp_path):
    out = tmp_path / "run"
    env = {**ENV, "FULL_ON": "step-000004"}
    result = subprocess.run(command(tiny, out, script=patched(tmp_path, DISK_FULL)), capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "saving the checkpoint" in result.stderr and "No space left on device" in result.stderr
    assert "the previous checkpoint is kept" in result.stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000003", "step-000005"] and (out / "final").is_dir()


def test_disk_full_on_the_final_export_keeps_the_weights(tiny, tmp_path):
    out = tmp_path / "run"
    env = {**ENV, "FULL_ON": "final"}
    result = subprocess.run(command(tiny, out, "--ckpt-every", "0", script=patched(tmp_path, DISK_FULL)),
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "final failed (No space left on device); the trained weights are in" in last
    saved = Path(last.split("the trained weights are in ")[1])
    assert saved.name == f"step-{STEPS:06d}" and not (out / "final").exists() and not (out / "final.tmp").exists()
    assert "Traceback" not in result.stderr
