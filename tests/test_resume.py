"""Long runs survive faults: exact resume after SIGKILL, atomic checkpoints, SIGTERM, non-finite steps,
a dying rank, failing disks. Each test drives the real CLI in subprocesses (marked slow), except the
checks that end before training, which call focusft.main in-process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ENV, ROOT, STEPS, command, run, step_rows

import qwen2


def run_in_process(capsys, cmd: list[str]) -> tuple[int, str, str]:
    """A one-process command that ends before training (an error, a finished run) run as
    focusft.main(argv) in this process: (exit status, stdout, stderr), no interpreter start-up."""
    import focusft

    assert cmd[0] == sys.executable and cmd[1] == str(ROOT / "focusft.py")
    try:
        focusft.main(cmd[2:])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def patched(tmp_path: Path, code: str, before_import: bool = False) -> Path:
    """A launcher script that patches focusft, or a library before focusft is imported (fault
    injection, test-side only), then runs focusft's CLI."""
    script = tmp_path / "patched_focusft.py"
    imports = "import focusft, qwen2\n"
    body = f"{code}\n{imports}" if before_import else f"{imports}{code}\n"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\n{body}focusft.main()\n")
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
    return [r["loss"] for r in step_rows(out)]


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
    stop_all(proc)
    proc.wait()


@pytest.mark.slow
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


# The weight writer (safetensors' own, patched before focusft is imported) writes half of the file
# for the save named by $DIE_IN, then the process SIGKILLs itself: a preemption in the middle of a save.
DIE_IN_SAVE = """
import signal
import safetensors.torch
original_save_file = safetensors.torch.save_file
def save_file(tensors, filename, *a, **k):
    original_save_file(tensors, filename, *a, **k)
    die_in = os.environ.get("DIE_IN")
    if die_in and os.path.basename(os.path.dirname(filename)).startswith(die_in):
        size = os.path.getsize(filename)
        with open(filename, "r+b") as f:
            f.truncate(size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = save_file
"""


@pytest.mark.slow
@pytest.mark.parametrize("save", ["step-000004", "final"], ids=["training-checkpoint", "final-export"])
def test_kill_during_a_save_keeps_the_previous_checkpoint(tiny, tmp_path, reference, save):
    """SIGKILL half way through writing a checkpoint's weights: the newest complete checkpoint
    before it loads, nothing half-written is taken for a checkpoint or an export, and the resumed
    run ends bitwise equal to the uninterrupted one."""
    out = tmp_path / "run"
    cmd = command(tiny, out, script=patched(tmp_path, DIE_IN_SAVE, before_import=True))
    killed = run(cmd, env={"DIE_IN": save})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    newest = sorted((out / "checkpoints").glob("step-??????"))[-1]
    qwen2.from_pretrained(newest)  # the newest checkpoint there loads, and it is the last whole one
    assert newest.name == ("step-000003" if save.startswith("step") else f"step-{STEPS - 1:06d}")
    target = out / "checkpoints" / save if save.startswith("step") else out / save
    assert not target.exists() and not (out / "final").exists()  # nothing half-written in place
    with pytest.raises(qwen2.CheckpointError):  # the interrupted save really was half written
        qwen2.from_pretrained(target.with_name(f"{save}.tmp"))
    resumed = run(cmd)  # the same command, without the fault
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {newest}" in resumed.stdout
    assert_bitwise_equal(out / "final", reference[1] / "final")
    assert losses(out) == losses(reference[1])


@pytest.mark.slow
def test_keep_and_finished_run(tiny, reference, capsys):
    out = reference[1]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-000003", "step-000004", "step-000005"]  # --keep 3, no checkpoint at the end
    # A checkpoint is an HF checkpoint too.
    assert qwen2.from_pretrained(out / "checkpoints" / "step-000005").config.num_hidden_layers == 4
    code, stdout, _ = run_in_process(capsys, command(tiny, out))
    assert code == 0 and "finished" in stdout and "nothing to do" in stdout


@pytest.mark.slow
def test_resume_refuses_other_settings(tiny, reference, capsys):
    code, _, err = run_in_process(capsys, command(tiny, reference[1], "--seed", "7"))
    assert code == 1
    assert "holds a run with other settings: --seed 1234 (now 7)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run_in_process(capsys, command(tiny, reference[2]))  # written by 2 processes, resumed by 1
    assert code == 1 and "resume it with the same number (now 1)" in err


def test_resume_flag_without_checkpoint(tiny, tmp_path, capsys):
    code, _, err = run_in_process(capsys, command(tiny, tmp_path / "fresh", "--resume"))
    assert code == 1 and "--resume: no training checkpoint in" in err
    assert not (tmp_path / "fresh").exists()


# Holds the first micro-batch of optimizer step 2 (call 3, with --grad-accum 2) while $HOLD exists,
# after touching $HOLD.entered<rank>; each signal the stop handler receives is logged to
# $HOLD.signals<rank> before the handler runs. The test acts while every rank is held, so what it
# checks never depends on timing.
HOLD = """
import time
calls = {"n": 0}
original_step = focusft.focusft_step
def held_step(*a, **k):
    calls["n"] += 1
    hold, rank = os.environ.get("HOLD", ""), os.environ.get("RANK", "0")
    if calls["n"] == 3 and hold and os.path.exists(hold):
        open(f"{hold}.entered{rank}", "w").close()
        while os.path.exists(hold):
            time.sleep(0.02)
    return original_step(*a, **k)
focusft.focusft_step = held_step
original_handle = focusft.StopRequest.handle
def handle(self, signum, frame):
    if os.environ.get("HOLD"):
        with open(os.environ["HOLD"] + ".signals" + os.environ.get("RANK", "0"), "a") as f:
            f.write(f"{signum}\\n")
    return original_handle(self, signum, frame)
focusft.StopRequest.handle = handle
"""


def start_held(tiny, tmp_path, nproc: int, *extra: str):
    """Start a run that holds at step 2 on every rank; return (process, hold file, out, command)."""
    out, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()
    cmd = command(tiny, out, *extra, nproc=nproc, script=patched(tmp_path, HOLD))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "HOLD": str(hold)})
    deadline = time.time() + 240
    while not all(Path(f"{hold}.entered{r}").exists() for r in range(nproc)):
        if proc.poll() is not None or time.time() > deadline:
            stop_all(proc)
            raise AssertionError(f"the run never reached the held step: {proc.communicate()}")
        time.sleep(0.05)
    return proc, hold, out, cmd


def stop_all(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rank_pid(proc: subprocess.Popen, rank: int) -> int:
    """The worker process of `rank` under torchrun (from its environment)."""
    for pid in descendants(proc.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    raise AssertionError(f"no worker with RANK={rank}")


def signals_seen(hold: Path, rank: int) -> int:
    path = Path(f"{hold}.signals{rank}")
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for(condition, proc, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            stop_all(proc)
            raise AssertionError(f"{what} never happened")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, sig, to_rank", [(1, signal.SIGTERM, 0), (1, signal.SIGINT, 0), (2, signal.SIGTERM, 1)],
                         ids=["sigterm", "sigint", "torchrun-sigterm-to-rank1"])
def test_signal_finishes_the_step_checkpoints_and_exits_zero(tiny, tmp_path, reference, nproc, sig, to_rank):
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) alike: the step in progress finishes,
    a checkpoint is written, exit 0, and the resumed run ends bitwise equal to the uninterrupted
    one. Under torchrun the signal reaches rank 1 only; rank 0 stops at the same step all the same
    (a rank that stopped alone would leave the other hanging in a collective)."""
    proc, hold, out, cmd = start_held(tiny, tmp_path, nproc, "--ckpt-every", "0")
    target = proc.pid if nproc == 1 else rank_pid(proc, to_rank)
    os.kill(target, sig)
    wait_for(lambda: signals_seen(hold, to_rank) == 1, proc, "the signal's delivery")
    hold.unlink()  # step 2 goes on
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        stop_all(proc)
    assert proc.returncode == 0, stderr
    assert "stopped by a signal after step 2: resume with the same command" in stdout
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # one checkpoint, all ranks'
    assert sorted(p.name for p in (out / "checkpoints" / "step-000002").glob("rng-rank*.pt")) == [
        f"rng-rank{r}.pt" for r in range(nproc)]
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "(step 2)" in resumed.stdout
    assert_bitwise_equal(out / "final", reference[nproc] / "final")
    assert losses(out) == losses(reference[nproc])


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once(tiny, tmp_path, reference):
    """Ctrl-C twice: the run stops inside the held step (which never finishes), writes nothing,
    and the checkpoints written before stay loadable and resume exactly."""
    proc, hold, out, cmd = start_held(tiny, tmp_path, 1)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: signals_seen(hold, 0) == 1, proc, "the first SIGINT's delivery")
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=120)  # still held: only the second Ctrl-C can end it
    finally:
        stop_all(proc)
    assert hold.exists() and signals_seen(hold, 0) == 2
    assert proc.returncode != 0 and "stopped by a signal" not in stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]  # none for step 2
    hold.unlink()
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "(step 1)" in resumed.stdout
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


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_non_finite_step_is_skipped_on_every_rank(tiny, tmp_path, nproc):
    out = tmp_path / "run"
    result = run(command(tiny, out, nproc=nproc, script=patched(tmp_path, NAN_ON_STEP_2)),
                 env={"NAN_RANK": str(nproc - 1)})  # under DDP only rank 1 sees the NaN
    assert result.returncode == 0, result.stderr
    skipped = [r for r in step_rows(out) if "skipped" in r]
    assert [r["step"] for r in skipped] == [2]
    assert len(skipped[0]["samples"]) == 2 * nproc and all(":" in s for s in skipped[0]["samples"])
    assert "1 skipped non-finite step(s)" in result.stdout
    assert "step 2: non-finite loss or gradient norm, optimizer step skipped" in result.stdout + result.stderr


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_rank_that_raises_stops_the_others(tiny, tmp_path):
    raising = ("original = focusft.focusft_step\n"
               "def step(*a, **k):\n"
               "    if os.environ['RANK'] == '1' and os.path.exists(os.environ['FAIL_FLAG']):\n"
               "        raise RuntimeError('injected failure on rank 1')\n"
               "    return original(*a, **k)\n"
               "focusft.focusft_step = step\n")
    flag = tmp_path / "fail-now"
    flag.touch()
    start = time.time()
    result = run(command(tiny, tmp_path / "run", nproc=2, script=patched(tmp_path, raising)), timeout=240,
                 env={"FAIL_FLAG": str(flag)})
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


@pytest.mark.slow
def test_disk_full_keeps_previous_checkpoint_and_training_goes_on(tiny, tmp_path):
    out = tmp_path / "run"
    result = run(command(tiny, out, script=patched(tmp_path, DISK_FULL)), env={"FULL_ON": "step-000004"})
    assert result.returncode == 0, result.stderr
    assert "saving the checkpoint" in result.stderr and "No space left on device" in result.stderr
    assert "the previous checkpoint is kept" in result.stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000003", "step-000005"] and (out / "final").is_dir()


@pytest.mark.slow
def test_disk_full_on_the_final_export_keeps_the_weights(tiny, tmp_path):
    out = tmp_path / "run"
    result = run(command(tiny, out, "--ckpt-every", "0", script=patched(tmp_path, DISK_FULL)),
                 env={"FULL_ON": "final"})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "final failed (No space left on device); the trained weights are in" in last
    saved = Path(last.split("the trained weights are in ")[1])
    assert saved.name == f"step-{STEPS:06d}" and not (out / "final").exists() and not (out / "final.tmp").exists()
    assert "Traceback" not in result.stderr
