"""Several nodes: two torchrun launches on this machine, joined by a c10d rendezvous as two one-process
"nodes" are on a cluster, train exactly like one node with two processes; nodes that do not share --out
stop before training."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, REFERENCE_FLAGS, command, step_rows
from test_resume import assert_bitwise_equal, patched


def two_nodes(script: list[str], cwds: tuple[Path, Path] | None = None) -> list[tuple[int, str, str]]:
    """`torchrun --nnodes 2 --nproc-per-node 1` twice, as on two machines, with the rendezvous on a free
    port of this one: (exit status, stdout, stderr) per node."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"localhost:{port}", *script], cwd=cwds[rank] if cwds else None,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    return [(node.returncode, *output) for node, output in zip(nodes, outputs, strict=True)]


@pytest.mark.slow
def test_two_nodes_train_like_one_node_with_two_processes(tiny, tmp_path, reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"  # one directory for both nodes, as on a shared filesystem
    results = two_nodes(command(tiny, out, *REFERENCE_FLAGS, "--report-to", "tensorboard")[1:])  # less python
    for code, stdout, stderr in results:
        assert code == 0, stdout + stderr
    assert "done: 6 steps on 2 process(es)" in "".join(stdout for _, stdout, _ in results)
    assert_bitwise_equal(out / "final", reference[2] / "final")
    assert step_rows(out) == [{**r, "tokens_per_s": row["tokens_per_s"], "step_s": row["step_s"]}
                              for r, row in zip(step_rows(reference[2]), step_rows(out), strict=True)]
    events = EventAccumulator(str(out))  # one writer, rank 0's
    events.Reload()
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_nodes_that_do_not_share_out_stop_before_training(tiny, tmp_path):
    # A relative --out from two working directories: each node has a "run" of its own, as on local disks.
    # (Looking for rank 0's marker for 0 s, not 60: nothing here is a network filesystem.)
    cwds = (tmp_path / "node0", tmp_path / "node1")
    for cwd in cwds:
        cwd.mkdir()
    script = patched(tmp_path, "import training\ntraining.SHARED_OUT_WAIT_S = 0")
    results = two_nodes(command(tiny, Path("run"), script=script)[1:], cwds)
    assert [code for code, _, _ in results] == [1, 1]
    stderr = "".join(err for _, _, err in results)
    assert ("focusft.py: error: --out run: 1 of the 2 processes do not see the directory rank 0 writes; every rank "
            "writes its part of each training checkpoint there, so on several nodes --out must be on a filesystem "
            "all of them share, at the same path\n") in stderr, stderr
    assert "]: Traceback" not in stderr  # none from a rank ("[rank1]: ..."; torchrun prints its own)
    assert not any((cwd / "run" / "checkpoints").exists() for cwd in cwds)  # no step was trained
