"""A seeded, small replication of the paper's claims, on a model pretrained here from scratch:

    python experiments/replicate.py --out /tmp/replicate            # the full protocol (CPU, ~45 min at 2 cores)
    python experiments/replicate.py --out /tmp/replicate --quick    # the whole pipeline at toy size (~1 min)
    python experiments/replicate.py --out /tmp/replicate --device cuda   # the same recipe, larger, on a GPU
    python experiments/replicate.py --base runs/smollm2   # no pretraining: a real checkpoint (experiments/real_base.py)

Stages, each writing under --out and skipped on a rerun when its result is there (the command resumes):
  1. pretrain: a small Qwen2 (qwen2.py) and its own BPE (synthetic.train_tokenizer) trained from scratch on
     filler prose, bAbI-style stories with their question and answer, and chat-rendered agentic records, at
     short context, with a few recipes that are reported to favour attention sinks (a fixed first token,
     spans of random tokens). Sink mass (attention on the first 5 tokens) and short-story accuracy are
     measured over pretraining. One recipe becomes the base model by a rule fixed in advance (PROTOCOL).
  2. train: the paper's 2x2 table (Standard SFT, SFT + Bidir, Causal bilevel, FocuSFT) through focusft.py's
     main(), same data, steps and seeds; focusft.py logs the attention diagnostics into metrics.jsonl.
  3. eval: eval_babilong.py --synthetic at the training length and 2x, 4x, 8x it, every trained model.
  4. report: report.md + results.json (Wilson intervals, mean over seeds), figures/*.png (matplotlib,
     optional: without it the figures are skipped with a note): the training curves of the 2x2 runs by
     scripts/plot_metrics.py, and a Figure-3-style attention map.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import data  # noqa: E402
import eval_babilong  # noqa: E402
import evaluation  # noqa: E402
import focusft  # noqa: E402
import plot_metrics  # noqa: E402
import qwen2  # noqa: E402
import synthetic  # noqa: E402

PROG = "experiments/replicate.py"
SINK = focusft.SINK_TOKENS  # the paper's sink: the first 5 tokens
SINK_FROM = 16  # pretraining sink mass is read from queries at positions >= 16 (earlier ones see few keys)
VARIANTS = {  # the paper's 2x2 table: name -> focusft.py flags
    "sft": ("Standard SFT", ["--no-bilevel", "--causal"]),
    "sft-bidir": ("SFT + Bidir", ["--no-bilevel"]),
    "bilevel-causal": ("Causal bilevel", ["--causal"]),
    "focusft": ("FocuSFT", []),
}
RECIPES = {
    "stream": "windows cut anywhere from a stream of documents (no fixed first token)",
    "bos": "every window starts with <|endoftext|> and a document's beginning",
    "bos-noise": "as bos, with spans of uniformly random tokens (30% of the spans) between documents",
}


@dataclass(frozen=True)
class Size:
    name: str
    vocab: int = 1000
    hidden: int = 128
    intermediate: int = 352
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    pre_len: int = 128  # pretraining window
    pre_steps: int = 150
    pre_batch: int = 8
    pre_lr: float = 3e-3
    pre_probe_every: int = 50  # sink mass and short accuracy measured every this many steps
    probe_items: int = 50  # bAbI questions of the short-accuracy probe
    sft_len: int = 512  # the training length of the 2x2 runs, in tokens of the tokenizer
    sft_steps: int = 60
    sft_lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_samples: int = 3  # per task, length and model
    tasks: tuple[str, ...] = ("qa1", "qa2", "qa3", "qa4", "qa5")
    attn_every: int = 5


SIZES = {
    "quick": Size("quick", vocab=600, hidden=32, intermediate=64, layers=4, heads=2, kv_heads=1, pre_len=64,
                  pre_steps=4, pre_batch=2, pre_probe_every=4, probe_items=4, sft_len=128, sft_steps=2,
                  seeds=(0,), eval_samples=1, tasks=("qa1",), attn_every=1),
    # Sized for ~45 minutes of a heavily shared 2-core machine. The tool schemas of the agentic records take
    # ~400 tokens, so a 640-token sample holds ~240 tokens of log.
    "full": Size("full", vocab=2000, pre_len=128, pre_steps=200, pre_probe_every=25, probe_items=40, sft_len=640,
                 sft_steps=40),
    "gpu": Size("gpu", vocab=4000, hidden=384, intermediate=1024, layers=8, heads=6, kv_heads=2, pre_len=512,
                pre_steps=3000, pre_batch=32, pre_lr=1e-3, pre_probe_every=250, probe_items=200, sft_len=1024,
                sft_steps=400, sft_lr=3e-4, eval_samples=50, attn_every=25),
}


class ReplicationError(Exception):
    """A problem reported in one line."""


# ----------------------------------------------------------------------------------------------------
# Statistics


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (fractions)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def diff_interval(c1: int, n1: int, c2: int, n2: int) -> tuple[float, float, float]:
    """Difference p1 - p2 with Newcombe's hybrid score interval (from the two Wilson intervals)."""
    p1, p2 = c1 / n1, c2 / n2
    l1, u1 = wilson(c1, n1)
    l2, u2 = wilson(c2, n2)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


# ----------------------------------------------------------------------------------------------------
# Stage 1: pretraining corpus, probes and loop


def babi_doc(rng: random.Random, count) -> tuple[str, str]:
    """A short bAbI-style story (facts among a little filler), its question, and ' answer.' to predict."""
    facts, question, answer = synthetic.babi_story(rng, rng.choice(synthetic.BABI_TASKS))
    story = synthetic.haystack(rng, facts, rng.randint(0, 40), count) if rng.random() < 0.5 else " ".join(facts)
    return f"{story}\nQuestion: {question}\nAnswer:", f" {answer}."


def document(rng: random.Random, count, chat_tokens: int) -> str:
    kind = rng.random()
    if kind < 0.45:
        prompt, answer = babi_doc(rng, count)
        return prompt + answer
    if kind < 0.8:
        return " ".join(synthetic.filler_sentence(rng) for _ in range(rng.randint(2, 12)))
    record = synthetic.synthetic_conversation(rng, chat_tokens, count)
    return data.render_chat(record["messages"], record["tools"])


def make_window(rng: random.Random, tok, recipe: str, length: int, eot: int, n_plain: int) -> list[int]:
    """One pretraining window of `length` + 1 tokens under `recipe` (see RECIPES)."""
    count = lambda t: len(tok.encode(t).ids)  # noqa: E731
    ids: list[int] = []
    if recipe == "stream":  # start inside a document, as a window cut from a long stream would
        first = tok.encode(document(rng, count, length)).ids
        ids = first[rng.randrange(len(first)):] + [eot]
    else:
        ids = [eot]
    while len(ids) < length + 1:
        if recipe == "bos-noise" and rng.random() < 0.3:
            ids += [rng.randrange(n_plain) for _ in range(rng.randint(8, 48))]  # hard-to-predict span
        ids += tok.encode(document(rng, count, length)).ids + [eot]
    return ids[: length + 1]


@torch.no_grad()
def sink_mass(model, windows: torch.Tensor) -> tuple[float, float]:
    """Mean attention of queries at positions >= SINK_FROM on the first SINK keys (causal), over heads, layers
    and queries; and what uniform attention over the visible keys would give."""
    B, S = windows.shape
    windows = windows.to(model.device)
    queries = (torch.arange(S, device=model.device) >= SINK_FROM).expand(B, S)  # the "response" rows
    mass = focusft.attention_diagnostics(model, windows, queries, torch.ones_like(windows), None)["sink_mass"]
    uniform = sum(min(1.0, SINK / (q + 1)) for q in range(SINK_FROM, S)) / (S - SINK_FROM)
    return mass, uniform


@torch.no_grad()
def short_accuracy(model, items: list[tuple[list[int], list[int]]]) -> float:
    """Share of bAbI questions whose answer tokens are all the model's argmax (teacher-forced greedy)."""
    right = 0
    for prompt, answer in items:
        ids = torch.tensor([prompt + answer], device=model.device)
        pred = model(ids)[0, len(prompt) - 1: -1].argmax(-1).tolist()
        right += pred == answer
    return right / len(items)


def probe_items(tok, recipe: str, eot: int, n: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random("replicate/probe")
    count = lambda t: len(tok.encode(t).ids)  # noqa: E731
    items = []
    for _ in range(n):
        prompt, answer = babi_doc(rng, count)
        items.append(([eot] * (recipe != "stream") + tok.encode(prompt).ids, tok.encode(answer).ids))
    return items


def build_tokenizer(out: Path, size: Size):
    path = out / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        rng = random.Random("replicate/tokenizer")
        texts = []
        for _ in range(200):
            record = synthetic.synthetic_conversation(rng, size.sft_len, synthetic.estimate_tokens)
            texts.append(data.render_chat(record["messages"], record["tools"]))
            texts.append(" ".join(babi_doc(rng, synthetic.estimate_tokens)))
        for task in size.tasks:
            prompt = eval_babilong.default_prompt(task, chat_template=True)
            texts += [prompt.instruction, prompt.examples, prompt.post_prompt]
        synthetic.save_tokenizer_files(synthetic.train_tokenizer(texts, vocab_size=size.vocab), path.parent)
    return data.load_tokenizer(path)


def model_config(tok, size: Size) -> qwen2.Qwen2Config:
    return qwen2.Qwen2Config(
        vocab_size=tok.get_vocab_size(), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=16 * size.sft_len, rope_theta=10000.0, tie_word_embeddings=True,
        eos_token_id=tok.token_to_id(data.IM_END))


def pretrain(out: Path, tok, size: Size, recipe: str, device: str, log) -> dict:
    """Pretrain one recipe; returns (and saves as curve.json) its measurements over training."""
    where = out / "pretrain" / recipe
    if (where / "curve.json").is_file() and (where / "model" / "config.json").is_file():
        return json.loads((where / "curve.json").read_text())
    t0 = time.time()
    eot = tok.token_to_id(data.ENDOFTEXT)
    n_plain = min(tok.get_added_tokens_decoder())  # the BPE's own tokens come first, Qwen's added ones after
    torch.manual_seed(1234)
    model = qwen2.random_model(model_config(tok, size), seed=1234, dtype=torch.float32, device=device)
    model.train()
    opt = torch.optim.AdamW(focusft.param_groups(model, 0.1), lr=size.pre_lr, betas=(0.9, 0.95))
    rng = random.Random(f"replicate/pretrain/{recipe}")
    held = random.Random(f"replicate/held-out/{recipe}")
    probe_windows = torch.tensor([make_window(held, tok, recipe, size.pre_len, eot, n_plain)[:-1] for _ in range(8)])
    items = probe_items(tok, recipe, eot, size.probe_items)
    curve, losses = [], []

    def probe(step: int) -> None:
        model.eval()
        mass, uniform = sink_mass(model, probe_windows)
        acc = short_accuracy(model, items)
        model.train()
        row = {"step": step, "loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
               "sink_mass": mass, "uniform": uniform, "short_accuracy": acc, "elapsed_s": time.time() - t0}
        curve.append(row)
        log(f"  pretrain {recipe} step {step}: loss {row['loss'] or float('nan'):.3f} sink {mass:.3f} "
            f"(uniform {uniform:.3f}) short accuracy {acc:.2f}")

    probe(0)
    for step in range(1, size.pre_steps + 1):
        lr = focusft.lr_at(step - 1, size.pre_steps, size.pre_lr, 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = torch.tensor([make_window(rng, tok, recipe, size.pre_len, eot, n_plain)
                              for _ in range(size.pre_batch)], device=device)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % size.pre_probe_every == 0 or step == size.pre_steps:
            probe(step)
    model.eval()
    model.save_pretrained(where / "model")
    synthetic.save_tokenizer_files(tok, where / "model")
    result = {"recipe": recipe, "description": RECIPES[recipe], "curve": curve, "seconds": time.time() - t0,
              "parameters": sum(p.numel() for p in model.parameters())}
    evaluation.write_json(where / "curve.json", result)
    return result


def choose_base(results: dict[str, dict]) -> str:
    """The rule fixed before any run (PROTOCOL): the recipe with the largest final sink mass relative to
    uniform, among those whose final short accuracy is at least 80% of the best recipe's."""
    best = max(r["curve"][-1]["short_accuracy"] for r in results.values())
    fit = [k for k, r in results.items() if r["curve"][-1]["short_accuracy"] >= 0.8 * best]
    return max(fit, key=lambda k: results[k]["curve"][-1]["sink_mass"] / results[k]["curve"][-1]["uniform"])


# ----------------------------------------------------------------------------------------------------
# Stages 2 and 3: the 2x2 table through focusft.py, evaluation through eval_babilong.py


def call(stage: str, fn, argv: list[str], log) -> None:
    log(f"  $ python {stage} {shlex.join(argv)}")
    try:
        rc = fn(argv)
    except SystemExit as e:  # both scripts end a user-fixable problem with sys.exit("...: error: ...")
        rc = e.code
    if rc not in (0, None):
        raise ReplicationError(f"{stage} failed: {rc}")


def train_variant(out: Path, base: Path, size: Size, variant: str, seed: int, device: str, log) -> Path:
    run = out / "train" / f"{variant}-s{seed}"
    if (run / "final" / "config.json").is_file():
        return run
    if run.exists():
        shutil.rmtree(run)  # an interrupted run: start it over (it is short)
    argv = ["--model", str(base), "--data", str(out / "train.jsonl"), "--out", str(run), *VARIANTS[variant][1],
            "--max-len", str(size.sft_len + 1024),  # never truncated (the tool schemas alone take ~400 tokens)
            "--max-steps", str(size.sft_steps), "--epochs", "1",
            "--lr", str(size.sft_lr), "--grad-accum", "1", "--attn-every", str(size.attn_every),
            "--ckpt-every", "0", "--seed", str(seed), "--device", device]
    call("focusft.py", focusft.main, argv, log)
    return run


def eval_lengths(size: Size) -> list[str]:
    return [str(size.sft_len * k) for k in (1, 2, 4, 8)]


def evaluate_model(model: Path, where: Path, size: Size, device: str, log) -> None:
    """eval_babilong.py on the model into `where`, unless its results.json is there already."""
    argv = ["--model", str(model), "--synthetic", "--lengths", *eval_lengths(size), "--tasks", *size.tasks,
            "--max-samples", str(size.eval_samples),
            "--chat-template", "--seed", "0", "--device", device, "--out", str(where)]
    if not (where / "results.json").is_file():
        call("eval_babilong.py", eval_babilong.main, argv, log)


def eval_counts(where: Path, size: Size) -> dict:
    """Correct and total per length (all tasks), from eval_babilong.py's results.json in `where`."""
    results = json.loads((where / "results.json").read_text())
    correct, total = results["correct"], results["total"]  # task -> length -> count
    return {n: [sum(correct[t][n] for t in size.tasks), sum(total[t][n] for t in size.tasks)]
            for n in eval_lengths(size)}


def diagnostics(run: Path) -> list[dict]:
    return [{"step": r["step"], **r["attn_base"], **({"fast_" + k: v for k, v in r["attn_fast"].items()}
                                                     if "attn_fast" in r else {})}
            for r in focusft.read_metrics(run / "metrics.jsonl") if "attn_base" in r]


@torch.no_grad()
def attention_map(model_dir: Path, sample: data.Sample) -> torch.Tensor:
    """Mean attention (over heads and layers) of every query over every key, causal as at inference: (S, S)."""
    model = qwen2.from_pretrained(model_dir, dtype=torch.float32, device="cpu")
    ids = torch.tensor([sample.input_ids])
    S = ids.shape[1]
    h = model.embed(ids)
    total = torch.zeros(S, S)
    for i in range(model.config.num_hidden_layers):
        total += model.attention_probabilities(h, i, torch.ones(1, S, dtype=torch.bool))[0].mean(0)
        h = model.run_layers(h, i, i + 1)
    return total / model.config.num_hidden_layers


# ----------------------------------------------------------------------------------------------------
# Stage 4: tables, figures, report


def protocol(size: Size, device: str) -> str:
    lengths = ", ".join(eval_lengths(size))
    return f"""## Protocol (fixed before any variant was trained or evaluated)

- Model: Qwen2 (this project's `qwen2.py`), {size.layers} layers, hidden {size.hidden}, FFN {size.intermediate},
  {size.heads} heads ({size.kv_heads} KV), tied embeddings; BPE of {size.vocab} tokens trained by
  `synthetic.train_tokenizer` on the synthetic conversations, bAbI stories and the evaluation's prompt texts.
- Pretraining, from scratch, per recipe: {size.pre_steps} AdamW steps (lr {size.pre_lr:g}, cosine, 10% warmup,
  weight decay 0.1, batch {size.pre_batch} x {size.pre_len} tokens) on 45% bAbI-style stories with
  `Question: ... Answer: ...`, 35% filler prose, 20% chat-rendered agentic records. Recipes:
  {'; '.join(f'`{k}`: {v}' for k, v in RECIPES.items())}. Every {size.pre_probe_every} steps: sink mass (mean
  attention of queries at positions >= {SINK_FROM} on the first {SINK} tokens, over heads and layers, on 8 held-out
  windows of the recipe's own format; uniform attention would give the `uniform` column) and short-story
  accuracy ({size.probe_items} held-out questions; all answer tokens must be the greedy argmax).
- Base model rule: the recipe with the largest final sink mass / uniform among recipes whose final short
  accuracy is at least 80% of the best recipe's.
- The 2x2 table: `focusft.py` (its `main`) on the base model, {size.sft_steps} optimizer steps of 1 sample
  ({size.sft_steps} agentic conversations of ~{size.sft_len} tokens from `synthetic.write_synthetic`, one epoch,
  the same file for every run), lr {size.sft_lr:g} (the paper's 1e-5 is for a pretrained 7B), every other
  setting at focusft.py's defaults (K=2, eta=1, c=1, rank 32, alpha 64, layer fraction 0.35), seeds
  {', '.join(map(str, size.seeds))}. Attention diagnostics every {size.attn_every} steps (focusft.py's
  `--attn-every`, on that step's training sample).
- Evaluation: `eval_babilong.py --synthetic --chat-template` (seed 0: the same samples for every model),
  {", ".join(size.tasks)}, {size.eval_samples} samples per task and length, at {lengths} tokens (1x, 2x, 4x,
  8x the training length); per variant the accuracy pooled over seeds with a 95% Wilson interval, the
  per-seed accuracies, and the difference to Standard SFT with Newcombe's interval. A difference whose
  interval holds 0 cannot be told from noise.
- Device: {device}. Nothing of this protocol was changed after looking at a variant comparison.
"""


def fmt_ci(c: int, n: int) -> str:
    lo, hi = wilson(c, n)
    return f"{100 * c / n:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def tables(res: dict, size: Size) -> str:
    lengths = eval_lengths(size)
    params = next(iter(res["pretrain"].values()))["parameters"]
    lines = [f"### Pretraining recipes ({params / 1e6:.2f}M parameters; sink mass on the first 5 tokens; uniform = "
             "what equal attention gives)", "",
             "| recipe | steps | final loss | sink mass | uniform | sink / uniform | short accuracy | minutes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in res["pretrain"].items():
        last = r["curve"][-1]
        lines.append(f"| {name}{' (base)' if name == res['base'] else ''} | {last['step']} | {last['loss']:.3f} | "
                     f"{last['sink_mass']:.4f} | {last['uniform']:.4f} | {last['sink_mass'] / last['uniform']:.2f} | "
                     f"{last['short_accuracy']:.2f} | {r['seconds'] / 60:.1f} |")
    lines += ["", "### Synthetic BABILong accuracy, % (pooled over seeds, 95% Wilson interval; per seed in brackets "
              "after /)", "", "| variant | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
              "| --- |" + " --- |" * len(lengths)]
    for v, (label, _) in VARIANTS.items():
        if v not in res["accuracy"]:
            continue
        cells = []
        for n in lengths:
            c, t = res["accuracy"][v]["pooled"][n]
            per = ", ".join(f"{100 * a:.0f}" for a in res["accuracy"][v]["per_seed"][n])
            cells.append(f"{fmt_ci(c, t)} / {per}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "sft" in res["accuracy"]:
        lines += ["", "### Difference to Standard SFT, points (95% Newcombe interval)", "",
                  "| variant | " + " | ".join(f"{n}" for n in lengths) + " |", "| --- |" + " --- |" * len(lengths)]
        for v, (label, _) in VARIANTS.items():
            if v == "sft" or v not in res["accuracy"]:
                continue
            cells = []
            for n in lengths:
                d, lo, hi = diff_interval(*res["accuracy"][v]["pooled"][n], *res["accuracy"]["sft"]["pooled"][n])
                verdict = "noise" if lo <= 0 <= hi else ("better" if lo > 0 else "worse")
                cells.append(f"{100 * d:+.1f} [{100 * lo:+.0f}, {100 * hi:+.0f}] {verdict}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if res["diagnostics"]:
        lines += ["", "### Attention diagnostics of response tokens during training (mean over seeds; focusft.py's "
                  "metrics.jsonl, base weights)", "",
                  "| variant | sink mass, first | sink mass, last | engagement, first | engagement, last |",
                  "| --- | --- | --- | --- | --- |"]
        for v, (label, _) in VARIANTS.items():
            runs = res["diagnostics"].get(v)
            if not runs:
                continue
            def mean(key: str, i: int, runs: list = runs) -> float:
                return sum(r[i][key] for r in runs) / len(runs)

            lines.append(f"| {label} | {mean('sink_mass', 0):.4f} | {mean('sink_mass', -1):.4f} | "
                         f"{mean('context_engagement', 0):.4f} | {mean('context_engagement', -1):.4f} |")
    return "\n".join(lines)


def save_figure(fig, path: Path) -> str:
    """Lay out, write as PNG and close a matplotlib figure; its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name


def figures(res: dict, size: Size, fig_dir: Path, maps: dict, curves: dict) -> list[str]:
    """PNG figures in fig_dir; returns their names (none when matplotlib is missing). curves: each variant's
    finished training runs' metrics rows, drawn by scripts/plot_metrics.py (training.png, diagnostics.png)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig_dir.mkdir(parents=True, exist_ok=True)
    made = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, r in res["pretrain"].items():
        steps = [c["step"] for c in r["curve"]]
        axes[0].plot(steps, [c["sink_mass"] / c["uniform"] for c in r["curve"]], marker="o", label=name)
        axes[1].plot(steps, [c["short_accuracy"] for c in r["curve"]], marker="o", label=name)
    axes[0].axhline(1.0, color="grey", ls=":", lw=1)
    axes[0].set(title="pretraining: sink mass / uniform", xlabel="step")
    axes[1].set(title="pretraining: short-story accuracy", xlabel="step", ylim=(0, 1))
    axes[0].legend(fontsize=8)
    made.append(save_figure(fig, fig_dir / "pretraining.png"))
    if res["accuracy"]:
        lengths = eval_lengths(size)
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for k, (v, (label, _)) in enumerate(VARIANTS.items()):
            if v not in res["accuracy"]:
                continue
            ps = [res["accuracy"][v]["pooled"][n] for n in lengths]
            x = [i + (k - 1.5) * 0.06 for i in range(len(lengths))]
            y = [100 * c / t for c, t in ps]
            lo = [100 * (c / t - wilson(c, t)[0]) for c, t in ps]
            hi = [100 * (wilson(c, t)[1] - c / t) for c, t in ps]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set(xlabel="context length (tokens)", ylabel="accuracy, % (95% Wilson)",
               title="synthetic BABILong qa1-qa5")
        ax.legend(fontsize=8)
        made.append(save_figure(fig, fig_dir / "accuracy.png"))
    made += plot_metrics.plot(curves, fig_dir)  # each variant the mean over its seeds
    if maps:
        fig, axes = plt.subplots(1, len(maps), figsize=(4.5 * len(maps), 4))
        for ax, (label, m) in zip(axes if len(maps) > 1 else [axes], maps.items(), strict=True):
            ax.imshow(torch.log10(m + 1e-6).numpy(), cmap="viridis", vmin=-4, vmax=0)
            ax.set(title=f"{label}: log10 attention", xlabel="key", ylabel="query")
        made.append(save_figure(fig, fig_dir / "attention_map.png"))
    return made


# ----------------------------------------------------------------------------------------------------
# The run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", metavar="DIR",
                   help="start from this pretrained checkpoint instead of pretraining: the pre-registered real-model "
                        "protocol of experiments/real_base.py, which takes its own flags (see its --help)")
    p.add_argument("--out", required=True, help="output directory; a rerun skips every stage already done there")
    p.add_argument("--quick", action="store_true", help="toy sizes, the whole pipeline in about a minute (CI)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the full protocol; cuda: the same recipe at the larger 'gpu' size (default: cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; on a shared 2-core machine two threads per process ran a "
                        "pretraining step 10x slower than one)")
    p.add_argument("--sft-steps", type=int, metavar="N",
                   help="optimizer steps of each 2x2 run instead of the size's own (a new --out; a pretraining "
                        "copied there from another run is reused)")
    p.add_argument("--eval-samples", type=int, metavar="N",
                   help="samples per task and length in the evaluation, instead of the size's own: the same trained "
                        "models evaluated again into eval-N/, reported in report-evalN.md (tighter intervals, same "
                        "protocol otherwise)")
    p.add_argument("--stages", nargs="+", choices=("pretrain", "train", "eval", "report"),
                   default=["pretrain", "train", "eval", "report"],
                   help="stages to run (default: all); later stages need the earlier ones' results in --out")
    args = p.parse_args(argv)
    for flag in ("eval_samples", "sft_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    check_machine_flags(p, args)
    return args


def check_machine_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--threads, --quick and --device, as this script and experiments/real_base.py take them."""
    if args.threads < 1:
        p.error(f"--threads must be >= 1 (got {args.threads})")
    if args.quick and args.device == "cuda":
        p.error("--quick and --device cuda: choose one size")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch")


def collect(runs: dict, eval_dir: Path, size) -> tuple[dict, dict, list[str]]:
    """Accuracy (pooled and per seed) and diagnostics of every finished run; the runs not evaluated yet."""
    accuracy, diagnostics_of, missing = {}, {}, []
    for v in VARIANTS:
        per_seed, pooled, diag = {n: [] for n in eval_lengths(size)}, {n: [0, 0] for n in eval_lengths(size)}, []
        for s in size.seeds:
            run, where = runs[v, s], eval_dir / f"{v}-s{s}"
            if (run / "final" / "config.json").is_file():
                diag.append(diagnostics(run))
            if not (where / "results.json").is_file():
                missing.append(f"{v}-s{s}")
                continue
            for n, (c, t) in eval_counts(where, size).items():
                per_seed[n].append(c / t)
                pooled[n][0] += c
                pooled[n][1] += t
        if diag:
            diagnostics_of[v] = diag
        if all(p[1] for p in pooled.values()):
            accuracy[v] = {"pooled": pooled, "per_seed": per_seed}
    return accuracy, diagnostics_of, missing


def write_report(out: Path, args: argparse.Namespace, argv: list[str], size, res: dict, runs: dict, times: dict,
                 missing: list[str], suffix: str, tok, settings: dict, log) -> None:
    """report.md (or report-evalN.md) with the protocol, the tables and the figures, and results.json."""
    maps = {}
    sample = data.load_samples(out / "train.jsonl", tok, max_len=size.sft_len + 1024)[0][0]
    for v in ("sft", "focusft"):
        final = runs[v, size.seeds[0]] / "final"
        if (final / "config.json").is_file():
            maps[VARIANTS[v][0]] = attention_map(final, sample)
    curves = {label: [focusft.read_metrics(runs[v, s] / "metrics.jsonl") for s in size.seeds
                      if (runs[v, s] / "final" / "config.json").is_file()] for v, (label, _) in VARIANTS.items()}
    made = figures(res, size, out / ("figures" + (f"-eval{suffix}" if suffix else "")), maps,
                   {label: rows for label, rows in curves.items() if rows})
    note = ("" if made else "\n\nFigures skipped: matplotlib is not installed "
            "(`pip install -r experiments/requirements.txt`).")
    report = [f"# FocuSFT small replication ({size.name} size)", "",
              f"Command: `python {PROG} {shlex.join(without_stages(argv))}`  ",
              f"Machine: {platform.machine()}, {evaluation.usable_cores()} CPU cores, torch {torch.__version__}, "
              f"device {args.device}  ", "Duration (s, per stage, summed over resumed runs): "
              + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + f"; total {sum(times.values()) / 60:.1f} min",
              "", protocol(size, args.device), "## Results", "",
              ("Status: complete." if not missing else
               f"Status: PARTIAL -- not evaluated yet: {', '.join(missing)} (rerun the same command to finish)."),
              "", tables(res, size), note]
    report += [f"\n![{m}](figures{f'-eval{suffix}' if suffix else ''}/{m})" for m in made]
    name = f"report-eval{suffix}" if suffix else "report"
    (out / f"{name}.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    results = {"settings": settings, "command": shlex.join(argv), "times_s": times, "missing": missing, **res}
    evaluation.write_json(out / f"{name.replace('report', 'results')}.json", results)
    log(f"report: {out / (name + '.md')}")


def replicate(args: argparse.Namespace, argv: list[str]) -> dict:
    size = SIZES["quick" if args.quick else "gpu" if args.device == "cuda" else "full"]
    if args.sft_steps is not None:
        size = replace(size, sft_steps=args.sft_steps)
    suffix = ""  # the evaluation's directory and report names: eval/, report.md or eval-N/, report-evalN.md
    if args.eval_samples is not None and args.eval_samples != size.eval_samples:
        suffix = str(args.eval_samples)
        size = replace(size, eval_samples=args.eval_samples)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    settings = {"size": json.loads(json.dumps(asdict(size))), "device": args.device}  # tuples as JSON lists

    def trained(sizes: dict) -> dict:  # what the trained models depend on
        return {k: v for k, v in sizes.items() if k != "eval_samples"}

    if settings_path.is_file() and trained(json.loads(settings_path.read_text())["size"]) != trained(settings["size"]):
        raise ReplicationError(f"--out {out}: holds a run of another size ({settings_path}); use another --out")
    if not suffix or not settings_path.is_file():
        evaluation.write_json(settings_path, settings)
    (out / f"protocol{'-eval' + suffix if suffix else ''}.md").write_text(protocol(size, args.device), encoding="utf-8")
    journal = Journal(out, "replicate.log")
    log, timed, times = journal.log, journal.timed, journal.times
    log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {PROG} {shlex.join(argv)} (size {size.name})")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    tok = build_tokenizer(out, size)
    res = {"pretrain": {}, "base": None, "accuracy": {}, "diagnostics": {}}
    if "pretrain" in args.stages or (out / "base.json").is_file():
        res["pretrain"] = {r: timed(f"pretrain_{r}", lambda r=r: pretrain(out, tok, size, r, args.device, log))
                           for r in RECIPES}
        res["base"] = choose_base(res["pretrain"])
        evaluation.write_json(out / "base.json", {"recipe": res["base"]})
        log(f"base model: recipe {res['base']} (the protocol's rule)")
    if res["base"] is None:
        raise ReplicationError(f"--out {out}: no pretrained base yet; run the pretrain stage first")
    base = out / "pretrain" / res["base"] / "model"
    if not (out / "train.jsonl").is_file():
        synthetic.write_synthetic(out / "train.jsonl", size.sft_steps, size.sft_len, seed=1234,
                                  count_tokens=lambda text: len(tok.encode(text).ids))
    runs = {(v, s): out / "train" / f"{v}-s{s}" for s in size.seeds for v in VARIANTS}
    eval_dir = out / (f"eval-{suffix}" if suffix else "eval")
    # Seed by seed, each variant trained then evaluated: a run stopped early leaves whole seeds behind.
    for (v, s), run in runs.items():
        if "train" in args.stages:
            timed(f"train_{v}", lambda v=v, s=s: train_variant(out, base, size, v, s, args.device, log))
        if "eval" in args.stages and (run / "final" / "config.json").is_file():
            timed(f"eval{suffix}_{v}", lambda v=v, s=s, run=run: evaluate_model(run / "final", eval_dir / f"{v}-s{s}",
                                                                     size, args.device, log))
    # Results of whatever is finished (the report of a partial run says what is missing).
    res["accuracy"], res["diagnostics"], missing = collect(runs, eval_dir, size)
    if "report" in args.stages:
        write_report(out, args, argv, size, res, runs, times, missing, suffix, tok, settings, log)
    journal.close()
    return res


def without_stages(argv: list[str]) -> list[str]:
    """The command without --stages: a rerun of some stages reports the run it finishes."""
    out, skip = [], False
    for a in argv:
        if a.startswith("--stages"):
            skip = "=" not in a
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


class Journal:
    """A run's log (printed, and appended to a file in --out) and the seconds each stage took (times.json
    in --out), summed over the runs that resumed it."""

    def __init__(self, out: Path, name: str):
        self.out, self.file = out, open(out / name, "a", encoding="utf-8")
        self.times = json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}

    def log(self, text: str) -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def timed(self, key: str, fn):
        """fn(), its seconds added to times[key]."""
        t = time.time()
        value = fn()
        self.times[key] = self.times.get(key, 0.0) + time.time() - t
        evaluation.write_json(self.out / "times.json", self.times)
        return value

    def close(self) -> None:
        self.file.close()


def guarded(prog: str, fn, errors: tuple) -> int:
    """fn(), with a problem the user can fix (`errors`) and Ctrl-C each ending the process in one line, and
    the caller's torch threads put back (a test session keeps its own)."""
    threads = torch.get_num_threads()
    try:
        fn()
    except errors as e:
        sys.exit(f"{prog}: error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"{prog}: interrupted; the same command resumes")
    finally:
        torch.set_num_threads(threads)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--base" or a.startswith("--base=") for a in argv):  # a real checkpoint: another protocol
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import real_base

        return real_base.main(argv)
    args = parse_args(argv)
    return guarded(PROG, lambda: replicate(args, argv), (ReplicationError, data.DataError))


if __name__ == "__main__":
    sys.exit(main())
