"""The whole pipeline in one command, on a CPU, with no downloads and no arguments:

    python demo.py              # about 4 minutes on 2 CPU cores; everything goes to runs/demo
    python demo.py --quick      # a reduced size for CI and a first look (well under a minute)

It builds a tiny byte-level BPE tokenizer (Qwen's ChatML special tokens), a tiny random Qwen2
checkpoint in the Hugging Face format and synthetic agentic long-context training data; trains the
model twice on the same data, steps and seed, with Standard SFT (`focusft.py --no-bilevel --causal`)
and with FocuSFT (`focusft.py`'s defaults), through torchrun when it can; evaluates both checkpoints
and the untrained base with `eval_babilong.py --synthetic`; and prints one comparison table: accuracy
by context length, sink mass and context engagement at the start and the end of training, and the
median step time. The table is saved as comparison.md and comparison.json in the output directory.

At this scale the accuracies say nothing about the method: a model of about a million random
parameters trained for a few minutes learns the format of its training conversations, not to answer
questions over long contexts. What the demo shows is that the pipeline runs end to end, what the
attention diagnostics look like, and what a FocuSFT step costs next to an SFT step.
"""

from __future__ import annotations

import argparse
import codecs
import datetime
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import tokenizers
import torch
import torch.distributed as dist

import data
import eval_babilong
import focusft
import qwen2

ROOT = Path(__file__).resolve().parent
PROG = "demo.py"
MARKER = "demo-settings.json"  # written first into --out: marks a directory this script may wipe
LR = 3e-3  # the paper's 1e-5 suits a pretrained 7B; a random tiny model needs far larger steps to learn
TOKENIZER_CONVERSATIONS = 64
MAX_SAMPLES = 4000  # beyond this, long --steps runs repeat the data (epochs) instead of generating more
LAST_STEPS = 10  # the end-of-training loss is averaged over this many steps (a single step is noisy)
TAIL_LINES = 20
TAIL_BYTES = 64 * 1024
METHODS = {"sft": ("Standard SFT", ["--no-bilevel", "--causal"]), "focusft": ("FocuSFT", [])}
COLUMNS = {"base": "base model (untrained)", "sft": "Standard SFT", "focusft": "FocuSFT"}
EVAL_TASK_FOR_EXAMPLE = "qa1"


@dataclass(frozen=True)
class Size:
    """How big the demo is: the data, the model, the training and the evaluation."""

    name: str
    steps: int  # optimizer steps of each training run
    tokens: int  # length of each training sample, in tokens of the tiny tokenizer
    eval_lengths: tuple[str, ...]  # eval_babilong.py's split names
    eval_samples: int  # per task and length
    vocab: int = 1000
    hidden: int = 128
    intermediate: int = 352
    layers: int = 4  # fast weights on layers int(4 * (1 - 0.35)) = 2 .. 3 with the default fraction
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 4096  # room for the 2k evaluation prompts plus the instructions and examples


FULL = Size("full", steps=200, tokens=1024, eval_lengths=("0k", "1k", "2k"), eval_samples=10)
QUICK = Size("quick", steps=4, tokens=256, eval_lengths=("0k",), eval_samples=2, hidden=64, intermediate=128)


class DemoError(Exception):
    """A problem the demo reports in one message (plus, for a failed stage, its output's tail)."""


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM's KeyboardInterrupt) during a stage; carries the stage's name."""


# ----------------------------------------------------------------------------------------------------
# Command line


def cpu_count() -> int:
    """The cores this process may run on (a container's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def distributed_available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


def default_nproc() -> int:
    """Two training processes (DDP under torchrun, as on a GPU node) where the machine can run them."""
    return 2 if cpu_count() >= 2 and distributed_available() else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Build a tiny tokenizer, model and synthetic data; train it with Standard SFT and with "
                    "FocuSFT; evaluate both on synthetic BABILong; print one comparison table. No downloads; "
                    "CPU only.",
        epilog="A second run into the same --out deletes the earlier demo there and starts again (the training "
               "runs would otherwise resume from, or skip to, the earlier results).")
    p.add_argument("--out", default="runs/demo",
                   help="output directory for everything the demo makes (default: %(default)s)")
    p.add_argument("--nproc", type=int, default=None,
                   help="training processes: 2 or more run focusft.py through torchrun (DDP over gloo), 1 runs "
                        "it directly (default: 2 when torch.distributed is available and there are >= 2 CPU "
                        "cores, else 1)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps of each training run (default: {FULL.steps}, or {QUICK.steps} with "
                        f"--quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"reduced size for CI: {QUICK.tokens}-token samples, a {QUICK.hidden}-wide model, "
                        f"{QUICK.steps} steps, evaluation at {' '.join(QUICK.eval_lengths)} with "
                        f"{QUICK.eval_samples} samples per task")
    p.add_argument("--seed", type=int, default=1234,
                   help="seed of everything: tokenizer corpus, training data, model weights, training, "
                        "evaluation samples (default: %(default)s, the paper's)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1 (got {args.steps})")
    if args.nproc is not None:
        if args.nproc < 1:
            p.error(f"--nproc must be >= 1 (got {args.nproc})")
        if args.nproc > 1 and not distributed_available():
            p.error(f"--nproc {args.nproc}: this torch build has no torch.distributed with gloo; use --nproc 1")
    return args


# ----------------------------------------------------------------------------------------------------
# The output directory and the inputs: tokenizer, model, data


def prepare_out(out: Path, settings: dict) -> str:
    """Create --out, wiping an earlier demo there; refuse a directory the demo did not write.
    Returns what was done, for the user."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out}: exists and is not a directory")
    earlier = out.is_dir() and any(out.iterdir())
    if earlier and not (out / MARKER).is_file():
        raise DemoError(f"--out {out}: exists, is not empty and was not written by {PROG} (no {MARKER}); "
                        f"choose another --out (the demo deletes and rewrites its output directory)")
    try:
        if earlier:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise DemoError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    if earlier:
        return f"removed the earlier demo in {out}, starting fresh (its training runs would resume otherwise)"
    return f"writing to {out}"


def train_tokenizer(size: Size, seed: int) -> tokenizers.Tokenizer:
    """A small BPE trained on synthetic conversations like the training data (drawn from another seed
    stream) and on the evaluation's prompt texts, so both tokenize into reasonable pieces."""
    rng = random.Random(f"demo-tokenizer/{seed}")
    texts = []
    for _ in range(TOKENIZER_CONVERSATIONS):
        record = data.synthetic_conversation(rng, size.tokens, data.estimate_tokens)
        texts.append(data.render_chat(record["messages"], record["tools"]))
    for task in eval_babilong.SYNTHETIC_TASKS:
        prompt = eval_babilong.default_prompt(task, chat_template=True)
        texts += [prompt.instruction, prompt.examples, prompt.post_prompt]
    return data.train_tokenizer(texts, vocab_size=size.vocab)


def build_inputs(out: Path, size: Size, seed: int, n_samples: int) -> dict:
    """The tiny tokenizer, the random base checkpoint (with the tokenizer files beside it) and the
    training data. Returns their paths and a few facts for the table."""
    tokenizer = train_tokenizer(size, seed)
    model_dir, train_file = out / "model", out / "train.jsonl"
    config = qwen2.Qwen2Config(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_positions, rope_theta=10000.0, tie_word_embeddings=True,
        eos_token_id=tokenizer.token_to_id("<|endoftext|>"))
    model = qwen2.random_model(config, seed=seed)
    model.save_pretrained(model_dir)
    data.save_tokenizer_files(tokenizer, model_dir)
    # Sample lengths counted with the tiny tokenizer itself, so "1024 tokens" is what the model sees.
    data.write_synthetic(train_file, n_samples, size.tokens, seed,
                         count_tokens=lambda text: len(tokenizer.encode(text).ids))
    return {"model": model_dir, "data": train_file, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": tokenizer.get_vocab_size()}


# ----------------------------------------------------------------------------------------------------
# Running the stages (subprocesses, their output shown live and kept in logs/)


def _pump(stream, echo, log, lock: threading.Lock, keep: bytearray | None) -> None:
    # Forward a child's stream as it comes (tqdm redraws with '\r', so never wait for whole lines).
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in iter(lambda: stream.read1(65536), b""):
        with lock:
            log.write(chunk)
        if keep is not None:
            keep += chunk
            del keep[:-TAIL_BYTES]
        if echo is not None:
            echo.write(decoder.decode(chunk))
            echo.flush()


# torchrun's log records ('E1128 17:26:18.683000 29184 .../torch/distributed/elastic/...') can start in the
# middle of a worker's unfinished progress-bar line. Its failure report (an E record, then a launcher
# traceback and a summary) follows the workers' own error, which is what the user needs.
_TORCHRUN_RECORD = re.compile(r"(?=[EWI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S*torch/distributed/elastic/)")


def error_tail(raw: bytes, lines: int = TAIL_LINES) -> str:
    """The last lines of a child's stderr as a terminal would show them: each progress-bar line reduced
    to its last redraw, torchrun's failure report left out."""
    shown = []
    for line in _TORCHRUN_RECORD.sub("\n", raw.decode("utf-8", "replace")).split("\n"):
        frames = [f for f in line.split("\r") if f.strip()]
        if not frames:
            continue
        if frames[-1].startswith("E") and _TORCHRUN_RECORD.match(frames[-1]) and shown:
            break
        shown.append(frames[-1].rstrip())
    return "\n".join(shown[-lines:])


def _short(arg: str) -> str:
    # A path relative to the working directory where it is inside it; 'python' for the interpreter.
    if arg == sys.executable:
        return "python"
    if os.path.isabs(arg):
        try:
            return str(Path(arg).relative_to(Path.cwd()))
        except ValueError:
            pass
    return arg


def _display(cmd: list[str]) -> str:
    """The command as a user would type it."""
    return shlex.join(_short(a) for a in cmd)


def _stop(proc: subprocess.Popen) -> None:
    # The child got the same Ctrl-C (focusft.py then finishes its step, checkpoints and exits): give it
    # a moment. Then SIGTERM, which torchrun passes on to its workers (their own process groups, which
    # a SIGKILL of torchrun would leave running); SIGKILL last.
    for action, wait in ((None, 30), (proc.terminate, 15), (proc.kill, None)):
        if action is not None:
            action()
        try:
            proc.wait(timeout=wait)
            return
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            continue


def run_stage(stage: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
              echo: bool = True) -> None:
    """Run one stage's command with its output shown live and saved to log_path; a failure raises
    DemoError naming the stage, with the tail of the command's stderr."""
    print(f"  $ {_display(cmd)}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lock, err = threading.Lock(), bytearray()
    # Unbuffered children: their summary lines and progress bars arrive in order and at once.
    env = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        except OSError as e:
            raise DemoError(f"{stage}: cannot start {cmd[0]} ({e.strerror or e})") from None
        pumps = [threading.Thread(target=_pump, daemon=True,
                                  args=(proc.stdout, sys.stdout if echo else None, log, lock, None)),
                 threading.Thread(target=_pump, daemon=True,
                                  args=(proc.stderr, sys.stderr if echo else None, log, lock, err))]
        for t in pumps:
            t.start()
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            _stop(proc)
            for t in pumps:  # a worker that outlived its launcher may hold the pipes open: don't wait forever
                t.join(timeout=5)
            raise Interrupted(stage) from None
        for t in pumps:
            t.join()
    if rc != 0:
        tail = error_tail(bytes(err)) or "(it wrote nothing to stderr)"
        how = f"exit status {rc}" if rc > 0 else f"killed by signal {-rc}"
        raise DemoError(f"stage '{stage}' failed ({how}). The end of its stderr:\n"
                        + "\n".join("  | " + line for line in tail.split("\n"))
                        + f"\nIts full output is in {log_path}")


def child_env(threads: int) -> dict[str, str]:
    # Every process gets its share of the cores: two training processes with two threads each on two
    # cores would fight over them.
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, threads))}


def training_command(method: str, model: Path, data_file: Path, out: Path, steps: int, epochs: int,
                     nproc: int, seed: int) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])  # --standalone: a free port, never a clash with another job
    return [*launcher, str(ROOT / "focusft.py"), "--model", str(model), "--data", str(data_file), "--out", str(out),
            *METHODS[method][1],
            "--max-steps", str(steps), "--epochs", str(epochs), "--lr", str(LR),
            "--grad-accum", "1",  # more optimizer steps from the few minutes there are
            "--attn-every", str(max(1, steps // 4)), "--ckpt-every", "0", "--seed", str(seed), "--device", "cpu"]


def eval_command(model: Path, out: Path, size: Size, seed: int) -> list[str]:
    # The chat template: the models are trained on ChatML conversations, so they are asked in ChatML.
    return [sys.executable, str(ROOT / "eval_babilong.py"), "--model", str(model), "--synthetic",
            "--lengths", *size.eval_lengths, "--max-samples", str(size.eval_samples), "--chat-template",
            "--seed", str(seed), "--device", "cpu", "--out", str(out)]


# ----------------------------------------------------------------------------------------------------
# Reading the results and building the table


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise DemoError(f"{path}: missing (the training run wrote no metrics)")
    try:
        return focusft.read_metrics(path)
    except json.JSONDecodeError as e:
        raise DemoError(f"{path}: not JSON Lines ({e})") from None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def summarize_run(rows: list[dict], source: str = "metrics.jsonl") -> dict:
    """What the table needs from one run's metrics.jsonl: the attention diagnostics of the start
    (the row of step 0, before any update) and of the end (the last row that has them), the median step
    time, the training loss at the start and the end, and the inner loop's losses (FocuSFT only)."""
    diag = [r for r in rows if "attn_base" in r]
    steps = [r for r in rows if "step_s" in r]
    if not diag or not steps:
        raise DemoError(f"{source}: no {'attention diagnostics' if not diag else 'step times'} logged")
    start = next((r for r in diag if r["step"] == 0), diag[0])
    end = diag[-1]
    good = [r for r in steps if "skipped" not in r]

    def stat(row: dict, key: str, name: str) -> float | None:
        return row[key][name] if key in row else None

    return {
        "steps": steps[-1]["step"], "start_step": start["step"], "end_step": end["step"],
        "sink_start": stat(start, "attn_base", "sink_mass"), "sink_end": stat(end, "attn_base", "sink_mass"),
        "engagement_start": stat(start, "attn_base", "context_engagement"),
        "engagement_end": stat(end, "attn_base", "context_engagement"),
        "fast_sink_start": stat(start, "attn_fast", "sink_mass"), "fast_sink_end": stat(end, "attn_fast", "sink_mass"),
        "fast_engagement_start": stat(start, "attn_fast", "context_engagement"),
        "fast_engagement_end": stat(end, "attn_fast", "context_engagement"),
        "step_s_median": statistics.median(r["step_s"] for r in steps),
        "loss_start": good[0]["loss"] if good else None,
        "loss_end": _mean([r["loss"] for r in good[-LAST_STEPS:]]),
        # focusft.py logs L(theta, phi_k) for k = 0 .. K-1 (inner_first: the base weights' own loss, as
        # phi_0 adds nothing) and the outer loss L(theta, phi_K): the inner loop's effect on each sample.
        "inner_before": _mean([r.get("inner_first") for r in good]),
        "inner_after": _mean([r["loss"] for r in good]) if any("inner_first" in r for r in good) else None,
        "skipped_steps": len(steps) - len(good),
    }


def read_accuracy(eval_dir: Path, lengths: tuple[str, ...]) -> dict[str, float | None]:
    """Mean accuracy over the tasks per length, as a fraction, from eval_babilong.py's results.json."""
    path = eval_dir / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DemoError(f"{path}: unreadable evaluation results ({e})") from None
    return {n: results["mean"].get(n) for n in lengths}


def first_predictions(eval_dir: Path, lengths: tuple[str, ...]) -> dict[str, dict]:
    """Per length, the first sample of one task: question, target and the model's output, so the user
    sees what the accuracy figures are made of."""
    prompt = eval_babilong.default_prompt(EVAL_TASK_FOR_EXAMPLE, chat_template=True)
    found = {}
    for length in lengths:
        csv_path = eval_babilong.pair_paths(eval_dir, EVAL_TASK_FOR_EXAMPLE, length, prompt)[0]
        try:
            rows = eval_babilong.read_predictions(csv_path)
        except eval_babilong.EvalError:
            continue
        if rows:
            found[length] = rows[0]
    return found


def predictions_table(examples: dict[str, dict[str, dict]], lengths: tuple[str, ...], width: int = 40) -> str:
    """Markdown: the question and target, then each model's output (shortened), per length."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def output(column: str, length: str) -> str:
        row = examples.get(column, {}).get(length)
        if row is None:
            return "-"
        text = row["output"]
        return cell(repr(text[:width] + ("..." if len(text) > width else "")))

    any_model = next(iter(examples.values()), {})
    lines = [f"| {EVAL_TASK_FOR_EXAMPLE}, first sample | " + " | ".join(lengths) + " |",
             "| --- |" + " --- |" * len(lengths),
             "| question -> target | " + " | ".join(
                 cell(f"{any_model[n]['question']} -> {any_model[n]['target']}") if n in any_model else "-"
                 for n in lengths) + " |"]
    lines += [f"| {name} | " + " | ".join(output(c, n) for n in lengths) + " |" for c, name in COLUMNS.items()]
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def comparison(accuracy: dict[str, dict[str, float | None]], runs: dict[str, dict], lengths: tuple[str, ...],
               inner_steps: int = 2) -> list[dict]:
    """The table's rows, each {key, label, values: {column: number or None}, format}. accuracy holds
    fractions per column and length (base, sft, focusft); runs holds summarize_run() of sft and focusft."""
    sft, foc = runs["sft"], runs["focusft"]
    first, last = sft["start_step"], sft["end_step"]
    rows = []

    def add(key: str, label: str, spec: str, values: dict[str, float | None]) -> None:
        rows.append({"key": key, "label": label, "format": spec,
                     "values": {c: values.get(c) for c in COLUMNS}})

    for n in lengths:
        add(f"accuracy_{n}", f"accuracy at {n} context, % (mean of the tasks)", ".1f",
            {c: None if accuracy[c].get(n) is None else 100 * accuracy[c][n] for c in COLUMNS})
    for key, label in (("sink", "sink mass"), ("engagement", "context engagement"),
                       ("fast_sink", "sink mass, with fast weights"),
                       ("fast_engagement", "context engagement, with fast weights")):
        add(f"{key}_start", f"{label}, start (step {first})", ".4f",
            {"sft": sft[f"{key}_start"], "focusft": foc[f"{key}_start"]})
        add(f"{key}_end", f"{label}, end (step {last})", ".4f",
            {"sft": sft[f"{key}_end"], "focusft": foc[f"{key}_end"]})
    # FocuSFT's loss is the outer loss, with the adapted fast weights: lower than its base weights' own.
    add("loss_start", "training loss (FocuSFT: with fast weights), first step", ".3f",
        {"sft": sft["loss_start"], "focusft": foc["loss_start"]})
    add("loss_end", f"training loss (FocuSFT: with fast weights), mean of the last {min(LAST_STEPS, sft['steps'])} "
                    f"steps", ".3f",
        {"sft": sft["loss_end"], "focusft": foc["loss_end"]})
    add("inner_before", "inner loop: loss before it, with the base weights (mean over steps)", ".3f",
        {"sft": sft["inner_before"], "focusft": foc["inner_before"]})
    add("inner_after", f"inner loop: loss after its {inner_steps} steps, the outer loss (mean over steps)", ".3f",
        {"sft": sft["inner_after"], "focusft": foc["inner_after"]})
    add("step_s_median", "step time, median (s)", ".3f",
        {"sft": sft["step_s_median"], "focusft": foc["step_s_median"]})
    add("step_ratio", "step time vs Standard SFT", ".2f",
        {"sft": 1.0, "focusft": foc["step_s_median"] / sft["step_s_median"]})
    return rows


def render_markdown(rows: list[dict]) -> str:
    lines = ["| | " + " | ".join(COLUMNS.values()) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    for row in rows:
        cells = [_fmt(row["values"][c], row["format"]) for c in COLUMNS]
        if row["key"] == "step_ratio":
            cells = [c if c == "-" else c + "x" for c in cells]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def caveats(facts: dict, rows: list[dict]) -> str:
    """What the table can and cannot show, with this run's own figures."""
    n = facts["size"]["eval_samples"] * len(facts["tasks"])
    sinks = [v for r in rows if r["key"].endswith(("sink_start", "sink_end")) for v in r["values"].values()
             if v is not None]
    noise = 200 * math.sqrt(0.15 * 0.85 / n)  # two standard errors of an accuracy near 15%, in points
    return (
        f"What this shows: the whole pipeline runs (data, tokenizer, model, {facts['nproc']}-process training with "
        f"both methods, Hugging Face checkpoints, evaluation with the benchmark's prompt and scoring); the attention "
        f"diagnostics of response tokens (sink mass: the attention on the first 5 tokens; context engagement: on "
        f"the other context tokens), measured on the same training sample in both runs, each under its own "
        f"training mask; and what a FocuSFT step costs next to an SFT step (the two runs are timed one after the "
        f"other, so a busy machine skews the ratio; `python bench.py` measures it interleaved, without the mask's "
        f"share).\n\n"
        f"What it cannot show: the paper's accuracy gains. A random model of {facts['parameters'] / 1e6:.1f}M "
        f"parameters trained for {facts['size']['steps']} steps learns the format of its training conversations "
        f"(its loss falls), not to answer questions over long contexts. Its accuracy is chance at best: a model "
        f"that names the same room for every question scores about 13% (right 1 time in 6 on qa1-qa4, never on "
        f"qa5), one that answers with a tool call or filler scores 0, and with {n} samples per length a "
        f"difference under about {noise:.0f} points is noise anyway. So a gap between the columns tells which "
        f"model ended up with an answer-shaped output, not which one reads long contexts better. Attention sinks "
        f"form in pretraining, so a random model has none: the sink mass is at most {max(sinks, default=0):.1%} "
        f"here, where the paper measures 30% for Standard SFT of Qwen2.5-7B. To see the "
        f"method's effect, fine-tune a real Qwen2.5 (see the README).")


# ----------------------------------------------------------------------------------------------------
# The demo


def run_demo(args: argparse.Namespace, argv: list[str]) -> dict:
    """Every stage, the table printed and saved; returns what comparison.json holds."""
    t_start = time.perf_counter()
    size = QUICK if args.quick else FULL
    if args.steps is not None:
        size = replace(size, steps=args.steps)
    nproc = args.nproc or default_nproc()
    cores = cpu_count()
    out = Path(args.out).resolve()
    # One epoch of fresh samples (one per process per step), up to a cap, then repeated as epochs.
    n_samples = min(size.steps * nproc, MAX_SAMPLES)
    epochs = math.ceil(size.steps * nproc / n_samples)
    settings = {"command": shlex.join(["python", PROG, *argv]),
                "size": asdict(size), "nproc": nproc, "seed": args.seed, "lr": LR, "samples": n_samples,
                "date": datetime.date.today().isoformat(), "cpu_cores": cores, "torch": torch.__version__,
                "python": platform.python_version(), "machine": platform.machine()}
    stages = 7
    timings: dict[str, float] = {}
    prepared = prepare_out(Path(args.out), settings)  # before anything else: a wrong --out stops the demo at once

    def stage(k: int, text: str) -> float:
        print(f"\n[{k}/{stages}] {text}", flush=True)
        return time.perf_counter()

    t = stage(1, "tiny tokenizer, random Qwen2 checkpoint and synthetic training data")
    print(f"  {prepared}", flush=True)
    inputs = build_inputs(out, size, args.seed, n_samples)
    print(f"  tokenizer: {inputs['vocab']} tokens (Qwen's ChatML special tokens); model: "
          f"{inputs['parameters'] / 1e6:.2f}M parameters, {size.layers} layers, hidden {size.hidden} "
          f"-> {inputs['model']}\n  data: {n_samples} agentic conversations of about {size.tokens} tokens "
          f"-> {inputs['data']}", flush=True)
    timings["setup"] = time.perf_counter() - t

    logs = out / "logs"
    train_env = child_env(cores // nproc)
    for k, method in enumerate(METHODS, 2):
        name = METHODS[method][0]
        t = stage(k, f"training: {name}, {size.steps} steps on {nproc} process(es), "
                     f"{train_env['OMP_NUM_THREADS']} thread(s) each")
        cmd = training_command(method, inputs["model"], inputs["data"], out / method, size.steps, epochs, nproc,
                               args.seed)
        run_stage(f"training: {name}", cmd, logs / f"train-{method}.log", train_env)
        if not (out / method / "final" / "config.json").is_file():
            raise DemoError(f"stage 'training: {name}' ended without a checkpoint in {out / method / 'final'} "
                            f"(stopped by a signal?); see {logs / f'train-{method}.log'}")
        timings[f"train_{method}"] = time.perf_counter() - t

    models = {"base": inputs["model"], "sft": out / "sft" / "final", "focusft": out / "focusft" / "final"}
    accuracy, examples = {}, {}
    for k, column in enumerate(COLUMNS, 4):
        t = stage(k, f"evaluation: {COLUMNS[column]}, synthetic BABILong qa1-qa5 at "
                     f"{' '.join(size.eval_lengths)}, {size.eval_samples} samples per task and length")
        eval_dir = out / "eval" / column
        run_stage(f"evaluation: {COLUMNS[column]}", eval_command(models[column], eval_dir, size, args.seed),
                  logs / f"eval-{column}.log", child_env(cores))
        accuracy[column] = read_accuracy(eval_dir, size.eval_lengths)
        examples[column] = first_predictions(eval_dir, size.eval_lengths)
        timings[f"eval_{column}"] = time.perf_counter() - t

    t = stage(7, "comparison")
    runs = {m: summarize_run(read_metrics(out / m / "metrics.jsonl"), str(out / m / "metrics.jsonl"))
            for m in METHODS}
    rows = comparison(accuracy, runs, size.eval_lengths, inner_steps(out / "focusft" / "config.json"))
    timings["total"] = time.perf_counter() - t_start
    facts = {**settings, "parameters": inputs["parameters"], "tasks": list(eval_babilong.SYNTHETIC_TASKS)}
    markdown = report(facts, rows, predictions_table(examples, size.eval_lengths), timings)
    result = {"settings": settings, "parameters": inputs["parameters"], "columns": COLUMNS, "rows": rows,
              "runs": runs, "accuracy": accuracy, "examples": examples, "timings_s": timings}
    (out / "comparison.md").write_text(markdown, encoding="utf-8")
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\n{markdown}")
    print(f"Done in {timings['total'] / 60:.1f} min. Everything is in {_short(str(out))}/:\n"
          f"  model/                                    the tiny random base model (HF format) with its tokenizer\n"
          f"  train.jsonl                               the synthetic training data\n"
          f"  sft/final/, focusft/final/                the trained checkpoints (HF format: transformers and "
          f"vLLM load them)\n"
          f"  sft/metrics.jsonl, focusft/metrics.jsonl  loss, step time, attention diagnostics, per step\n"
          f"  eval/base/, eval/sft/, eval/focusft/      predictions (a CSV and a JSON per task and length), "
          f"results.md\n"
          f"  logs/                                     the full output of every stage\n"
          f"  comparison.md, comparison.json            this table")
    return result


def inner_steps(run_config: Path) -> int:
    # K as the FocuSFT run used it (focusft.py's default unless that changes), for the table's label.
    try:
        return int(json.loads(run_config.read_text(encoding="utf-8"))["inner_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return 2


def report(facts: dict, rows: list[dict], predictions: str, timings: dict[str, float]) -> str:
    """comparison.md: what was run, the table, one prediction per model, and what it all can and cannot show."""
    size = facts["size"]
    header = (f"FocuSFT demo ({size['name']} size, {facts['date']}): a {facts['parameters'] / 1e6:.2f}M-parameter "
              f"random Qwen2 trained for {size['steps']} steps ({facts['nproc']} process(es), 1 sample each per "
              f"step, lr {facts['lr']:g}) on {facts['samples']} synthetic agentic samples of ~{size['tokens']} "
              f"tokens; evaluated on synthetic BABILong ({size['eval_samples']} samples per task and length, "
              f"{', '.join(facts['tasks'])}). {facts['cpu_cores']} CPU cores, torch {facts['torch']}; wall time "
              f"{timings['total'] / 60:.1f} min (training {timings['train_sft']:.0f} s + "
              f"{timings['train_focusft']:.0f} s, evaluation "
              f"{sum(v for k, v in timings.items() if k.startswith('eval_')):.0f} s).")
    parts = [header, render_markdown(rows)]
    parts.append(f"What the models answer (the outputs are in eval/*/{EVAL_TASK_FOR_EXAMPLE}_*.csv):\n\n{predictions}")
    parts.append(caveats(facts, rows))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        run_demo(args, argv)
    except DemoError as e:
        sys.exit(f"{PROG}: error: {e}")
    except OSError as e:  # permissions, a full disk, ...
        sys.exit(f"{PROG}: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except Interrupted as e:
        # focusft.py's "resume with the same command" does not apply: the demo always starts over.
        sys.exit(f"{PROG}: interrupted during stage '{e}'; `python {PROG}` starts the demo over")
    except KeyboardInterrupt:
        sys.exit(f"{PROG}: interrupted; `python {PROG}` starts the demo over")
    return 0


if __name__ == "__main__":
    sys.exit(main())
