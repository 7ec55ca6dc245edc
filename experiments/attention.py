"""The paper's attention analysis (sec. 2.2, 3.5, 4.4) on a real pretrained model, on a CPU:

    python experiments/attention.py --out runs/attention            # the full run (see "Cost" below)
    python experiments/attention.py --out runs/attention-quick --quick   # 1 seed, 2 steps, the real model
    python experiments/attention.py --out runs/attention --report-only   # the report of the stages done so far

What it measures: where the response tokens' attention goes -- the sink (the first 5 tokens,
focusft.SINK_TOKENS) and the context content (every other token outside the assistant turns: system,
user, tool outputs, turn headers), as focusft.attention_diagnostics defines them -- for the paper's 2x2
table (Standard SFT, SFT + Bidir, Causal bilevel, FocuSFT) fine-tuned from SmolLM2-135M-Instruct
(scripts/convert_gguf.py converts it on first use), in two regimes:
  train-time      each variant under its own mask (and with its fast weights phi_K when bilevel), on its
                  training micro-batch, logged by focusft.py every --attn-every steps from step 0 on;
  inference-time  the causal mask and no fast weights, on held-out conversations, for the base model
                  (also under the hybrid mask: what the mask alone does) and every fine-tuned model.

Stages, each writing under --out and skipped on a rerun when its result is there (the command resumes):
  1. data       train.jsonl and heldout.jsonl: synthetic agentic conversations (bAbI facts hidden in
                tool outputs, synthetic.py) of about --tokens tokens of the model's tokenizer;
  2. base       inference/base.json: the base model on the held-out conversations, causal and hybrid;
  3. per seed, per variant: train/<variant>-s<seed> (focusft.main), then inference/<variant>-s<seed>.json;
  4. report     attention.json (the issue's schema), details.json (per seed and sample, intervals),
                report.md, and figures: profile.png (Figure 2 style), map.png (Figure 3 style),
                diagnostics.png (train-time statistics by step).

Cost (2 CPU cores shared with other jobs, one torch thread): an optimizer step on a ~1K-token conversation
takes ~20 s for Standard SFT and ~30-45 s for the hybrid-mask and bilevel variants; one diagnostics pass
(30 layers) ~7-12 s. The full run (3 seeds x 4 variants x 6 steps, 6 held-out conversations) took 55 min
(3306 s wall); --quick (1 seed, 2 steps, ~512 tokens, 2 held-out conversations) 3-5 min (162 s and 304 s).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "scripts"))

import convert_gguf  # noqa: E402
import replicate  # noqa: E402

import data  # noqa: E402
import evaluation  # noqa: E402
import focusft  # noqa: E402
import qwen2  # noqa: E402
import synthetic  # noqa: E402

PROG = "experiments/attention.py"
SINK = focusft.SINK_TOKENS
VARIANTS = {v: label for v, (label, _) in replicate.VARIANTS.items()}  # the 2x2 table, focusft.py flags there
KEYS = {"sft": "sft", "sft-bidir": "sft_bidir", "bilevel-causal": "causal_bilevel", "focusft": "focusft"}
PAPER = {"sink_sft": 0.301, "context_sft": 0.135, "sink_reduction": 529.0, "context_gain": 3.1}


@dataclass(frozen=True)
class Size:
    name: str
    tokens: int = 1024  # length of each conversation, in tokens of the model's tokenizer
    steps: int = 6  # optimizer steps of every run, one conversation each (so `steps` training conversations)
    lr: float = 1e-4
    attn_every: int = 3  # train-time diagnostics at steps 0, 3, 6
    seeds: tuple[int, ...] = (0, 1, 2)
    heldout: int = 6  # held-out conversations of the inference-time measurement


SIZES = {
    # 6 steps at lr 1e-4 (no warmup, cosine to 0): what fits about an hour at 20-45 s a step. The peak lr is
    # 10x the paper's 1e-5 because 6 steps are ~80x fewer than the paper's ~470; measured with --quick, 2 such
    # steps of Standard SFT already take the held-out response loss from 1.45 to 0.68: the model moves.
    "full": Size("full"),
    "quick": Size("quick", tokens=512, steps=2, attn_every=2, seeds=(0,), heldout=2),
}


class AttentionError(Exception):
    """A problem the user can fix (a bad --model, an --out holding another run); one line."""


# ----------------------------------------------------------------------------------------------------
# Measurements


@torch.no_grad()
def key_profile(model: qwen2.Qwen2ForCausalLM, batch: dict, mask) -> torch.Tensor:
    """(S,): the attention each key position receives from the response queries, averaged over layers,
    heads and queries (Figure 2). Sums to 1; its first SINK entries sum to the sink mass."""
    ids, queries = batch["input_ids"], batch["loss_mask"].bool()  # (1, S) each
    h = model.embed(ids)
    total = torch.zeros(ids.shape[1])
    for i in range(model.config.num_hidden_layers):
        probs = model.attention_probabilities(h, i, queries, mask=mask)[0]  # (H, N, S)
        total += probs.float().mean((0, 1))
        h = model.run_layers(h, i, i + 1, mask=mask)
    return total / model.config.num_hidden_layers


def mask_of(name: str, batch: dict):
    """'causal' (None: the fused causal kernel) or 'hybrid' (focusft.hybrid_mask, (1, 1, S, S))."""
    return None if name == "causal" else focusft.hybrid_mask(batch["loss_mask"], batch["attention_mask"])


@torch.no_grad()
def measure(model_dir: Path, samples: list[data.Sample], pad_id: int, masks: tuple[str, ...],
            profiles: tuple[str, ...] = ()) -> dict:
    """Per held-out sample: sink mass and context engagement under each mask (no fast weights), the
    response loss under the causal mask, and the key profile under the masks in `profiles`."""
    model = qwen2.from_pretrained(model_dir, dtype=torch.float32, device="cpu")
    rows = []
    for sample in samples:
        batch = data.collate([sample], pad_id)
        inputs = (batch["input_ids"], batch["loss_mask"], batch["attention_mask"])
        row = {m: focusft.attention_diagnostics(model, *inputs, mask_of(m, batch)) for m in masks}
        # The held-out response loss says how far training moved the model.
        row["loss"] = focusft.focusft_step(model, *inputs, inner_steps=0, causal=True).loss.item()
        row["profile"] = {m: key_profile(model, batch, mask_of(m, batch)).tolist() for m in profiles}
        rows.append(row)
    return {"samples": rows}


def cached(path: Path, fn) -> dict:
    """fn()'s result, stored in path as JSON; read back on a rerun instead of recomputed."""
    if path.is_file():
        return json.loads(path.read_text())
    result = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    evaluation.write_json(path, result)
    return result


# ----------------------------------------------------------------------------------------------------
# Training: focusft.main, same data, steps and lr for every variant


def train(out: Path, model: Path, size: Size, variant: str, seed: int, threads: int, log) -> Path:
    """One variant x seed; focusft.main resumes an interrupted run from its checkpoint (on a signal)."""
    run = out / "train" / f"{variant}-s{seed}"
    if (run / "final" / "config.json").is_file():
        return run
    argv = ["--model", str(model), "--data", str(out / "train.jsonl"), "--out", str(run),
            *replicate.VARIANTS[variant][1], "--max-len", str(2 * size.tokens),  # never truncated
            "--max-steps", str(size.steps), "--epochs", "1", "--lr", str(size.lr),
            "--warmup-ratio", "0",  # with warmup, step 0's lr would be 0: a lost step of 6
            "--grad-accum", "1", "--attn-every", str(size.attn_every), "--ckpt-every", "0", "--seed", str(seed),
            "--no-grad-ckpt", "--no-inner-ckpt",  # a 135M model at 1K tokens fits; recomputation costs ~1/3
            "--device", "cpu"]
    replicate.call("focusft.py", focusft.main, argv, log)
    torch.set_num_threads(threads)
    if not (run / "final" / "config.json").is_file():  # focusft.py saved a checkpoint on a signal and returned
        raise AttentionError(f"training {run.name} stopped before its end; the same command resumes it")
    return run


def train_time(run: Path) -> list[dict]:
    """focusft.py's diagnostics rows of a run, as the outer loss sees attention: with phi_K when the
    variant is bilevel (its loss is computed with the fast weights), else with the weights alone."""
    return [{"step": r["step"], **r.get("attn_fast", r["attn_base"])}
            for r in focusft.read_metrics(run / "metrics.jsonl") if "attn_base" in r]


# ----------------------------------------------------------------------------------------------------
# Statistics: means with bootstrap intervals over seeds and samples


def bootstrap(values: dict, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile interval of {seed: [value per sample]}: seeds resampled, then samples
    within each. One seed with one sample has no interval (lo = hi = the value)."""
    groups = [v for v in values.values() if v]
    mean = sum(sum(g) / len(g) for g in groups) / len(groups)
    rng = random.Random(seed)
    means = []
    for _ in range(n):
        picked = [rng.choice(groups) for _ in groups]
        means.append(sum(sum(rng.choice(g) for _ in g) / len(g) for g in picked) / len(picked))
    means.sort()
    return mean, means[int(0.025 * n)], means[int(0.975 * n) - 1]


def ratio_bootstrap(num: dict, den: dict, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """num / den of the means, with a 95% interval: seeds resampled together (same seed, same data),
    samples within each."""
    seeds = [s for s in num if num[s] and den.get(s)]

    def mean_of(d, picked, rng=None):
        vals = [sum(rng.choice(d[s]) for _ in d[s]) / len(d[s]) if rng else sum(d[s]) / len(d[s]) for s in picked]
        return sum(vals) / len(vals)

    point = mean_of(num, seeds) / mean_of(den, seeds)
    rng = random.Random(seed)
    ratios = []
    for _ in range(n):
        picked = [rng.choice(seeds) for _ in seeds]
        ratios.append(mean_of(num, picked, rng) / max(mean_of(den, picked, rng), 1e-12))
    ratios.sort()
    return point, ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]


def fmt(ci: tuple[float, float, float], pct: bool = True, digits: int | None = None) -> str:
    """mean [lo, hi], as percent (pct) or as a plain number (a ratio)."""
    k = 100 if pct else 1
    digits = digits if digits is not None else 1 if pct else 2
    return f"{k * ci[0]:.{digits}f} [{k * ci[1]:.{digits}f}, {k * ci[2]:.{digits}f}]"


# ----------------------------------------------------------------------------------------------------
# Collecting the results


STATS = ("sink_mass", "context_engagement")


def collect(out: Path, size: Size) -> dict:
    """Per-seed, per-sample values of every finished stage: {where: {stat: {seed: [values]}}}."""
    res = {}
    base = out / "inference" / "base.json"
    if base.is_file():
        rows = json.loads(base.read_text())["samples"]
        for m in ("causal", "hybrid"):
            res[f"base.{m}"] = {s: {0: [r[m][s] for r in rows]} for s in STATS}
        res["base.loss"] = {0: [r["loss"] for r in rows]}
    for v in VARIANTS:
        for s in size.seeds:
            run, inf = out / "train" / f"{v}-s{s}", out / "inference" / f"{v}-s{s}.json"
            if (run / "final" / "config.json").is_file():
                rows = train_time(run)
                for where, row in (("train_start", rows[0]), ("train_end", rows[-1])):
                    for stat in STATS:
                        res.setdefault(f"{v}.{where}", {}).setdefault(stat, {})[s] = [row[stat]]
            if inf.is_file():
                rows = json.loads(inf.read_text())["samples"]
                for stat in STATS:
                    res.setdefault(f"{v}.inference_end", {}).setdefault(stat, {})[s] = [r["causal"][stat] for r in rows]
                res.setdefault(f"{v}.loss", {})[s] = [r["loss"] for r in rows]
    return res


def summary(res: dict) -> tuple[dict, dict]:
    """attention.json (the issue's schema: every leaf {sink_mass, context_engagement}, mean over seeds)
    and the intervals of every leaf."""
    summary_json, intervals = {}, {}
    for where, per_stat in res.items():
        if where.endswith(".loss"):
            continue
        model, leaf = where.split(".")
        key = "base" if model == "base" else KEYS[model]
        cis = {stat: bootstrap(per_stat[stat]) for stat in STATS}
        summary_json.setdefault(key, {})[leaf] = {stat: cis[stat][0] for stat in STATS}
        intervals.setdefault(key, {})[leaf] = {stat: list(cis[stat]) for stat in STATS}
    return summary_json, intervals


# ----------------------------------------------------------------------------------------------------
# Figures


def turn_starts(sample: data.Sample, tokenizer) -> list[int]:
    """Positions of the <|im_start|> tokens: where each message (turn) begins."""
    start = data.special_token_id(tokenizer, data.IM_START)
    return [i for i, t in enumerate(sample.input_ids) if t == start]


def figures(out: Path, size: Size, heldout: list[data.Sample], tokenizer) -> list[str]:
    """profile.png, map.png, diagnostics.png in out/figures; their names (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    made = []
    seed = size.seeds[0]
    lines = {}  # label -> the profile averaged over samples, position by position (lengths differ a little)
    for label, path, mask in (("base, causal", out / "inference" / "base.json", "causal"),
                              ("base, hybrid mask", out / "inference" / "base.json", "hybrid"),
                              ("Standard SFT, causal", out / "inference" / f"sft-s{seed}.json", "causal"),
                              ("FocuSFT, causal", out / "inference" / f"focusft-s{seed}.json", "causal"),
                              ("FocuSFT, hybrid mask", out / "inference" / f"focusft-s{seed}.json", "hybrid")):
        if not path.is_file():
            continue
        profiles = [r["profile"][mask] for r in json.loads(path.read_text())["samples"] if mask in r["profile"]]
        if profiles:
            n = min(len(p) for p in profiles)
            lines[label] = [sum(p[i] for p in profiles) / len(profiles) for i in range(n)]
    if lines:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        for label, y in lines.items():
            for ax in axes:
                ax.plot(range(len(y)), y, lw=1, label=label)
        axes[0].set(yscale="log", xlabel="key position", ylabel="attention of response queries",
                    title="by key position (mean over layers, heads, samples)")
        axes[1].set(yscale="log", xlim=(-0.5, 31.5), xlabel="key position", title=f"first 32 (sink: 0..{SINK - 1})")
        axes[1].axvspan(-0.5, SINK - 0.5, color="grey", alpha=0.15)
        axes[0].legend(fontsize=7)
        made.append(replicate.save_figure(fig, fig_dir / "profile.png"))
    maps = {}
    for label, model in (("base", Path(json.loads((out / "settings.json").read_text())["model"])),
                         ("Standard SFT", out / "train" / f"sft-s{seed}" / "final"),
                         ("FocuSFT", out / "train" / f"focusft-s{seed}" / "final")):
        if (model / "config.json").is_file():
            maps[label] = replicate.attention_map(model, heldout[0])  # (S, S), causal, no fast weights
    if maps:
        starts = turn_starts(heldout[0], tokenizer)
        fig, axes = plt.subplots(1, len(maps), figsize=(4.4 * len(maps), 4.2), squeeze=False)
        for ax, (label, m) in zip(axes[0], maps.items(), strict=True):
            # Max over k x k blocks, so that a one-token column (the sink) stays visible at ~300 pixels.
            S, k = m.shape[0], max(1, m.shape[0] // 256)
            pooled = torch.nn.functional.max_pool2d(m[None, None], k, ceil_mode=True)[0, 0]
            ax.imshow(torch.log10(pooled + 1e-6).numpy(), cmap="viridis", vmin=-4, vmax=0, extent=(0, S, S, 0))
            for p in starts:  # turn boundaries
                ax.axhline(p - 0.5, color="white", lw=0.4, alpha=0.6)
                ax.axvline(p - 0.5, color="white", lw=0.4, alpha=0.6)
            ax.set(title=f"{label}: log10 attention (causal)", xlabel="key position", ylabel="query position")
        made.append(replicate.save_figure(fig, fig_dir / "map.png"))
    curves = {v: [train_time(out / "train" / f"{v}-s{s}") for s in size.seeds
                  if (out / "train" / f"{v}-s{s}" / "final" / "config.json").is_file()] for v in VARIANTS}
    if any(curves.values()):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for v, runs in curves.items():
            if runs:
                steps = [r["step"] for r in runs[0]]
                for ax, stat in zip(axes, STATS, strict=True):
                    ax.plot(steps, [sum(r[i][stat] for r in runs) / len(runs) for i in range(len(steps))],
                            marker="o", label=VARIANTS[v])
        axes[0].set(title="train-time sink mass", xlabel="step", yscale="log")
        axes[1].set(title="train-time context engagement", xlabel="step")
        axes[0].legend(fontsize=7)
        made.append(replicate.save_figure(fig, fig_dir / "diagnostics.png"))
    return made


# ----------------------------------------------------------------------------------------------------
# The report


def commit() -> str:
    """The repository's commit, '+' when the work tree has uncommitted changes; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+ (uncommitted changes)" if dirty else "")


def stage_commits(out: Path) -> list[str]:
    """The commits the stages in --out ran at (commits.txt; '+': with uncommitted changes)."""
    return (out / "commits.txt").read_text().split() if (out / "commits.txt").is_file() else []


def compare(res: dict, a: str, b: str, stat: str) -> tuple[float, float, float] | None:
    """Paired difference a - b of `stat` (same seeds, same held-out samples), mean and 95% interval."""
    if a not in res or b not in res:
        return None
    x, y = res[a][stat], res[b][stat]
    if len(y) == 1 and b.startswith("base."):  # the base model has no seeds: every seed is paired with it
        y = {s: next(iter(y.values())) for s in x}
    diffs = {s: [p - q for p, q in zip(x[s], y[s], strict=True)] for s in x if s in y}
    return bootstrap(diffs) if diffs else None


def verdict(ci: tuple[float, float, float]) -> str:
    if ci[1] > 0:
        return "higher (the 95% interval is above 0)"
    if ci[2] < 0:
        return "lower (the 95% interval is below 0)"
    return "not distinguishable from it (the 95% interval holds 0)"


def report(out: Path, size: Size, res: dict, intervals: dict, missing: list[str], made: list[str], argv: list[str],
           times: dict, model: Path) -> str:
    rows = ["| model | regime | sink mass, % | context engagement, % |", "|---|---|---|---|"]
    labels = {"base": f"base ({model.name})", **{KEYS[v]: label for v, label in VARIANTS.items()}}
    regimes = {"causal": "inference: causal mask", "hybrid": "hybrid mask, no training",
               "train_start": "train-time, step 0", "train_end": f"train-time, step {size.steps}",
               "inference_end": "inference: causal, after training"}
    for key, leaves in intervals.items():
        for leaf, cis in leaves.items():
            rows.append(f"| {labels[key]} | {regimes[leaf]} | {fmt(cis['sink_mass'])} | "
                        f"{fmt(cis['context_engagement'])} |")
    n_seeds = len(size.seeds)
    ran = stage_commits(out)
    shown = model.relative_to(ROOT) if model.is_relative_to(ROOT) else model  # no local path in a committed report
    text = [f"# The paper's attention analysis on a real pretrained model ({size.name} size)", "",
            f"Command: `python {PROG} {shlex.join(argv)}`  ",
            f"Commit: the report was written at {commit()}; the stages ran at "
            f"{', '.join(ran) if ran else 'unrecorded commits'}  ",
            f"Machine: {platform.machine()}, {evaluation.usable_cores()} CPU cores, torch {torch.__version__}  ",
            "Run time (s, per stage, summed over resumed runs): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
            + f"; total {sum(times.values()) / 60:.1f} min", "",
            "Status: complete." if not missing else
            f"Status: **PARTIAL** -- not run yet: {', '.join(missing)}. Every number below is from the finished "
            "stages only; rerun the same command to finish.", "",
            "## Protocol", "",
            f"- Model: `{shown}` (SmolLM2-135M-Instruct by default, converted by `scripts/convert_gguf.py`), fp32, "
            "CPU.",
            f"- Data: synthetic agentic conversations of ~{size.tokens} tokens (`synthetic.write_synthetic`: a bAbI "
            "question, the facts hidden among distractors in 1-3 tool outputs, the answer in the last assistant "
            f"turn); {size.steps} for training, {size.heldout} other ones held out.",
            f"- Training: the 2x2 table through `focusft.main`, {n_seeds} seed(s) "
            f"({', '.join(map(str, size.seeds))}), each run {size.steps} optimizer steps of one conversation, "
            f"AdamW at lr {size.lr:g} (no warmup, cosine to 0), the paper's method settings otherwise "
            "(K = 2, inner lr 1, rank 32, alpha 64, top 35% of layers).",
            f"- Train-time: `focusft.py`'s diagnostics every {size.attn_every} step(s) from step 0, on that step's "
            "training conversation, under the variant's own mask and, for the bilevel variants, with phi_K "
            "(what the outer loss sees). One conversation per seed: the interval is over seeds only. The seeds "
            "share the training conversations and differ in their order and the fast weights' draws; step 0 is "
            "the same conversation for every seed (focusft.py runs the longest micro-batch first).",
            f"- Inference-time: the causal mask and no fast weights, on the {size.heldout} held-out conversations, "
            "for the base model and every trained one; intervals over seeds and samples.",
            "- Intervals: 95% bootstrap percentile intervals (seeds resampled, then samples within each seed).",
            "", "## Definitions, against the paper's", "",
            f"- **Sink mass**: the attention that response queries put on the first {SINK} tokens, averaged over "
            "heads, layers and response queries (`focusft.attention_diagnostics`). The paper: \"the attention "
            f"sink absorbs 30.1% of the budget on just 5 tokens\". Here the first {SINK} tokens are "
            "`<|im_start|>`, `system`, the newline and the system prompt's first two tokens (SmolLM2's tokenizer).",
            "- **Context engagement**: the attention response queries put on context tokens other than the sink: "
            "every token outside the assistant turns' bodies (system prompt, user message, tool outputs, and "
            "the `<|im_start|>role` headers). The paper: \"the entire context content (system/user prompt and "
            "tool responses combined) receives only 13.5%\". The headers are counted as context here; earlier "
            "assistant turns (tool calls) are responses, as they are trained on.",
            "- **Response queries**: the tokens of every assistant turn's body (the trained tokens).",
            "", "## Against the paper", ""]
    table = ["| quantity | paper (Qwen2.5-7B, training) | here |", "|---|---|---|"]
    if "sft.train_end" in res:
        table.append(f"| Standard SFT sink mass, % | {100 * PAPER['sink_sft']:.1f} | "
                     f"{fmt(bootstrap(res['sft.train_end']['sink_mass']))} (step {size.steps}) |")
        table.append(f"| Standard SFT context engagement, % | {100 * PAPER['context_sft']:.1f} | "
                     f"{fmt(bootstrap(res['sft.train_end']['context_engagement']))} (step {size.steps}) |")
    if "sft.train_end" in res and "focusft.train_end" in res:
        sink = ratio_bootstrap(res["sft.train_end"]["sink_mass"], res["focusft.train_end"]["sink_mass"])
        gain = ratio_bootstrap(res["focusft.train_end"]["context_engagement"],
                               res["sft.train_end"]["context_engagement"])
        table.append(f"| sink mass, Standard SFT / FocuSFT | {PAPER['sink_reduction']:.0f}x | {fmt(sink, False)}x |")
        table.append(f"| context engagement, FocuSFT / Standard SFT | {PAPER['context_gain']:.1f}x | "
                     f"{fmt(gain, False)}x |")
    text += table + ["", "## Every measurement (mean over seeds [95% interval])", "", *rows, ""]
    text += ["## How much comes from the mask, how much from training", ""]
    if "base.causal" in res:
        sink = ratio_bootstrap(res["base.causal"]["sink_mass"], res["base.hybrid"]["sink_mass"])
        text.append(f"- The base model, no training, same held-out conversations: the hybrid mask alone takes the "
                    f"sink from {fmt(bootstrap(res['base.causal']['sink_mass']))}% (causal) to "
                    f"{fmt(bootstrap(res['base.hybrid']['sink_mass']))}%, a factor {fmt(sink, False)}; context "
                    f"engagement from {fmt(bootstrap(res['base.causal']['context_engagement']))}% to "
                    f"{fmt(bootstrap(res['base.hybrid']['context_engagement']))}%.")
    for v in VARIANTS:
        if f"{v}.train_start" in res and f"{v}.train_end" in res:
            a, b = res[f"{v}.train_start"], res[f"{v}.train_end"]
            text.append(f"- {VARIANTS[v]}, train-time: step 0 sink {fmt(bootstrap(a['sink_mass']))}%, "
                        f"context {fmt(bootstrap(a['context_engagement']))}%; step {size.steps} sink "
                        f"{fmt(bootstrap(b['sink_mass']))}%, context {fmt(bootstrap(b['context_engagement']))}%.")
    for leaf, when in (("train_start", "step 0 (no update yet)"), ("train_end", f"step {size.steps}")):
        a, b = res.get(f"sft.{leaf}"), res.get(f"focusft.{leaf}")
        if a and b:
            sink = ratio_bootstrap(a["sink_mass"], b["sink_mass"])
            gain = ratio_bootstrap(b["context_engagement"], a["context_engagement"])
            text.append(f"- Train-time, {when}: sink mass Standard SFT / FocuSFT {fmt(sink, False)}x, context "
                        f"engagement FocuSFT / Standard SFT {fmt(gain, False)}x.")
    text += ["", "Step 0 is the base model under the variant's mask (and, bilevel, its phi_K): the difference "
             "between variants at step 0 is what the mask and the inner loop do without any training; the change "
             f"from step 0 to step {size.steps} is what training did (each step's value is on that step's own "
             "training conversation, so part of the change is the conversation's).", ""]
    text += ["## Inference time (causal mask, no fast weights): FocuSFT's weights against Standard SFT's", ""]
    for stat in STATS:
        d = compare(res, "focusft.inference_end", "sft.inference_end", stat)
        if d:
            text.append(f"- {stat.replace('_', ' ')}: FocuSFT minus Standard SFT = {fmt(d, digits=2)} points (paired "
                        f"by seed and held-out conversation): FocuSFT's is {verdict(d)}.")
        for v in VARIANTS:
            d = compare(res, f"{v}.inference_end", "base.causal", stat) if "base.causal" in res else None
            if d:
                text.append(f"  - {VARIANTS[v]} minus the base model: {fmt(d, digits=2)} points.")
    text += ["", "Held-out response loss under the causal mask (how far the training moved each model):", ""]
    if "base.loss" in res:
        text.append(f"- base model: {bootstrap(res['base.loss'])[0]:.3f}")
    for v in VARIANTS:
        if f"{v}.loss" in res:
            ci = bootstrap(res[f"{v}.loss"])
            text.append(f"- {VARIANTS[v]}: {ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]")
    text += ["", "## Figures", ""]
    if not made:
        text.append("Figures skipped: matplotlib is not installed (`pip install -r experiments/requirements.txt`).")
    captions = {
        "profile.png": "Figure 2 style: attention of response queries by key position, mean over layers, heads "
                       f"and held-out conversations (seed {size.seeds[0]}'s models; log scale).",
        "map.png": "Figure 3 style: query x key, mean over heads and layers, one held-out conversation, causal "
                   "(shown as the maximum over blocks of 4 x 4 tokens); white lines: turn boundaries "
                   "(`<|im_start|>`).",
        "diagnostics.png": "Train-time sink mass and context engagement by step, mean over seeds.",
    }
    for m in made:
        text += [f"![{m}](figures/{m})  ", captions[m], ""]
    return "\n".join(text) + "\n"


# ----------------------------------------------------------------------------------------------------
# The run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="base model: a Qwen2 checkpoint directory (default: SmolLM2-135M-Instruct converted into "
                        "runs/smollm2 by scripts/convert_gguf.py on first use)")
    p.add_argument("--out", required=True, help="output directory; a rerun skips every stage already done there")
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 2 steps, ~512-token conversations, 2 held-out ones: every stage in minutes")
    p.add_argument("--report-only", action="store_true",
                   help="train and measure nothing: write attention.json, the report and the figures from the stages "
                        "already finished in --out (a partial report while a run is still going)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine two threads ran slower)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1 (got {args.threads})")
    return args


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    size = SIZES["quick" if args.quick else "full"]
    try:
        model = Path(args.model) if args.model else convert_gguf.smollm2_checkpoint(ROOT / "runs" / "smollm2")
    except convert_gguf.ConvertError as e:
        raise AttentionError(f"converting SmolLM2 failed ({e}); give a checkpoint with --model") from e
    model = qwen2.checkpoint_dir(model).resolve()
    tokenizer = data.load_tokenizer(model)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"size": json.loads(json.dumps(asdict(size))), "model": str(model)}
    if (out / "settings.json").is_file() and json.loads((out / "settings.json").read_text()) != settings:
        raise AttentionError(f"--out {out}: holds a run of another size or model (settings.json); use another --out")
    evaluation.write_json(out / "settings.json", settings)
    journal = replicate.Journal(out, "attention.log")
    log, timed, times = journal.log, journal.timed, journal.times
    log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {PROG} {shlex.join(argv)} (size {size.name})")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    count = lambda text: len(tokenizer.encode(text).ids)  # noqa: E731
    for name, n, seed in (("train", size.steps, 1234), ("heldout", size.heldout, 4321)):
        if not (out / f"{name}.jsonl").is_file():
            synthetic.write_synthetic(out / f"{name}.jsonl", n, size.tokens, seed=seed, count_tokens=count)
    system = data.default_system(model)
    heldout = data.load_samples(out / "heldout.jsonl", tokenizer, 2 * size.tokens, default_system=system)[0]
    pad_id = data.special_token_id(tokenizer, data.ENDOFTEXT)
    if args.report_only:  # the report names the run's own command
        return finish(out, size, heldout, tokenizer, [a for a in argv if a != "--report-only"], times, model, log)
    ran = stage_commits(out)
    if commit().split()[0] not in ran:  # the commits the stages ran at, for the report
        (out / "commits.txt").write_text("\n".join([*ran, commit().split()[0]]) + "\n")
    first = size.seeds[0]
    timed("base", lambda: cached(out / "inference" / "base.json", lambda: measure(
        model, heldout, pad_id, ("causal", "hybrid"), profiles=("causal", "hybrid"))))
    # Seed by seed, each variant trained then measured: a run stopped early leaves whole seeds behind.
    for s in size.seeds:
        for v in VARIANTS:
            run_dir = timed(f"train_{v}", lambda v=v, s=s: train(out, model, size, v, s, args.threads, log))
            profiles = {"sft": ("causal",), "focusft": ("causal", "hybrid")}.get(v, ()) if s == first else ()
            masks = ("causal", "hybrid") if "hybrid" in profiles else ("causal",)
            timed(f"inference_{v}", lambda v=v, s=s, run_dir=run_dir, profiles=profiles, masks=masks: cached(
                out / "inference" / f"{v}-s{s}.json",
                lambda: measure(run_dir / "final", heldout, pad_id, masks, profiles)))
            log(f"{v}-s{s}: trained and measured ({time.strftime('%H:%M:%S')})")
    result = finish(out, size, heldout, tokenizer, argv, times, model, log)
    journal.close()
    return result


def finish(out: Path, size: Size, heldout: list[data.Sample], tokenizer, argv: list[str], times: dict, model: Path,
           log) -> dict:
    """attention.json, details.json, the figures and report.md from whatever stages are finished."""
    res = collect(out, size)
    missing = [f"{v}-s{s}" for s in size.seeds for v in VARIANTS
               if not (out / "inference" / f"{v}-s{s}.json").is_file()]
    summary_json, intervals = summary(res)
    evaluation.write_json(out / "attention.json", summary_json)
    evaluation.write_json(out / "details.json", {"settings": asdict(size), "missing": missing, "intervals": intervals,
                                                 "values": res, "times_s": times})
    made = figures(out, size, heldout, tokenizer)
    (out / "report.md").write_text(report(out, size, res, intervals, missing, made, argv, times, model),
                                   encoding="utf-8")
    log(f"wrote {out / 'attention.json'}, {out / 'report.md'}" + (f" and figures/{', '.join(made)}" if made else ""))
    return summary_json


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return replicate.guarded(PROG, lambda: run(args, argv), (AttentionError, replicate.ReplicationError,
                                                             data.DataError, qwen2.CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
