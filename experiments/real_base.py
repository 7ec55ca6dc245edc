"""The paper's 2x2 table on a real pretrained checkpoint, pre-registered in
docs/replication/real-model-preregistration.md (issue 25). Run through replicate.py:

    python experiments/replicate.py --base runs/smollm2                 # the full protocol (12 CPU hours, resumable)
    python experiments/replicate.py --base runs/smollm2 --quick         # every stage at toy size (a few minutes)
    python experiments/replicate.py --base runs/smollm2 --device cuda   # a larger plan for one GPU (unmeasured)
    python experiments/replicate.py --base runs/smollm2 --stages data budget   # only measure this machine

No pretraining: the base model is the checkpoint. Stages, each writing under --out and skipped on a rerun when
its result is there (a training run stopped midway resumes from its last checkpoint; an evaluation stage, one
task at one length, starts over):
  data    train.jsonl: agentic conversations (synthetic.synthetic_conversation) whose answers need facts hidden
          in the tool outputs, drawn from their own seeds, and none holding a story the evaluation asks about;
  budget  seconds per training step (Standard SFT, FocuSFT) and per generated answer at every evaluation length,
          measured on the base model, and the plan's projected CPU hours (budget.json);
  train   one run per variant and seed, through focusft.py's main (replicate.VARIANTS, the 2x2 table);
  eval    one per model, length and task: eval_babilong.py --synthetic, the same samples for every model (the
          base model included);
  report  report.md, results.json and figures/: accuracy with Wilson intervals, paired comparisons to Standard
          SFT (exact McNemar test, Newcombe's paired interval, a paired bootstrap for the primary endpoint), the
          paper's claims row by row, and descriptive tables: the wrong answers, the answers that loop, the
          training logs, the attention diagnostics and every stage's CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import replicate  # noqa: E402, I001 (first: it puts scripts/ on the path, for convert_gguf)

import convert_gguf  # noqa: E402
import data  # noqa: E402
import eval_babilong  # noqa: E402
import evaluation  # noqa: E402
import focusft  # noqa: E402
import synthetic  # noqa: E402

VARIANTS = replicate.VARIANTS  # the 2x2 table: name -> (label, focusft.py flags)
EVAL_SEED = 0  # eval_babilong.py --synthetic --seed: the evaluation's stories
BUDGET_SEED = 1  # the budget's generation timing runs on other stories, so it shows no evaluation answer
TRAIN_SEED = "real-base/train"  # the training conversations' generators: f"{TRAIN_SEED}/{i}"
STAGES = ("data", "budget", "train", "eval", "report")


@dataclass(frozen=True)
class Plan:
    name: str
    train_len: int = 1024  # tokens per training conversation (the base model's tokenizer)
    steps: int = 60  # optimizer steps of one sample each: one epoch over `steps` conversations
    lr: float = 5e-5
    seeds: tuple[int, ...] = (0, 1, 2)  # Standard SFT and FocuSFT
    ablation_seeds: tuple[int, ...] = (0,)  # SFT + Bidir and Causal bilevel
    tasks: tuple[str, ...] = ("qa1", "qa2", "qa3")
    lengths: tuple[str, ...] = ("0k", "1k", "2k", "4k")
    primary: tuple[str, ...] = ("2k", "4k")  # the lengths beyond the training length
    samples: int = 50  # per task and length: Standard SFT and FocuSFT at the primary lengths
    side_samples: int = 10  # the first this many of them everywhere else (the base, the 1-seed variants, 0k, 1k)
    batch: int = 8  # answers generated together (eval_babilong.py --batch-size)
    ckpt_every: int = 20  # training checkpoints, so a killed run loses at most this many steps (0: on a signal)
    attn_every: int = 20  # focusft.py's attention diagnostics (0: at the start and the end only)
    budget_steps: int = 4  # training steps timed per kind (the first is left out: it warms up)
    budget_samples: int = 6  # answers timed per length
    bootstrap: int = 10000  # resamples of the primary endpoint's paired bootstrap


PLANS = {
    # Sized from budget.json (docs/replication/real-model-budget.json): see the pre-registration.
    "full": Plan("full"),
    "quick": Plan("quick", train_len=512, steps=2, seeds=(0,), tasks=("qa1",), lengths=("0k", "1k"), primary=("1k",),
                  samples=2, side_samples=1, ckpt_every=0, attn_every=0, budget_steps=2, budget_samples=1,
                  bootstrap=200),
    # Not measured on a GPU: sized by the CPU figures and a GPU's usual 30-100x speed-up on this model.
    # 7168, not 8k: the model's context is 8192 tokens, prompt included.
    "gpu": Plan("gpu", steps=300, ablation_seeds=(0, 1, 2), tasks=("qa1", "qa2", "qa3", "qa4", "qa5"),
                lengths=("0k", "1k", "2k", "4k", "7168"), primary=("2k", "4k", "7168"), samples=100,
                side_samples=100, batch=32, ckpt_every=50, attn_every=50),
}


def models(plan: Plan) -> list[str]:
    """Every evaluated model: the base, then the trained runs, seed by seed (a stopped run leaves whole seeds)."""
    runs = [(s, v) for v in VARIANTS for s in (plan.seeds if v in ("sft", "focusft") else plan.ablation_seeds)]
    return ["base"] + [f"{v}-s{s}" for s, v in sorted(runs, key=lambda r: (r[0], list(VARIANTS).index(r[1])))]


def variant_of(model: str) -> str:
    return model if model == "base" else model.rsplit("-s", 1)[0]


def seed_of(model: str) -> int:
    return int(model.rsplit("-s", 1)[1])


def samples_of(plan: Plan, model: str, length: str) -> int:
    """Answers per task of a model at a length: the full count only where the primary endpoint needs it (sample i
    depends only on i, so the side evaluations hold the first samples of the primary ones: the same samples)."""
    return plan.samples if variant_of(model) in ("sft", "focusft") and length in plan.primary else plan.side_samples


# ----------------------------------------------------------------------------------------------------
# Statistics (the independent-sample ones, wilson and diff_interval, are replicate.py's)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: a binomial(b + c, 1/2) test."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_interval(a: int, b: int, c: int, d: int) -> tuple[float, float, float]:
    """p1 - p2 of paired outcomes with Newcombe's (1998) method 10 interval. a: both right, b: only the first
    right, c: only the second, d: neither. The two Wilson intervals are combined as in diff_interval, less
    their covariance: phi is the table's correlation, its numerator moved n/2 towards 0 (Newcombe's rule)."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = replicate.wilson(a + b, n)
    l2, u2 = replicate.wilson(a + c, n)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    cross = cross - n / 2 if cross > n / 2 else (0 if cross >= 0 else cross)
    phi = cross / math.sqrt(margins) if margins else 0.0
    lo = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return p1 - p2, p1 - p2 - lo, p1 - p2 + hi


def pairs(correct: dict, first: list[str], second: list[str], cells: list[tuple[str, str]]) -> list[tuple[bool, bool]]:
    """(first right, second right) over the same samples: runs matched by seed, and a single model (the base,
    or a variant with one seed) matched with every run of the other side."""
    if len(first) == 1 or len(second) == 1:
        matched = [(x, y) for x in first for y in second]
    else:
        matched = [(x, y) for x in first for y in second if seed_of(x) == seed_of(y)]
    n = {cell: common(correct, first + second, cell) for cell in cells}
    return [(r1, r2) for x, y in matched for cell in cells
            for r1, r2 in zip(correct[x][cell][:n[cell]], correct[y][cell][:n[cell]], strict=True)]


def common(correct: dict, runs: list[str], cell: tuple[str, str]) -> int:
    """How many samples of a cell every run answered (the first ones)."""
    return min(len(correct[r][cell]) for r in runs)


def compare(correct: dict, first: list[str], second: list[str], cells: list[tuple[str, str]]) -> dict:
    """first - second, paired: the difference, Newcombe's interval, McNemar's exact p and the 2x2 counts."""
    table = Counter(pairs(correct, first, second, cells))
    a, b, c, d = table[True, True], table[True, False], table[False, True], table[False, False]
    diff, lo, hi = paired_interval(a, b, c, d)
    return {"diff": diff, "lo": lo, "hi": hi, "p_mcnemar": mcnemar_exact(b, c), "both": a, "only_first": b,
            "only_second": c, "neither": d, "pairs": a + b + c + d}


def mean_accuracy(correct: dict, runs: list[str], cells: list[tuple[str, str]], picks: dict) -> float:
    """Mean over runs and cells of a cell's accuracy on the samples `picks` (cell -> sample indices)."""
    total = 0.0
    for run in runs:
        for cell in cells:
            rows = correct[run][cell]
            idx = picks[cell]
            total += sum(rows[i] for i in idx) / len(idx)
    return total / (len(runs) * len(cells))


def bootstrap_diff(correct: dict, first: list[str], second: list[str], cells: list[tuple[str, str]],
                   reps: int) -> tuple[float, float, float]:
    """Mean accuracy of `first` runs minus `second` runs, with a 95% percentile interval from resampling the
    evaluation samples within each (task, length) cell, the same draw for both sides (paired), on the samples
    both sides answered."""
    rng = random.Random("real-base/bootstrap")
    n = {cell: common(correct, first + second, cell) for cell in cells}
    diffs = []
    for _ in range(reps):
        picks = {cell: [rng.randrange(n[cell]) for _ in range(n[cell])] for cell in cells}
        diffs.append(mean_accuracy(correct, first, cells, picks) - mean_accuracy(correct, second, cells, picks))
    diffs.sort()
    every = {cell: range(n[cell]) for cell in cells}
    point = mean_accuracy(correct, first, cells, every) - mean_accuracy(correct, second, cells, every)
    return point, diffs[int(0.025 * reps)], diffs[min(reps - 1, int(0.975 * reps))]


# ----------------------------------------------------------------------------------------------------
# Stage: data


def eval_stories(plan: Plan) -> list[tuple[list[str], str]]:
    """(facts, question) of every story the evaluation asks about (every task --synthetic builds, so a later
    evaluation of more tasks is covered too)."""
    source = eval_babilong.SyntheticData(seed=EVAL_SEED)
    stories = []
    for task in eval_babilong.SYNTHETIC_TASKS:
        for length in plan.lengths:
            for i in range(plan.samples):
                facts, question, _ = synthetic.babi_story(source.story_rng(task, length, i), task)
                stories.append((facts, question))
    return stories


def holds_story(record: dict, facts: list[str], question: str) -> bool:
    """Whether a training conversation asks `question` with all of `facts`, in order, in its tool outputs."""
    if not any(m["role"] == "user" and question in m["content"] for m in record["messages"]):
        return False
    logs = " ".join(m["content"] for m in record["messages"] if m["role"] == "tool")
    at = 0
    for fact in facts:
        at = logs.find(fact, at)
        if at < 0:
            return False
        at += len(fact)
    return True


def write_data(out: Path, plan: Plan, tok, log) -> bool:
    """train.jsonl: plan.steps conversations of ~plan.train_len tokens; data.json says which were left out. True
    when it wrote them."""
    if (out / "train.jsonl").is_file() and (out / "data.json").is_file():
        return False
    count = lambda text: len(tok.encode(text).ids)  # noqa: E731
    stories = eval_stories(plan)
    records, skipped, i = [], [], 0
    while len(records) < plan.steps:
        record = synthetic.synthetic_conversation(random.Random(f"{TRAIN_SEED}/{i}"), plan.train_len, count)
        if any(holds_story(record, facts, q) for facts, q in stories):
            skipped.append(i)  # the evaluation asks about this very story: a model could have learned its answer
        else:
            records.append(record)
        i += 1
    evaluation.write_jsonl(out / "train.jsonl", records)
    lengths = [count(data.render_chat(r["messages"], r["tools"])) for r in records]
    evaluation.write_json(out / "data.json", {
        "generator": "synthetic.synthetic_conversation", "seeds": f"random.Random('{TRAIN_SEED}/' + str(i))",
        "records": len(records), "skipped_holding_an_evaluation_story": skipped, "checked_stories": len(stories),
        "tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)}})
    log(f"data: {len(records)} conversations ({min(lengths)}-{max(lengths)} tokens), {len(skipped)} left out for "
        f"holding one of the {len(stories)} evaluation stories")
    return True


# ----------------------------------------------------------------------------------------------------
# Stages: train, eval (and the budget, which times both)


def train_argv(out: Path, plan: Plan, base: Path, variant: str, seed: int, run: Path, device: str,
               steps: int) -> list[str]:
    return ["--model", str(base), "--data", str(out / "train.jsonl"), "--out", str(run), *VARIANTS[variant][1],
            "--max-len", str(2 * plan.train_len), "--max-steps", str(steps), "--epochs", "1", "--lr", str(plan.lr),
            "--grad-accum", "1", "--attn-every", str(plan.attn_every), "--ckpt-every", str(plan.ckpt_every),
            "--keep", "1", "--seed", str(seed), "--device", device]


def train(out: Path, plan: Plan, base: Path, model: str, device: str, log) -> bool:
    """One training run, unless finished; a stopped one resumes from its checkpoint. True when it ran."""
    run = out / "train" / model
    if (run / "final" / "config.json").is_file():
        return False
    variant, seed = variant_of(model), seed_of(model)
    replicate.call("focusft.py", focusft.main, train_argv(out, plan, base, variant, seed, run, device, plan.steps), log)
    if not (run / "final" / "config.json").is_file():  # stopped by a signal: focusft.py saved a checkpoint
        raise KeyboardInterrupt
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # finished: final/ is what counts (a checkpoint is ~3x it)
    check_weights(run)
    return True


def check_weights(run: Path) -> None:
    """Record the sha256 of the final weights in final.sha256, or, when it is already there (the run's records were
    kept without its weights, which are then trained again), require the same weights: evaluations of two
    different models must not be mixed under one name."""
    # sha256sum's format, one line per weight file: `sha256sum -c ../final.sha256` checks it from final/.
    digests = "".join(f"{convert_gguf.sha256(f)}  {f.name}\n" for f in sorted((run / "final").glob("*.safetensors")))
    recorded = run / "final.sha256"
    if recorded.is_file() and recorded.read_text() != digests:
        evals = run.parent.parent / "eval" / run.name
        raise replicate.ReplicationError(f"{run / 'final'}: trained again, its weights differ from those recorded in "
                                         f"{recorded}, whose evaluations are kept; remove {evals} and {recorded} to "
                                         "evaluate the new weights")
    recorded.write_text(digests)


@contextlib.contextmanager
def locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def model_dir(out: Path, base: Path, model: str) -> Path:
    return base if model == "base" else out / "train" / model / "final"


def eval_argv(model: Path, where: Path, plan: Plan, length: str, device: str, seed: int, samples: int,
              tasks: tuple[str, ...]) -> list[str]:
    return ["--model", str(model), "--synthetic", "--seed", str(seed), "--lengths", length, "--tasks", *tasks,
            "--max-samples", str(samples), "--batch-size", str(plan.batch), "--chat-template", "--device", device,
            "--out", str(where)]


def evaluate(out: Path, plan: Plan, base: Path, model: str, length: str, task: str, device: str, log) -> bool:
    """One model at one length on one task, unless done. True when it ran."""
    where = out / "eval" / model / length / task
    if (where / "results.json").is_file():
        return False
    argv = eval_argv(model_dir(out, base, model), where, plan, length, device, EVAL_SEED,
                     samples_of(plan, model, length), (task,))
    replicate.call("eval_babilong.py", eval_babilong.main, argv, log)
    return True


def measure_budget(out: Path, plan: Plan, base: Path, device: str, log) -> dict:
    """Seconds per training step and per answer on this machine now, by the wall clock and in CPU time (this
    process's, all threads), with the load average around each measurement; written to budget.json.

    The machine is shared: the wall clock depends on what else runs, the CPU time much less, so the plan is
    sized in CPU hours. A step's CPU time is its wall time (focusft.py's step_s, the median after the first
    step, which warms up) times the share of a CPU the whole run got."""
    where = out / "budget"
    result = {"machine": machine(), "train_step_s": {}, "train_step_cpu_s": {}, "answer_s": {}, "answer_cpu_s": {},
              "loadavg": {}}

    def measured(fn) -> tuple[float, float, list]:
        load, wall, cpu = os.getloadavg(), time.time(), time.process_time()
        fn()
        return time.time() - wall, time.process_time() - cpu, [load, os.getloadavg()]

    for variant in ("sft", "focusft"):
        run = where / f"train-{variant}"
        shutil.rmtree(run, ignore_errors=True)  # a stopped measurement is measured again, from the start
        argv = train_argv(out, plan, base, variant, 0, run, device, plan.budget_steps)
        wall, cpu, result["loadavg"][f"train-{variant}"] = measured(
            lambda argv=argv: replicate.call("focusft.py", focusft.main, argv, log))
        steps = [r["step_s"] for r in focusft.read_metrics(run / "metrics.jsonl") if "step_s" in r]
        result["train_step_s"][variant] = statistics.median(steps[1:] or steps)
        result["train_step_cpu_s"][variant] = result["train_step_s"][variant] * cpu / wall
        for heavy in ("final", "checkpoints"):  # only the timings are needed (metrics.jsonl stays)
            shutil.rmtree(run / heavy, ignore_errors=True)
    for length in plan.lengths:
        shutil.rmtree(where / f"eval-{length}", ignore_errors=True)  # else finished answers would be skipped
        argv = eval_argv(base, where / f"eval-{length}", plan, length, device, BUDGET_SEED, plan.budget_samples,
                         plan.tasks[:1])
        wall, cpu, result["loadavg"][f"eval-{length}"] = measured(
            lambda argv=argv: replicate.call("eval_babilong.py", eval_babilong.main, argv, log))
        result["answer_s"][length] = wall / plan.budget_samples  # model loading included
        result["answer_cpu_s"][length] = cpu / plan.budget_samples
    evaluation.write_json(out / "budget.json", result)
    return result


def project(plan: Plan, budget: dict) -> dict:
    """Projected CPU seconds of every stage of `plan` from the measured CPU time per step and per answer, the
    totals in CPU hours, and the wall-clock hours at the share of a CPU the measurements got."""
    stages = {}
    for model in models(plan)[1:]:
        kind = "sft" if variant_of(model) in ("sft", "sft-bidir") else "focusft"
        stages[f"train/{model}"] = plan.steps * budget["train_step_cpu_s"][kind]
    for model in models(plan):
        for length in plan.lengths:
            for task in plan.tasks:
                answers = samples_of(plan, model, length)
                stages[f"eval/{model}/{length}/{task}"] = answers * budget["answer_cpu_s"][length]
    train_s = sum(v for k, v in stages.items() if k.startswith("train/"))
    eval_s = sum(v for k, v in stages.items() if k.startswith("eval/"))
    walls = [budget["train_step_s"][k] / budget["train_step_cpu_s"][k] for k in budget["train_step_s"]]
    walls += [budget["answer_s"][n] / budget["answer_cpu_s"][n] for n in budget["answer_s"]]
    return {"cpu_s": stages, "train_cpu_h": train_s / 3600, "eval_cpu_h": eval_s / 3600,
            "total_cpu_h": (train_s + eval_s) / 3600, "wall_per_cpu": statistics.mean(walls),
            "longest_stage": max(stages, key=stages.get), "longest_stage_cpu_h": max(stages.values()) / 3600}


def machine() -> str:
    return (f"{platform.machine()}, {evaluation.usable_cores()} usable CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s)")


# ----------------------------------------------------------------------------------------------------
# Stage: report


def load_eval(out: Path, plan: Plan) -> tuple[dict, dict, list[str]]:
    """correct[model][(task, length)] = per-sample booleans, outputs[model][(task, length)] = the rows, and the
    evaluations not finished yet."""
    correct, outputs, missing = {}, {}, []
    for model in models(plan):
        for length in plan.lengths:
            for task in plan.tasks:
                where = out / "eval" / model / length / task
                if not (where / "results.json").is_file():
                    missing.append(f"{model}/{length}/{task}")
                    continue
                rows = eval_babilong.read_predictions(next(where.glob(f"{task}_{length}_*.csv")))
                outputs.setdefault(model, {})[task, length] = rows
                correct.setdefault(model, {})[task, length] = [
                    eval_babilong.is_correct(task, r["target"], r["output"], r["question"]) for r in rows]
    return correct, outputs, missing


def runs_of(correct: dict, plan: Plan, variant: str) -> list[str]:
    """The finished runs of a variant: evaluated at every length."""
    return [m for m in models(plan) if variant_of(m) == variant and m in correct
            and len(correct[m]) == len(plan.tasks) * len(plan.lengths)]


LABELS = {"base": "Base model", **{v: label for v, (label, _) in VARIANTS.items()}}


def analyse(correct: dict, plan: Plan) -> dict:
    """Every number of the report from per-sample correctness."""
    runs = {v: runs_of(correct, plan, v) for v in LABELS}
    runs = {v: r for v, r in runs.items() if r}
    res = {"runs": runs, "accuracy": {}, "per_run": {}, "versus_sft": {}, "primary": None}

    def counts(rs: list[str], tasks: tuple[str, ...], length: str) -> list[int]:
        return [sum(sum(correct[r][t, length]) for r in rs for t in tasks),
                sum(len(correct[r][t, length]) for r in rs for t in tasks)]

    for v, rs in runs.items():
        res["accuracy"][v] = {f"{task}/{length}": counts(rs, plan.tasks if task == "mean" else (task,), length)
                              for length in plan.lengths for task in (*plan.tasks, "mean")}
        res["per_run"].update({r: {n: counts([r], plan.tasks, n) for n in plan.lengths} for r in rs})
    if "sft" not in runs:
        return res
    beyond = [(t, n) for t in plan.tasks for n in plan.primary]
    for v, rs in runs.items():
        if v == "sft":
            continue
        res["versus_sft"][v] = {length: compare(correct, rs, runs["sft"], [(t, length) for t in plan.tasks])
                                for length in plan.lengths}
        res["versus_sft"][v]["beyond"] = compare(correct, rs, runs["sft"], beyond)
        res["versus_sft"][v]["beyond_mean"] = bootstrap_diff(correct, rs, runs["sft"], beyond, plan.bootstrap)
    if "focusft" in runs:
        res["primary"] = {"seeds": {"focusft": len(runs["focusft"]), "sft": len(runs["sft"])},
                          "bootstrap": res["versus_sft"]["focusft"]["beyond_mean"],
                          "mcnemar": res["versus_sft"]["focusft"]["beyond"],
                          "per_seed": {}}  # descriptive: how much the seeds differ
        sft_of = {seed_of(r): r for r in runs["sft"]}
        for r in runs["focusft"]:
            if (seed := seed_of(r)) in sft_of:
                res["primary"]["per_seed"][str(seed)] = compare(correct, [r], [sft_of[seed]], beyond)
    return res


def verdict(lo: float, hi: float) -> str:
    """'supported' when the interval lies above 0, 'contradicted' below it, else 'inconclusive'."""
    return "supported" if lo > 0 else "contradicted" if hi < 0 else "inconclusive"


def claims(res: dict, plan: Plan) -> list[tuple[str, str, str]]:
    """The paper's claims, each with its verdict at this scale and the reason (rules: the pre-registration)."""
    vs = res["versus_sft"]
    beyond = "/".join(plan.primary)
    rows = []

    def pts(x: float) -> str:
        return f"{100 * x:+.1f}"

    if res["primary"]:
        d, lo, hi = res["primary"]["bootstrap"]
        v = verdict(lo, hi)
        size = " The paper's smallest gain (+9.6) is outside the interval." if hi < 0.096 else ""
        rows.append(("FocuSFT beats Standard SFT beyond its training length (+9.6 to +14.2 points at 4K-32K)", v,
                     f"primary endpoint: {pts(d)} points [{pts(lo)}, {pts(hi)}] at {beyond} (paired bootstrap)."
                     + size))
    else:
        rows.append(("FocuSFT beats Standard SFT beyond its training length", "pending", "runs not finished"))
    if "base" in vs:  # base - SFT: the claim is about SFT - base, inside +-5 points
        d, lo, hi = (-x for x in vs["base"]["beyond_mean"])
        lo, hi = min(lo, hi), max(lo, hi)
        v = "supported" if -0.05 < lo and hi < 0.05 else "contradicted" if lo > 0.05 or hi < -0.05 else "inconclusive"
        rows.append(("Standard SFT barely moves the base model", v,
                     f"SFT - base {pts(d)} [{pts(lo)}, {pts(hi)}] at {beyond}; rule: interval within +-5 points."))
    else:
        rows.append(("Standard SFT barely moves the base model", "pending", "runs not finished"))
    if "sft-bidir" in vs:
        d, lo, hi = vs["sft-bidir"]["beyond_mean"]
        v = {"supported": "contradicted", "contradicted": "supported"}.get(verdict(lo, hi), "inconclusive")
        rows.append(("SFT + Bidir alone hurts", v, f"SFT + Bidir - SFT {pts(d)} [{pts(lo)}, {pts(hi)}] at {beyond} "
                     f"({len(res['runs']['sft-bidir'])} seed(s))."))
    else:
        rows.append(("SFT + Bidir alone hurts", "pending", "runs not finished"))
    if "bilevel-causal" in vs and res["primary"]:
        d, lo, hi = vs["bilevel-causal"]["beyond_mean"]
        full = res["primary"]["bootstrap"][0]
        if res["primary"]["bootstrap"][1] <= 0:
            v, why = "untestable", "FocuSFT shows no gain over SFT here, so there is no gain to carry."
        else:
            v = "supported" if lo > 0 and d >= full / 2 else "contradicted" if hi < full / 2 else "inconclusive"
            why = f"rule: interval above 0 and point at least half of FocuSFT's {pts(full)}."
        rows.append(("Causal bilevel carries most of the gain", v,
                     f"Causal bilevel - SFT {pts(d)} [{pts(lo)}, {pts(hi)}] at {beyond}. {why}"))
    else:
        rows.append(("Causal bilevel carries most of the gain", "pending", "runs not finished"))
    rows += [
        ("The gain holds out to 32K", "untestable", "the base model's context is 8192 tokens; lengths here end at "
         f"{plan.lengths[-1]}."),
        ("FocuSFT lowers the attention sink and raises context engagement", "untestable here",
         "not an endpoint of this protocol (the attention analysis is issue 21); focusft.py's diagnostics are listed "
         "below, descriptive only."),
        ("Results on Qwen2.5-7B, LongBench, RULER, GPQA", "untestable", "a 135M model on 2 CPU cores; synthetic "
         "BABILong qa tasks only."),
    ]
    return rows


def wrong_answers(outputs: dict, correct: dict, res: dict, lengths: tuple[str, ...], top: int = 5) -> list[str]:
    """The commonest wrong answers per variant at these lengths, and how they split into kinds."""
    lines = []
    for v, rs in res["runs"].items():
        kinds, texts = Counter(), Counter()
        for r in rs:
            for cell, rows in outputs[r].items():
                if cell[1] not in lengths:
                    continue
                for row, ok in zip(rows, correct[r][cell], strict=True):
                    if ok:
                        continue
                    text = " ".join(row["output"].split())
                    labels = [w for w in eval_babilong.TASK_LABELS[cell[0]] if w.lower() in text.lower()]
                    kinds["empty" if not text else "tool call" if "tool_call" in text or "read_log" in text
                          else "another label" if labels else "no label"] += 1
                    texts[text[:60]] += 1
        total = sum(kinds.values())
        if not total:
            continue
        split = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
        common = "; ".join(f"`{t or '(empty)'}` x{n}" for t, n in texts.most_common(top))
        lines.append(f"| {LABELS[v]} | {total} | {split} | {common.replace('|', '/')} |")
    return (["| variant | wrong | kinds | commonest (first 60 characters) |", "| --- | --- | --- | --- |", *lines]
            if lines else ["No wrong answers at these lengths yet."])


def repeats(text: str, times: int = 3) -> bool:
    """Whether the answer loops: one three-word phrase in it `times` or more times ("The answer is the library.
    The answer is the library. The answer is ...", cut off by the token limit); words only, punctuation aside."""
    words = re.findall(r"\w+", text.lower())
    return any(n >= times for n in Counter(zip(words, words[1:], words[2:], strict=False)).values())


def looping(outputs: dict, res: dict, plan: Plan) -> list[str]:
    """Per run, how many of its answers at the primary lengths loop (repeats), right or wrong."""
    lines = ["| run | looping answers | of |", "| --- | --- | --- |"]
    for rs in res["runs"].values():
        for r in rs:
            rows = [row for cell, cell_rows in outputs[r].items() if cell[1] in plan.primary for row in cell_rows]
            lines.append(f"| {r} | {sum(repeats(row['output']) for row in rows)} | {len(rows)} |")
    return lines


def thirds(values: list[float]) -> str:
    """The means of the first, middle and last third of a run's values: its trend, in one cell."""
    k = len(values) / 3
    parts = [values[round(i * k):round((i + 1) * k)] for i in range(3)]
    return " → ".join(f"{statistics.fmean(p):.2f}" for p in parts) if all(parts) else "-"


def training_logs(out: Path, res: dict, spike: float = 2.0) -> list[str]:
    """Per trained run, from its metrics.jsonl: the outer (SFT) loss and, for the bilevel variants, the inner
    loop's loss before its first step (inner_first): by thirds of the run, how many steps the outer loss passed
    `spike`, and its largest value."""
    lines = [f"| run | steps | loss by thirds | steps with loss > {spike:g} | largest loss (step) | "
             "inner_first by thirds |", "| --- | --- | --- | --- | --- | --- |"]
    for v, rs in res["runs"].items():
        for r in rs if v != "base" else []:
            steps = [x for x in focusft.read_metrics(out / "train" / r / "metrics.jsonl") if "loss" in x]
            if not steps:
                continue
            loss = [x["loss"] for x in steps]
            top = max(steps, key=lambda x: x["loss"])
            inner = [x["inner_first"] for x in steps if "inner_first" in x]
            lines.append(f"| {r} | {len(steps)} | {thirds(loss)} | {sum(x > spike for x in loss)} | "
                         f"{top['loss']:.1f} ({top['step']}) | {thirds(inner) if inner else '-'} |")
    return lines


def diagnostics(out: Path, res: dict) -> list[str]:
    lines = ["| run | sink mass, first | sink mass, last | engagement, first | engagement, last |",
             "| --- | --- | --- | --- | --- |"]
    for v, rs in res["runs"].items():
        for r in rs if v != "base" else []:
            metrics = focusft.read_metrics(out / "train" / r / "metrics.jsonl")
            rows = [x["attn_base"] for x in metrics if "attn_base" in x]
            if rows:
                lines.append(f"| {r} | {rows[0]['sink_mass']:.3f} | {rows[-1]['sink_mass']:.3f} | "
                             f"{rows[0]['context_engagement']:.3f} | {rows[-1]['context_engagement']:.3f} |")
    return lines


def figures(res: dict, plan: Plan, fig_dir: Path) -> list[str]:
    """accuracy.png (mean over tasks vs length, per variant) and effects.png (each variant minus Standard SFT,
    paired); none without matplotlib."""
    try:  # optional: experiments/requirements.txt
        from matplotlib import pyplot as plt
    except ImportError:
        return []
    plt.switch_backend("Agg")  # files only, no display
    fig_dir.mkdir(parents=True, exist_ok=True)

    def chart(name: str, series: dict, ylabel: str, title: str) -> str:
        """Points with asymmetric error bars over the lengths: series is label -> (y, below, above)."""
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for k, (label, (y, below, above)) in enumerate(series.items()):
            shift = (k - (len(series) - 1) / 2) * 0.05  # side by side, so the bars do not hide each other
            ax.errorbar([i + shift for i in range(len(y))], y, yerr=[below, above], marker="o", capsize=3,
                        label=label, color=f"C{list(LABELS.values()).index(label)}")  # one colour per variant
        ax.axhline(0, color="grey", lw=1, ls=":")
        ax.set_xticks(range(len(plan.lengths)), plan.lengths)
        ax.set(xlabel="context length", ylabel=ylabel, title=title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=80)
        plt.close(fig)
        return name

    accuracy = {}
    for v, acc in res["accuracy"].items():
        cells = [(acc[f"mean/{n}"], replicate.wilson(*acc[f"mean/{n}"])) for n in plan.lengths]
        accuracy[LABELS[v]] = ([100 * c / t for (c, t), _ in cells], [100 * (c / t - lo) for (c, t), (lo, _) in cells],
                               [100 * (hi - c / t) for (c, t), (_, hi) in cells])
    made = [chart("accuracy.png", accuracy, "accuracy, % (95% Wilson)", f"synthetic BABILong {', '.join(plan.tasks)}")]
    if res["versus_sft"]:
        effects = {LABELS[v]: ([100 * comp[n]["diff"] for n in plan.lengths],
                               [100 * (comp[n]["diff"] - comp[n]["lo"]) for n in plan.lengths],
                               [100 * (comp[n]["hi"] - comp[n]["diff"]) for n in plan.lengths])
                   for v, comp in res["versus_sft"].items()}
        made.append(chart("effects.png", effects, "minus Standard SFT, points", "2x2 effects (paired, 95% Newcombe)"))
    return made


def write_report(out: Path, plan: Plan, argv: list[str], times: dict, log) -> dict:
    correct, outputs, missing = load_eval(out, plan)
    res = analyse(correct, plan)
    budget = json.loads((out / "budget.json").read_text()) if (out / "budget.json").is_file() else None
    fmt = replicate.fmt_ci
    lines = [f"# FocuSFT's 2x2 table on a real pretrained model ({plan.name} plan)", "",
             f"Command: `python experiments/replicate.py {shlex.join(argv)}`  ", f"Machine: {machine()}  ",
             "Protocol: docs/replication/real-model-preregistration.md; this plan: "
             + ", ".join(f"{k} {v}" for k, v in asdict(plan).items()), "",
             "Status: complete." if not missing else
             f"Status: PARTIAL -- not evaluated yet: {', '.join(missing)} (the same command resumes).", "",
             "## Accuracy, % [95% Wilson], pooled over seeds", "",
             "| variant (runs) | task | " + " | ".join(plan.lengths) + " |",
             "| --- | --- |" + " --- |" * len(plan.lengths)]
    for v, acc in res["accuracy"].items():
        for task in (*plan.tasks, "mean"):
            cells = [fmt(*acc[f"{task}/{n}"]) for n in plan.lengths]
            lines.append(f"| {LABELS[v]} ({len(res['runs'][v])}) | {task} | " + " | ".join(cells) + " |")
    lines += ["", "Per run, mean over the tasks:", "", "| run | " + " | ".join(plan.lengths) + " |",
              "| --- |" + " --- |" * len(plan.lengths)]
    lines += [f"| {r} | " + " | ".join(fmt(*acc[n]) for n in plan.lengths) + " |" for r, acc in res["per_run"].items()]
    if res["primary"]:
        d, lo, hi = res["primary"]["bootstrap"]
        m = res["primary"]["mcnemar"]
        mean = {v: statistics.fmean(c / n for c, n in (res["accuracy"][v][f"mean/{x}"] for x in plan.primary))
                for v in ("focusft", "sft")}
        lines += ["", "## Primary endpoint", "",
                  f"Mean accuracy over {', '.join(plan.tasks)} at {', '.join(plan.primary)}, FocuSFT minus Standard "
                  f"SFT ({res['primary']['seeds']['focusft']} and {res['primary']['seeds']['sft']} seeds, "
                  f"{100 * mean['focusft']:.1f}% and {100 * mean['sft']:.1f}%): "
                  f"**{100 * d:+.1f} points**, 95% paired bootstrap interval [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                  f"({plan.bootstrap} resamples of the samples within each task and length). Seed-matched pairs: "
                  f"{m['pairs']}, FocuSFT alone right {m['only_first']}, SFT alone right {m['only_second']}, exact "
                  f"McNemar p = {m['p_mcnemar']:.3g}, Newcombe {100 * m['diff']:+.1f} [{100 * m['lo']:+.1f}, "
                  f"{100 * m['hi']:+.1f}].", "",
                  "Per seed (descriptive): " + "; ".join(
                      f"seed {k} {100 * c['diff']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}] "
                      f"p={c['p_mcnemar']:.2g}" for k, c in res["primary"]["per_seed"].items()) + "."]
    if res["versus_sft"]:
        lines += ["", "## Paired comparisons to Standard SFT, points [95% Newcombe], exact McNemar p", "",
                  "Same samples; runs matched by seed, a single model against every run of the other side.", "",
                  "| variant | " + " | ".join(plan.lengths) + f" | beyond: {' + '.join(plan.primary)} |",
                  "| --- |" + " --- |" * (len(plan.lengths) + 1)]
        for v, comp in res["versus_sft"].items():
            cells = [f"{100 * c['diff']:+.1f} [{100 * c['lo']:+.0f}, {100 * c['hi']:+.0f}] p={c['p_mcnemar']:.2g}"
                     for c in (comp[n] for n in (*plan.lengths, "beyond"))]
            lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    lines += ["", "## The paper's claims", "", "| claim | at this scale | why |", "| --- | --- | --- |"]
    lines += [f"| {c} | {v} | {why} |" for c, v, why in claims(res, plan)]
    lines += ["", f"## Wrong answers at {', '.join(plan.primary)}", "",
              *wrong_answers(outputs, correct, res, plan.primary)]
    lines += ["", f"Answers that loop (a three-word phrase three or more times), right or wrong, at "
              f"{', '.join(plan.primary)}:", "", *looping(outputs, res, plan)]
    if plan.lengths[0] not in plan.primary:  # the shortest length: the sanity row, where the base model reads
        lines += ["", f"Wrong answers at {plan.lengths[0]} (descriptive):", "",
                  *wrong_answers(outputs, correct, res, plan.lengths[:1])]
    lines += ["", "## Training (focusft.py's metrics.jsonl; descriptive)", "", *training_logs(out, res)]
    lines += ["", "## Attention diagnostics during training (focusft.py's metrics.jsonl, base weights; descriptive)",
              "", *diagnostics(out, res)]
    lines += ["", "## CPU time of every stage", "", "Measured in this process (`time.process_time`, all threads) and "
              "by the wall clock; the load average is the machine's when the stage started (it is shared).", "",
              "| stage | wall, min | CPU, min | load average | runs |", "| --- | --- | --- | --- | --- |"]
    for key, t in times.items():
        lines.append(f"| {key} | {t['wall_s'] / 60:.1f} | {t['cpu_s'] / 60:.1f} | {t['load'][0]:.1f} | {t['runs']} |")
    total = sum(t["cpu_s"] for t in times.values()) / 3600
    projected = f" (projected before the run: {budget['projection']['total_cpu_h']:.2f} h)" if budget else ""
    lines.append(f"\nTotal CPU time: {total:.2f} h{projected}")
    made = figures(res, plan, out / "figures")
    lines += [f"\n![{m}](figures/{m})" for m in made] or ["", "Figures skipped: matplotlib is not installed."]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    results = {"plan": asdict(plan), "command": shlex.join(argv), "missing": missing, "times": times,
               "claims": claims(res, plan), **res}
    evaluation.write_json(out / "results.json", results)
    log(f"report: {out / 'report.md'}")
    return results


# ----------------------------------------------------------------------------------------------------
# The run


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="experiments/replicate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, metavar="DIR",
                   help="the pretrained checkpoint to start from (an HF Qwen2 directory, e.g. runs/smollm2)")
    p.add_argument("--out", metavar="DIR",
                   help="output directory; a rerun skips every stage done there (default: runs/real-base, "
                        "runs/real-base-quick or runs/real-base-gpu)")
    p.add_argument("--quick", action="store_true", help="every stage at toy size, in a few minutes")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the pre-registered plan; cuda: the larger 'gpu' plan (default: cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1, as replicate.py: the machine is shared)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="stages to run (default: all); each needs the data stage's train.jsonl")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="train and evaluate only these models (base, sft-s0, focusft-s1, ...; default: all), so "
                        "that several processes can share --out: e.g. one per core, each with its own models")
    args = p.parse_args(argv)
    replicate.check_machine_flags(p, args)
    if not (Path(args.base) / "config.json").is_file():
        p.error(f"--base {args.base}: no config.json there (convert one with scripts/convert_gguf.py)")
    return args


def run(args: argparse.Namespace, argv: list[str]) -> dict | None:
    plan = PLANS["quick" if args.quick else "gpu" if args.device == "cuda" else "full"]
    out = Path(args.out or f"runs/real-base{'' if plan.name == 'full' else '-' + plan.name}").resolve()
    base = Path(args.base).resolve()
    out.mkdir(parents=True, exist_ok=True)
    every = models(plan)
    unknown = sorted(set(args.models or ()) - set(every))
    if unknown:
        raise replicate.ReplicationError(f"--models {' '.join(unknown)}: not a model of the {plan.name} plan "
                                         f"(its models: {' '.join(every)})")
    # The base inside the repository as a relative path: the records stay valid in another clone (docs/replication).
    where = base.relative_to(ROOT) if base.is_relative_to(ROOT) else base
    settings = {"plan": json.loads(json.dumps(asdict(plan))), "base": str(where), "device": args.device}
    if (out / "settings.json").is_file() and json.loads((out / "settings.json").read_text()) != settings:
        raise replicate.ReplicationError(f"--out {out}: holds a run of another plan or base ({out / 'settings.json'}); "
                            "use another --out")
    evaluation.write_json(out / "settings.json", settings)
    torch.set_num_threads(args.threads)
    logfile = open(out / "replicate.log", "a", encoding="utf-8")

    def log(text: str) -> None:
        print(text, flush=True)
        logfile.write(text + "\n")
        logfile.flush()

    def timed(key: str, fn) -> None:
        """Run a stage; its wall and CPU seconds add up over resumed runs (not counted when it was done)."""
        load, wall, cpu = os.getloadavg(), time.time(), time.process_time()
        if fn() is False:
            return
        with locked(out / "times.json.lock"):  # another process (--models) may be adding its own stages
            times = json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}
            t = times.setdefault(key, {"wall_s": 0.0, "cpu_s": 0.0, "runs": 0, "load": load})
            t["wall_s"] += time.time() - wall
            t["cpu_s"] += time.process_time() - cpu
            t["runs"] += 1
            evaluation.write_json(out / "times.json", times)

    log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} experiments/replicate.py {shlex.join(argv)} (plan {plan.name})")
    tok = data.load_tokenizer(base)
    if "data" in args.stages:
        timed("data", lambda: write_data(out, plan, tok, log))
    if not (out / "train.jsonl").is_file() and {"budget", "train"} & set(args.stages):
        raise replicate.ReplicationError(f"--out {out}: no train.jsonl yet; run the data stage first")
    if "budget" in args.stages:
        if not (out / "budget.json").is_file():
            timed("budget", lambda: measure_budget(out, plan, base, args.device, log))
        budget = json.loads((out / "budget.json").read_text())
        budget["projection"] = proj = project(plan, budget)  # measured once; projected for the plan run now
        evaluation.write_json(out / "budget.json", budget)
        log(f"budget: the plan projects {proj['total_cpu_h']:.2f} CPU hours (train {proj['train_cpu_h']:.2f}, eval "
            f"{proj['eval_cpu_h']:.2f}), {proj['total_cpu_h'] * proj['wall_per_cpu']:.1f} hours of wall clock at the "
            f"load measured; longest stage {proj['longest_stage']}, {proj['longest_stage_cpu_h']:.2f} CPU hours")
    for model in [m for m in every if m in (args.models or every)]:
        todo = [(length, task) for length in plan.lengths for task in plan.tasks
                if not (out / "eval" / model / length / task / "results.json").is_file()]
        # Kept records without the weights (a run carried to another machine): train only what is still to evaluate.
        if "train" in args.stages and model != "base" and (todo or "eval" not in args.stages):
            timed(f"train/{model}", lambda model=model: train(out, plan, base, model, args.device, log))
        if "eval" in args.stages and (model == "base" or (out / "train" / model / "final" / "config.json").is_file()):
            for length, task in todo:
                timed(f"eval/{model}/{length}/{task}", lambda model=model, length=length, task=task:
                      evaluate(out, plan, base, model, length, task, args.device, log))
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}
    result = write_report(out, plan, argv, times, log) if "report" in args.stages else None
    logfile.close()
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return replicate.guarded(replicate.PROG, lambda: run(args, argv), (replicate.ReplicationError, data.DataError))


if __name__ == "__main__":
    sys.exit(main())
