"""FocuSFT: bilevel, dilution-aware long-context supervised fine-tuning. The method and the trainer.

    torchrun --nproc_per_node 8 focusft.py --data agentic.jsonl            # the paper's run (Qwen2.5-7B)
    torchrun --nproc_per_node 8 focusft.py --data agentic.jsonl --no-bilevel --causal   # standard SFT
    python focusft.py --model DIR --data train.jsonl --max-steps 20 --out runs/try     # one process

Each optimizer step, for every micro-batch (paper section 3, DESIGN.md section 2):
  1. mask     the hybrid mask: context turns bidirectional, responses causal    `hybrid_mask`   (eq. 5)
  2. inner    fresh LoRA fast weights phi on the FFNs of the top layers          `init_fast_weights`
              adapted by K clipped SGD steps on the response loss               `inner_loop`    (eq. 3)
  3. outer    the response loss with phi_K held constant; only theta learns      `response_loss` (eq. 6)
`focusft_step` composes them; its fast path computes the layers below the first adapted layer once
(they do not depend on phi), asks for logits only where the next token is a response token, and
differentiates the inner loss with respect to phi alone. `reference_focusft_loss` is the slow,
obvious computation (the authors' way) that the tests hold the fast path to.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import data
import qwen2
from qwen2 import FastWeights, LowRank, Qwen2ForCausalLM

TARGETS = ("gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------
# The method


def hybrid_mask(loss_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """The turn-aware (GLM-style) mask (B, 1, S, S), True = may attend.

    Turns are the maximal runs of equal loss-mask values (0: context, 1: response). Query i sees key
    j iff both are real and j is in an earlier turn, or in the same turn and (i is context or j <= i):
    context turns are bidirectional inside, responses causal, and no token sees a later turn.
    Padding queries see only themselves, so no row is empty (an empty row would give NaN)."""
    B, S = loss_mask.shape  # both (B, S) LongTensors; attention_mask 1 = real token
    turn = F.pad((loss_mask[:, 1:] != loss_mask[:, :-1]).long(), (1, 0)).cumsum(1)  # (B, S)
    ti, tj = turn[:, :, None], turn[:, None, :]  # query i, key j
    idx = torch.arange(S, device=loss_mask.device)
    causal = idx[None, :, None] >= idx[None, None, :]  # (1, S, S): j <= i
    context_query = (loss_mask == 0)[:, :, None]
    allowed = (tj < ti) | ((tj == ti) & (context_query | causal))
    real = attention_mask.bool()
    allowed &= real[:, :, None] & real[:, None, :]
    allowed |= ~real[:, :, None] & (idx[:, None] == idx[None, :])
    return allowed[:, None]


def adapted_layers(n_layers: int, layer_fraction: float) -> range:
    """The top layers that carry fast weights: int(L * (1 - fraction)) .. L-1 (7B: 18..27)."""
    return range(int(n_layers * (1 - layer_fraction)), n_layers)


def init_fast_weights(model: Qwen2ForCausalLM, layers: range, targets=TARGETS, rank: int = 32,
                      alpha: float = 64.0, generator: torch.Generator | None = None,
                      init_A: dict | None = None) -> FastWeights:
    """phi_0: per (layer, projection) A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's default), B = 0,
    so W' = W at the start; scale alpha / rank. A is drawn on the CPU from `generator` (the same
    numbers on any device), unless `init_A[(layer, name)]` gives it."""
    fast: FastWeights = {}
    for i in layers:
        fast[i] = {}
        for name in targets:
            W = getattr(model.model.layers[i].mlp, name).weight  # (d_out, d_in)
            if init_A is not None and (i, name) in init_A:
                A = init_A[(i, name)].detach().clone()
            else:
                A = torch.empty(rank, W.shape[1])
                nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            A = A.to(device=W.device, dtype=W.dtype)
            B = torch.zeros(W.shape[0], A.shape[0], device=W.device, dtype=W.dtype)
            fast[i][name] = LowRank(A, B, alpha / rank)
    return fast


def targets_of(input_ids: Tensor, loss_mask: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Where the next token is a response token: `where` (B, S-1) bool over positions 0..S-2, and
    the labels there (N,). Logits are needed at these N positions only."""
    where = loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    return where, input_ids[:, 1:][where]


def response_loss(model: Qwen2ForCausalLM, h: Tensor, start: int, mask, fast: FastWeights | None,
                  where: Tensor, labels: Tensor, checkpoint: bool = False) -> Tensor:
    """L(theta, phi): layers start..L-1 on h (B, S, D), then the mean next-token cross-entropy over
    the micro-batch's response tokens (eq. 4 and 6)."""
    h = model.run_layers(h, start, model.config.num_hidden_layers, mask=mask, fast=fast,
                         checkpoint=checkpoint)
    logits = model.logits(h[:, :-1], where)  # (N, V): only where a response token comes next
    return F.cross_entropy(logits.float(), labels)


def clip_per_tensor(g: Tensor, max_norm: float) -> Tensor:
    """g * min(1, c / ||g||), each tensor on its own (a zero gradient stays zero)."""
    return g * (max_norm / g.float().norm()).clamp(max=1.0).to(g.dtype)


def inner_loop(model: Qwen2ForCausalLM, h: Tensor, start: int, mask, fast: FastWeights, where: Tensor,
               labels: Tensor, steps: int, lr: float, clip: float,
               checkpoint: bool = False) -> tuple[FastWeights, list[Tensor]]:
    """K steps of phi <- phi - eta * clip(grad_phi L(theta, phi)) (eq. 3), theta fixed.

    h is the detached output of the layers below `start`, so each step runs the top layers only,
    and autograd is asked for the fast weights' gradients alone (none for theta)."""
    losses = []
    for _ in range(steps):
        fast = {i: {n: LowRank(A.detach().requires_grad_(), B.detach().requires_grad_(), s)
                    for n, (A, B, s) in per.items()} for i, per in fast.items()}
        params = [t for per in fast.values() for lr_ in per.values() for t in (lr_.A, lr_.B)]
        loss = response_loss(model, h, start, mask, fast, where, labels, checkpoint)
        grads = iter(torch.autograd.grad(loss, params))
        with torch.no_grad():
            fast = {i: {n: LowRank(A - lr * clip_per_tensor(next(grads), clip),
                                   B - lr * clip_per_tensor(next(grads), clip), s)
                        for n, (A, B, s) in per.items()} for i, per in fast.items()}
        losses.append(loss.detach())
    return fast, losses


@dataclass
class StepOutput:
    loss: Tensor  # the outer loss, ready for backward (gradients reach theta only)
    inner_losses: list[float]  # L(theta, phi_k) for k = 0..K-1
    fast: FastWeights | None  # phi_K (None for plain SFT), for diagnostics
    n_targets: int  # response tokens the loss averages over


def focusft_step(model: Qwen2ForCausalLM, input_ids: Tensor, loss_mask: Tensor, attention_mask: Tensor, *,
                 inner_steps: int = 2, inner_lr: float = 1.0, inner_clip: float = 1.0, rank: int = 32,
                 alpha: float = 64.0, layer_fraction: float = 0.35, targets=TARGETS, causal: bool = False,
                 init_A: dict | None = None, generator: torch.Generator | None = None,
                 checkpoint: bool = False, inner_checkpoint: bool = False) -> StepOutput:
    """One micro-batch of FocuSFT, fast path. inputs (B, S); inner_steps=0 is plain SFT."""
    # Right padding: causal attention alone is exact for every real token, and lets SDPA take its
    # fused causal kernel; the hybrid mask is explicit.
    mask = None if causal else hybrid_mask(loss_mask, attention_mask)
    where, labels = targets_of(input_ids, loss_mask, attention_mask)
    L = model.config.num_hidden_layers
    start = adapted_layers(L, layer_fraction).start if inner_steps > 0 else L
    h = model.run_layers(model.embed(input_ids), 0, start, mask=mask, checkpoint=checkpoint)  # once
    fast, inner = None, []
    if inner_steps > 0:
        fast = init_fast_weights(model, range(start, L), targets, rank, alpha, generator, init_A)
        fast, inner = inner_loop(model, h.detach(), start, mask, fast, where, labels, inner_steps, inner_lr,
                                 inner_clip, inner_checkpoint)
    loss = response_loss(model, h, start, mask, fast, where, labels, checkpoint)  # phi_K constant
    return StepOutput(loss, [x.item() for x in inner], fast, int(labels.numel()))


def focusft_loss(model: Qwen2ForCausalLM, input_ids: Tensor, loss_mask: Tensor, attention_mask: Tensor, *,
                 inner_steps: int = 2, inner_lr: float = 1.0, inner_clip: float = 1.0, rank: int = 32,
                 alpha: float = 64.0, layer_fraction: float = 0.35, targets=TARGETS, causal: bool = False,
                 init_A: dict | None = None) -> tuple[Tensor, list[float]]:
    """The outer loss of one micro-batch (ready for backward) and its K inner losses."""
    out = focusft_step(model, input_ids, loss_mask, attention_mask, inner_steps=inner_steps,
                       inner_lr=inner_lr, inner_clip=inner_clip, rank=rank, alpha=alpha,
                       layer_fraction=layer_fraction, targets=targets, causal=causal, init_A=init_A)
    return out.loss, out.inner_losses


def reference_focusft_loss(model: Qwen2ForCausalLM, input_ids: Tensor, loss_mask: Tensor,
                           attention_mask: Tensor, *, inner_steps: int = 2, inner_lr: float = 1.0,
                           inner_clip: float = 1.0, rank: int = 32, alpha: float = 64.0,
                           layer_fraction: float = 0.35, targets=TARGETS, causal: bool = False,
                           init_A: dict | None = None, generator: torch.Generator | None = None,
                           checkpoint: bool = False) -> tuple[Tensor, list[float]]:
    """The same loss computed the slow, obvious way (the authors' design): a full forward from the
    embeddings for every inner step and for the outer pass, full-vocabulary logits at every
    position, and fast weights that are leaves of the outer graph too (so the outer backward also
    computes their gradients). Used by the tests and bench.py; never by the trainer."""
    L = model.config.num_hidden_layers
    real = attention_mask.bool()
    S = input_ids.shape[1]
    tril = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()
    mask = tril[None, None] & real[:, None, None] if causal else hybrid_mask(loss_mask, attention_mask)
    if causal:  # padding queries see themselves only, as in hybrid_mask
        mask = mask | (~real[:, None, :, None] & torch.eye(S, dtype=torch.bool, device=mask.device))
    labels = input_ids[:, 1:].masked_fill(~(loss_mask[:, 1:].bool() & real[:, 1:]), -100)

    def full_loss(fast):
        h = model.run_layers(model.embed(input_ids), 0, L, mask=mask, fast=fast, checkpoint=checkpoint)
        logits = model.logits(h)[:, :-1]  # (B, S-1, V) everywhere
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    fast, inner = None, []
    if inner_steps > 0:
        fast = init_fast_weights(model, adapted_layers(L, layer_fraction), targets, rank, alpha, generator,
                                 init_A)
        for _ in range(inner_steps):
            for per in fast.values():
                for lr_ in per.values():
                    lr_.A.requires_grad_()
                    lr_.B.requires_grad_()
            loss = full_loss(fast)
            params = [t for per in fast.values() for lr_ in per.values() for t in (lr_.A, lr_.B)]
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                new = [p - inner_lr * clip_per_tensor(g, inner_clip)
                       for p, g in zip(params, grads, strict=True)]
            it = iter(new)
            fast = {i: {n: LowRank(next(it), next(it), lr_.scale) for n, lr_ in per.items()}
                    for i, per in fast.items()}
            inner.append(loss.item())
        for per in fast.values():  # the authors' fast weights are parameters in the outer graph too
            for lr_ in per.values():
                lr_.A.requires_grad_()
                lr_.B.requires_grad_()
    return full_loss(fast), inner


# ----------------------------------------------------------------------------------------------
# Attention diagnostics (paper sections 2.2 and 4.4)


SINK_TOKENS = 5


@torch.no_grad()
def attention_diagnostics(model: Qwen2ForCausalLM, input_ids: Tensor, loss_mask: Tensor,
                          attention_mask: Tensor, mask, fast: FastWeights | None = None) -> dict[str, float]:
    """Where response queries put their attention, averaged over heads, layers and queries:
    sink mass (the first 5 tokens) and context engagement (the other context tokens).

    An explicit softmax layer by layer, for the response rows only ((H, N, S) per layer), run on
    diagnostic occasions alone so the training step keeps its fused attention kernels."""
    L = model.config.num_hidden_layers
    real = attention_mask.bool()
    queries = loss_mask.bool() & real  # (B, S)
    S = input_ids.shape[1]
    context = (loss_mask == 0) & real
    sink_keys = torch.zeros_like(context)
    sink_keys[:, :SINK_TOKENS] = True
    sink_keys &= real
    content_keys = context & ~sink_keys
    if mask is None:
        mask = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()[None, None]
    positions = torch.arange(S, device=input_ids.device)[None]
    cos, sin = model.rope(positions, model.dtype)
    h = model.embed(input_ids)
    sink_total, content_total, n = 0.0, 0.0, 0
    for i in range(L):
        layer = model.model.layers[i]
        att = layer.self_attn
        x = layer.input_layernorm(h)
        B = x.shape[0]
        q = att.q_proj(x).view(B, S, att.n_heads, att.head_dim).transpose(1, 2)
        k = att.k_proj(x).view(B, S, att.n_kv, att.head_dim).transpose(1, 2)
        q, k = qwen2.apply_rope(q, cos, sin), qwen2.apply_rope(k, cos, sin)
        k = k.repeat_interleave(att.n_heads // att.n_kv, dim=1)
        for b in range(B):
            rows = queries[b].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            scores = (q[b][:, rows].float() @ k[b].float().transpose(-1, -2)) / math.sqrt(att.head_dim)
            allowed = mask[b if mask.shape[0] > 1 else 0, 0][rows]  # (N, S)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # (H, N, S)
            sink_total += probs[..., sink_keys[b]].sum(-1).mean().item()
            content_total += probs[..., content_keys[b]].sum(-1).mean().item()
            n += 1
        h = layer(h, cos, sin, mask, (fast or {}).get(i))
    return {"sink_mass": sink_total / max(n, 1), "context_engagement": content_total / max(n, 1)}


# ----------------------------------------------------------------------------------------------
# The training script


class Objective(nn.Module):
    """The micro-batch loss as a module, so DDP wraps the whole step (its hooks and gradient sync
    see the forward) while the model itself stays a plain Qwen2ForCausalLM that saves as such."""

    def __init__(self, model: Qwen2ForCausalLM, method: dict):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, input_ids, loss_mask, attention_mask, generator) -> StepOutput:
        return focusft_step(self.model, input_ids, loss_mask, attention_mask, generator=generator,
                            **self.method)


def method_kwargs(args) -> dict:
    return dict(inner_steps=0 if args.no_bilevel else args.inner_steps, inner_lr=args.inner_lr,
                inner_clip=args.inner_clip, rank=args.rank, alpha=args.alpha,
                layer_fraction=args.layer_fraction, targets=tuple(args.targets), causal=args.causal,
                checkpoint=args.grad_ckpt, inner_checkpoint=args.inner_ckpt)


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warmup over ceil(warmup_ratio * total) steps, then cosine to 0 (transformers' schedule,
    so step s has the same lr as in a Trainer run of the same length; step 0 has lr 0)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, embeddings) only; norms and biases are not decayed."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fast_weight_generator(seed: int, epoch: int, micro_batch_index: int) -> torch.Generator:
    """phi_0's draw depends on (seed, epoch, global micro-batch index) only: the same sample gets
    the same init whatever the number of ranks, and a resumed run needs no generator state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + micro_batch_index)


@dataclass
class Run:
    """What the loop needs to know about the process group."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_flag: str) -> Run:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; plain python runs one process with no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return Run(rank, local_rank, world, device)


def all_reduce_sum(values: list[float], run: Run) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=run.device)
    if run.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def broadcast_str(text: str, run: Run) -> str:
    if run.world == 1:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def replicas_agree(model: nn.Module, run: Run) -> bool:
    """End-of-run guard: DDP keeps every rank's weights identical; compare per-tensor checksums."""
    local = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                         for p in model.parameters()]).flatten()
    gathered = [torch.empty_like(local) for _ in range(run.world)]
    dist.all_gather(gathered, local)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def export(model: Qwen2ForCausalLM, directory: Path, tokenizer_dir: Path, eos_ids: list[int]) -> None:
    """An HF checkpoint (weights, config, generation config with the chat EOS ids, tokenizer files),
    loadable by transformers and vLLM. Fast weights are never part of the model, so never saved."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config = {**model.generation_config, "eos_token_id": eos_ids}
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, tmp / name)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="focusft.py", description="FocuSFT fine-tuning of a Qwen2/Qwen2.5 checkpoint "
        "(defaults: the paper's configuration).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="Qwen/Qwen2.5-7B",
                   help="base model: a local HF checkpoint directory or a hub id")
    g.add_argument("--data", nargs="+", metavar="FILE", help="training data: JSONL or parquet chat records")
    g.add_argument("--out", default=None,
                   help="output directory (default: runs/<model>-<method>-<date>-<time>)")
    g.add_argument("--max-len", type=int, default=4096, help="truncate samples to this many tokens")
    g.add_argument("--skip-bad-samples", action="store_true",
                   help="skip and count bad records instead of stopping before training")
    g = p.add_argument_group("the method")
    g.add_argument("--inner-steps", type=int, default=2, help="K: inner SGD steps on the fast weights")
    g.add_argument("--inner-lr", type=float, default=1.0, help="eta: inner learning rate")
    g.add_argument("--inner-clip", type=float, default=1.0, help="c: per-tensor inner gradient clip")
    g.add_argument("--rank", type=int, default=32, help="LoRA rank of the fast weights")
    g.add_argument("--alpha", type=float, default=64.0, help="LoRA alpha (scale alpha / rank)")
    g.add_argument("--layer-fraction", type=float, default=0.35,
                   help="fraction of top layers with fast weights: layers int(L*(1-f))..L-1")
    g.add_argument("--targets", type=lambda s: s.split(","), default=list(TARGETS),
                   help="comma-separated FFN projections carrying fast weights")
    g.add_argument("--no-bilevel", action="store_true", help="plain SFT: no inner loop (K = 0)")
    g.add_argument("--causal", action="store_true",
                   help="plain causal mask in both loops instead of the hybrid mask")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5, help="passes over the data")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--lr", type=float, default=1e-5, help="AdamW peak learning rate")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay (matrices only; not norms and biases)")
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup share, then cosine to 0")
    g.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    g.add_argument("--micro-batch", type=int, default=1, help="samples per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step per process")
    g.add_argument("--loss-norm", choices=("micro-batch", "token"), default="micro-batch",
                   help="micro-batch: mean over each micro-batch's response tokens, averaged over "
                        "micro-batches and ranks (the authors'); token: mean over all response "
                        "tokens of the optimizer step")
    g.add_argument("--seed", type=int, default=1234, help="seed for data order, fast-weight init, ...")
    g.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="weights and optimizer states (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing of decoder layers in the outer pass")
    g.add_argument("--inner-ckpt", action="store_true",
                   help="activation checkpointing in the inner loop too (less memory, ~10%% slower)")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to train")
    g = p.add_argument_group("output")
    g.add_argument("--save-every", type=int, default=0,
                   help="also export a checkpoint every N steps (0: off)")
    g.add_argument("--attn-every", type=int, default=0,
                   help="attention diagnostics every N steps (always at the start and the end; 0: only then)")
    args = p.parse_args(argv)
    bad = [unknown for unknown in args.targets if unknown not in TARGETS]
    checks = [
        (not args.data, "--data: give one or more JSONL/parquet files"),
        (bad, f"--targets: unknown projection(s) {', '.join(bad)}; choose from {', '.join(TARGETS)}"),
        (args.inner_steps < 0, "--inner-steps must be >= 0"),
        (args.inner_lr <= 0, "--inner-lr must be > 0"),
        (args.inner_clip <= 0, "--inner-clip must be > 0"),
        (args.rank < 1, "--rank must be >= 1"),
        (not 0 < args.layer_fraction <= 1, "--layer-fraction must be in (0, 1]"),
        (args.epochs < 1, "--epochs must be >= 1"),
        (args.max_steps is not None and args.max_steps < 1, "--max-steps must be >= 1"),
        (args.lr < 0, "--lr must be >= 0"),
        (not 0 <= args.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
        (args.grad_clip < 0, "--grad-clip must be >= 0"),
        (args.micro_batch < 1, "--micro-batch must be >= 1"),
        (args.grad_accum < 1, "--grad-accum must be >= 1"),
        (args.max_len < 2, "--max-len must be >= 2"),
        (args.save_every < 0, "--save-every must be >= 0"),
        (args.attn_every < 0, "--attn-every must be >= 0"),
    ]
    for failed, message in checks:
        if failed:
            p.error(message)
    return args


def fail(message: str) -> None:
    """One clear line (or the data problem list), exit status 1, no traceback."""
    print(f"focusft.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = setup_distributed(args.device)
    args.dtype = args.dtype or ("bf16" if run.device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(args.seed)
    method = method_kwargs(args)
    name = "sft" if method["inner_steps"] == 0 else "focusft"
    name += "-causal" if args.causal else ""

    # -- model, tokenizer, data (everything validated before the first step) ------------------
    try:
        model_dir = qwen2.checkpoint_dir(args.model)
        tokenizer = data.load_tokenizer(model_dir)
        samples, stats = data.load_samples(args.data, tokenizer, args.max_len, skip_bad=args.skip_bad_samples)
        model = qwen2.from_pretrained(model_dir, dtype=dtype, device=run.device)
    except (qwen2.CheckpointError, data.DataError) as e:
        fail(str(e))
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        fail(f"{model_dir}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's "
             f"embedding only {model.config.vocab_size} rows")
    if method["inner_steps"] > 0 and len(adapted_layers(model.config.num_hidden_layers,
                                                         args.layer_fraction)) == 0:
        fail(f"--layer-fraction {args.layer_fraction} adapts no layer of a "
             f"{model.config.num_hidden_layers}-layer model")
    pad_id = data.special_token_id(tokenizer, "<|endoftext|>")
    eos_ids = sorted({*model.config.eos_token_ids, data.special_token_id(tokenizer, "<|im_end|>")})
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(broadcast_str(args.out or f"runs/{Path(str(args.model)).name}-{name}-{stamp}", run))
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: exists and is not a directory")
    if run.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**vars(args), "world_size": run.world}, indent=2) + "\n")
        print(stats.summary())

    # -- optimizer, schedule, DDP ------------------------------------------------------------------
    lengths = [len(s) for s in samples]
    per_epoch = len(data.epoch_microbatches(lengths, args.micro_batch, run.world, run.rank, args.seed, 0))
    steps_per_epoch = math.ceil(per_epoch / args.grad_accum)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999),
                                  fused=run.device.type == "cuda")
    objective = Objective(model, method)
    if run.world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[run.device] if run.device.type == "cuda" else None)
    if run.main:
        top = adapted_layers(model.config.num_hidden_layers, args.layer_fraction)
        inner = (f"fast weights on layers {top.start}..{top.stop - 1}" if method["inner_steps"]
                 else "no inner loop")
        print(f"{name}: {run.world} process(es), {args.micro_batch} x {args.grad_accum} x {run.world} "
              f"samples per step, {steps_per_epoch} steps per epoch, {total_steps} steps, {dtype}, "
              f"{inner}; output {out}")
    metrics = open(out / "metrics.jsonl", "a") if run.main else None  # noqa: SIM115

    def diagnose(batch: dict, fast: FastWeights | None, step: int) -> dict:
        mask = None if args.causal else hybrid_mask(batch["loss_mask"], batch["attention_mask"])
        base = attention_diagnostics(model, batch["input_ids"], batch["loss_mask"], batch["attention_mask"],
                                     mask)
        row = {"step": step, "attn_base": base}
        if fast is not None:
            row["attn_fast"] = attention_diagnostics(model, batch["input_ids"], batch["loss_mask"],
                                                     batch["attention_mask"], mask, fast)
        return row

    from tqdm import tqdm
    bar = tqdm(total=total_steps, disable=not run.main, dynamic_ncols=True, desc=name)
    step, diag_rows, last_batch = 0, [], None
    for epoch in range(args.epochs):
        micro = data.epoch_microbatches(lengths, args.micro_batch, run.world, run.rank, args.seed, epoch)
        for first in range(0, len(micro), args.grad_accum):
            if step >= total_steps:
                break
            t0 = time.perf_counter()
            group = micro[first:first + args.grad_accum]
            batches = [data.collate([samples[i] for i in mb] or [samples[0]], pad_id) for mb in group]
            n_targets = [int(targets_of(b["input_ids"], b["loss_mask"], b["attention_mask"])[1].numel())
                         if mb else 0 for b, mb in zip(batches, group, strict=True)]
            # Every rank needs the step's totals before its backward passes, to weigh its micro-batches.
            real_mb, real_targets = all_reduce_sum([sum(1 for mb in group if mb), sum(n_targets)], run)
            sums = [0.0, 0.0, 0.0, 0.0]  # loss sum, inner first, inner last, tokens
            for j, (mb, batch) in enumerate(zip(group, batches, strict=True)):
                batch = {k: v.to(run.device) for k, v in batch.items()}
                if isinstance(objective, nn.parallel.DistributedDataParallel):
                    objective.require_backward_grad_sync = j == len(group) - 1
                gen = fast_weight_generator(args.seed, epoch, (first + j) * run.world + run.rank)
                res = objective(batch["input_ids"], batch["loss_mask"], batch["attention_mask"], gen)
                # DDP averages gradients over ranks, hence the factor world.
                if not mb:
                    weight = 0.0  # an empty slot at the end of an epoch: runs for DDP, counts for nothing
                elif args.loss_norm == "token":
                    weight = run.world * n_targets[j] / real_targets
                else:
                    weight = run.world / real_mb
                (res.loss * weight).backward()
                if mb:
                    sums[0] += res.loss.item()
                    sums[1] += res.inner_losses[0] if res.inner_losses else 0.0
                    sums[2] += res.inner_losses[-1] if res.inner_losses else 0.0
                    sums[3] += int(batch["attention_mask"].sum())
                if run.main and not diag_rows and mb:  # the start of training, before any update
                    t_diag = time.perf_counter()
                    diag_rows.append(diagnose(batch, res.fast, 0))
                    t0 += time.perf_counter() - t_diag  # not part of the step time
                last_batch = (batch, res.fast) if mb else last_batch
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                         if args.grad_clip > 0 else torch.nn.utils.get_total_norm(
                             [p.grad for p in model.parameters() if p.grad is not None]))
            lr = lr_at(step, total_steps, args.lr, args.warmup_ratio)
            for group_ in optimizer.param_groups:
                group_["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss, in_first, in_last, tokens = all_reduce_sum(sums, run)
            dt = time.perf_counter() - t0
            row = {"step": step, "epoch": epoch, "loss": loss / real_mb, "lr": lr,
                   "grad_norm": float(grad_norm), "tokens": int(tokens), "tokens_per_s": tokens / dt,
                   "step_s": dt, "response_tokens": int(real_targets)}
            if method["inner_steps"]:
                row.update(inner_first=in_first / real_mb, inner_last=in_last / real_mb)
            if run.main and (step == total_steps or (args.attn_every and step % args.attn_every == 0)):
                d = diagnose(*last_batch, step)
                diag_rows.append(d)
                row.update({k: v for k, v in d.items() if k != "step"})
            if run.main:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                inner = (f" inner {row['inner_first']:.3f}->{row['inner_last']:.3f}"
                         if method["inner_steps"] else "")
                bar.set_postfix_str(f"loss {row['loss']:.4f}{inner} lr {lr:.2e} "
                                    f"{row['tokens_per_s']:.0f} tok/s")
                bar.update(1)
                if args.save_every and step % args.save_every == 0 and step < total_steps:
                    export(model, out / f"step-{step}", model_dir, eos_ids)
        if step >= total_steps:
            break
    bar.close()
    if run.world > 1 and not replicas_agree(model, run):
        fail("the ranks' weights differ after training (DDP desynchronised); the export would be wrong")
    if run.main:
        export(model, out / "final", model_dir, eos_ids)
        metrics.close()
        print(diagnostics_table(diag_rows))
        print(f"done: {step} steps on {run.world} process(es), weights identical on every rank; "
              f"checkpoint {out / 'final'}, metrics {out / 'metrics.jsonl'}")
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def diagnostics_table(rows: list[dict]) -> str:
    """Start vs end attention statistics of response queries (DESIGN.md section 3)."""
    if not rows:
        return ""
    start, end = rows[0], rows[-1]
    lines = [f"attention of response queries      start (step {start['step']})   end (step {end['step']})"]
    for key, label in (("attn_base", "base weights"), ("attn_fast", "with fast weights")):
        if key in start and key in end:
            for stat in ("sink_mass", "context_engagement"):
                lines.append(f"  {label:18s} {stat:19s} {start[key][stat]:8.4f}        {end[key][stat]:8.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
