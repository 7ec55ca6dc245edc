"""What a user watches a run with: --report-to tensorboard and wandb, read back with their own readers
across a killed and resumed run."""

import json
import struct
import sys

import pytest
from conftest import train_in_process

import focusft
import training

# 4 steps of one micro-batch, diagnostics at 0, 2 and 4, a checkpoint every 2 steps
FLAGS = ["--max-steps", "4", "--grad-accum", "1", "--lr", "1e-3", "--rank", "4", "--alpha", "16", "--attn-every", "2",
         "--ckpt-every", "2"]
STEP_TAGS = {"train/loss": "loss", "train/inner_first": "inner_first", "train/inner_last": "inner_last",
             "train/lr": "lr", "train/grad_norm": "grad_norm", "train/tokens_per_s": "tokens_per_s"}


class Killed(Exception):
    pass


def killed_then_resumed(tiny, out, monkeypatch, *flags) -> list[dict]:
    """The first session dies right after logging step 3 (its newest checkpoint: step 2); the same command
    then resumes and logs step 3 again. Returns the final metrics.jsonl rows."""
    after_step = focusft.after_step

    def dies_after_step_3(job, state, *rest):
        stopped = after_step(job, state, *rest)
        if state.step == 3:
            raise Killed
        return stopped

    monkeypatch.setattr(focusft, "after_step", dies_after_step_3)
    with pytest.raises(Killed):
        train_in_process(tiny, out, *FLAGS, *flags)
    monkeypatch.setattr(focusft, "after_step", after_step)
    train_in_process(tiny, out, *FLAGS, *flags)
    return focusft.read_metrics(out / "metrics.jsonl")


def expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag, from metrics.jsonl."""
    series = {tag: [(r["step"], r[key]) for r in rows if key in r] for tag, key in STEP_TAGS.items()}
    for which in ("attn_base", "attn_fast"):
        for stat in ("sink_mass", "context_engagement"):
            series[f"{which}/{stat}"] = [(r["step"], r[which][stat]) for r in rows if which in r]
    return series


@pytest.mark.slow
def test_tensorboard_shows_every_step_once_across_a_resume(tiny, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rows = killed_then_resumed(tiny, out, monkeypatch, "--report-to", "tensorboard")
    events = EventAccumulator(str(out))
    events.Reload()
    assert len(list(out.glob("events.out.tfevents.*"))) == 2  # one file per session, one run
    for tag, series in expected(rows).items():
        steps, values = zip(*series, strict=True)
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == list(steps), tag  # step 3, logged by both sessions, shows once
        assert [e.value for e in logged] == pytest.approx(values, rel=1e-6), tag  # stored as float32
    assert [e.step for e in events.Scalars("attn_base/sink_mass")] == [0, 2, 4]
    args = events.Tensors("args/text_summary")  # each session's arguments, at the step it started from
    assert [e.step for e in args] == [0, 3]
    assert '"report_to": "tensorboard"' in args[0].tensor_proto.string_val[0].decode()


def test_tensorboard_rows_are_on_disk_as_soon_as_logged(tmp_path):
    """A run killed right after a checkpoint resumes after that step: its rows must not wait in the writer."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = training.TensorBoard(tmp_path, {"lr": 1e-3}, first_step=0)
    report.log({"step": 1, "loss": 2.5, "attn_base": {"sink_mass": 0.25}})
    events = EventAccumulator(str(tmp_path))  # read before the writer is closed
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5)]
    assert [(e.step, e.value) for e in events.Scalars("attn_base/sink_mass")] == [(1, 0.25)]
    report.close()


def wandb_history(path) -> dict[int, dict]:
    """The logged rows of a .wandb file: W&B's record log (LevelDB's log format: 32 KiB blocks of records, each
    with a 7-byte header: checksum, length, type), after a 7-byte file header; each record a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, part, records = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        part, pos = part + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last fragment of one
            records.append(part)
            part = b""
    history = {}
    for data in records:
        record = wandb_internal_pb2.Record.FromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


@pytest.fixture
def wandb_settings(monkeypatch, tmp_path):
    """W&B keeps the settings of its first run for the life of a process: start and end with none. HOME is a
    temporary one: no account (~/.netrc) is found, and W&B's logs (~/.cache/wandb) stay there."""
    import wandb

    wandb.teardown()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    yield monkeypatch
    wandb.teardown()  # as at the end of a process: W&B's service also finishes writing its files


@pytest.mark.slow
def test_wandb_offline_logs_the_same_rows_into_one_run_across_a_resume(tiny, tmp_path, wandb_settings):
    monkeypatch = wandb_settings
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's capture alone
    out = tmp_path / "run"
    rows = killed_then_resumed(tiny, out, monkeypatch, "--report-to", "wandb")
    import wandb

    wandb.teardown()  # as at the end of a process: W&B's service finishes writing its files
    sessions = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    run_id = (out / "wandb-run-id").read_text().strip()
    assert [p.name for p in sessions] == [f"run-{run_id}.wandb"] * 2  # the resumed session continues the run
    first, resumed = (wandb_history(p) for p in sessions)
    assert sorted(first) == [0, 1, 2, 3] and sorted(resumed) == [3, 4]
    # Offline, each session keeps what it logged; W&B keeps a step's first values when they are synced.
    logged = {**resumed, **{step: values for step, values in first.items() if step < 3}}
    for tag, series in expected(rows).items():
        assert [(step, logged[step][tag]) for step, _ in series] == series, tag


def test_wandb_without_an_account_is_one_line(tiny, tmp_path, wandb_settings, capsys):
    wandb_settings.setenv("WANDB_MODE", "online")  # no key, no ~/.netrc: W&B refuses before any network call
    wandb_settings.setenv("WANDB_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        train_in_process(tiny, tmp_path / "run", "--report-to", "wandb")
    assert stop.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("focusft.py: error: --report-to wandb: ") and "WANDB_MODE=offline" in last


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_missing_package_is_one_line(tiny, tmp_path, monkeypatch, capsys, kind):
    monkeypatch.setitem(sys.modules, kind, None)  # importing it now fails, as when it is not installed
    with pytest.raises(SystemExit):
        focusft.parse_args(["--data", str(tiny.data), "--report-to", kind])
    assert f"--report-to {kind}: the {kind} package is not installed (pip install {kind})" in capsys.readouterr().err
