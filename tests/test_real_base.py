"""experiments/real_base.py (replicate.py --base): its paired statistics, the training data's separation from
the evaluation, and --quick end to end on the tiny random model (every stage, then a rerun that does nothing)."""

import json
import random
import shutil
import sys

import pytest
from conftest import ROOT, cli_error

sys.path.insert(0, str(ROOT / "experiments"))
import real_base  # noqa: E402
import replicate  # noqa: E402


def test_mcnemar_exact_is_the_two_sided_binomial_test():
    assert real_base.mcnemar_exact(5, 0) == pytest.approx(2 / 2 ** 5)
    assert real_base.mcnemar_exact(0, 5) == real_base.mcnemar_exact(5, 0)
    assert real_base.mcnemar_exact(3, 3) == 1.0 and real_base.mcnemar_exact(0, 0) == 1.0
    assert real_base.mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)


def test_paired_interval_without_correlation_is_newcombes_unpaired_one():
    # ad - bc = 0: phi is 0 and the interval is the square-and-add of the two Wilson intervals.
    assert real_base.paired_interval(3, 6, 2, 4) == pytest.approx(replicate.diff_interval(9, 15, 5, 15))
    # Positively correlated outcomes (the usual case of two models on one set of samples) narrow it.
    d, lo, hi = real_base.paired_interval(40, 8, 2, 50)
    d0, lo0, hi0 = replicate.diff_interval(48, 100, 42, 100)
    assert d == pytest.approx(d0) and lo0 < lo < d < hi < hi0


def test_pairs_match_runs_by_seed_and_a_single_model_with_every_run():
    cell = ("qa1", "1k")
    correct = {"base": {cell: [True, False]}, "sft-s0": {cell: [True, True]}, "sft-s1": {cell: [False, False]},
               "focusft-s0": {cell: [False, True]}, "focusft-s1": {cell: [True, False]}}
    assert real_base.pairs(correct, ["focusft-s0", "focusft-s1"], ["sft-s0", "sft-s1"], [cell]) == [
        (False, True), (True, True), (True, False), (False, False)]
    assert len(real_base.pairs(correct, ["base"], ["sft-s0", "sft-s1"], [cell])) == 4
    same = real_base.bootstrap_diff(correct, ["sft-s0"], ["sft-s0"], [cell], 50)
    assert same == (0.0, 0.0, 0.0)


def test_a_looping_answer_is_told_from_a_plain_one():
    assert real_base.repeats("The answer is the library.\n\nThe answer is the library.\n\nThe answer is the")
    assert real_base.repeats("The answer is: the library.\n\nThe answer is the\n\nThe answer is,")  # punctuation
    assert not real_base.repeats("The answer is the library. The answer is the library.")  # twice is not a loop
    assert not real_base.repeats("The library.") and not real_base.repeats("")


def test_training_logs_show_the_spikes_and_the_inner_losses_trend(tmp_path):
    run = tmp_path / "train" / "focusft-s0"
    run.mkdir(parents=True)
    rows = [{"step": 0, "attn_base": {"sink_mass": 0.1, "context_engagement": 0.5}}]
    rows += [{"step": i, "loss": [0.5, 0.4, 0.3, 9.0, 0.2, 3.0][i - 1], "inner_first": float(i)} for i in range(1, 7)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert real_base.thirds([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == "1.50 → 3.50 → 5.50"
    assert real_base.thirds([1.0]) == "-"
    table = real_base.training_logs(tmp_path, {"runs": {"base": ["base"], "focusft": ["focusft-s0"]}})
    assert table[2:] == ["| focusft-s0 | 6 | 0.45 → 4.65 → 1.60 | 2 | 9.0 (4) | 1.50 → 3.50 → 5.50 |"]


def test_training_data_leaves_out_the_evaluations_stories(tiny, tmp_path, monkeypatch):
    plan = real_base.PLANS["quick"]
    count = lambda text: len(tiny.tokenizer.encode(text).ids)  # noqa: E731
    first = real_base.synthetic.synthetic_conversation(random.Random(f"{real_base.TRAIN_SEED}/0"), 512, count)
    # A story the first conversation holds: its question, and a sentence of its logs as the facts.
    question = first["messages"][1]["content"].split("answer: ")[-1]
    logs = [m["content"] for m in first["messages"] if m["role"] == "tool"]
    facts = [logs[0].split(". ")[0] + "."]
    assert real_base.holds_story(first, facts, question)
    assert not real_base.holds_story(first, facts, "Where is nobody?")
    assert not real_base.holds_story(first, [*facts, "The sentence that is in no log."], question)
    # Pretend the evaluation asks about it: the data stage must skip it and draw one more.
    monkeypatch.setattr(real_base, "eval_stories", lambda plan: [(facts, question)])
    assert real_base.write_data(tmp_path, plan, tiny.tokenizer, print)
    record = json.loads((tmp_path / "data.json").read_text())
    assert record["skipped_holding_an_evaluation_story"] == [0] and record["records"] == plan.steps
    kept = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert first not in kept and len(kept) == plan.steps
    assert not real_base.write_data(tmp_path, plan, tiny.tokenizer, print)  # done: a rerun writes nothing


def test_the_real_evaluation_stories_never_reach_the_training_data():
    plan = real_base.PLANS["full"]
    stories = real_base.eval_stories(plan)
    assert len(stories) == len(real_base.eval_babilong.SYNTHETIC_TASKS) * len(plan.lengths) * plan.samples
    # The generator of eval_babilong.py's sample i is the one real_base checks against.
    source = real_base.eval_babilong.SyntheticData(seed=real_base.EVAL_SEED, count=1)
    sample = source.samples("qa2", "0k", real_base.synthetic.estimate_tokens)[0]
    facts, question, answer = real_base.synthetic.babi_story(source.story_rng("qa2", "0k", 0), "qa2")
    assert (sample["question"], sample["target"]) == (question, answer) and sample["input"] == " ".join(facts)


def test_a_training_run_stopped_by_a_signal_stops_the_protocol(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(real_base.focusft, "main", lambda argv: 0)  # after a SIGINT: a checkpoint, exit 0, no final/
    with pytest.raises(KeyboardInterrupt):  # replicate.guarded turns it into "interrupted; the same command resumes"
        real_base.train(tmp_path, real_base.PLANS["quick"], tiny.model, "sft-s0", "cpu", print)


def test_focusft_main_gives_the_callers_signal_handlers_back(tiny, tmp_path):
    """Ctrl-C works again in what follows a training run in the same process (the evaluations here)."""
    import signal

    from conftest import train_in_process

    mine = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    train_in_process(tiny, tmp_path / "run", "--max-steps", "1")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == mine


@pytest.mark.slow
def test_quick_runs_every_stage_and_a_rerun_does_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "real"
    assert replicate.main(["--base", str(tiny.model), "--quick", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["missing"] == []
    assert set(result["runs"]) == {"base", *replicate.VARIANTS}
    assert result["primary"]["mcnemar"]["pairs"] == len(real_base.PLANS["quick"].primary) * 2
    assert result["primary"]["per_seed"]["0"] == result["primary"]["mcnemar"]  # one seed: the pooled comparison
    assert [c[0] for c in result["claims"]][:4] == [
        "FocuSFT beats Standard SFT beyond its training length (+9.6 to +14.2 points at 4K-32K)",
        "Standard SFT barely moves the base model", "SFT + Bidir alone hurts",
        "Causal bilevel carries most of the gain"]
    budget = json.loads((out / "budget.json").read_text())
    assert set(budget["train_step_s"]) == {"sft", "focusft"} and budget["projection"]["total_cpu_h"] > 0
    assert set(budget["answer_s"]) == set(real_base.PLANS["quick"].lengths)
    times = json.loads((out / "times.json").read_text())
    assert {"data", "budget", "train/sft-s0", "eval/base/0k/qa1", "eval/focusft-s0/1k/qa1"} <= set(times)
    report = (out / "report.md").read_text()
    assert "Status: complete." in report and "## Primary endpoint" in report and "## The paper's claims" in report
    assert "| focusft-s0 | 2 |" in report  # its training log: 2 steps (the quick plan's)
    assert "Answers that loop" in report and "Wrong answers at 0k" in report
    try:
        import matplotlib  # noqa: F401
        assert all((out / "figures" / f).is_file() for f in ("accuracy.png", "effects.png"))
    except ImportError:
        assert "Figures skipped" in report
    # A rerun finds every stage done: nothing is trained or evaluated again.
    capsys.readouterr()
    assert replicate.main(["--base", str(tiny.model), "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "focusft.py" not in printed and "eval_babilong.py" not in printed
    # The records carried without the weights (docs/replication/real-model): a finished model is not trained
    # again; one with an evaluation left is, to the weights recorded in final.sha256, and only that is evaluated.
    for final in out.glob("train/*/final"):
        shutil.rmtree(final)
    (out / "eval" / "sft-s0" / "1k" / "qa1" / "results.json").unlink()
    assert replicate.main(["--base", str(tiny.model), "--quick", "--out", str(out), "--models", "sft-s0",
                           "focusft-s0"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("$ python focusft.py") == 1 and printed.count("$ python eval_babilong.py") == 1
    assert (out / "train" / "sft-s0" / "final").is_dir() and not (out / "train" / "focusft-s0" / "final").exists()


def test_weights_trained_again_must_be_the_ones_whose_evaluations_are_kept(tmp_path):
    run = tmp_path / "train" / "sft-s0"
    (run / "final").mkdir(parents=True)
    (run / "final" / "model.safetensors").write_bytes(b"weights")
    real_base.check_weights(run)  # the first time: recorded
    real_base.check_weights(run)  # the same weights again: fine
    (run / "final" / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(replicate.ReplicationError, match="weights differ from those recorded"):
        real_base.check_weights(run)


def test_bad_flags_end_in_one_line(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse: usage, then one line, status 2
        replicate.main(["--base", str(tmp_path), "--quick"])
    assert e.value.code == 2 and "no config.json there" in capsys.readouterr().err.splitlines()[-1]
    out = tmp_path / "other"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"plan": {}, "base": "elsewhere", "device": "cpu"}))
    error = cli_error(replicate.main, ["--base", tiny.model, "--quick", "--out", out])
    assert "holds a run of another plan" in error and "\n" not in error
    error = cli_error(replicate.main, ["--base", tiny.model, "--quick", "--out", tmp_path / "m", "--models", "sft-s7"])
    assert "--models sft-s7: not a model of the quick plan" in error and "\n" not in error
