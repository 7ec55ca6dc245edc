"""What a FocuSFT step costs against plain SFT and against the authors' design. No download needed.

    python bench.py                                   # the default CPU configuration of the README
    python bench.py --json                            # one JSON object (sft_s, focusft_s, authors_way_s, ...)
    python bench.py --device cuda --dtype bf16 --hidden 3584 --intermediate 18944 --layers 28 \\
        --heads 28 --kv-heads 4 --vocab 152064 --seq 4096     # a 7B-shaped random model on one GPU
    python bench.py --model path/to/checkpoint        # the shape of a real config.json, random weights

Ways to compute the loss and gradients of one micro-batch, on the same random model and batch:
  sft          plain SFT (inner_steps=0): one forward and backward, logits at response positions;
  focusft      FocuSFT as implemented (focusft.focusft_step): lower layers once, inner steps on the
               top layers only, response-position logits, inner gradients for the fast weights only;
               with --inner-ckpt (on, as in focusft.py) the layers with fast weights are checkpointed too;
  focusft_no_inner_ckpt  the same with those layers' activations kept (focusft.py --no-inner-ckpt);
  authors_way  the same numbers computed the authors' way (focusft.reference_focusft_loss): a full
               forward per inner step, full-vocabulary logits everywhere, fast weights in the outer graph.
All use the same mask (hybrid unless --causal) and the same activation-checkpointing setting (the
authors' way checkpoints every layer in every pass with --grad-ckpt; SFT has no inner loop).
A "step" is the forward and backward of one micro-batch; the optimizer step, identical for all three,
is left out. Repetitions are interleaved after warm-up (so a slow period hits every variant) and
the median is reported with the min-max spread.

Peak memory: on CUDA torch.cuda.max_memory_allocated above the allocation before the step, reset
per variant, on the same model (gradients are released after every step); on the CPU each variant
runs once in a fresh subprocess (after a short warm-up step) and reports its peak resident set size
(VmHWM, reset just before the step) above the resident size just before the step, so the weights
themselves are not counted; glibc is told to return freed blocks at once, so the resident size
follows the live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import focusft
import qwen2

VARIANTS = ("sft", "focusft", "focusft_no_inner_ckpt", "authors_way")


def make_config(args) -> qwen2.Qwen2Config:
    if args.model:
        config = qwen2.Qwen2Config.from_json(qwen2.checkpoint_dir(args.model) / "config.json")
    else:
        config = qwen2.Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden,
                                   intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                   num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                   tie_word_embeddings=False)
    config.max_position_embeddings = max(config.max_position_embeddings, args.seq)
    return config


def make_batch(seq: int, vocab: int, response_fraction: float, turns: int, device, batch: int = 1) -> dict:
    """`batch` samples (B, seq) of `turns` context/response pairs; the responses hold `response_fraction`
    of each. Row 0 is the same whatever `batch` (one draw of (B, seq) from the same seed)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    loss_mask = torch.zeros(batch, seq, dtype=torch.long)
    pair = seq // turns
    reply = max(1, round(pair * response_fraction))
    for t in range(turns):
        loss_mask[:, (t + 1) * pair - reply:(t + 1) * pair] = 1
    return {"input_ids": ids.to(device), "loss_mask": loss_mask.to(device),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}


def build(args) -> tuple[qwen2.Qwen2ForCausalLM, dict]:
    """The random model and the batch every variant runs on."""
    device = torch.device(args.device)
    model = qwen2.random_model(make_config(args), seed=0, dtype=args.dtype, device=device)
    return model, make_batch(args.seq, model.config.vocab_size, args.response_fraction, args.turns, device)


def step_fn(variant: str, model, batch: dict, args):
    kw = dict(inner_steps=0 if variant == "sft" else args.inner_steps, layer_fraction=args.layer_fraction,
              rank=args.rank, alpha=args.alpha, causal=args.causal, checkpoint=args.grad_ckpt)
    loss_fn = focusft.reference_focusft_loss if variant == "authors_way" else focusft.focusft_step
    if variant.startswith("focusft"):
        kw["inner_checkpoint"] = inner_ckpt(variant, args)

    def step():
        g = torch.Generator().manual_seed(1)  # the same fast-weight draw every time
        out = loss_fn(model, batch["input_ids"], batch["loss_mask"], batch["attention_mask"], generator=g,
                      **kw)
        loss = out[0] if isinstance(out, tuple) else out.loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    return step


def inner_ckpt(variant: str, args) -> bool:
    """Whether this FocuSFT variant checkpoints the layers with fast weights."""
    return variant == "focusft" and args.inner_ckpt


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_step(config: qwen2.Qwen2Config, seq: int, variant: str, args, n_targets: int) -> float:
    """Matrix FLOPs actually executed (for MFU): 2 per multiply-add; a backward that needs weight and
    input gradients costs 2x its forward, one that needs input gradients only 1x; a checkpointed
    layer runs its forward twice. FocuSFT checkpoints the layers below the fast weights, and with
    --inner-ckpt the layers with fast weights too, in the inner steps and in the outer pass."""
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    layer = 2 * seq * (2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size) + 4 * seq * seq * d
    head = 2 * d * V
    recompute = 1 if args.grad_ckpt else 0
    train = 1 + recompute + 2  # forward, recomputation, backward (weights + inputs)
    K = args.inner_steps
    if variant == "sft":
        return L * layer * train + head * n_targets * 3
    if variant.startswith("focusft"):
        top = len(focusft.adapted_layers(L, args.layer_fraction))
        again = 1 if inner_ckpt(variant, args) else 0  # the top layers' recomputation
        inner = K * (top * layer * (2 + again) + head * n_targets * 2)  # forward (+ again) + input-gradient backward
        return (L - top) * layer * train + top * layer * (3 + again) + inner + head * n_targets * 3
    inner = K * (L * layer * (2 + recompute) + head * seq * 2)
    return L * layer * train + inner + head * seq * 3


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def measure_memory_here(variant: str, args) -> float:
    """Peak memory (MB) of one step of `variant` in this fresh CPU process (see the module docstring)."""
    model, batch = build(args)
    device = model.device
    step = step_fn(variant, model, batch, args)
    # A short warm-up step first, so that library code and thread pools paged in by the first step
    # are part of the baseline, not of the variant's peak.
    step_fn(variant, model, make_batch(min(64, args.seq), model.config.vocab_size, args.response_fraction,
                                       args.turns, device), args)()
    # Reset the resident-set high-water mark (VmHWM) to the current size, so that the peak is this
    # step's alone (ru_maxrss would also carry the parent's size from before exec).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = peak_rss_mb()  # the mark just reset: the resident size now, from the same counter as the peak
    step()
    return peak_rss_mb() - base


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model shape (random weights)")
    g.add_argument("--model", default=None, help="take the shape from this checkpoint's config.json instead")
    g.add_argument("--hidden", type=int, default=512, help="hidden size")
    g.add_argument("--intermediate", type=int, default=1408, help="FFN intermediate size")
    g.add_argument("--layers", type=int, default=8, help="decoder layers")
    g.add_argument("--heads", type=int, default=8, help="attention heads")
    g.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    g.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    g = p.add_argument_group("batch and method")
    g.add_argument("--seq", type=int, default=1024, help="tokens in the micro-batch (one sample)")
    g.add_argument("--response-fraction", type=float, default=0.25, help="share of response tokens")
    g.add_argument("--turns", type=int, default=2, help="context/response turn pairs in the sample")
    g.add_argument("--inner-steps", type=int, default=2, help="K")
    g.add_argument("--layer-fraction", type=float, default=0.35, help="share of top layers with fast weights")
    g.add_argument("--rank", type=int, default=32, help="fast-weight LoRA rank")
    g.add_argument("--alpha", type=float, default=64.0, help="fast-weight LoRA alpha")
    g.add_argument("--causal", action="store_true", help="causal mask instead of the hybrid mask")
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing of decoder layers (all variants)")
    g.add_argument("--inner-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="FocuSFT: checkpoint the layers with fast weights too, in both loops (focusft.py's "
                        "--inner-ckpt, on by default there too; --no-inner-ckpt is the faster setting)")
    g = p.add_argument_group("measurement")
    g.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weights and activations")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--repeats", type=int, default=5, help="timed repetitions of each variant")
    g.add_argument("--warmup", type=int, default=1, help="untimed repetitions of each variant first")
    g.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="what to run")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="device bf16 peak for MFU (default: known value for H100/H200, else no MFU)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    g.add_argument("--profile", choices=VARIANTS, default=None,
                   help="instead of timing, print torch.profiler's table of one step of this variant")
    g.add_argument("--measure-memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    checks = [
        (args.device == "cuda" and not torch.cuda.is_available(), "--device cuda: no CUDA device is available"),
        (not 0 < args.response_fraction < 1, "--response-fraction must be in (0, 1)"),
        (args.seq < 2 * args.turns, "--seq must hold at least two tokens per turn"),
        (min(args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab, args.turns) < 1,
         "--hidden, --intermediate, --layers, --heads, --kv-heads, --vocab and --turns must be >= 1"),
        (args.inner_steps < 0, "--inner-steps must be >= 0"),
        (not 0 < args.layer_fraction <= 1, "--layer-fraction must be in (0, 1]"),
        (args.repeats < 1 or args.warmup < 0, "--repeats must be >= 1 and --warmup >= 0"),
    ]
    for failed, message in checks:
        if failed:
            p.error(message)
    if args.model:
        try:
            qwen2.Qwen2Config.from_json(qwen2.checkpoint_dir(args.model) / "config.json")
        except qwen2.CheckpointError as e:
            p.error(f"--model: {e}")
    return args


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0)):  # dense bf16
            if key in name:
                return value
    return None


def cuda_peak_mb(step, device) -> float:
    """Peak memory (MB) of one step above what is allocated before it (the model, the batch)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure(model, batch: dict, args) -> dict:
    """Step time, tokens/s, MFU (with a known peak) and, on CUDA, peak memory of each of args.variants
    on this model and batch; repetitions interleaved after warm-up."""
    device, config = model.device, model.config
    n_targets = int(focusft.targets_of(batch["input_ids"], batch["loss_mask"],
                                       batch["attention_mask"])[1].numel())
    steps = {v: step_fn(v, model, batch, args) for v in args.variants}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {v: [] for v in args.variants}
    for _ in range(args.repeats):
        for v, step in steps.items():
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            times[v].append(time.perf_counter() - t)

    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size")
    result = {"config": {k: getattr(config, k) for k in shape},
              "seq": int(batch["input_ids"].shape[1]), "response_tokens": n_targets,
              "inner_steps": args.inner_steps, "layer_fraction": args.layer_fraction, "dtype": args.dtype,
              "device": args.device, "grad_ckpt": args.grad_ckpt, "inner_ckpt": args.inner_ckpt,
              "mask": "causal" if args.causal else "hybrid", "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    peak = peak_tflops(args)
    for v, ts in times.items():
        result[f"{v}_s"] = statistics.median(ts)
        result[f"{v}_min_s"], result[f"{v}_max_s"] = min(ts), max(ts)
        result[f"{v}_tokens_per_s"] = result["seq"] / statistics.median(ts)
        if peak:
            flops = flops_per_step(config, result["seq"], v, args, n_targets)
            result[f"{v}_mfu"] = flops / statistics.median(ts) / (peak * 1e12)
    if not args.no_memory and device.type == "cuda":
        for v, step in steps.items():
            result[f"{v}_peak_mb"] = cuda_peak_mb(step, device)
    return result


def ratios(result: dict) -> dict:
    """The comparisons the table ends with, for the variants measured."""
    out = {}
    if "sft_s" in result and "focusft_s" in result:
        out["focusft_over_sft"] = result["focusft_s"] / result["sft_s"]
    if "authors_way_s" in result and "focusft_s" in result:
        out["authors_way_over_focusft"] = result["authors_way_s"] / result["focusft_s"]
    if "authors_way_peak_mb" in result and "focusft_peak_mb" in result:
        out["focusft_over_authors_way_memory"] = result["focusft_peak_mb"] / result["authors_way_peak_mb"]
    if "sft_s" in result and "focusft_no_inner_ckpt_s" in result:
        out["focusft_no_inner_ckpt_over_sft"] = result["focusft_no_inner_ckpt_s"] / result["sft_s"]
    if "focusft_peak_mb" in result and "focusft_no_inner_ckpt_peak_mb" in result:
        out["focusft_no_inner_ckpt_over_focusft_memory"] = (result["focusft_no_inner_ckpt_peak_mb"]
                                                            / result["focusft_peak_mb"])
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.measure_memory_of:
        print(json.dumps({"peak_mb": measure_memory_here(args.measure_memory_of, args)}))
        return {}
    torch.manual_seed(0)
    model, batch = build(args)
    if args.profile:
        return profile(step_fn(args.profile, model, batch, args))
    result = measure(model, batch, args)
    if not args.no_memory and model.device.type == "cpu":
        for v in args.variants:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                   "--measure-memory-of", v]
            # glibc otherwise keeps freed blocks below a moving threshold in its heap, and the
            # resident size would report the allocator's history rather than live tensors.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            result[f"{v}_peak_mb"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    result.update(ratios(result))

    if args.json:
        print(json.dumps(result))
    else:
        print(table(result, args.variants))
    return result


def profile(step) -> dict:
    """Where one step's time goes, by operator (after a warm-up step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        step()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total",
                         row_limit=15, max_name_column_width=50))
    total = sum(e.self_cpu_time_total for e in averages)
    shares = {}
    for e in averages:
        kind = ("attention" if "scaled_dot_product" in e.key else
                "matrix products" if e.key in ("aten::mm", "aten::addmm", "aten::bmm") else None)
        if kind:
            shares[kind] = shares.get(kind, 0.0) + e.self_cpu_time_total / total
    print("share of self CPU time: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    return shares


def table(r: dict, variants) -> str:
    c = r["config"]
    lines = [f"random Qwen2: hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, "
             f"{c['num_hidden_layers']} layers, {c['num_attention_heads']}/{c['num_key_value_heads']} heads, "
             f"vocab {c['vocab_size']}; seq {r['seq']} ({r['response_tokens']} response tokens), "
             f"K={r['inner_steps']}, layer fraction {r['layer_fraction']}, {r['dtype']} on {r['device']}, "
             f"{r['mask']} mask, activation checkpointing {'on' if r['grad_ckpt'] else 'off'}"
             f", inner checkpointing {'on' if r['inner_ckpt'] else 'off'} in the focusft row",
             "",
             "| variant | step (median) | spread (min-max) | tokens/s | peak memory |" + (
                 " MFU |" if any(f"{v}_mfu" in r for v in variants) else ""),
             "| --- | --- | --- | --- | --- |" + (" --- |" if any(f"{v}_mfu" in r for v in variants) else "")]
    for v in variants:
        mem = f"{r[f'{v}_peak_mb']:.0f} MB" if f"{v}_peak_mb" in r else "-"
        mfu = f" {r[f'{v}_mfu']:.1%} |" if f"{v}_mfu" in r else ""
        lines.append(f"| {v} | {r[f'{v}_s']:.3f} s | {r[f'{v}_min_s']:.3f}-{r[f'{v}_max_s']:.3f} s | "
                     f"{r[f'{v}_tokens_per_s']:.0f} | {mem} |{mfu}")
    lines.append("")
    if "focusft_over_sft" in r:
        lines.append(f"FocuSFT / SFT step time:            {r['focusft_over_sft']:.2f}x")
    if "authors_way_over_focusft" in r:
        lines.append(f"authors' way / FocuSFT step time:   {r['authors_way_over_focusft']:.2f}x")
    if "focusft_over_authors_way_memory" in r:
        lines.append(f"FocuSFT / authors' way peak memory: {r['focusft_over_authors_way_memory']:.2f}x")
    if "focusft_no_inner_ckpt_over_sft" in r:
        lines.append(f"FocuSFT --no-inner-ckpt / SFT step time: {r['focusft_no_inner_ckpt_over_sft']:.2f}x")
    if "focusft_no_inner_ckpt_over_focusft_memory" in r:
        lines.append("FocuSFT --no-inner-ckpt / FocuSFT peak memory: "
                     f"{r['focusft_no_inner_ckpt_over_focusft_memory']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
