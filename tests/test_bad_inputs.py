"""Every class of bad input the command-line tools can receive ends in one clear message naming the
file, line or flag, a non-zero exit, no traceback, and no partial output left behind.

The CLIs run in-process (their main() with an argv list): an uncaught exception would fail the test
the same way a traceback would show, and it is much faster than a subprocess per case."""

import json
import shutil

import pytest
import torch

import bench
import data
import focusft
import qwen2


def run_cli(capsys, main, argv: list[str]) -> tuple[int, str]:
    """main(argv) in-process: a non-zero exit, no traceback, and the error in ONE line: all of stderr
    for an error found by the program (exit 1); argparse's usage then one error line (exit 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    captured = capsys.readouterr()
    code = exit_.value.code
    assert code not in (0, None), captured.out + captured.err
    assert "Traceback" not in captured.err
    err = captured.err.strip()
    lines = err.splitlines()
    if code == 2:  # argparse: usage lines, then the one error line
        assert lines and lines[0].startswith("usage: ") and ": error: " in lines[-1], err
        assert sum(": error: " in line for line in lines) == 1, err
    else:
        assert len(lines) == 1, f"not one line:\n{err}"
    return code, err


def one_line(err: str, prog: str) -> str:
    """The error line itself: the last line, from the named program (argparse prints its usage before)."""
    last = err.splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), err
    return last


# ---------------------------------------------------------------------------------------------- data


BAD_RECORDS = [
    ("invalid JSON", '{"messages": [', "invalid JSON"),
    ("not an object", '["a list"]', "not a JSON object"),
    ("no messages", '{"conversation": []}', "no 'messages'"),
    ("unknown role", '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "unknown role 'robot'"),
    ("non-string content",
     '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}', "content"),
    ("assistant with neither content nor tool calls",
     '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}', "neither content nor tool calls"),
    ("tool message with no tool call before it",
     '{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}, '
     '{"role": "assistant", "content": "y"}]}', "no tool call before it"),
    ("conversation without an assistant turn", '{"messages": [{"role": "user", "content": "x"}]}',
     "without any assistant message"),
    ("tool call without a name",
     '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": '
     '[{"type": "function", "function": {"arguments": {}}}]}, {"role": "tool", "content": "r"}, '
     '{"role": "assistant", "content": "y"}]}', "tool call without a name"),
]


@pytest.mark.parametrize("name, line, reason", BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_bad_record(tiny, tmp_path, capsys, name, line, reason):
    good = tiny.data.read_text().splitlines()[0]
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    out = tmp_path / "out"
    code, err = run_cli(capsys, focusft.main, ["--model", str(tiny.model), "--data", str(path), "--out", str(out)])
    assert code == 1 and f"{path}:3: " in err and reason in err, err
    assert not out.exists()
    # data.py check reports the same, with the same line number
    assert data.main(["check", "--data", str(path), "--tokenizer", str(tiny.model)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{path}:3: " in err and len(err.splitlines()) == 1, err


def test_skip_bad_samples_counts_them(tiny, tmp_path, capsys):
    good = tiny.data.read_text().splitlines()[0]
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{{broken\n{good}\n")
    assert data.main(["check", "--data", str(path), "--tokenizer", str(tiny.model), "--skip-bad-samples"]) == 0
    assert "1 bad skipped, 2 samples kept" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["data file missing", "data file empty"])
def test_data_file_missing_or_empty(tiny, tmp_path, capsys, kind):
    path = tmp_path / "train.jsonl"
    if kind == "data file empty":
        path.write_text("")
    code, err = run_cli(capsys, focusft.main, ["--model", str(tiny.model), "--data", str(path), "--out",
                                               str(tmp_path / "out")])
    assert code == 1 and f"{path}: " + ("file is empty" if path.exists() else "file does not exist") in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- model


def broken_model(tiny, tmp_path, kind):
    directory = tmp_path / "model"
    shutil.copytree(tiny.model, directory)
    if kind == "no config.json":
        (directory / "config.json").unlink()
    elif kind == "no weights":
        (directory / "model.safetensors").unlink()
    elif kind == "no tokenizer":
        (directory / "tokenizer.json").unlink()
    elif kind in ("mis-shaped tensor", "missing tensor"):
        from safetensors.torch import load_file, save_file

        t = load_file(directory / "model.safetensors")
        if kind == "missing tensor":
            del t["model.layers.0.mlp.up_proj.weight"]
        else:
            t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
        save_file(t, directory / "model.safetensors", metadata={"format": "pt"})
    elif kind == "tokenizer larger than the embedding":
        cfg = qwen2.Qwen2Config.from_json(directory / "config.json")
        cfg.vocab_size = tiny.tokenizer.get_vocab_size() - 10
        qwen2.random_model(cfg).save_pretrained(directory)
    elif kind == "unsupported config":
        cfg = json.loads((directory / "config.json").read_text())
        cfg["model_type"] = "llama"
        (directory / "config.json").write_text(json.dumps(cfg))
    return directory


MODEL_CASES = [
    ("model dir without config.json", "no config.json", "config.json"),
    ("model dir without weights", "no weights", "no model.safetensors"),
    ("model dir without tokenizer", "no tokenizer", "tokenizer.json"),
    ("mis-shaped tensor", "mis-shaped tensor", "model.layers.0.mlp.up_proj.weight [3, 3]"),
    ("missing tensor", "missing tensor", "1 missing tensor(s): model.layers.0.mlp.up_proj.weight"),
    ("tokenizer larger than the embedding", "tokenizer larger than the embedding", "embedding only"),
    ("unsupported model config", "unsupported config", "model_type is 'llama'"),
]


@pytest.mark.parametrize("name, kind, message", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model(tiny, tmp_path, capsys, name, kind, message):
    model = broken_model(tiny, tmp_path, kind)
    out = tmp_path / "out"
    code, err = run_cli(capsys, focusft.main, ["--model", str(model), "--data", str(tiny.data), "--out", str(out)])
    line = one_line(err, "focusft.py")
    assert code == 1 and message in line and str(model) in line, err
    assert not out.exists()


def test_hub_id_not_available_offline(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, err = run_cli(capsys, focusft.main, ["--model", "nobody/nothing", "--data", str(tiny.data), "--out",
                                               str(tmp_path / "out")])
    assert "nobody/nothing: not a local directory, and the hub download failed" in one_line(err, "focusft.py")


# ---------------------------------------------------------------------------------------------- output and flags


def test_out_is_a_file(tiny, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("x")
    code, err = run_cli(capsys, focusft.main, ["--model", str(tiny.model), "--data", str(tiny.data), "--out", str(out)])
    assert f"--out {out}: exists and is not a directory" in one_line(err, "focusft.py")
    assert out.read_text() == "x"


def test_out_not_writable(tiny, capsys):
    code, err = run_cli(capsys, focusft.main, ["--model", str(tiny.model), "--data", str(tiny.data), "--out",
                                               "/proc/focusft-out"])
    assert "--out /proc/focusft-out: cannot write there" in one_line(err, "focusft.py")


FLAGS = [
    ("--micro-batch 0", ["--micro-batch", "0"], "--micro-batch must be >= 1"),
    ("--layer-fraction 1.5", ["--layer-fraction", "1.5"], "--layer-fraction must be in (0, 1]"),
    ("--inner-steps -1", ["--inner-steps", "-1"], "--inner-steps must be >= 0"),
    ("--grad-accum 0", ["--grad-accum", "0"], "--grad-accum must be >= 1"),
    ("--targets unknown", ["--targets", "gate_proj,o_proj"], "unknown projection(s) o_proj"),
    ("--keep 0", ["--keep", "0"], "--keep must be >= 1"),
    ("--lr not a number", ["--lr", "fast"], "--lr: invalid float value: 'fast'"),
    ("no --data", [], "--data: give one or more"),
]


@pytest.mark.parametrize("name, flags, message", FLAGS, ids=[f[0] for f in FLAGS])
def test_bad_flag(tiny, tmp_path, capsys, name, flags, message):
    argv = ["--model", str(tiny.model), "--out", str(tmp_path / "out"), *flags]
    if name != "no --data":
        argv += ["--data", str(tiny.data)]
    code, err = run_cli(capsys, focusft.main, argv)
    assert code == 2 and message in one_line(err, "focusft.py")
    assert not (tmp_path / "out").exists()


def test_layer_fraction_adapting_nothing(tiny, tmp_path, capsys):
    code, err = run_cli(capsys, focusft.main, ["--model", str(tiny.model), "--data", str(tiny.data), "--out",
                                               str(tmp_path / "out"), "--layer-fraction", "1e-20"])
    assert "--layer-fraction 1e-20 adapts no layer of a 4-layer model" in one_line(err, "focusft.py")


@pytest.mark.parametrize("flags, message", [
    (["--response-fraction", "2"], "--response-fraction must be in (0, 1)"),
    (["--seq", "0"], "--seq must hold at least two tokens per turn"),
    (["--model", "/nonexistent-model"], "--model: /nonexistent-model: no such directory"),
], ids=["bench.py --response-fraction 2", "bench.py --seq 0", "bench.py --model missing"])
def test_bench_bad_flag(capsys, flags, message):
    code, err = run_cli(capsys, bench.main, flags)
    assert message in one_line(err, "bench.py")


def test_data_check_missing_tokenizer(tmp_path, capsys):
    good = tmp_path / "d.jsonl"
    good.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    assert data.main(["check", "--data", str(good), "--tokenizer", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("data.py: error: ") and "tokenizer file not found" in err


# ---------------------------------------------------------------------------------------------- eval_babilong.py


def eval_error(capsys, argv) -> str:
    import eval_babilong

    with pytest.raises(SystemExit) as exit_:
        eval_babilong.main(argv)
    captured = capsys.readouterr()
    # sys.exit("message") carries the message; argparse's errors are printed and exit 2
    message = exit_.value.code if isinstance(exit_.value.code, str) else captured.err.strip().splitlines()[-1]
    assert exit_.value.code not in (0, None) and "Traceback" not in captured.err
    if isinstance(exit_.value.code, str):  # the message is all the user sees on stderr
        assert captured.err.strip() == "", captured.err
    else:  # argparse: usage, then the one error line
        assert sum(": error: " in line for line in captured.err.splitlines()) == 1, captured.err
    assert message.startswith("eval_babilong.py: error: ") and "\n" not in message, message
    return message


EVAL_CASES = [
    ("unknown BABILong task", ["--tasks", "qa99"], "--tasks: unknown task 'qa99'"),
    ("unknown BABILong length", ["--lengths", "3k"], "--lengths: unknown length '3k'"),
]


@pytest.mark.parametrize("name, flags, message", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_bad_flag(tiny, tmp_path, capsys, name, flags, message):
    out = tmp_path / "out"
    msg = eval_error(capsys, ["--model", str(tiny.model), "--synthetic", "--out", str(out), *flags])
    assert message in msg and not out.exists()


def test_eval_model_without_tokenizer(tiny, tmp_path, capsys):
    model = broken_model(tiny, tmp_path, "no tokenizer")
    msg = eval_error(capsys, ["--model", str(model), "--synthetic", "--tasks", "qa1", "--lengths", "0k", "--out",
                              str(tmp_path / "out")])
    assert f"--model {model}: no tokenizer.json" in msg and not (tmp_path / "out").exists()


def test_eval_data_dir_missing_a_file(tiny, tmp_path, capsys):
    (tmp_path / "babilong" / "0k").mkdir(parents=True)
    msg = eval_error(capsys, ["--model", str(tiny.model), "--data-dir", str(tmp_path / "babilong"), "--tasks", "qa1",
                              "--lengths", "0k", "--out", str(tmp_path / "out")])
    assert "no data file for qa1 at 0k" in msg and not (tmp_path / "out").exists()


def test_eval_out_is_a_file(tiny, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("x")
    msg = eval_error(capsys, ["--model", str(tiny.model), "--synthetic", "--out", str(out)])
    assert f"--out {out}: is a file" in msg


def test_eval_csv_without_columns_and_missing_csv(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert "no column(s) target, output, question" in eval_error(capsys, ["--score-csv", str(bad), "--task", "qa1"])
    assert "no such file" in eval_error(capsys, ["--score-csv", str(tmp_path / "none.csv"), "--task", "qa1"])
