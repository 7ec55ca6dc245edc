"""The trainer's machinery, kept out of the training loop in focusft.py: the process group, data
parallelism (DDP or FSDP2, set up in `parallelize`), training checkpoints and resuming, HF exports,
signals, one-line errors, and --report-to's TensorBoard and W&B writers. Each is one call from
`focusft.train`; nothing here knows the method.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

import qwen2
from qwen2 import Qwen2ForCausalLM

# ----------------------------------------------------------------------------------------------
# Processes and data parallelism


@dataclass
class Processes:
    """This process among the training processes: its rank, their number, its device, and whether
    FSDP shards the model over them (`procs.main`: rank 0, the one that writes files and prints)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False  # parameters, gradients and optimizer states sharded over the ranks

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_flag: str, fsdp: bool = False) -> Processes:
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
    return Processes(rank, local_rank, world, device, fsdp)


def all_reduce_sum(values: list[float], procs: Processes) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=procs.device)
    if procs.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def broadcast_str(text: str, procs: Processes) -> str:
    if procs.world == 1:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def parallelize(objective: nn.Module, procs: Processes, compute_dtype: torch.dtype) -> nn.Module:
    """The one place data parallelism is set up; the loop is the same for both. `objective` computes
    one micro-batch's loss (focusft.Objective) and holds the model as `.model`.

    DDP (several processes): every rank holds the whole model; gradients are all-reduced.
    FSDP2 (--fsdp): each decoder layer, then the rest of the model (embeddings, final norm, lm_head,
    under the objective), is sharded over the ranks: parameters are gathered for each layer's forward
    and backward and the gradients reduce-scattered; the weights and AdamW states stay in fp32 (the
    master copy) while the forward runs in `compute_dtype`. The fast weights are created inside the
    step, per rank, from the activations' dtype: they are never sharded nor reduced."""
    if procs.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(procs.device.type, (procs.world,))
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for block in objective.model.blocks():
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(objective, mesh=mesh, mp_policy=policy)
        return objective
    if procs.world > 1:
        # Gradients as views into DDP's communication buckets: no second copy of the gradients.
        return nn.parallel.DistributedDataParallel(
            objective, device_ids=[procs.device] if procs.device.type == "cuda" else None, gradient_as_bucket_view=True)
    return objective


def micro_batch_forward(objective: nn.Module, procs: Processes, last: bool, *inputs):
    """objective(*inputs) for one micro-batch of an optimizer step, as the parallel layout wants it.

    DDP all-reduces the gradients in the backward of the step's last micro-batch only (the others
    accumulate locally). FSDP keeps the root's parameters (embeddings, lm_head) gathered through the
    inner loop's backward passes inside the forward, rather than re-gathering them for each."""
    if isinstance(objective, nn.parallel.DistributedDataParallel):
        objective.require_backward_grad_sync = last
    if procs.fsdp:
        objective.set_reshard_after_backward(False, recurse=False)
    out = objective(*inputs)
    if procs.fsdp:
        objective.set_reshard_after_backward(True, recurse=False)
    return out


def fsdp_units(objective: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in objective.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(objective: nn.Module, procs: Processes):
    """Under FSDP, all parameters gathered on every rank (for the diagnostics, which use the layers'
    parts directly); a no-op otherwise. Every rank must enter it."""
    units = fsdp_units(objective) if procs.fsdp else []
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


def full_state(model: nn.Module, procs: Processes, dtype: torch.dtype | None = None) -> dict[str, Tensor] | None:
    """The model's whole state dict on rank 0 (None elsewhere), optionally cast. Under FSDP each
    tensor is all-gathered in turn (every rank must call this) and copied to the CPU on rank 0, so no
    rank ever holds a second full copy on the accelerator."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t.detach()
        if procs.main:
            state[name] = (t.to(dtype) if dtype is not None else t).to("cpu", copy=procs.fsdp)
    return state if procs.main else None


def replicas_agree(model: nn.Module, procs: Processes) -> bool:
    """End-of-run guard: DDP keeps every rank's weights identical; compare per-tensor checksums."""
    local = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                         for p in model.parameters()]).flatten()
    gathered = [torch.empty_like(local) for _ in range(procs.world)]
    dist.all_gather(gathered, local)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def barrier(procs: Processes) -> None:
    if procs.world > 1:
        dist.barrier()


# How long a rank looks for rank 0's marker in --out: a network filesystem may show another node's new file
# only once its attribute cache expires (NFS: up to acdirmax, 60 s by default).
SHARED_OUT_WAIT_S = 60.0


def check_shared_out(out: Path, procs: Processes) -> None:
    """Every rank writes its part of each training checkpoint into --out and reads the checkpoint back to
    resume, so every rank must see the directory rank 0 made: on several nodes, one shared filesystem. A
    rank that does not see rank 0's marker file there stops the run, before training, with one line."""
    if procs.world == 1:
        return
    marker = out / f".shared-{broadcast_str(uuid.uuid4().hex, procs)}"
    if procs.main:
        marker.touch()
    barrier(procs)
    deadline = time.monotonic() + SHARED_OUT_WAIT_S
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(1.0)
    blind = all_reduce_sum([0.0 if marker.exists() else 1.0], procs)[0]  # also: every rank has looked
    if procs.main:
        marker.unlink()
    if blind:
        fail(f"--out {out}: {blind:.0f} of the {procs.world} processes do not see the directory rank 0 writes; "
             f"every rank writes its part of each training checkpoint there, so on several nodes --out must be on "
             f"a filesystem all of them share, at the same path")


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
                             procs: Processes) -> Path | None:
    """Weights (an HF checkpoint itself), optimizer, trainer state and every rank's RNG states, in a
    temporary directory renamed into place when complete. Keeps the newest --keep. On an OS error
    (disk full, permissions) every rank returns None and the previous checkpoint stays."""
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    failed = 0.0
    if procs.main:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            print(f"focusft.py: warning: cannot write a checkpoint in {tmp.parent}: {e}", file=sys.stderr)
            failed = 1.0
    barrier(procs)
    if not all_reduce_sum([failed], procs)[0]:
        weights = full_state(model, procs)  # a collective under FSDP: before anything can fail
        try:
            rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
            torch.save(rng, tmp / f"rng-rank{procs.rank}.pt")
            if procs.fsdp:  # each rank's shard of the AdamW states, as plain tensors
                torch.save(local_optimizer_state(optimizer), tmp / f"optimizer-rank{procs.rank}.pt")
            elif procs.main:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if procs.main:
                qwen2.save_weights(weights, model.config, tmp)
                trainer = {"step": step, "world_size": procs.world, "args": vars(args), **state}
                (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2) + "\n")
        except OSError as e:
            print(f"focusft.py: warning: saving the checkpoint {tmp} failed on rank {procs.rank}: {e}; "
                  f"the previous checkpoint is kept", file=sys.stderr)
            failed = 1.0
    failed = all_reduce_sum([failed], procs)[0]
    if procs.main:
        if failed:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            replace_dir(tmp, final)
            for old in checkpoints(out)[:-args.keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(procs)
    return None if failed else final


def local_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with each sharded (DTensor) state replaced by this rank's shard."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    sd["state"] = {i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in st.items()}
                   for i, st in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer, ckpt: Path, procs: Processes) -> None:
    if not procs.fsdp:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=procs.device, weights_only=True))
        return
    from torch.distributed.tensor import DTensor

    sd = torch.load(ckpt / f"optimizer-rank{procs.rank}.pt", map_location=procs.device, weights_only=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, st in sd["state"].items():  # shards back into DTensors laid out like their parameters
        p = params[int(i)]
        for k, v in st.items():
            if isinstance(p, DTensor) and v.dim() > 0:
                st[k] = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(sd)


def restore_rng(ckpt: Path, procs: Processes) -> None:
    rng = torch.load(ckpt / f"rng-rank{procs.rank}.pt", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def resume_point(out: Path, args, procs: Processes) -> tuple[Path | None, dict]:
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
    if trainer["world_size"] != procs.world:
        fail(f"{ckpt} was written by {trainer['world_size']} process(es); resume it with the same number "
             f"(now {procs.world})")
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


# ----------------------------------------------------------------------------------------------
# Reporting (--report-to): the metrics rows also go to TensorBoard or W&B, from rank 0 only

def scalars(row: dict) -> dict[str, float]:
    """A metrics.jsonl row as scalar tags: loss -> train/loss, attn_base: {sink_mass} -> attn_base/sink_mass.
    The step is the x axis, not a tag; a skipped step's sample list is no scalar."""
    tags = {}
    for key, value in row.items():
        if isinstance(value, dict):
            tags.update({f"{key}/{k}": v for k, v in value.items()})
        elif isinstance(value, (int, float)) and key != "step":
            tags[f"train/{key}"] = value
    return tags


class TensorBoard:
    """Event files written into --out itself, so `tensorboard --logdir runs` shows each run under its name."""

    def __init__(self, out: Path, config: dict, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard discards what an interrupted session logged from first_step on, which this
        # resumed session logs again, so no step shows twice.
        self.writer = SummaryWriter(str(out), purge_step=first_step)
        self.writer.add_text("args", "    " + json.dumps(config, indent=2).replace("\n", "\n    "), first_step)

    def log(self, row: dict) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, row["step"])
        self.writer.flush()  # a killed run keeps every step it logged

    def close(self) -> None:
        self.writer.close()


class ReportError(Exception):  # a writer that cannot start; one line for the user
    pass


class WandB:
    """One W&B run per --out: its id is kept in --out/wandb-run-id, so a resumed session continues it.
    W&B's own variables apply (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE=offline, ...)."""

    def __init__(self, out: Path, config: dict, first_step: int):
        import wandb

        id_file = out / "wandb-run-id"
        run_id = id_file.read_text().strip() if first_step > 0 and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        try:
            # reinit: a run an earlier session in this process left open (it raised) is finished, not
            # continued under this session's settings (W&B's default outside notebooks)
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "focusft"), name=out.name, id=run_id,
                                  resume="allow", dir=str(out), config=config, reinit="finish_previous")
        except wandb.errors.Error as e:
            raise ReportError(f"--report-to wandb: {e} (WANDB_MODE=offline logs with no account or network)") from e

    def log(self, row: dict) -> None:
        # Online, a resumed W&B run starts after the last step it holds: the steps the interrupted session
        # logged after its checkpoint are there already.
        if row["step"] >= self.run.starting_step:
            self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


REPORTERS = {"tensorboard": TensorBoard, "wandb": WandB}  # --report-to's choices, each the package it needs


def open_report(kind: str, out: Path, config: dict, first_step: int, procs: Processes) -> TensorBoard | WandB | None:
    """The --report-to writer on rank 0 (None on the others, and for none). first_step: the first step this
    session logs (0, or the resumed checkpoint's step + 1). Every rank calls it: a failure stops them all."""
    report, error = None, ""
    if procs.main and kind != "none":
        try:
            report = REPORTERS[kind](out, config, first_step)
        except ReportError as e:
            error = str(e)
    error = broadcast_str(error, procs)
    if error:
        fail(error)
    return report


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

