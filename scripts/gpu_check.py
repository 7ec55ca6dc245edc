"""One prepared GPU check: the CUDA paths the main command depends on, measured in one command.

    python scripts/gpu_check.py --out runs/gpu-check               # one CUDA GPU: 8 minutes at most (time limits)
    python scripts/gpu_check.py --cpu-smoke --out runs/gpu-smoke   # every part at toy sizes on the CPU (CI)

No network and no downloads: every model is random and the tokenizer is trained on the spot. Five
parts, each in its own process with its own time limit, so that a crash, a hang or an out-of-memory
in one part leaves the others running:

  numerics    qwen2.py against transformers (fp32 and bf16, causal and hybrid mask), and
              focusft_step against reference_focusft_loss (bf16, fp32 beside it): max differences
  sdpa        which SDPA kernel PyTorch picks for the causal path, the hybrid mask and decoding
              (the profiler's op names), and the time of each backend forced alone, at 4K
  train       a few optimizer steps of focusft.py's command line (bf16, one process, synthetic.py's
              data) on a random model with Qwen2.5-0.5B's shape at 4096 tokens, with inner
              checkpointing on and off: finite losses, checkpoint reloaded, peak memory
  bench7b     bench.py's three variants at Qwen2.5-7B's shape (bf16, 4096 tokens, 25% response
              tokens): step time, tokens/s, MFU, peak memory, for both inner-checkpointing settings;
              then the longest sequence one FocuSFT step fits (doubling, bounded by the time limit)
  generation  eval_babilong.py's batched generation on the 0.5B-shaped model with 4K and 32K
              prompts: samples/s at batch size 1 and 8

After every part, --out holds gpu_check.json (all results so far), gpu_check.md (the same as tables)
and gpu_check.log (everything printed), so whatever finished before a time limit is kept. Models,
data and training runs go to --work (a temporary directory by default, removed at the end).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # qwen2, data, focusft, bench, eval_babilong; each part imports what it needs

# The shapes of Qwen2.5-0.5B's and Qwen2.5-7B's config.json (random weights here).
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
QWEN_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
TOY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, tie_word_embeddings=True)


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the GPU run, or the CPU smoke run that keeps the script from rotting."""

    device: str
    dtype: str  # bench.py's and focusft.py's --dtype
    small: dict  # the trained and generating model's shape
    big: dict  # bench's shape
    seq: int  # tokens per training sample and per bench step
    attn: tuple[int, int, int]  # heads, KV heads, head dim of the SDPA part (7B's)
    train_steps: int
    repeats: int  # timed repetitions (bench, SDPA)
    search: tuple[int, ...]  # sequence lengths tried for the longest FocuSFT step
    gen_lengths: tuple[str, ...]  # eval_babilong.py's length names
    gen_samples: int
    gen_batch: int
    max_positions: int  # the small model's context: room for the longest prompt
    limits: dict[str, float] = field(default_factory=dict)  # seconds per part


GPU = Sizes("cuda", "bf16", small=QWEN_05B, big=QWEN_7B, seq=4096, attn=(28, 4, 128), train_steps=3, repeats=3,
            search=(8192, 16384, 32768, 65536, 131072), gen_lengths=("4k", "32k"), gen_samples=8, gen_batch=8,
            max_positions=40960,
            limits={"numerics": 40, "sdpa": 40, "train": 110, "bench7b": 215, "generation": 75})  # 8 minutes
SMOKE = Sizes("cpu", "fp32", small=TOY, big=TOY, seq=512, attn=(4, 2, 16), train_steps=2, repeats=1, search=(768,),
              gen_lengths=("0k", "1k"), gen_samples=2, gen_batch=2, max_positions=4096,
              limits={"numerics": 120, "sdpa": 120, "train": 120, "bench7b": 120, "generation": 120})
PARTS = ("numerics", "sdpa", "train", "bench7b", "generation")


# ----------------------------------------------------------------------------------------------
# Results: one JSON per part, rewritten after every record, so a kill keeps what was measured


def one_line(e: BaseException) -> str:
    if isinstance(e, SystemExit) and not isinstance(e.code, str):  # a script's own error line is in the log
        return f"the script stopped (exit status {e.code}); its message is in gpu_check.log"
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


class Part:
    """One part's results, as {"results": {...}} in parts/<name>.json."""

    def __init__(self, path: Path):
        self.path, self.results, self.failures = path, {}, 0

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"results": self.results}, indent=1, default=str) + "\n")
        tmp.replace(self.path)

    def record(self, key: str, value) -> None:
        self.results[key] = value
        self.save()

    def add_row(self, key: str, row: dict) -> None:
        self.results.setdefault(key, []).append(row)
        self.save()

    def attempt(self, key: str, fn) -> None:
        """Run one check; its failure is recorded under `key` and the part goes on with the next."""
        try:
            fn()
        except (Exception, SystemExit) as e:  # SystemExit: a script's one-line error (focusft.fail)
            traceback.print_exc()
            self.failures += 1
            self.add_row("errors", {"check": key, "error": one_line(e)})


def say(message: str, log=None) -> None:
    print(f"[gpu_check] {message}", flush=True)
    if log is not None:  # the parent's own lines go to gpu_check.log too (the parts' output is copied there)
        log.write(f"[gpu_check] {message}\n".encode())
        log.flush()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------
# Part 1: numerics


def tiny_checkpoint(directory: Path) -> Path:
    """A tiny random Qwen2 (3 layers, GQA 4/2) with q/k/v biases and norm gains away from 0 and 1,
    where a misuse of them would go unseen."""
    import qwen2

    config = qwen2.Qwen2Config(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               rope_theta=10000.0, eos_token_id=2)
    model = qwen2.random_model(config, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(directory)
    return directory


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def part_numerics(part: Part, size: Sizes, work: Path) -> None:
    import bench
    import focusft
    import qwen2

    device = torch.device(size.device)
    directory = tiny_checkpoint(work / "numerics-model")
    batch = bench.make_batch(48, 211, 0.25, 2, device, batch=2)  # two context/response pairs, 25% responses
    ids, loss_mask, attention_mask = batch["input_ids"], batch["loss_mask"], batch["attention_mask"]
    mask = focusft.hybrid_mask(loss_mask, attention_mask)
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # bf16: a few roundings of 2^-8 on logits ~1-3

    def against_transformers(dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        ours = qwen2.from_pretrained(directory, dtype=dtype, device=device)
        theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa")
        theirs = theirs.to(device).eval()
        with torch.no_grad():
            pairs = {"causal": (ours(ids), theirs(ids).logits),
                     "hybrid mask": (ours(ids, attn_mask=mask), theirs(ids, attention_mask=mask).logits)}
        for name, (a, b) in pairs.items():
            diff = max_diff(a, b)
            part.add_row("qwen2_vs_transformers", {
                "dtype": str(dtype).removeprefix("torch."), "mask": name, "max_abs_diff": diff,
                "max_abs_logit": b.abs().max().item(), "tolerance": tolerance[dtype],
                "within": diff <= tolerance[dtype]})
            say(f"qwen2 vs transformers, {dtype}, {name}: max abs diff {diff:.3e}")

    def fast_against_reference(dtype: torch.dtype) -> None:
        model = qwen2.from_pretrained(directory, dtype=dtype, device=device)
        params = list(model.parameters())
        for causal in (False, True):
            kw = dict(causal=causal, layer_fraction=0.5, rank=8, alpha=16.0)
            out = focusft.focusft_step(model, ids, loss_mask, attention_mask,
                                       generator=torch.Generator().manual_seed(1), **kw)
            out.loss.backward()
            fast = [p.grad.clone() for p in params]
            model.zero_grad(set_to_none=True)
            loss, inner = focusft.reference_focusft_loss(model, ids, loss_mask, attention_mask,
                                                         generator=torch.Generator().manual_seed(1), **kw)
            loss.backward()
            ref = [p.grad.clone() for p in params]
            model.zero_grad(set_to_none=True)
            row = {"dtype": str(dtype).removeprefix("torch."), "mask": "causal" if causal else "hybrid",
                   "loss": out.loss.item(), "loss_diff": abs(out.loss.item() - loss.item()),
                   "inner_loss_diff": max(abs(x - y) for x, y in zip(out.inner_losses, inner, strict=True)),
                   "grad_max_abs_diff": max(max_diff(a, b) for a, b in zip(fast, ref, strict=True)),
                   "grad_max_abs": max(g.abs().max().item() for g in ref)}
            part.add_row("focusft_step_vs_reference", row)
            say(f"focusft_step vs reference, {dtype}, {row['mask']}: loss diff {row['loss_diff']:.3e}, "
                f"gradient max abs diff {row['grad_max_abs_diff']:.3e}")

    try:
        import transformers
        part.record("transformers", transformers.__version__)
    except ImportError:
        part.record("transformers", "not installed: the comparison with transformers is skipped")
    else:
        for dtype in (torch.float32, torch.bfloat16):
            part.attempt(f"qwen2 vs transformers {dtype}", lambda dtype=dtype: against_transformers(dtype))
    for dtype in (torch.bfloat16, torch.float32):
        part.attempt(f"focusft_step vs reference {dtype}", lambda dtype=dtype: fast_against_reference(dtype))


# ----------------------------------------------------------------------------------------------
# Part 2: which SDPA kernel runs

# The ATen ops behind F.scaled_dot_product_attention, as the profiler names them.
SDPA_OPS = {"aten::_scaled_dot_product_flash_attention": "flash",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
            "aten::_scaled_dot_product_efficient_attention": "mem-efficient",
            "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
            "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
            "aten::_scaled_dot_product_attention_math": "math"}


def kernels_seen(fn) -> tuple[str, str]:
    """The SDPA kernels one call of fn runs, forward and backward, from the profiler's op names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    keys = {e.key for e in prof.key_averages()}
    forward = sorted({label for op, label in SDPA_OPS.items() if op in keys})
    backward = sorted({label for op, label in SDPA_OPS.items() if op + "_backward" in keys})
    return ", ".join(forward) or "none seen", ", ".join(backward) or "-"


def sdpa_reasons(caught: list) -> list[str]:
    """Why PyTorch refused a backend: the warnings it gives on the way, each once, without the
    '(Triggered internally at file:line.)' tail."""
    lines = [str(w.message).split("(Triggered internally")[0].strip() for w in caught]
    return list(dict.fromkeys(line for line in lines if line))[:6]


def part_sdpa(part: Part, size: Sizes, work: Path) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import bench
    import focusft
    import qwen2

    device = torch.device(size.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[size.dtype]
    H, KV, hd = size.attn
    S = size.seq
    g = torch.Generator().manual_seed(0)

    def tensors(B: int, Sq: int, T: int, grad: bool):
        q, k, v = (torch.randn(B, n, s, hd, generator=g).to(device, dtype) for n, s in ((H, Sq), (KV, T), (KV, T)))
        return [t.requires_grad_(grad) for t in (q, k, v)]

    turns = bench.make_batch(S, 2, 0.25, 2, device)
    hybrid = focusft.hybrid_mask(turns["loss_mask"], turns["attention_mask"])  # (1, 1, S, S)
    B = 8  # decoding: 8 rows of different lengths over a cache of S positions, one query each
    lengths = torch.linspace(S // 2, S, B).long().to(device)
    decode_mask = (torch.arange(S, device=device)[None] < lengths[:, None])[:, None, None]  # (B, 1, 1, S)
    cases = {  # name -> (q, k, v, mask, backward?)
        "causal (training)": (*tensors(1, S, S, True), None, True),
        "hybrid mask (training)": (*tensors(1, S, S, True), hybrid, True),
        f"decoding (batch {B}, cache {S})": (*tensors(B, 1, S, False), decode_mask, False),
    }
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "mem-efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cuDNN": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    part.record("shape", f"{H} query heads over {KV} KV heads, head dim {hd}, {S} tokens, {dtype}, "
                         f"through qwen2.attention")

    for name, (q, k, v, mask, backward) in cases.items():
        def call(q=q, k=k, v=v, mask=mask, backward=backward):
            if backward:
                qwen2.attention(q, k, v, mask).sum().backward()
                q.grad = k.grad = v.grad = None
            else:
                with torch.no_grad():
                    qwen2.attention(q, k, v, mask)

        def measure(name=name, call=call, backward=backward):
            forward, backward_ops = kernels_seen(call)
            row = {"case": name, "picked_forward": forward,
                   "picked_backward": backward_ops if backward else "-",
                   "default_ms": 1e3 * timed(call, device, size.repeats)}
            for label, backend in backends.items():
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        with sdpa_kernel([backend]):
                            row[f"{label}_ms"] = 1e3 * timed(call, device, size.repeats)
                    except RuntimeError as e:
                        row[f"{label}_ms"] = "unavailable"
                        part.add_row("unavailable", {"case": name, "backend": label,
                                                     "why": "; ".join(sdpa_reasons(caught)) or one_line(e)})
                free_memory()
            part.add_row("kernels", row)
            say(f"SDPA {name}: picks {row['picked_forward']} (backward {row['picked_backward']}), "
                f"{row['default_ms']:.2f} ms")

        part.attempt(name, measure)


# ----------------------------------------------------------------------------------------------
# The small model the train and generation parts share: a tokenizer trained here, random weights


def small_model(work: Path, size: Sizes) -> Path:
    import data
    import qwen2
    import synthetic

    directory = work / "small-model"
    if (directory / "config.json").is_file():
        return directory
    say("building the random small model and its tokenizer")
    rng = random.Random(0)
    texts = []
    for _ in range(40):
        record = synthetic.synthetic_conversation(rng, 512, synthetic.estimate_tokens)
        texts.append(data.render_chat(record["messages"], record["tools"]))
    tokenizer = synthetic.train_tokenizer(texts, vocab_size=1000)
    vocab = max(size.small["vocab_size"], tokenizer.get_vocab_size())
    config = qwen2.Qwen2Config(**{**size.small, "vocab_size": vocab}, max_position_embeddings=size.max_positions,
                               rope_theta=1e6, eos_token_id=tokenizer.token_to_id("<|endoftext|>"))
    tmp = work / "small-model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    qwen2.random_model(config, seed=0, dtype="bfloat16").save_pretrained(tmp)
    synthetic.save_tokenizer_files(tokenizer, tmp)
    tmp.rename(directory)
    return directory


# ----------------------------------------------------------------------------------------------
# Part 3: training through focusft.py's command line


def part_train(part: Part, size: Sizes, work: Path) -> None:
    import data
    import focusft
    import qwen2
    import synthetic
    import training

    device = torch.device(size.device)
    model_dir = small_model(work, size)
    tokenizer = data.load_tokenizer(model_dir)
    data_file = work / "train.jsonl"
    # Samples a little under --max-len, so that truncation never cuts off their last answer.
    synthetic.write_synthetic(data_file, size.train_steps + 1, size.seq - size.seq // 16, seed=0,
                              count_tokens=lambda text: len(tokenizer.encode(text).ids))
    # A training checkpoint one step before the end: the last step is then trained again after a resume.
    base = ["--model", str(model_dir), "--data", str(data_file), "--max-steps", str(size.train_steps),
            "--grad-accum", "1", "--max-len", str(size.seq), "--ckpt-every", str(size.train_steps - 1),
            "--dtype", size.dtype, "--device", size.device]
    initial = qwen2.from_pretrained(model_dir).state_dict()

    def train(argv: list[str]) -> float | None:
        say("python focusft.py " + " ".join(argv))
        free_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        focusft.main(argv)
        return peak_gb(device)

    # focusft.py's default (--inner-ckpt) first, with the resume; then the other setting
    for i, (inner_ckpt, flags) in enumerate(((True, []), (False, ["--no-inner-ckpt"]))):
        def run(inner_ckpt=inner_ckpt, flags=flags, resume=i == 0):
            out = work / f"train-inner-ckpt-{'on' if inner_ckpt else 'off'}"
            shutil.rmtree(out, ignore_errors=True)
            argv = [*base, "--out", str(out), *flags]
            peak = train(argv)
            steps = [r for r in focusft.read_metrics(out / "metrics.jsonl") if "loss" in r]
            checkpoint = training.checkpoints(out)[-1]
            final = qwen2.from_pretrained(out / "final").state_dict()
            saved = qwen2.from_pretrained(checkpoint).state_dict()  # a training checkpoint is an HF checkpoint too
            row = {"inner_ckpt": inner_ckpt, "steps": len(steps), "losses": [round(r["loss"], 4) for r in steps],
                   "finite": all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps),
                   "step_s_median": statistics.median(r["step_s"] for r in steps[1:] or steps),
                   "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[1:] or steps),
                   "peak_gb": peak, "checkpoint": checkpoint.name,
                   "weights_finite": all(bool(t.float().isfinite().all()) for t in [*final.values(), *saved.values()]),
                   "max_weight_change": max(max_diff(final[k], initial[k]) for k in final)}
            if resume:  # the same command again without the export: resumes from the checkpoint, redoes the last step
                (out / "final").rename(out / "final-first")
                train([*argv, "--resume"])
                again = qwen2.from_pretrained(out / "final").state_dict()
                last = [r for r in focusft.read_metrics(out / "metrics.jsonl") if "loss" in r][-1]
                row |= {"resumed_loss_diff": abs(last["loss"] - steps[-1]["loss"]),
                        "resumed_weights_max_diff": max(max_diff(again[k], final[k]) for k in final)}
            part.add_row("runs", row)
            say(f"training with inner checkpointing {'on' if inner_ckpt else 'off'}: {len(steps)} steps, "
                f"peak memory {'-' if peak is None else f'{peak:.2f} GB'}")

        part.attempt(f"focusft.py inner_ckpt={inner_ckpt}", run)


# ----------------------------------------------------------------------------------------------
# Part 4: bench.py at 7B, and the longest FocuSFT step


def part_bench7b(part: Part, size: Sizes, work: Path, deadline: float) -> None:
    import bench

    device = torch.device(size.device)
    s = size.big
    base = ["--hidden", str(s["hidden_size"]), "--intermediate", str(s["intermediate_size"]),
            "--layers", str(s["num_hidden_layers"]), "--heads", str(s["num_attention_heads"]),
            "--kv-heads", str(s["num_key_value_heads"]), "--vocab", str(s["vocab_size"]),
            "--seq", str(size.seq), "--response-fraction", "0.25", "--dtype", size.dtype, "--device", size.device,
            "--repeats", str(size.repeats), "--warmup", "1"]
    say("python bench.py " + " ".join(base) + "  (one random model for every measurement)")
    torch.manual_seed(0)
    model, batch = bench.build(bench.parse_args(base))  # drawing 7B random weights takes about a minute
    part.record("memory", "steps: peak_gb is one step's peak above the weights and the batch (bench.py's measure); "
                          "longest_step: peak_gb_total is everything allocated, weights included")

    def measure(inner_ckpt: bool, variants: list[str]) -> None:
        args = bench.parse_args([*base, "--variants", *variants])
        result = bench.measure(model, batch, args)
        result.update(bench.ratios(result))
        print(bench.table(result, args.variants), flush=True)
        for v in args.variants:
            mb = result.get(f"{v}_peak_mb")
            part.add_row("steps", {"variant": v, "inner_ckpt": inner_ckpt, "step_s": result[f"{v}_s"],
                                   "tokens_per_s": result[f"{v}_tokens_per_s"], "mfu": result.get(f"{v}_mfu"),
                                   "peak_gb": None if mb is None else mb / 1024})
        part.record(f"ratios (inner_ckpt={inner_ckpt})",
                    {k: v for k, v in result.items() if "_over_" in k} | {"response_tokens": result["response_tokens"]})

    part.attempt("bench default", lambda: measure(True, ["sft", "focusft", "authors_way"]))  # --inner-ckpt
    free_memory()

    def longest() -> None:
        # One FocuSFT step (forward, inner loop, backward; no optimizer states) at doubling lengths, with the
        # memory-lean setting (bench.py's default, --inner-ckpt), until one does not fit, the list ends, or the
        # next would pass the time limit.
        last = None  # (seq, seconds)
        for seq in size.search:
            if last and time.monotonic() + 1.5 * last[1] * (seq / last[0]) ** 2 > deadline:
                part.add_row("longest_step", {"seq": seq, "fits": "not tried: would pass the time limit"})
                break
            args = bench.parse_args([*base, "--seq", str(seq)])
            step = bench.step_fn("focusft", model, bench.make_batch(seq, s["vocab_size"], 0.25, 2, device), args)
            free_memory()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0, fits = time.perf_counter(), True
            try:
                step()
                sync(device)
            except torch.cuda.OutOfMemoryError:
                fits = False
            seconds = time.perf_counter() - t0
            del step
            model.zero_grad(set_to_none=True)  # a backward cut short leaves some gradients behind
            free_memory()
            # the whole allocation: bf16 weights (15 GB at 7B) and gradients included, no optimizer states
            row = {"seq": seq, "fits": fits, "step_s": seconds if fits else None,
                   "peak_gb_total": peak_gb(device) if fits else None}
            part.add_row("longest_step", row)
            say(f"FocuSFT step at {seq} tokens: " + (f"fits, {seconds:.1f} s" if fits else "out of memory"))
            if not fits:
                break
            last = (seq, seconds)
        fitting = [r["seq"] for r in part.results.get("longest_step", []) if r["fits"] is True]
        part.record("longest_fitting_seq", max(fitting) if fitting else None)

    part.attempt("longest step", longest)
    free_memory()
    # the other setting changes only the FocuSFT row: bench.py's variant for focusft.py --no-inner-ckpt
    part.attempt("bench inner_ckpt=False", lambda: measure(False, ["focusft_no_inner_ckpt"]))


# ----------------------------------------------------------------------------------------------
# Part 5: batched generation through eval_babilong.py


def part_generation(part: Part, size: Sizes, work: Path) -> None:
    import eval_babilong

    model_dir = small_model(work, size)
    for length in size.gen_lengths:
        def run(length=length):
            argv = ["--model", str(model_dir), "--synthetic", "--tasks", "qa1", "--lengths", length,
                    "--max-samples", str(size.gen_samples), "--batch-size", str(size.gen_batch), "--benchmark",
                    "--device", size.device]
            say("python eval_babilong.py " + " ".join(argv))
            args = eval_babilong.build_parser().parse_args(argv)
            eval_babilong.validate(args)
            result = eval_babilong.benchmark(args)
            per_s = result["samples_per_s"]
            part.add_row("generation", {"length": length, "samples": size.gen_samples,
                                        "batch_1_samples_per_s": per_s[1],
                                        f"batch_{size.gen_batch}_samples_per_s": per_s[size.gen_batch],
                                        "speedup": per_s[size.gen_batch] / per_s[1],
                                        "identical_outputs": result["identical"]})

        part.attempt(f"generation {length}", run)


# ----------------------------------------------------------------------------------------------
# The report


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " ".join(fmt(v) for v in value)
    return "-" if value is None else str(value)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check: {env['device']}", "",
             f"{report['started']}, torch {env['torch']}, CUDA {env['cuda']}, {report['mode']}; "
             f"`{report['command']}`", "", "| part | status | seconds | limit (s) |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {name} | {p['status']} | {p['seconds']:.0f} | {p['limit_s']:.0f} |"
              for name, p in report["parts"].items()]
    for name, p in report["parts"].items():
        lines += ["", f"## {name}: {p['status']}", ""]
        for key, value in p["results"].items():
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                columns = list(dict.fromkeys(k for r in value for k in r))
                lines += ["", f"**{key}**", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
                lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in value]
                lines.append("")
            elif isinstance(value, dict):
                lines.append(f"- {key}: " + ", ".join(f"{k} {fmt(v)}" for k, v in value.items()))
            else:
                lines.append(f"- {key}: {fmt(value)}")
    return "\n".join(lines).rstrip() + "\n"


def write_report(out: Path, report: dict) -> None:
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=str) + "\n"),
                       ("gpu_check.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def environment(device: str) -> dict:
    env = {"device": "CPU (smoke run)", "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env |= {"device": props.name, "memory_gb": props.total_memory / 2**30,
                "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count}
    return env


# ----------------------------------------------------------------------------------------------
# Running the parts: each in a child process with its own time limit


def copy_output(stream, log) -> None:
    for chunk in iter(lambda: stream.read1(4096), b""):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        log.write(chunk)
        log.flush()


def run_part(name: str, args: argparse.Namespace, work: Path, limit: float, log) -> str:
    cmd = [sys.executable, __file__, "--part", name, "--out", str(args.out), "--work", str(work),
           "--limit", str(limit), *(["--cpu-smoke"] if args.cpu_smoke else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    pump = threading.Thread(target=copy_output, args=(proc.stdout, log), daemon=True)
    pump.start()
    try:
        code = proc.wait(timeout=limit)
        status = {0: "ok", 1: "errors"}.get(code, f"crashed (exit {code})")
    except subprocess.TimeoutExpired:
        status = f"time limit ({limit:.0f} s)"
    except KeyboardInterrupt:
        status = "interrupted"
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    pump.join(timeout=10)
    return status


def run_child(args: argparse.Namespace) -> int:
    size = SMOKE if args.cpu_smoke else GPU
    part = Part(args.out / "parts" / f"{args.part}.json")
    part.save()
    if args.cpu_smoke:
        torch.set_num_threads(1)  # toy sizes: threads only contend (on a busy CI machine, 10x slower)
    work = Path(args.work)
    deadline = time.monotonic() + args.limit - 10
    fn = {"numerics": part_numerics, "sdpa": part_sdpa, "train": part_train, "generation": part_generation,
          "bench7b": lambda p, s, w: part_bench7b(p, s, w, deadline)}[args.part]
    try:
        fn(part, size, work)
    except (Exception, SystemExit) as e:
        traceback.print_exc()
        part.add_row("errors", {"check": args.part, "error": one_line(e)})
        return 1
    return 1 if part.failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="where gpu_check.json, gpu_check.md, gpu_check.log and parts/*.json go")
    p.add_argument("--cpu-smoke", action="store_true", help="every part at toy sizes on the CPU (CI)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run, in order")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply every part's time limit (e.g. 2 on a slower GPU than an H100)")
    p.add_argument("--work", default=None,
                   help="models, data and training runs (default: a temporary directory, removed at the end)")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part here
    p.add_argument("--limit", type=float, help=argparse.SUPPRESS)  # internal: that part's time limit
    args = p.parse_args(argv)
    if args.time_scale <= 0:
        p.error("--time-scale must be > 0")
    if not args.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA device is visible: run it on a GPU node, or add --cpu-smoke for the CPU toy run")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_child(args)
    size = SMOKE if args.cpu_smoke else GPU
    (args.out / "parts").mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "mode": "CPU smoke run (toy sizes)" if args.cpu_smoke else "GPU run",
              "command": " ".join(["python scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "environment": environment(size.device), "parts": {}}
    started = time.monotonic()
    try:
        with open(args.out / "gpu_check.log", "wb") as log:
            say(f"{report['mode']} on {report['environment']['device']}; results in {args.out}", log)
            for i, name in enumerate(args.parts, 1):
                limit = size.limits[name] * args.time_scale
                say(f"part {i}/{len(args.parts)}: {name} (time limit {limit:.0f} s)", log)
                result_file = args.out / "parts" / f"{name}.json"
                result_file.unlink(missing_ok=True)  # never an earlier run's results
                t0 = time.monotonic()
                status = run_part(name, args, work, limit, log)
                results = json.loads(result_file.read_text())["results"] if result_file.is_file() else {}
                report["parts"][name] = {"status": status, "seconds": time.monotonic() - t0, "limit_s": limit,
                                         "results": results}
                write_report(args.out, report)
                say(f"part {name}: {status} in {time.monotonic() - t0:.0f} s", log)
                if status == "interrupted":
                    break
            say(f"done in {time.monotonic() - started:.0f} s: {args.out / 'gpu_check.md'}", log)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
