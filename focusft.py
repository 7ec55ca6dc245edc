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
import contextlib
import datetime
import json
import math
import os
import random
import shutil
import signal
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
        fast = {i: {n: LowRank(A.detach().requires_grad_(), B.detach().requires_grad_(), s)
                    for n, (A, B, s) in per.items()} for i, per in fast.items()}
        params = [t for per in fast.values() for lr_ in per.values() for t in (lr_.A, lr_.B)]
        loss = response_loss(model, h, start, mask, fast, where, labels, checkpoint, attended=True)
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
        fast = {i: {n: LowRank(A.requires_grad_(), B.requires_grad_(), s) for n, (A, B, s) in per.items()}
                for i, per in fast.items()}
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


def fast_grads_of(fast: FastWeights) -> list[Tensor]:
    """dL_outer/dphi_K after the outer backward, fp32, in a fixed (layer, projection, A/B) order."""
    return [t.grad.float() if t.grad is not None else torch.zeros_like(t, dtype=torch.float32)
            for per in fast.values() for lr_ in per.values() for t in (lr_.A, lr_.B)]


def clip_gradients(model: nn.Module, fast_grads: list[Tensor] | None, max_norm: float, run: Run) -> float:
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
        if run.world > 1:  # averaged over ranks, as DDP averages the authors' fast-weight gradients
            dist.all_reduce(flat)
            flat /= run.world
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


@dataclass
class Run:
    """What the loop needs to know about the process group."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False  # parameters, gradients and optimizer states sharded over the ranks

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_flag: str, fsdp: bool = False) -> Run:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; plain python runs one process with no group (FSDP
    needs one: a single-process group then)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    if world > 1:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    elif fsdp:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Run(rank, local_rank, world, device, fsdp)


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


def parallelize(objective: Objective, run: Run, compute_dtype: torch.dtype) -> nn.Module:
    """The one place data parallelism is set up; the loop is the same for both.

    DDP (several processes): every rank holds the whole model; gradients are all-reduced.
    FSDP2 (--fsdp): each decoder layer, then the rest of the model (embeddings, final norm, lm_head,
    under the objective), is sharded over the ranks: parameters are gathered for each layer's forward
    and backward and the gradients reduce-scattered; the weights and AdamW states stay in fp32 (the
    master copy) while the forward runs in `compute_dtype`. The fast weights are created inside the
    step, per rank, from the activations' dtype: they are never sharded nor reduced."""
    if run.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(run.device.type, (run.world,))
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for block in objective.model.blocks():
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(objective, mesh=mesh, mp_policy=policy)
        return objective
    if run.world > 1:
        # Gradients as views into DDP's communication buckets: no second copy of the gradients.
        return nn.parallel.DistributedDataParallel(
            objective, device_ids=[run.device] if run.device.type == "cuda" else None, gradient_as_bucket_view=True)
    return objective


def fsdp_units(objective: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in objective.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(objective: nn.Module, run: Run):
    """Under FSDP, all parameters gathered on every rank (for the diagnostics, which use the layers'
    parts directly); a no-op otherwise. Every rank must enter it."""
    units = fsdp_units(objective) if run.fsdp else []
    layers = [unit for unit in units if unit is not objective]
    for unit in layers:  # calling a layer would otherwise reshard it when it returns
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in layers:
            unit.set_reshard_after_forward(True, recurse=False)


def full_state(model: nn.Module, run: Run, dtype: torch.dtype | None = None) -> dict[str, Tensor] | None:
    """The model's whole state dict on rank 0 (None elsewhere), optionally cast. Under FSDP each
    tensor is all-gathered in turn (every rank must call this) and copied to the CPU on rank 0, so no
    rank ever holds a second full copy on the accelerator."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t.detach()
        if run.main:
            state[name] = (t.to(dtype) if dtype is not None else t).to("cpu", copy=run.fsdp)
    return state if run.main else None


def replicas_agree(model: nn.Module, run: Run) -> bool:
    """End-of-run guard: DDP keeps every rank's weights identical; compare per-tensor checksums."""
    local = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                         for p in model.parameters()]).flatten()
    gathered = [torch.empty_like(local) for _ in range(run.world)]
    dist.all_gather(gathered, local)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def barrier(run: Run) -> None:
    if run.world > 1:
        dist.barrier()


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a completely written directory into place. A kill at any point leaves either the old or
    the new directory complete under `final` (or, between the two renames, the old one at .old)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def export(state: dict[str, Tensor], model: Qwen2ForCausalLM, directory: Path, tokenizer_dir: Path,
           eos_ids: list[int]) -> None:
    """An HF checkpoint (weights, config, generation config with the chat EOS ids, tokenizer files),
    loadable by transformers and vLLM, written to a temporary directory and renamed into place.
    `state` is the model's full state dict (see full_state). Fast weights are never part of the
    model, so never saved."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        qwen2.save_weights(state, model.config, tmp, {**model.generation_config, "eos_token_id": eos_ids})
        for name in qwen2.TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# Training checkpoints (for resuming; exports above are for use)

# The flags that shape the trajectory: a resumed run must use the same ones to continue it exactly.
TRAJECTORY = ("model", "data", "max_len", "skip_bad_samples", "inner_steps", "inner_lr", "inner_clip", "rank",
              "alpha", "layer_fraction", "targets", "no_bilevel", "causal", "epochs", "max_steps", "lr",
              "weight_decay", "warmup_ratio", "grad_clip", "micro_batch", "grad_accum", "loss_norm", "seed",
              "dtype", "fsdp")


def checkpoints(out: Path) -> list[Path]:
    """Complete training checkpoints, oldest first (a .tmp directory is an interrupted save)."""
    found = [p for p in (out / "checkpoints").glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_training_checkpoint(out: Path, step: int, model: nn.Module, optimizer, state: dict, args,
                             run: Run) -> Path | None:
    """Weights (an HF checkpoint itself), optimizer, trainer state and every rank's RNG states, in a
    temporary directory renamed into place when complete. Keeps the newest --keep. On an OS error
    (disk full, permissions) every rank returns None and the previous checkpoint stays."""
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    failed = 0.0
    if run.main:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            print(f"focusft.py: warning: cannot write a checkpoint in {tmp.parent}: {e}", file=sys.stderr)
            failed = 1.0
    barrier(run)
    if not all_reduce_sum([failed], run)[0]:
        weights = full_state(model, run)  # a collective under FSDP: before anything can fail
        try:
            rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
            torch.save(rng, tmp / f"rng-rank{run.rank}.pt")
            if run.fsdp:  # each rank's shard of the AdamW states, as plain tensors
                torch.save(local_optimizer_state(optimizer), tmp / f"optimizer-rank{run.rank}.pt")
            elif run.main:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if run.main:
                qwen2.save_weights(weights, model.config, tmp)
                trainer = {"step": step, "world_size": run.world, "args": vars(args), **state}
                (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2) + "\n")
        except OSError as e:
            print(f"focusft.py: warning: saving the checkpoint {tmp} failed on rank {run.rank}: {e}; "
                  f"the previous checkpoint is kept", file=sys.stderr)
            failed = 1.0
    failed = all_reduce_sum([failed], run)[0]
    if run.main:
        if failed:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            replace_dir(tmp, final)
            for old in checkpoints(out)[:-args.keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(run)
    return None if failed else final


def local_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with each sharded (DTensor) state replaced by this rank's shard."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    sd["state"] = {i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in st.items()}
                   for i, st in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer, ckpt: Path, run: Run) -> None:
    if not run.fsdp:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=run.device, weights_only=True))
        return
    from torch.distributed.tensor import DTensor

    sd = torch.load(ckpt / f"optimizer-rank{run.rank}.pt", map_location=run.device, weights_only=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, st in sd["state"].items():  # shards back into DTensors laid out like their parameters
        p = params[int(i)]
        for k, v in st.items():
            if isinstance(p, DTensor) and v.dim() > 0:
                st[k] = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(sd)


def restore_rng(ckpt: Path, run: Run) -> None:
    rng = torch.load(ckpt / f"rng-rank{run.rank}.pt", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def resume_point(out: Path, args, run: Run) -> tuple[Path | None, dict]:
    """The newest training checkpoint in --out and its trainer state, after checking that it
    continues this very run (same trajectory flags, same number of processes)."""
    found = checkpoints(out) if out.is_dir() else []
    if not found:
        if args.resume:
            fail(f"--resume: no training checkpoint in {out / 'checkpoints'}")
        return None, {}
    ckpt = found[-1]
    try:
        trainer = json.loads((ckpt / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{ckpt / 'trainer.json'}: unreadable training checkpoint ({e}); remove {ckpt} to resume "
             f"from the one before")
    saved, now = trainer["args"], vars(args)
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now.get(k)!r})" for k in TRAJECTORY
              if saved.get(k) != now.get(k)]
    if differ:
        fail(f"--out {out} holds a run with other settings: {'; '.join(differ)}. Resume with the same flags, "
             f"or choose a new --out")
    if trainer["world_size"] != run.world:
        fail(f"{ckpt} was written by {trainer['world_size']} process(es); resume it with the same number "
             f"(now {run.world})")
    return ckpt, trainer


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop finishes its optimizer step, checkpoints and exits 0.
    A second SIGINT stops at once (the last checkpoint stays)."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum


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
        (args.ckpt_every < 0, "--ckpt-every must be >= 0"),
        (args.keep < 1, "--keep must be >= 1"),
        (args.max_bad_steps < 0, "--max-bad-steps must be >= 0"),
    ]
    for failed, message in checks:
        if failed:
            p.error(message)
    return args




def fail(message: str) -> None:
    """One clear message (a line, or the data problem list), exit status 1, no traceback. Under
    torchrun rank 0 prints it whole and the other ranks its first line only, each in one write so
    the ranks' messages never interleave."""
    rank = int(os.environ.get("RANK", "0"))
    text = f"focusft.py: error: {message}" if rank == 0 else f"focusft.py: error (rank {rank}): " + message.split(
        "\n")[0]
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
    sys.exit(1)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = setup_distributed(args.device, args.fsdp)
    try:
        train(args, run)
    finally:
        if run.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace, run: Run) -> None:
    args.dtype = args.dtype or ("bf16" if run.device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    method = method_kwargs(args)
    name = ("sft" if method["inner_steps"] == 0 else "focusft") + ("-causal" if args.causal else "")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(broadcast_str(args.out or f"runs/{Path(str(args.model)).name}-{name}-{stamp}", run))
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: exists and is not a directory")
    ckpt, trainer_state = resume_point(out, args, run)

    # -- model, tokenizer, data: all validated before the output directory is touched ---------
    try:
        model_dir = qwen2.checkpoint_dir(args.model)
        tokenizer = data.load_tokenizer(model_dir)
    except (qwen2.CheckpointError, data.DataError) as e:
        fail(e.problems[0] if isinstance(e, data.DataError) else str(e))
    try:
        samples, stats = data.load_samples(args.data, tokenizer, args.max_len, skip_bad=args.skip_bad_samples)
        # FSDP keeps fp32 master weights and computes in `dtype`; DDP computes in the weights' dtype.
        model = qwen2.from_pretrained(ckpt or model_dir, dtype=torch.float32 if args.fsdp else dtype,
                                      device=run.device)
    except (qwen2.CheckpointError, data.DataError) as e:
        fail(str(e))
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        fail(f"{model_dir}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's embedding "
             f"only {model.config.vocab_size} rows")
    if method["inner_steps"] > 0 and not adapted_layers(model.config.num_hidden_layers, args.layer_fraction):
        fail(f"--layer-fraction {args.layer_fraction} adapts no layer of a {model.config.num_hidden_layers}-layer "
             f"model")
    pad_id = data.special_token_id(tokenizer, data.ENDOFTEXT)
    eos_ids = sorted({*model.config.eos_token_ids, data.special_token_id(tokenizer, data.IM_END)})
    lengths = [len(s) for s in samples]
    per_epoch = len(data.epoch_microbatches(lengths, args.micro_batch, run.world, run.rank, args.seed, 0))
    steps_per_epoch = math.ceil(per_epoch / args.grad_accum)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    logged = read_metrics(out / "metrics.jsonl")
    if (out / "final").is_dir() and logged and logged[-1]["step"] >= total_steps:
        if run.main:
            print(f"{out} already holds this run, finished ({out / 'final'}): nothing to do")
        return
    try:
        if run.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps({**vars(args), "world_size": run.world}, indent=2) + "\n")
            # A resumed run rewrites the metrics the interrupted one logged after its checkpoint.
            up_to = trainer_state["step"] if ckpt else -1
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged if r["step"] <= up_to))
    except OSError as e:
        fail(f"--out {out}: cannot write there ({e.strerror or e})")
    if run.main:
        print(stats.summary())

    # -- DDP or FSDP, then the optimizer over the (possibly sharded) parameters ----------------------
    objective = parallelize(Objective(model, method), run, dtype)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999),
                                  fused=run.device.type == "cuda")
    step, bad_total, bad_run = 0, 0, 0
    if ckpt:
        load_optimizer_state(optimizer, ckpt, run)
        restore_rng(ckpt, run)
        step, bad_total, bad_run = trainer_state["step"], trainer_state["bad_steps"], trainer_state["bad_run"]
    if run.main:
        top = adapted_layers(model.config.num_hidden_layers, args.layer_fraction)
        inner = f"fast weights on layers {top.start}..{top.stop - 1}" if method["inner_steps"] else "no inner loop"
        print(f"{name}: {run.world} process(es), {args.micro_batch} x {args.grad_accum} x {run.world} samples "
              f"per step, {steps_per_epoch} steps per epoch, {total_steps} steps, {dtype}, {inner}; output {out}"
              + (f"\nresuming from {ckpt} (step {step})" if ckpt else ""))

    def diagnose(batch: dict, fast: FastWeights | None, at: int) -> dict:
        """On rank 0's micro-batch; under FSDP every rank computes it (the weights are gathered)."""
        mask = None if args.causal else hybrid_mask(batch["loss_mask"], batch["attention_mask"])
        inputs = (batch["input_ids"], batch["loss_mask"], batch["attention_mask"], mask)
        with gathered(objective, run):
            row = {"step": at, "attn_base": attention_diagnostics(model, *inputs)}
            if fast is not None:
                row["attn_fast"] = attention_diagnostics(model, *inputs, fast)
        return row

    def log(row: dict) -> None:
        if run.main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def checkpoint(at: int) -> Path | None:
        return save_training_checkpoint(out, at, model, optimizer, {"bad_steps": bad_total, "bad_run": bad_run},
                                        args, run)

    from tqdm import tqdm
    stop = StopRequest()
    bar = tqdm(total=total_steps, initial=step, disable=not run.main, dynamic_ncols=True, desc=name)
    last_batch, micro_epoch, micro = None, None, []
    while step < total_steps:
        # The position of `step` in the data: epoch, then the first micro-batch of this step.
        epoch, first = step // steps_per_epoch, (step % steps_per_epoch) * args.grad_accum
        if epoch >= args.epochs:
            break
        if epoch != micro_epoch:  # this rank's micro-batches, once per epoch
            micro_epoch = epoch
            micro = data.epoch_microbatches(lengths, args.micro_batch, run.world, run.rank, args.seed, epoch)
        group = micro[first:first + args.grad_accum]
        t0 = time.perf_counter()
        batches = [data.collate([samples[i] for i in mb] or [samples[0]], pad_id) for mb in group]
        n_targets = [int(targets_of(b["input_ids"], b["loss_mask"], b["attention_mask"])[1].numel()) if mb else 0
                     for b, mb in zip(batches, group, strict=True)]
        # Every rank needs the step's totals before its backward passes, to weigh its micro-batches.
        real_mb, real_targets = all_reduce_sum([sum(1 for mb in group if mb), sum(n_targets)], run)
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, first inner loss, last inner loss, tokens
        fast_grads = None  # sum over micro-batches of the weighted dL_outer/dphi_K (see clip_gradients)
        for j, (mb, batch) in enumerate(zip(group, batches, strict=True)):
            batch = {k: v.to(run.device) for k, v in batch.items()}
            if isinstance(objective, nn.parallel.DistributedDataParallel):
                objective.require_backward_grad_sync = j == len(group) - 1
            gen = fast_weight_generator(args.seed, epoch, (first + j) * run.world + run.rank)
            if run.fsdp:  # the embeddings and lm_head stay gathered through the inner backward passes
                objective.set_reshard_after_backward(False, recurse=False)
            res = objective(batch["input_ids"], batch["loss_mask"], batch["attention_mask"], gen)
            if run.fsdp:
                objective.set_reshard_after_backward(True, recurse=False)
            # DDP averages gradients over ranks, hence the factor world. An empty slot at the end of
            # an epoch (fewer micro-batches than ranks) runs for DDP's sake and counts for nothing.
            if not mb:
                weight = 0.0
            elif args.loss_norm == "token":
                weight = run.world * n_targets[j] / real_targets
            else:
                weight = run.world / real_mb
            (res.loss * weight).backward()
            if res.fast is not None:  # summed over the micro-batches, for the clip's norm
                g = fast_grads_of(res.fast)
                fast_grads = g if fast_grads is None else [a + b for a, b in zip(fast_grads, g, strict=True)]
            if mb:
                inner = res.inner_losses or [0.0]
                sums = [sums[0] + res.loss.item(), sums[1] + inner[0], sums[2] + inner[-1],
                        sums[3] + int(batch["attention_mask"].sum())]
            if mb or last_batch is None:
                last_batch = (batch, res.fast)
            if (run.main or run.fsdp) and step == 0 and j == 0:  # the start of training, before any update
                t_diag = time.perf_counter()
                log(diagnose(batch, res.fast, 0))
                t0 += time.perf_counter() - t_diag  # not part of the step time
        grad_norm = clip_gradients(model, fast_grads, args.grad_clip, run)
        # One all-reduce carries the metrics and any stop request, so all ranks decide alike.
        loss, in_first, in_last, tokens, stopping = all_reduce_sum([*sums, float(stop.signal is not None)], run)
        lr = lr_at(step, total_steps, args.lr, args.warmup_ratio)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            for group_ in optimizer.param_groups:
                group_["lr"] = lr
            optimizer.step()
            bad_run = 0
        else:  # skipped on every rank alike: the loss sum and the synced gradient norm are the same
            bad_total, bad_run = bad_total + 1, bad_run + 1
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        row = {"step": step, "epoch": epoch, "loss": loss / real_mb, "lr": lr, "grad_norm": grad_norm,
               "tokens": int(tokens), "tokens_per_s": tokens / dt, "step_s": dt, "response_tokens": int(real_targets)}
        if method["inner_steps"]:
            row.update(inner_first=in_first / real_mb, inner_last=in_last / real_mb)
        if not finite:
            sources = [samples[i].source for mb in group for i in mb]
            every = [None] * run.world
            if run.world > 1:
                dist.all_gather_object(every, sources)
            else:
                every = [sources]
            row.update(skipped="non-finite loss or gradient norm", bad_steps=bad_total,
                       samples=[s for part in every for s in part])
            if run.main:
                tqdm.write(f"step {step}: non-finite loss or gradient norm, optimizer step skipped "
                           f"({bad_run} in a row); samples: {', '.join(row['samples'])}")
        if (run.main or run.fsdp) and finite and (step == total_steps or
                                                  (args.attn_every and step % args.attn_every == 0)):
            row.update({k: v for k, v in diagnose(*last_batch, step).items() if k != "step"})
        log(row)
        if run.main:
            inner = f" inner {row['inner_first']:.3f}->{row['inner_last']:.3f}" if method["inner_steps"] else ""
            bar.set_postfix_str(f"loss {row['loss']:.4f}{inner} lr {lr:.2e} {row['tokens_per_s']:.0f} tok/s")
            bar.update(1)
        if bad_run > args.max_bad_steps:
            checkpoint(step)
            fail(f"{bad_run} optimizer steps in a row had a non-finite loss or gradient norm (--max-bad-steps "
                 f"{args.max_bad_steps}); the last good weights are in {out / 'checkpoints'}. Lower --lr or check "
                 f"the samples logged in {out / 'metrics.jsonl'}")
        if stopping:
            saved = checkpoint(step)
            if run.main:
                bar.close()
                how = (f"resume with the same command (with --out {out})" if saved else
                       "the checkpoint could not be written")
                print(f"stopped by a signal after step {step}: {how}")
            return
        if args.ckpt_every and step % args.ckpt_every == 0 and step < total_steps:
            checkpoint(step)
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            state = full_state(model, run, dtype)  # every rank: a collective under FSDP
            if run.main:
                try:
                    export(state, model, out / f"step-{step}", model_dir, eos_ids)
                except OSError as e:
                    tqdm.write(f"focusft.py: warning: export {out / f'step-{step}'} failed ({e}); training goes on")
    bar.close()
    if run.world > 1 and not run.fsdp and not replicas_agree(model, run):
        fail("the ranks' weights differ after training (DDP desynchronised); the export would be wrong")
    error = None
    state = full_state(model, run, dtype)
    if run.main:
        try:
            export(state, model, out / "final", model_dir, eos_ids)
        except OSError as e:
            error = f"writing {out / 'final'} failed ({e.strerror or e})"
    if broadcast_str(error or "", run):  # never lose the trained weights: keep them as a checkpoint
        saved = checkpoint(step)
        fail(f"{error}; " + (f"the trained weights are in {saved}" if saved else "no checkpoint could be written"))
    if run.main:
        print(diagnostics_table([r for r in read_metrics(out / "metrics.jsonl") if "attn_base" in r]))
        layout = f"sharded (FSDP) over {run.world}" if run.fsdp else "weights identical on every rank"
        print(f"done: {step} steps on {run.world} process(es), {layout}"
              f"{f', {bad_total} skipped non-finite step(s)' if bad_total else ''}; checkpoint {out / 'final'}, "
              f"metrics {out / 'metrics.jsonl'}")
    barrier(run)


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
