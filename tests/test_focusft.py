"""The FocuSFT method (mask, inner loop, fast path = slow path) and its training script."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, batch_of, fixed_init_A, launcher, report, run, step_rows, train_in_process

import focusft
import qwen2

# ---------------------------------------------------------------------------------------------- the mask


def mask_by_loops(loss_mask, attention_mask):
    B, S = loss_mask.shape
    out = torch.zeros(B, 1, S, S, dtype=torch.bool)
    for b in range(B):
        turn, t = [], 0
        for i in range(S):
            if i > 0 and loss_mask[b, i] != loss_mask[b, i - 1]:
                t += 1
            turn.append(t)
        for i in range(S):
            for j in range(S):
                real = attention_mask[b, i] and attention_mask[b, j]
                if not attention_mask[b, i]:
                    out[b, 0, i, j] = i == j  # padding queries see themselves only
                elif real and (turn[j] < turn[i] or (turn[j] == turn[i] and (loss_mask[b, i] == 0 or j <= i))):
                    out[b, 0, i, j] = True
    return out


def test_hybrid_mask_equals_double_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        B, S = 3, int(torch.randint(1, 24, (1,), generator=g))
        # Runs of random lengths: loss-mask flips with probability 0.25 per position.
        flips = (torch.rand(B, S, generator=g) < 0.25).long().cumsum(1)
        loss_mask = (flips + torch.randint(0, 2, (B, 1), generator=g)) % 2
        lengths = torch.randint(1, S + 1, (B,), generator=g)
        attention_mask = (torch.arange(S)[None] < lengths[:, None]).long()
        loss_mask = loss_mask * attention_mask
        assert torch.equal(focusft.hybrid_mask(loss_mask, attention_mask), mask_by_loops(loss_mask, attention_mask))


def test_hybrid_mask_hand_example():
    # context (3) | response (2) | context (2) | response (1) | padding (1)
    lm = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 1, 0]])
    am = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    m = focusft.hybrid_mask(lm, am)[0, 0].int()
    assert m[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]  # first context token sees its whole turn
    assert m[3].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]  # response: earlier turns + causal
    assert m[5].tolist() == [1, 1, 1, 1, 1, 1, 1, 0, 0]  # later context: bidirectional in its turn
    assert m[7].tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert m[8].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1]  # padding: itself only


def test_padded_batch_gives_no_nan(tiny):
    model = qwen2.from_pretrained(tiny.model)
    b = batch_of(tiny, 3)
    assert (b["attention_mask"] == 0).any()  # the batch really is padded
    mask = focusft.hybrid_mask(b["loss_mask"], b["attention_mask"])
    with torch.no_grad():
        assert not model(b["input_ids"], attn_mask=mask).isnan().any()
    for causal in (False, True):
        out = focusft.focusft_step(model, b["input_ids"], b["loss_mask"], b["attention_mask"], rank=4,
                                   causal=causal)
        out.loss.backward()
        assert torch.isfinite(out.loss) and all(map(lambda x: x == x, out.inner_losses))
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()


# ---------------------------------------------------------------------------------------------- inner loop


def test_one_inner_step_is_a_clipped_sgd_step(tiny):
    model = qwen2.from_pretrained(tiny.model)
    b = batch_of(tiny, 2)
    L, rank, lr, clip = model.config.num_hidden_layers, 4, 0.5, 0.05
    layers = focusft.adapted_layers(L, 0.5)
    init_A = fixed_init_A(model, layers, rank)
    mask = focusft.hybrid_mask(b["loss_mask"], b["attention_mask"])
    where, labels = focusft.targets_of(b["input_ids"], b["loss_mask"], b["attention_mask"])
    fast0 = focusft.init_fast_weights(model, layers, rank=rank, alpha=8.0, init_A=init_A)

    # By hand: the loss of the full model with phi_0, its gradient, each tensor clipped to norm c.
    leaves = {(i, n): (lr_.A.clone().requires_grad_(), lr_.B.clone().requires_grad_())
              for i, per in fast0.items() for n, lr_ in per.items()}
    fast = {i: {n: qwen2.LowRank(*leaves[(i, n)], 2.0) for n in per} for i, per in fast0.items()}
    logits = model.logits(model.run_layers(model.embed(b["input_ids"]), 0, L, mask=mask, fast=fast))
    loss = F.cross_entropy(logits[:, :-1][where], labels)
    flat = [t for pair in leaves.values() for t in pair]
    grads = torch.autograd.grad(loss, flat)
    expected = []
    clipped = 0
    for p, g in zip(flat, grads, strict=True):
        norm = g.norm().item()
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        clipped += factor < 1
        expected.append(p.detach() - lr * g * factor)

    h = model.run_layers(model.embed(b["input_ids"]), 0, layers.start, mask=mask).detach()
    fast1, losses = focusft.inner_loop(model, h, layers.start, mask, fast0, where, labels, steps=1, lr=lr,
                                       clip=clip)
    got = [t for per in fast1.values() for lr_ in per.values() for t in (lr_.A, lr_.B)]
    assert losses[0].item() == pytest.approx(loss.item(), abs=1e-6)
    assert clipped > 0  # the clip was active for some tensors
    for e, g_ in zip(expected, got, strict=True):
        assert torch.allclose(e, g_, atol=1e-7)
    # With B = 0 the gradient with respect to A is zero: A is unchanged after the first step.
    assert all(torch.equal(fast1[i][n].A, fast0[i][n].A) for i in fast0 for n in fast0[i])
    # An SGD step on a clipped gradient moves B by at most lr * c.
    moved = [fast1[i][n].B.norm().item() for i in fast0 for n in fast0[i]]
    assert max(moved) == pytest.approx(lr * clip, rel=1e-5) and min(moved) > 0


def test_inner_loss_falls_over_steps(tiny):
    model = qwen2.from_pretrained(tiny.model)
    b = batch_of(tiny, 1)
    _, inner = focusft.focusft_loss(model, b["input_ids"], b["loss_mask"], b["attention_mask"], inner_steps=5,
                                    rank=8, alpha=16.0, layer_fraction=0.5)
    print("[inner losses]", [round(x, 4) for x in inner])
    assert len(inner) == 5
    assert all(later < earlier for earlier, later in zip(inner, inner[1:], strict=False))


# ---------------------------------------------------------------------------------------------- fast = slow


@pytest.mark.parametrize("causal", [False, True], ids=["hybrid", "causal"])
@pytest.mark.parametrize("K", [0, 1, 2])
def test_fast_path_equals_reference(tiny, causal, K):
    model = qwen2.from_pretrained(tiny.model)
    b = batch_of(tiny, 2, start=3)
    kw = dict(inner_steps=K, inner_lr=1.0, inner_clip=1.0, rank=8, alpha=16.0, layer_fraction=0.5, causal=causal)
    kw["init_A"] = fixed_init_A(model, focusft.adapted_layers(4, 0.5), 8)
    loss, inner = focusft.focusft_loss(model, b["input_ids"], b["loss_mask"], b["attention_mask"], **kw)
    loss.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_loss, ref_inner = focusft.reference_focusft_loss(model, b["input_ids"], b["loss_mask"],
                                                         b["attention_mask"], **kw)
    ref_loss.backward()
    tag = f"{'causal' if causal else 'hybrid'} K={K}"
    print(f"[fast=slow] {tag}: loss {loss.item():.6f} vs {ref_loss.item():.6f}; inner {inner} vs {ref_inner}")
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    assert inner == pytest.approx(ref_inner, abs=1e-5)
    worst = 0.0
    for n, p in model.named_parameters():
        worst = max(worst, report(f"{tag} grad {n}", fast_grads[n], p.grad) / (p.grad.abs().max().item() + 1e-12))
        assert torch.allclose(fast_grads[n], p.grad, rtol=1e-4, atol=1e-6), n
    print(f"[fast=slow] {tag}: worst gradient difference relative to the gradient's scale {worst:.2e}")


def test_no_bilevel_is_plain_sft(tiny):
    model = qwen2.from_pretrained(tiny.model)
    b = batch_of(tiny, 2)
    ids, lm, am = b["input_ids"], b["loss_mask"], b["attention_mask"]
    labels = ids[:, 1:].masked_fill((lm[:, 1:] * am[:, 1:]) == 0, -100)

    def sft(logits):  # SFT as anyone writes it: full logits, shifted labels, -100 on non-responses
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)

    causal, _ = focusft.focusft_loss(model, ids, lm, am, inner_steps=0, causal=True)
    hybrid, _ = focusft.focusft_loss(model, ids, lm, am, inner_steps=0)
    with torch.no_grad():
        assert causal.item() == pytest.approx(sft(model(ids)).item(), abs=1e-6)
        assert hybrid.item() == pytest.approx(sft(model(ids, attn_mask=focusft.hybrid_mask(lm, am))).item(),
                                              abs=1e-6)
    assert abs(causal.item() - hybrid.item()) > 1e-4  # the mask flag really changes the computation


def test_checkpointing_changes_nothing(tiny):
    model = qwen2.from_pretrained(tiny.model)
    b = batch_of(tiny, 2)
    init_A = fixed_init_A(model, focusft.adapted_layers(4, 0.35), 4)
    results = []
    for ckpt, inner_ckpt in ((False, False), (True, False), (True, True)):
        out = focusft.focusft_step(model, b["input_ids"], b["loss_mask"], b["attention_mask"], rank=4,
                                   init_A=init_A, checkpoint=ckpt, inner_checkpoint=inner_ckpt)
        out.loss.backward()
        results.append((out.loss.item(), out.inner_losses, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    for loss, inner, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-6) and inner == pytest.approx(results[0][1], abs=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, results[0][2], strict=True))


def test_adapted_layers_and_schedule():
    assert list(focusft.adapted_layers(28, 0.35)) == list(range(18, 28))  # Qwen2.5-7B: layers 18..27
    assert list(focusft.adapted_layers(4, 0.35)) == [2, 3]
    assert focusft.lr_at(0, 100, 1e-5, 0.1) == 0.0
    assert focusft.lr_at(5, 100, 1e-5, 0.1) == pytest.approx(5e-6)
    assert focusft.lr_at(10, 100, 1e-5, 0.1) == pytest.approx(1e-5)
    assert focusft.lr_at(55, 100, 1e-5, 0.1) == pytest.approx(5e-6)
    assert focusft.lr_at(100, 100, 1e-5, 0.1) == pytest.approx(0.0, abs=1e-20)


def test_fast_weight_init_is_linear_default():
    """A is drawn exactly like nn.Linear's weight (kaiming_uniform_(a=sqrt(5))) from the given
    generator, projection after projection in order; B = 0; scale alpha / rank."""
    cfg = qwen2.Qwen2Config(vocab_size=32, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2)
    model = qwen2.random_model(cfg)
    fast = focusft.init_fast_weights(model, range(1, 3), rank=6, alpha=12.0, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    for i in (1, 2):
        for name, d_in, d_out in (("gate_proj", 48, 80), ("up_proj", 48, 80), ("down_proj", 80, 48)):
            expected = torch.empty(6, d_in)
            torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=g)
            A, B, scale = fast[i][name]
            assert torch.equal(A, expected), (i, name)
            assert B.shape == (d_out, 6) and torch.count_nonzero(B) == 0 and scale == 2.0
    # ... which is nn.Linear's own default init of a (6 x 80) weight, drawn from the global generator
    torch.manual_seed(3)
    linear = torch.nn.Linear(80, 6, bias=False)
    torch.manual_seed(3)
    again = focusft.init_fast_weights(model, range(2, 3), targets=("down_proj",), rank=6, alpha=12.0,
                                      generator=torch.default_generator)
    assert torch.equal(again[2]["down_proj"].A, linear.weight.detach())


@pytest.mark.parametrize("total", [1, 2, 3, 7, 10, 11, 25])
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1, 0.3])
def test_schedule_is_transformers_cosine_with_warmup(total, warmup_ratio):
    """Step s has the lr of a transformers Trainer run of the same length (warmup steps = ceil(ratio *
    total), as the Trainer computes them), at small totals where off-by-one errors show."""
    from transformers import get_cosine_schedule_with_warmup

    warmup = math.ceil(warmup_ratio * total)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-5)
    sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [focusft.lr_at(s, total, 1e-5, warmup_ratio) for s in range(total)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-20)


def test_weight_decay_on_matrices_only(tiny):
    """Projections and embeddings decay; RMSNorm weights and q/k/v biases do not (every parameter
    in exactly one group)."""
    model = qwen2.from_pretrained(tiny.model)
    groups = focusft.param_groups(model, 0.01)
    by_id = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in by_id, "a parameter in two groups"
            by_id[id(p)] = group["weight_decay"]
    names = dict(model.named_parameters())
    assert set(by_id) == {id(p) for p in names.values()}
    for name, p in names.items():
        decayed = not (name.endswith(".bias") or name.endswith("norm.weight"))
        assert by_id[id(p)] == (0.01 if decayed else 0.0), name
    assert sum(1 for n in names if n.endswith(".bias")) == 3 * 4 and any(n.endswith("norm.weight") for n in names)


# ---------------------------------------------------------------------------------------------- the script


def train(tiny, out, *extra, nproc: int = 1):
    result = run(launcher(nproc) + [str(ROOT / "focusft.py"), "--model", str(tiny.model), "--data", str(tiny.data),
                                    "--out", str(out), *extra], timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def data_parallel_runs(tiny, tmp_path_factory):
    """Training runs shared by the tests below, by (processes, --loss-norm, samples): 3 steps of 4
    micro-batches, as 1 process x accumulation 4 or 2 processes x accumulation 2."""
    root, done = tmp_path_factory.mktemp("data-parallel"), {}

    def get(nproc: int, norm: str, samples: int):
        key = (nproc, norm, samples)
        if key not in done:
            subset = root / f"data-{samples}.jsonl"
            subset.write_text("".join(tiny.data.read_text().splitlines(keepends=True)[:samples]))
            out = root / f"{nproc}-{norm}-{samples}"
            result = train(tiny, out, "--data", str(subset), "--epochs", "1", "--max-steps", "3", "--lr", "1e-3",
                           "--rank", "4", "--layer-fraction", "0.5", "--no-grad-ckpt", "--loss-norm", norm,
                           "--grad-accum", str(4 // nproc), nproc=nproc)
            done[key] = out, result
        return done[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("norm, samples", [("micro-batch", 12), ("token", 12), ("micro-batch", 5)],
                         ids=["micro-batch-mean", "token-mean", "uneven-shards"])
def test_ddp_two_processes_equal_one_process(tiny, data_parallel_runs, norm, samples):
    """2 ranks x accumulation k = 1 rank x accumulation 2k: the weights, and per step the loss and
    the gradient norm. With 5 samples the last step holds 1 sample: rank 1 runs an empty slot (a
    zero-weight dummy, for DDP's sake)."""
    ddp, two = data_parallel_runs(2, norm, samples)
    assert "2 process(es)" in two.stdout and "weights identical on every rank" in two.stdout
    one, _ = data_parallel_runs(1, norm, samples)
    a, b = qwen2.from_pretrained(ddp / "final"), qwen2.from_pretrained(one / "final")
    start = qwen2.from_pretrained(tiny.model)
    for (n, p), q, p0 in zip(a.named_parameters(), b.parameters(), start.parameters(), strict=True):
        assert not torch.equal(p, p0) or n.endswith("bias"), f"{n} did not train"
        report(f"ddp vs single ({norm}, {samples} samples) {n}", p, q)
        assert torch.allclose(p, q, atol=1e-5), n  # 1% of one Adam step (lr 1e-3): summation order only
    rows, single = step_rows(ddp), step_rows(one)
    assert len(rows) == len(single) == (2 if samples == 5 else 3)  # 5 samples, 4 per step: 2 steps
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in single], rel=1e-5)
    print(f"[ddp vs single] grad_norm {[r['grad_norm'] for r in rows]} vs {[r['grad_norm'] for r in single]}")
    # step 1 (the same weights) to fp32 rounding; later steps also carry the weights' tiny drift
    assert rows[0]["grad_norm"] == pytest.approx(single[0]["grad_norm"], rel=1e-6)
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in single], rel=1e-4)
    if samples == 5:
        assert [r["response_tokens"] > 0 for r in rows] == [True, True]


@pytest.mark.slow
def test_token_loss_norm_changes_the_weighting(data_parallel_runs):
    a = qwen2.from_pretrained(data_parallel_runs(1, "micro-batch", 12)[0] / "final")
    b = qwen2.from_pretrained(data_parallel_runs(1, "token", 12)[0] / "final")
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_weight_decay_reaches_matrices_only_in_training(tiny, tmp_path):
    """One optimizer step with weight decay 0 and with a large one (AdamW's decay multiplies each
    decayed weight by 1 - lr * wd before the update): norms and biases end bitwise equal, every
    matrix differs. Checks the trainer's optimizer, not only the grouping function."""
    flags = ["--max-steps", "1", "--grad-accum", "1", "--warmup-ratio", "0", "--lr", "1e-3", "--no-bilevel",
             "--ckpt-every", "0"]
    train_in_process(tiny, tmp_path / "wd0", *flags, "--weight-decay", "0")
    train_in_process(tiny, tmp_path / "wd", *flags, "--weight-decay", "100")
    a = dict(qwen2.from_pretrained(tmp_path / "wd0" / "final").named_parameters())
    b = dict(qwen2.from_pretrained(tmp_path / "wd" / "final").named_parameters())
    for name, p in a.items():
        if name.endswith(".bias") or name.endswith("norm.weight"):
            assert torch.equal(p, b[name]), f"{name} was decayed"
        else:
            assert not torch.equal(p, b[name]), f"{name} was not decayed"


def test_max_steps_beyond_the_epochs_is_a_cap_and_the_schedule_spans_what_runs(tiny, tmp_path, capsys):
    """--max-steps 50 on one epoch of 3 steps: training stops after the epoch, the cosine schedule is laid
    over those 3 steps (so it ends as a 3-step run's does, not near the peak), and a rerun finds the run done."""
    subset = tmp_path / "three.jsonl"
    subset.write_text("".join(tiny.data.read_text().splitlines(keepends=True)[:3]))
    flags = ["--data", str(subset), "--epochs", "1", "--max-steps", "50", "--grad-accum", "1", "--lr", "1e-3",
             "--warmup-ratio", "0", "--no-bilevel", "--ckpt-every", "0"]
    train_in_process(tiny, tmp_path / "run", *flags)
    lrs = [r["lr"] for r in step_rows(tmp_path / "run")]
    assert lrs == pytest.approx([focusft.lr_at(s, 3, 1e-3, 0.0) for s in range(3)])
    capsys.readouterr()
    train_in_process(tiny, tmp_path / "run", *flags)
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_end_to_end_training(tiny, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    # One sample four times: every step sees the same data, so the loss must fall step over step.
    small = tmp_path / "one.jsonl"
    small.write_text(tiny.data.read_text().splitlines(keepends=True)[0] * 4)
    out = tmp_path / "run"
    result = train(tiny, out, "--data", str(small), "--epochs", "6", "--grad-accum", "2", "--lr", "3e-3",
                   "--warmup-ratio", "0", "--rank", "4", "--attn-every", "3", "--dtype", dtype, "--save-every", "4")
    rows = focusft.read_metrics(out / "metrics.jsonl")
    assert rows[0]["step"] == 0 and "attn_base" in rows[0]  # the start diagnostics
    rows = rows[1:]
    assert len(rows) == 12 and rows[-1]["step"] == 12
    first, last = sum(r["loss"] for r in rows[:2]) / 2, sum(r["loss"] for r in rows[-2:]) / 2
    print(f"[e2e {dtype}] loss {first:.4f} -> {last:.4f}")
    assert last < first - 0.25
    assert {"attn_base", "attn_fast"} <= set(rows[2]) and {"attn_base", "attn_fast"} <= set(rows[-1])
    assert 0 <= rows[-1]["attn_base"]["sink_mass"] <= 1 and 0 < rows[-1]["attn_base"]["context_engagement"] <= 1
    assert "sink_mass" in result.stdout and "context_engagement" in result.stdout  # the start/end table
    config = json.loads((out / "config.json").read_text())
    assert config["inner_steps"] == 2 and config["dtype"] == dtype
    assert (out / "step-4" / "model.safetensors").is_file()

    final = out / "final"
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in final.iterdir()}
    im_end = tiny.tokenizer.token_to_id("<|im_end|>")
    assert im_end in json.loads((final / "generation_config.json").read_text())["eos_token_id"]
    ours = qwen2.from_pretrained(final, dtype="fp32")
    theirs = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = batch_of(tiny, 1)["input_ids"]
    with torch.no_grad():
        assert report(f"trained {dtype} checkpoint: qwen2 vs transformers", ours(ids), theirs(ids).logits) <= 1e-4
