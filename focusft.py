"""FocuSFT: bilevel, dilution-aware long-context supervised fine-tuning. The method and the trainer.

    torchrun --nproc_per_node 8 focusft.py --data agentic.jsonl            # the paper's run (Qwen2.5-7B)
    torchrun --nproc_per_node 8 focusft.py --data agentic.jsonl --no-bilevel --causal   # standard SFT
    python focusft.py --model DIR --data train.jsonl --max-steps 20 --out runs/try     # one process

Read top to bottom, in the paper's order (section 3). Each optimizer step, for every micro-batch:
  1. mask     the hybrid mask: context turns bidirectional, responses causal    `hybrid_mask`   (eq. 5)
  2. inner    fresh LoRA fast weights phi on the FFNs of the top layers          `init_fast_weights`
              adapted by K clipped SGD steps on the response loss               `inner_loop`    (eq. 3)
  3. outer    the response loss with phi_K held constant; only theta learns      `response_loss` (eq. 6)
`focusft_step` composes them; its fast path computes the layers below the first adapted layer once
(they do not depend on phi), asks for logits only where the next token is a response token, and
differentiates the inner loss with respect to phi alone. `reference_focusft_loss` is the slow,
obvious computation (the authors' way) that the tests hold the fast path to. Then the attention
diagnostics, the optimisation (schedule, weight decay, global clip), and `train`, the loop; the
machinery it calls (processes, DDP/FSDP2, checkpoints, exports, signals, reporting) is in training.py.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import data
import qwen2
from qwen2 import FastWeights, LowRank, Qwen2ForCausalLM
from training import (
    REPORTERS,
    Processes,
    StopRequest,
    TensorBoard,
    WandB,
    all_reduce_sum,
    barrier,
    broadcast_str,
    check_shared_out,
    export,
    fail,
    full_state,
    gathered,
    load_optimizer_state,
    micro_batch_forward,
    open_report,
    parallelize,
    read_metrics,
    replicas_agree,
    restore_rng,
    resume_point,
    save_training_checkpoint,
    setup_distributed,
)

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
                      init_A: dict | None = None, dtype: torch.dtype | None = None) -> FastWeights:
    """phi_0: per (layer, projection) A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's default), B = 0,
    so W' = W at the start; scale alpha / rank. A is drawn on the CPU from `generator` (the same
    numbers on any device), unless `init_A[(layer, name)]` gives it. dtype: the activations' (default
    the weights'; they differ under mixed precision)."""
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
            A = A.to(device=W.device, dtype=dtype or W.dtype)
            B = torch.zeros(W.shape[0], A.shape[0], device=W.device, dtype=dtype or W.dtype)
            fast[i][name] = LowRank(A, B, alpha / rank)
    return fast


def targets_of(input_ids: Tensor, loss_mask: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Where the next token is a response token: `where` (B, S-1) bool over positions 0..S-2, and
    the labels there (N,). Logits are needed at these N positions only."""
    where = loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    return where, input_ids[:, 1:][where]


def response_loss(model: Qwen2ForCausalLM, h: Tensor, start: int, mask, fast: FastWeights | None,
                  where: Tensor, labels: Tensor, checkpoint: bool = False, attended: bool = False) -> Tensor:
    """L(theta, phi): layers start..L-1 on h (B, S, D), then the mean next-token cross-entropy over
    the micro-batch's response tokens (eq. 4 and 6). attended: h is already past layer start's
    attention half (see inner_loop), so that layer runs its FFN half only."""
    if attended:
        h = model.run_ffn(h, start, fast=(fast or {}).get(start), checkpoint=checkpoint)
        start += 1
    h = model.run_layers(h, start, model.config.num_hidden_layers, mask=mask, fast=fast, checkpoint=checkpoint)
    logits = model.logits(h[:, :-1], where)  # (N, V): only where a response token comes next
    return F.cross_entropy(logits.float(), labels)


def clip_per_tensor(g: Tensor, max_norm: float) -> Tensor:
    """g * min(1, c / ||g||), each tensor on its own (a zero gradient stays zero). The norm, the factor
    and the product are fp32 and rounded once to g's dtype, as the authors' tensor-times-float does;
    a factor rounded to bf16 first would be off by up to ~0.4%."""
    factor = (max_norm / g.float().norm()).clamp(max=1.0)  # fp32 scalar tensor
    return (g.float() * factor).to(g.dtype)


def factors(fast: FastWeights) -> list[Tensor]:
    """phi as a flat list: every A and B, in (layer, projection, A then B) order."""
    return [t for per in fast.values() for low_rank in per.values() for t in (low_rank.A, low_rank.B)]


def as_leaves(fast: FastWeights) -> FastWeights:
    """phi as fresh autograd leaves (same values), so a backward gives their gradients."""
    return {i: {n: LowRank(A.detach().requires_grad_(), B.detach().requires_grad_(), s) for n, (A, B, s) in per.items()}
            for i, per in fast.items()}


@torch.no_grad()
def sgd_step(fast: FastWeights, grads: list[Tensor], lr: float, clip: float) -> FastWeights:
    """phi <- phi - eta * clip(g) for every factor (eq. 3); grads in `factors` order."""
    g = iter(grads)
    return {i: {n: LowRank(A - lr * clip_per_tensor(next(g), clip), B - lr * clip_per_tensor(next(g), clip), s)
                for n, (A, B, s) in per.items()} for i, per in fast.items()}


def inner_loop(model: Qwen2ForCausalLM, h: Tensor, start: int, mask, fast: FastWeights, where: Tensor,
               labels: Tensor, steps: int, lr: float, clip: float,
               checkpoint: bool = False) -> tuple[FastWeights, list[Tensor]]:
    """K steps of phi <- phi - eta * clip(grad_phi L(theta, phi)) (eq. 3), theta fixed.

    h is the detached output of the layers below `start`, so each step runs the top layers only,
    and autograd is asked for the fast weights' gradients alone (none for theta)."""
    with torch.no_grad():  # the first adapted layer's attention does not depend on phi either
        h = model.run_attention(h, start, mask=mask)
    losses = []
    for _ in range(steps):
        fast = as_leaves(fast)
        loss = response_loss(model, h, start, mask, fast, where, labels, checkpoint, attended=True)
        fast = sgd_step(fast, torch.autograd.grad(loss, factors(fast)), lr, clip)
        losses.append(loss.detach())
    return fast, losses


@dataclass
class StepOutput:
    loss: Tensor  # the outer loss, ready for backward (gradients reach theta only)
    inner_losses: list[float]  # L(theta, phi_k) for k = 0..K-1
    fast: FastWeights | None  # phi_K (None for plain SFT): leaves whose .grad the outer backward fills


def focusft_step(model: Qwen2ForCausalLM, input_ids: Tensor, loss_mask: Tensor, attention_mask: Tensor, *,
                 inner_steps: int = 2, inner_lr: float = 1.0, inner_clip: float = 1.0, rank: int = 32,
                 alpha: float = 64.0, layer_fraction: float = 0.35, targets=TARGETS, causal: bool = False,
                 init_A: dict | None = None, generator: torch.Generator | None = None,
                 checkpoint: bool = False, inner_checkpoint: bool = False) -> StepOutput:
    """One micro-batch of FocuSFT, fast path. inputs (B, S); inner_steps=0 is plain SFT.

    Activation checkpointing: `checkpoint` recomputes the lower layers (all layers for plain SFT),
    whose activations would otherwise be held through the whole inner loop. The top layers are
    recomputed only with `inner_checkpoint`: each inner step already holds their activations, so
    keeping them in the outer pass too costs no extra peak memory and saves their recomputation."""
    # Right padding: causal attention alone is exact for every real token, and lets SDPA take its
    # fused causal kernel; the hybrid mask is explicit.
    mask = None if causal else hybrid_mask(loss_mask, attention_mask)
    where, labels = targets_of(input_ids, loss_mask, attention_mask)
    L = model.config.num_hidden_layers
    start = adapted_layers(L, layer_fraction).start if inner_steps > 0 else L
    h = model.run_layers(model.embed(input_ids), 0, start, mask=mask, checkpoint=checkpoint)  # once
    fast, inner = None, []
    if inner_steps > 0:
        fast = init_fast_weights(model, range(start, L), targets, rank, alpha, generator, init_A, h.dtype)
        fast, inner = inner_loop(model, h.detach(), start, mask, fast, where, labels, inner_steps, inner_lr,
                                 inner_clip, inner_checkpoint)
        # phi_K is a constant of the outer loss, but its outer gradient dL/dphi_K is still wanted: the
        # authors' fast weights are module parameters, so their outer backward fills it and the global
        # gradient-norm clip counts it (`clip_gradients`). Rank-r factors: cheap next to theta's.
        fast = as_leaves(fast)
    top_checkpoint = inner_checkpoint if inner_steps > 0 else checkpoint
    loss = response_loss(model, h, start, mask, fast, where, labels, top_checkpoint)  # phi_K constant
    return StepOutput(loss, [x.item() for x in inner], fast)


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
            fast = as_leaves(fast)
            loss = full_loss(fast)
            fast = sgd_step(fast, torch.autograd.grad(loss, factors(fast)), inner_lr, inner_clip)
            inner.append(loss.item())
        fast = as_leaves(fast)  # the authors' fast weights are parameters in the outer graph too
    return full_loss(fast), inner


# ----------------------------------------------------------------------------------------------
# Attention diagnostics (paper sections 2.2 and 4.4)


SINK_TOKENS = 5


@torch.no_grad()
def attention_diagnostics(model: Qwen2ForCausalLM, input_ids: Tensor, loss_mask: Tensor,
                          attention_mask: Tensor, mask, fast: FastWeights | None = None) -> dict[str, float]:
    """Where response queries put their attention, averaged over heads, layers and queries:
    sink mass (the first 5 tokens) and context engagement (the other context tokens).

    The probabilities come from the model's own attention code (`attention_probabilities`, an
    explicit softmax for the response rows only), so the training step keeps its fused kernels.
    Under FSDP the caller gathers the weights first."""
    real = attention_mask.bool()
    queries = loss_mask.bool() & real  # (B, S)
    context = (loss_mask == 0) & real
    sink_keys = torch.zeros_like(context)
    sink_keys[:, :SINK_TOKENS] = True
    sink_keys &= real
    content_keys = context & ~sink_keys
    h = model.embed(input_ids)
    sink_total, content_total, n = 0.0, 0.0, 0
    for i in range(model.config.num_hidden_layers):
        for b, probs in enumerate(model.attention_probabilities(h, i, queries, mask=mask)):  # (H, N_b, S)
            if probs.shape[1] == 0:
                continue
            sink_total += probs[..., sink_keys[b]].sum(-1).mean().item()
            content_total += probs[..., content_keys[b]].sum(-1).mean().item()
            n += 1
        h = model.run_layers(h, i, i + 1, mask=mask, fast=fast)
    return {"sink_mass": sink_total / max(n, 1), "context_engagement": content_total / max(n, 1)}


# ----------------------------------------------------------------------------------------------
# The optimisation: the loss as one module, the global clip, the schedule, weight decay


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


def fast_grads_of(fast: FastWeights) -> list[Tensor]:
    """dL_outer/dphi_K after the outer backward, fp32, in a fixed (layer, projection, A/B) order."""
    return [t.grad.float() if t.grad is not None else torch.zeros_like(t, dtype=torch.float32)
            for t in factors(fast)]


def clip_gradients(model: nn.Module, fast_grads: list[Tensor] | None, max_norm: float, procs: Processes) -> float:
    """The global gradient-norm clip of an optimizer step (max_norm 0: measure only); returns the norm.

    The norm covers theta's gradients AND the fast weights' outer gradients, because the authors'
    trainer clips `model.parameters()`, among which its fast weights are: their .grad (summed over the
    step's micro-batches, averaged over ranks by DDP, like every parameter's) counts in the norm, so it
    sets the clip factor of every update and the logged grad_norm. Only theta is scaled and stepped.
    fast_grads: per fast-weight tensor, the sum over this process's micro-batches of the weighted
    dL/dphi_K (each micro-batch has its own phi_K; the authors' parameters are shared, so they add up)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()
    if fast_grads:
        flat = torch.cat([g.flatten() for g in fast_grads])
        if procs.world > 1:  # averaged over ranks, as DDP averages the authors' fast-weight gradients
            dist.all_reduce(flat)
            flat /= procs.world
        norm = torch.linalg.vector_norm(torch.stack([norm.to(flat.device), flat.norm()]))
    if max_norm > 0:  # torch.nn.utils.clip_grad_norm_'s factor
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0).item()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
    return float(norm)


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


# ----------------------------------------------------------------------------------------------
# The training loop


def train(args: argparse.Namespace, procs: Processes) -> None:
    """Each optimizer step: for each of this rank's micro-batches, FocuSFT's outer loss
    (`focusft_step`: mask, inner loop, outer loss) and its backward; then the global gradient clip,
    AdamW at the scheduled learning rate, and one metrics row. Everything else is one call."""
    job = prepare(args, procs)  # model, data, output directory: all validated before training starts
    if job is None:
        return
    model = job.model
    objective = parallelize(Objective(model, method_kwargs(args)), procs, job.dtype)  # DDP or FSDP2
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999),
                                  fused=procs.device.type == "cuda")
    state = resume(job, optimizer, procs)  # step 0, or where the newest checkpoint in --out stopped
    stop, bar = StopRequest(), progress_bar(job, state.step, procs)
    last = None  # (batch, phi_K) of the last real micro-batch, for the attention diagnostics
    while state.step < job.total_steps:
        epoch, first, group = job.micro_batches(state.step)
        t0 = time.perf_counter()
        batches = [data.collate([job.samples[i] for i in mb] or [job.samples[0]], job.pad_id) for mb in group]
        weights, n_real, n_targets = loss_weights(group, batches, args.loss_norm, procs)
        sums, fast_grads = StepSums(), None
        for j, (batch, weight) in enumerate(zip(batches, weights, strict=True)):
            batch = {k: v.to(procs.device) for k, v in batch.items()}
            gen = fast_weight_generator(args.seed, epoch, (first + j) * procs.world + procs.rank)
            res = micro_batch_forward(objective, procs, j == len(batches) - 1, batch["input_ids"],
                                      batch["loss_mask"], batch["attention_mask"], gen)  # focusft_step
            (res.loss * weight).backward()
            fast_grads = add_fast_grads(fast_grads, res.fast)
            if group[j]:  # an empty slot (see loss_weights) counts for nothing
                sums.add(res, batch)
            if group[j] or last is None:
                last = (batch, res.fast)
            if state.step == 0 and j == 0:  # the start of training, before any update
                t_diag = time.perf_counter()
                log(job, diagnostics_row(job, objective, batch, res.fast, 0, procs), procs)
                t0 += time.perf_counter() - t_diag  # not part of the step time
        grad_norm = clip_gradients(model, fast_grads, args.grad_clip, procs)
        # One all-reduce carries the metrics and any stop request, so all ranks decide alike.
        *totals, stopping = all_reduce_sum([*sums.values(), float(stop.signal is not None)], procs)
        lr = lr_at(state.step, job.total_steps, args.lr, args.warmup_ratio)
        finite = math.isfinite(totals[0]) and math.isfinite(grad_norm)
        if finite:  # else skipped on every rank alike: the sums and the synced gradient norm agree
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        row = metrics_row(state.step, epoch, totals, n_real, n_targets, lr, grad_norm, time.perf_counter() - t0,
                          bilevel=job.bilevel)
        count_bad_step(state, finite, row, job, group, procs)  # the non-finite policy's bookkeeping
        if finite and (state.step == job.total_steps or (args.attn_every and state.step % args.attn_every == 0)):
            row.update(diagnostics_row(job, objective, *last, state.step, procs))
        log(job, row, procs)
        show_progress(bar, row, job, procs)
        if after_step(job, state, optimizer, bool(stopping), procs):  # bad-step limit, signal, checkpoints, exports
            bar.close()
            return
    bar.close()
    finish(job, state, optimizer, procs)  # the final export, the diagnostics table, the summary


# ----------------------------------------------------------------------------------------------
# What the loop calls


@dataclass
class Job:
    """What `prepare` validated and loaded for one training run."""

    args: argparse.Namespace
    name: str  # "focusft", "sft", "focusft-causal", "sft-causal"
    out: Path
    dtype: torch.dtype  # the compute dtype
    model: Qwen2ForCausalLM
    model_dir: Path  # the base model's directory (tokenizer files for the exports)
    samples: list[data.Sample]
    pad_id: int
    eos_ids: list[int]
    steps_per_epoch: int
    total_steps: int
    ckpt: Path | None  # the training checkpoint this run resumes from
    trainer_state: dict  # its trainer.json
    world: int = 1
    rank: int = 0
    report: TensorBoard | WandB | None = None  # the --report-to writer, on rank 0 (training.open_report)
    _epoch: tuple[int, list[list[int]]] | None = None

    @property
    def bilevel(self) -> bool:
        return not self.args.no_bilevel and self.args.inner_steps > 0

    def micro_batches(self, step: int) -> tuple[int, int, list[list[int]]]:
        """Where `step` is in the data: its epoch, the index of its first micro-batch in the epoch,
        and this rank's micro-batches for it (lists of sample indices; [] is an empty slot)."""
        a = self.args
        epoch, first = step // self.steps_per_epoch, (step % self.steps_per_epoch) * a.grad_accum
        if self._epoch is None or self._epoch[0] != epoch:  # this rank's micro-batches, once per epoch
            lengths = [len(s) for s in self.samples]
            self._epoch = (epoch, data.epoch_microbatches(lengths, a.micro_batch, self.world, self.rank, a.seed,
                                                          epoch))
        return epoch, first, self._epoch[1][first:first + a.grad_accum]


def prepare(args: argparse.Namespace, procs: Processes) -> Job | None:
    """Seeds, the output directory, the resume point, model, tokenizer and data, every check a user's
    input can fail, and the run's config.json; None when --out already holds this run, finished."""
    args.dtype = args.dtype or ("bf16" if procs.device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    name = ("sft" if args.no_bilevel or args.inner_steps == 0 else "focusft") + ("-causal" if args.causal else "")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(broadcast_str(args.out or f"runs/{Path(str(args.model)).name}-{name}-{stamp}", procs))
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: exists and is not a directory")
    ckpt, trainer_state = resume_point(out, args, procs)
    model_dir, tokenizer, samples, stats, model = load_inputs(args, ckpt, dtype, procs)
    lengths = [len(s) for s in samples]
    per_epoch = len(data.epoch_microbatches(lengths, args.micro_batch, procs.world, procs.rank, args.seed, 0))
    steps_per_epoch = math.ceil(per_epoch / args.grad_accum)
    job = Job(args, name, out, dtype, model, model_dir, samples,
              pad_id=data.special_token_id(tokenizer, data.ENDOFTEXT),
              eos_ids=sorted({*model.config.eos_token_ids, data.special_token_id(tokenizer, data.IM_END)}),
              steps_per_epoch=steps_per_epoch,  # --max-steps caps the epochs; the lr schedule spans what runs
              total_steps=min(args.max_steps or math.inf, steps_per_epoch * args.epochs),
              ckpt=ckpt, trainer_state=trainer_state, world=procs.world, rank=procs.rank)
    if job.bilevel and not adapted_layers(model.config.num_hidden_layers, args.layer_fraction):
        fail(f"--layer-fraction {args.layer_fraction} adapts no layer of a {model.config.num_hidden_layers}-layer "
             f"model")
    logged = read_metrics(out / "metrics.jsonl")
    if (out / "final").is_dir() and logged and logged[-1]["step"] >= job.total_steps:
        if procs.main:
            print(f"{out} already holds this run, finished ({out / 'final'}): nothing to do")
        return None
    config = {**vars(args), "world_size": procs.world}
    up_to = trainer_state["step"] if ckpt else -1  # the last step logged that this run keeps
    try:
        if procs.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            # A resumed run rewrites the metrics the interrupted one logged after its checkpoint.
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged if r["step"] <= up_to))
    except OSError as e:
        fail(f"--out {out}: cannot write there ({e.strerror or e})")
    check_shared_out(out, procs)  # several nodes: one filesystem for the checkpoints
    job.report = open_report(args.report_to, out, config, up_to + 1, procs)
    if procs.main:
        print(stats.summary())
    return job


def load_inputs(args: argparse.Namespace, ckpt: Path | None, dtype: torch.dtype, procs: Processes) -> tuple:
    """(model_dir, tokenizer, samples, stats, model), or one clear error naming the file."""
    try:
        model_dir = qwen2.checkpoint_dir(args.model)
        tokenizer = data.load_tokenizer(model_dir)
    except (qwen2.CheckpointError, data.DataError) as e:
        fail(str(e))  # a DataError with one problem reads as that one line
    try:
        samples, stats = data.load_samples(args.data, tokenizer, args.max_len, skip_bad=args.skip_bad_samples,
                                           default_system=data.default_system(model_dir))
        # FSDP keeps fp32 master weights and computes in --dtype; DDP computes in the weights' dtype.
        model = qwen2.from_pretrained(ckpt or model_dir, dtype=torch.float32 if args.fsdp else dtype,
                                      device=procs.device)
    except (qwen2.CheckpointError, data.DataError) as e:
        fail(str(e))
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        fail(f"{model_dir}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's embedding "
             f"only {model.config.vocab_size} rows")
    return model_dir, tokenizer, samples, stats, model


@dataclass
class TrainState:
    """The loop's counters, saved in every training checkpoint (trainer.json)."""

    step: int = 0
    bad_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm, in all
    bad_run: int = 0  # ... in a row, up to now


def resume(job: Job, optimizer: torch.optim.Optimizer, procs: Processes) -> TrainState:
    """A fresh state, or the checkpoint's: its optimizer states, RNG states and counters."""
    if job.ckpt is None:
        state = TrainState()
    else:
        load_optimizer_state(optimizer, job.ckpt, procs)
        restore_rng(job.ckpt, procs)
        saved = job.trainer_state
        state = TrainState(saved["step"], saved["bad_steps"], saved["bad_run"])
    if procs.main:
        top = adapted_layers(job.model.config.num_hidden_layers, job.args.layer_fraction)
        inner = f"fast weights on layers {top.start}..{top.stop - 1}" if job.bilevel else "no inner loop"
        a = job.args
        print(f"{job.name}: {procs.world} process(es), {a.micro_batch} x {a.grad_accum} x {procs.world} samples per "
              f"step, {job.steps_per_epoch} steps per epoch, {job.total_steps} steps, {job.dtype}, {inner}; output "
              f"{job.out}" + (f"\nresuming from {job.ckpt} (step {state.step})" if job.ckpt else ""))
    return state


def loss_weights(group: list[list[int]], batches: list[dict], loss_norm: str,
                 procs: Processes) -> tuple[list[float], float, float]:
    """Each micro-batch's weight in the step's loss, and the step's real micro-batches and response
    tokens over all ranks. --loss-norm micro-batch: the mean of the micro-batch means; token: the mean
    over the step's response tokens. DDP and FSDP average gradients over ranks, hence the factor
    world. An empty slot at the end of an epoch (fewer micro-batches than ranks) runs for the
    collectives' sake and weighs nothing."""
    n_targets = [int(targets_of(b["input_ids"], b["loss_mask"], b["attention_mask"])[1].numel()) if mb else 0
                 for b, mb in zip(batches, group, strict=True)]
    # Every rank needs the step's totals before its backward passes, to weigh its micro-batches.
    n_real, n_total = all_reduce_sum([sum(1 for mb in group if mb), sum(n_targets)], procs)
    weights = [0.0 if not mb else procs.world * n / n_total if loss_norm == "token" else procs.world / n_real
               for mb, n in zip(group, n_targets, strict=True)]
    return weights, n_real, n_total


@dataclass
class StepSums:
    """This rank's sums over the step's real micro-batches, for the metrics row."""

    loss: float = 0.0
    inner_first: float = 0.0  # L(theta, phi_0)
    inner_last: float = 0.0  # L(theta, phi_{K-1})
    tokens: float = 0.0

    def add(self, res: StepOutput, batch: dict) -> None:
        inner = res.inner_losses or [0.0]
        self.loss += res.loss.item()
        self.inner_first += inner[0]
        self.inner_last += inner[-1]
        self.tokens += int(batch["attention_mask"].sum())

    def values(self) -> list[float]:
        return [self.loss, self.inner_first, self.inner_last, self.tokens]


def add_fast_grads(total: list[Tensor] | None, fast: FastWeights | None) -> list[Tensor] | None:
    """The running sum over micro-batches of dL_outer/dphi_K (see clip_gradients)."""
    if fast is None:
        return total
    grads = fast_grads_of(fast)
    return grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]


def metrics_row(step: int, epoch: int, totals: list[float], n_real: float, n_targets: float, lr: float,
                grad_norm: float, seconds: float, bilevel: bool) -> dict:
    loss, inner_first, inner_last, tokens = totals
    row = {"step": step, "epoch": epoch, "loss": loss / n_real, "lr": lr, "grad_norm": grad_norm,
           "tokens": int(tokens), "tokens_per_s": tokens / seconds, "step_s": seconds,
           "response_tokens": int(n_targets)}
    if bilevel:
        row.update(inner_first=inner_first / n_real, inner_last=inner_last / n_real)
    return row


def count_bad_step(state: TrainState, finite: bool, row: dict, job: Job, group: list[list[int]],
                   procs: Processes) -> None:
    """The non-finite policy: a step with a non-finite loss or gradient norm was skipped (no update);
    count it, and name every rank's samples of the step in its metrics row and on the console."""
    if finite:
        state.bad_run = 0
        return
    state.bad_steps, state.bad_run = state.bad_steps + 1, state.bad_run + 1
    sources = [job.samples[i].source for mb in group for i in mb]
    every = [None] * procs.world
    if procs.world > 1:
        dist.all_gather_object(every, sources)
    else:
        every = [sources]
    row.update(skipped="non-finite loss or gradient norm", bad_steps=state.bad_steps,
               samples=[s for part in every for s in part])
    if procs.main:
        tqdm.write(f"step {row['step']}: non-finite loss or gradient norm, optimizer step skipped "
                   f"({state.bad_run} in a row); samples: {', '.join(row['samples'])}")


def after_step(job: Job, state: TrainState, optimizer, stopping: bool, procs: Processes) -> bool:
    """What may follow an optimizer step: stop after too many bad steps in a row (with a checkpoint),
    stop on a signal (checkpoint, exit 0: True), the periodic training checkpoint and HF export."""
    a, out, step = job.args, job.out, state.step
    if state.bad_run > a.max_bad_steps:
        checkpoint(job, state, optimizer, procs)
        fail(f"{state.bad_run} optimizer steps in a row had a non-finite loss or gradient norm (--max-bad-steps "
             f"{a.max_bad_steps}); the last good weights are in {out / 'checkpoints'}. Lower --lr or check "
             f"the samples logged in {out / 'metrics.jsonl'}")
    if stopping:
        saved = checkpoint(job, state, optimizer, procs)
        if procs.main:
            how = f"resume with the same command (with --out {out})" if saved else "the checkpoint could not be written"
            print(f"stopped by a signal after step {step}: {how}")
        if job.report:
            job.report.close()
        return True
    if a.ckpt_every and step % a.ckpt_every == 0 and step < job.total_steps:
        checkpoint(job, state, optimizer, procs)
    if a.save_every and step % a.save_every == 0 and step < job.total_steps:
        weights = full_state(job.model, procs, job.dtype)  # every rank: a collective under FSDP
        if procs.main:
            try:
                export(weights, job.model, out / f"step-{step}", job.model_dir, job.eos_ids)
            except OSError as e:
                tqdm.write(f"focusft.py: warning: export {out / f'step-{step}'} failed ({e}); training goes on")
    return False


def checkpoint(job: Job, state: TrainState, optimizer, procs: Processes) -> Path | None:
    return save_training_checkpoint(job.out, state.step, job.model, optimizer,
                                    {"bad_steps": state.bad_steps, "bad_run": state.bad_run}, job.args, procs)


def finish(job: Job, state: TrainState, optimizer, procs: Processes) -> None:
    """The final HF export (never losing the weights: a checkpoint if it fails), then the summary."""
    if procs.world > 1 and not procs.fsdp and not replicas_agree(job.model, procs):
        fail("the ranks' weights differ after training (DDP desynchronised); the export would be wrong")
    error, final = None, job.out / "final"
    weights = full_state(job.model, procs, job.dtype)
    if procs.main:
        try:
            export(weights, job.model, final, job.model_dir, job.eos_ids)
        except OSError as e:
            error = f"writing {final} failed ({e.strerror or e})"
    if broadcast_str(error or "", procs):  # never lose the trained weights: keep them as a checkpoint
        saved = checkpoint(job, state, optimizer, procs)
        fail(f"{error}; " + (f"the trained weights are in {saved}" if saved else "no checkpoint could be written"))
    if procs.main:
        print(diagnostics_table([r for r in read_metrics(job.out / "metrics.jsonl") if "attn_base" in r]))
        layout = f"sharded (FSDP) over {procs.world}" if procs.fsdp else "weights identical on every rank"
        skipped = f", {state.bad_steps} skipped non-finite step(s)" if state.bad_steps else ""
        print(f"done: {state.step} steps on {procs.world} process(es), {layout}{skipped}; checkpoint {final}, "
              f"metrics {job.out / 'metrics.jsonl'}")
    if job.report:
        job.report.close()
    barrier(procs)


def diagnostics_row(job: Job, objective: nn.Module, batch: dict, fast: FastWeights | None, step: int,
                    procs: Processes) -> dict:
    """The attention statistics of rank 0's micro-batch, with the base weights and with phi_K. Under
    FSDP every rank computes them (the weights are gathered); otherwise rank 0 alone."""
    if not (procs.main or procs.fsdp):
        return {}
    mask = None if job.args.causal else hybrid_mask(batch["loss_mask"], batch["attention_mask"])
    inputs = (batch["input_ids"], batch["loss_mask"], batch["attention_mask"], mask)
    with gathered(objective, procs):
        row = {"step": step, "attn_base": attention_diagnostics(job.model, *inputs)}
        if fast is not None:
            row["attn_fast"] = attention_diagnostics(job.model, *inputs, fast)
    return row


def log(job: Job, row: dict, procs: Processes) -> None:
    if procs.main and row:
        with open(job.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if job.report:
            job.report.log(row)


def progress_bar(job: Job, step: int, procs: Processes):
    return tqdm(total=job.total_steps, initial=step, disable=not procs.main, dynamic_ncols=True, desc=job.name)


def show_progress(bar, row: dict, job: Job, procs: Processes) -> None:
    if procs.main:
        inner = f" inner {row['inner_first']:.3f}->{row['inner_last']:.3f}" if job.bilevel else ""
        bar.set_postfix_str(f"loss {row['loss']:.4f}{inner} lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s")
        bar.update(1)


def diagnostics_table(rows: list[dict]) -> str:
    """Start vs end attention statistics of response queries (paper sections 2.2 and 4.4)."""
    if not rows:
        return ""
    start, end = rows[0], rows[-1]
    lines = [f"attention of response queries      start (step {start['step']})   end (step {end['step']})"]
    for key, label in (("attn_base", "base weights"), ("attn_fast", "with fast weights")):
        if key in start and key in end:
            for stat in ("sink_mass", "context_engagement"):
                lines.append(f"  {label:18s} {stat:19s} {start[key][stat]:8.4f}        {end[key][stat]:8.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
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
    g.add_argument("--max-steps", type=int, default=None, help="stop after at most this many optimizer steps; the "
                   "lr schedule spans the steps run (default: all of --epochs)")
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
                   help="activation checkpointing of the decoder layers below the fast weights (all "
                        "layers with --no-bilevel)")
    g.add_argument("--inner-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing of the layers with fast weights too, in both loops (the "
                        "authors' memory setting; --no-inner-ckpt is faster but holds the top layers' "
                        "activations: ~11 GB more at 7B/4096)")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to train")
    g.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and AdamW states over the processes (FSDP2) with fp32 master "
                        "weights, computing in --dtype; default: DDP with everything in --dtype")
    g = p.add_argument_group("output")
    g.add_argument("--save-every", type=int, default=0,
                   help="also export an HF checkpoint (step-N/) every N steps (0: off)")
    g.add_argument("--ckpt-every", type=int, default=100,
                   help="write a training checkpoint (for resuming) every N steps (0: only on a signal)")
    g.add_argument("--keep", type=int, default=2, help="training checkpoints to keep (the newest)")
    g.add_argument("--resume", action="store_true",
                   help="require resuming from the newest training checkpoint in --out (a run resumes "
                        "automatically anyway when --out holds one)")
    g.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many consecutive optimizer steps with a non-finite loss or gradient")
    g.add_argument("--attn-every", type=int, default=0,
                   help="attention diagnostics every N steps (always at the start and the end; 0: only then)")
    g.add_argument("--report-to", choices=("none", *REPORTERS), default="none",
                   help="also log every metrics row (and the arguments) to TensorBoard, as event files in --out, "
                        "or to Weights & Biases (WANDB_MODE=offline works without a network); the package is "
                        "optional: pip install tensorboard, or wandb")
    return p


# Lower bounds of the integer and float flags (None: the flag is unset).
AT_LEAST = {"inner_steps": 0, "rank": 1, "epochs": 1, "max_steps": 1, "lr": 0, "grad_clip": 0, "micro_batch": 1,
            "grad_accum": 1, "max_len": 2, "save_every": 0, "attn_every": 0, "ckpt_every": 0, "keep": 1,
            "max_bad_steps": 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    bad = [unknown for unknown in args.targets if unknown not in TARGETS]
    package = args.report_to  # tensorboard or wandb: the package's own name
    checks = [
        (package != "none" and importlib.util.find_spec(package) is None,
         f"--report-to {package}: the {package} package is not installed (pip install {package})"),
        (not args.data, "--data: give one or more JSONL/parquet files"),
        (bad, f"--targets: unknown projection(s) {', '.join(bad)}; choose from {', '.join(TARGETS)}"),
        (args.inner_lr <= 0, "--inner-lr must be > 0"),
        (args.inner_clip <= 0, "--inner-clip must be > 0"),
        (not 0 < args.layer_fraction <= 1, "--layer-fraction must be in (0, 1]"),
        (not 0 <= args.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
        *((getattr(args, k) is not None and getattr(args, k) < low, f"--{k.replace('_', '-')} must be >= {low}")
          for k, low in AT_LEAST.items()),
    ]
    for failed, message in checks:
        if failed:
            p.error(message)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    procs = setup_distributed(args.device, args.fsdp)
    # The loop's SIGINT/SIGTERM handlers (training.StopRequest) are put back on return, so a caller that runs
    # training in its own process (the experiments, the tests) gets its Ctrl-C back.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(args, procs)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if procs.world > 1 and dist.is_initialized():
            # DDP's reducer sits in reference cycles; free it (and the gloo work it holds) while the
            # group and the interpreter are alive. Left to interpreter shutdown, a worker thread's
            # teardown can abort the process after a successful run (seen as SIGABRT under gloo).
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
