"""Fidelity to the authors' release: the same input_ids and loss mask as their data pipeline, and the
same optimizer step (clip included) as their trainer computes."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of, fixed_init_A, report, step_rows, train_in_process
from test_data import CONVERSATIONS, call

import data
import focusft
import qwen2
from qwen2 import LowRank

# ---------------------------------------------------------------------------------------------- the data


def authors_encoding(hf, messages: list[dict], tools=None) -> tuple[list[int], list[int]]:
    """The authors' rule (their AgenticSFTDataset), restated with the real template (jinja2 through
    transformers). Messages are taken in segments: a run of consecutive tool messages is one segment,
    any other message one on its own. A segment's text is the template's rendering of the conversation
    up to the segment's end, less its rendering up to the segment's start (nothing before the first).
    An assistant segment after the first message is cut where the generation prompt ends: the prompt
    (<|im_start|>assistant\n) gets loss 0, the rest 1; an assistant segment that opens the conversation
    gets 1 throughout; every other segment 0. Each piece is tokenized on its own; the pieces are joined."""
    tok, template = hf

    def render(prefix, generation_prompt=False) -> str:
        if not prefix:
            return ""
        return tok.apply_chat_template(prefix, tools=tools, chat_template=template, tokenize=False,
                                       add_generation_prompt=generation_prompt)

    ids, mask, i = [], [], 0
    while i < len(messages):
        j = i + 1
        while messages[i]["role"] == "tool" and j < len(messages) and messages[j]["role"] == "tool":
            j += 1
        before, through = render(messages[:i]), render(messages[:j])
        assistant = messages[i]["role"] == "assistant"
        if assistant and i > 0:
            prompted = render(messages[:i], generation_prompt=True)
            pieces = [(prompted[len(before):], 0), (through[len(prompted):], 1)]
        else:
            pieces = [(through[len(before):], int(assistant))]
        for text, trained in pieces:
            piece = tok.encode(text, add_special_tokens=False)
            ids += piece
            mask += [trained] * len(piece)
        i = j
    return ids, mask


LEADING_NEWLINES = ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "\n\nHi\n"},
                     {"role": "user", "content": "\nmore"}, {"role": "assistant", "content": "\nok"}], None)
THREE_TOOL_RESULTS = ([
    {"role": "user", "content": "Solve it. Put the answer in \\boxed{}."},
    {"role": "assistant", "content": "First the parts.", "tool_calls": [
        call("code_interpreter", {"code": "print(1)"}), call("code_interpreter", {"code": "print(2)"}),
        call("code_interpreter", {"code": "import math\nprint(math.pi)"})]},
    {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}, {"role": "tool", "content": "3.14159"},
    {"role": "assistant", "content": "So \\boxed{6.14}."},
], [{"type": "function", "function": {"name": "code_interpreter", "description": "A tool for executing code.",
                                       "parameters": {"type": "object", "properties": {"code": {
                                           "type": "string", "description": "The code to execute."}},
                                           "required": ["code"]}}}])
SAME_AS_AUTHORS = [n for n in CONVERSATIONS if n not in ("tool_first", "ends_with_user")]


@pytest.mark.parametrize("name", [*SAME_AS_AUTHORS, "leading_newlines", "three_tool_results"])
def test_encode_chat_gives_the_authors_ids_and_loss_mask(qwen, hf, name):
    """Tools or none, tool calls with and without content, several tool results in a row, a system
    prompt or none (or one later on), consecutive assistant messages, bodies opening with newlines."""
    messages, tools = {"leading_newlines": LEADING_NEWLINES, "three_tool_results": THREE_TOOL_RESULTS}.get(
        name, CONVERSATIONS.get(name))
    ids, mask = data.encode_chat(qwen, messages, tools)
    theirs = authors_encoding(hf, messages, tools)
    assert ids == theirs[0]
    assert mask == theirs[1]
    assert sum(mask) > 0


def test_truncated_tail_is_the_authors_right_cut(qwen, hf, tmp_path):
    messages, tools = THREE_TOOL_RESULTS
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": messages, "tools": tools}) + "\n")
    full_ids, full_mask = authors_encoding(hf, messages, tools)
    for max_len in (len(full_ids) - 3, len(full_ids) - 30, len(full_ids) - 60):  # inside the last answer, ...
        (sample,), stats = data.load_samples(path, qwen, max_len=max_len)
        assert stats.n_truncated == 1
        assert (sample.input_ids, sample.loss_mask) == (full_ids[:max_len], full_mask[:max_len])


def test_an_assistant_message_first_differs_from_the_authors_only_in_its_mask(qwen, hf):
    """The authors give the whole first segment loss 1 when the conversation opens with an assistant
    message: the default system prompt and the <|im_start|>assistant header too (a bug: the model would
    learn to write the system prompt). Ours trains on the body only; the ids are the same."""
    messages = [{"role": "assistant", "content": "Hello, how can I help?"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hi!"}]
    ids, mask = data.encode_chat(qwen, messages)
    theirs_ids, theirs_mask = authors_encoding(hf, messages)
    assert ids == theirs_ids
    differ = [t for t, (a, b) in enumerate(zip(mask, theirs_mask, strict=True)) if a != b]
    header_text = data.render_chat(messages[:1]).split("<|im_start|>assistant\n")[0] + "<|im_start|>assistant\n"
    header = len(qwen.encode(header_text, add_special_tokens=False).ids)
    assert differ == list(range(header))  # the default system turn and the header: 0 here, 1 there
    assert qwen.decode(ids[:header], skip_special_tokens=False).startswith("<|im_start|>system\n" +
                                                                           data.DEFAULT_SYSTEM)

# ---------------------------------------------------------------------------------------------- the step


def authors_steps(tiny, steps: int, accum: int, lr: float, rank: int, alpha: float, fraction: float,
                  seed: int = 1234) -> tuple[qwen2.Qwen2ForCausalLM, list[float]]:
    """Optimizer steps computed the authors' way, spelled out: fast weights are parameters that live
    across micro-batches (reset in place before each one, so their .grad adds up over the step), every
    loss is a full forward with full-vocabulary logits, the inner step is their per-tensor clip with
    a float factor, and torch's clip_grad_norm_ runs over the model's AND the fast weights' gradients.
    The micro-batches and phi_0 draws are the trainer's (data order and seeding are not under test)."""
    model = qwen2.from_pretrained(tiny.model)
    L = model.config.num_hidden_layers
    layers = focusft.adapted_layers(L, fraction)
    samples, _ = data.load_samples([tiny.data], tiny.tokenizer, max_len=4096)
    micro = data.epoch_microbatches([len(s) for s in samples], 1, 1, 0, seed, 0)
    pad = tiny.tokenizer.token_to_id("<|endoftext|>")
    phi = {(i, n): (torch.nn.Parameter(torch.zeros(rank, getattr(model.model.layers[i].mlp, n).weight.shape[1])),
                    torch.nn.Parameter(torch.zeros(getattr(model.model.layers[i].mlp, n).weight.shape[0], rank)))
           for i in layers for n in focusft.TARGETS}
    phi_params = [t for pair in phi.values() for t in pair]
    fast = {i: {n: LowRank(*phi[i, n], alpha / rank) for n in focusft.TARGETS} for i in layers}
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "norm" in n)]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias") or "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    norms = []
    for step in range(steps):
        for j in range(accum):
            b = data.collate([samples[i] for i in micro[step * accum + j]], pad)
            ids, lm, am = b["input_ids"], b["loss_mask"], b["attention_mask"]
            mask = focusft.hybrid_mask(lm, am)
            phi_0 = focusft.init_fast_weights(model, layers, rank=rank, alpha=alpha,
                                              generator=focusft.fast_weight_generator(seed, 0, step * accum + j))
            with torch.no_grad():  # reset_inner: in place, .grad untouched
                for (i, n), (A, B) in phi.items():
                    A.copy_(phi_0[i][n].A)
                    B.zero_()

            def loss_of(ids, lm, mask):
                logits = model.logits(model.run_layers(model.embed(ids), 0, L, mask=mask, fast=fast))[:, :-1]
                per_token = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
                shift = lm[:, 1:].float()
                return (per_token.view(shift.shape) * shift).sum() / shift.sum()

            for _ in range(2):  # K = 2, eta = 1, c = 1
                grads = torch.autograd.grad(loss_of(ids, lm, mask), phi_params)
                with torch.no_grad():
                    for p, g in zip(phi_params, grads, strict=True):
                        norm = g.norm().item()
                        p.sub_(g * (1.0 / (norm + 1e-12)) if norm > 1.0 else g)
            (loss_of(ids, lm, mask) / accum).backward()
        norms.append(torch.nn.utils.clip_grad_norm_([*model.parameters(), *phi_params], 1.0).item())
        progress = step / steps  # transformers' cosine schedule, no warmup
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * progress))
        opt.step()
        opt.zero_grad()
        for p in phi_params:
            p.grad = None
    return model, norms


def test_optimizer_steps_equal_the_authors(tiny, tmp_path):
    """Two optimizer steps of focusft.py (the second depends on the first's clip factor: Adam's first
    step does not see a gradient's scale) against `authors_steps`: the logged gradient norms, and
    the weights after the clipped updates."""
    lr, rank, alpha, fraction = 1e-2, 4, 16.0, 0.5
    out = tmp_path / "run"
    train_in_process(tiny, out, "--max-steps", "2", "--grad-accum", "3", "--lr", str(lr), "--warmup-ratio", "0",
                     "--rank", str(rank), "--alpha", str(alpha), "--layer-fraction", str(fraction),
                     "--ckpt-every", "0", "--dtype", "fp32")
    ours = qwen2.from_pretrained(out / "final")
    theirs, norms = authors_steps(tiny, 2, 3, lr, rank, alpha, fraction)
    logged = [r["grad_norm"] for r in step_rows(out)]
    print(f"[authors] gradient norms: ours {logged}, theirs {norms}")
    assert min(norms) > 1.0  # the clip is active in both steps
    assert logged == pytest.approx(norms, rel=1e-5)
    start = qwen2.from_pretrained(tiny.model)
    for (n, p), q, p0 in zip(ours.named_parameters(), theirs.parameters(), start.parameters(), strict=True):
        # relative to the update (~lr per element): a different clip factor in step 1 moves step 2's
        # update by about the factor's relative change
        report(f"authors' step: {n}", p, q)
        assert torch.allclose(p - p0, q - p0, rtol=1e-3, atol=lr * 1e-3), n


def test_inner_clip_factor_is_fp32():
    """bf16 gradients: the factor c / ||g|| stays fp32 and the product is rounded once, as the authors'
    tensor-times-float does; a factor rounded to bf16 first is off by up to ~0.4%."""
    g = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    ours = focusft.clip_per_tensor(g, 1.0)
    theirs = (g.float() * (1.0 / g.float().norm().item())).to(torch.bfloat16)
    assert torch.equal(ours, theirs)
    assert ours.float().norm().item() == pytest.approx(1.0, rel=1e-2)
    small = g / 1000  # norm below c: unchanged
    assert torch.equal(focusft.clip_per_tensor(small, 1.0), small)
    # The authors take the norm as grad.norm(), which for a bf16 gradient is itself rounded to bf16
    # (up to 2^-8 relative, ~0.4%), before their float factor: a remaining difference under bf16.
    assert g.norm().dtype == torch.bfloat16
    assert 0 < abs(g.norm().item() / g.float().norm().item() - 1) <= 2 ** -8


def test_padding_changes_nothing(tiny):
    """The authors pad every sample to max_length (4096); at micro-batch 1 nothing is padded here.
    Padding is masked: the loss and every gradient are the same, so this only costs them compute."""
    model = qwen2.from_pretrained(tiny.model)
    pad = tiny.tokenizer.token_to_id("<|endoftext|>")
    b = batch_of(tiny, 1)
    n = b["input_ids"].shape[1]
    padded = {k: F.pad(v, (0, 64), value=pad if k == "input_ids" else 0) for k, v in b.items()}
    init_A = fixed_init_A(model, focusft.adapted_layers(4, 0.5), 4)
    results = []
    for batch in (b, padded):
        loss, inner = focusft.focusft_loss(model, batch["input_ids"], batch["loss_mask"], batch["attention_mask"],
                                           rank=4, alpha=16.0, layer_fraction=0.5, init_A=init_A)
        loss.backward()
        results.append((loss.item(), inner, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    assert padded["input_ids"].shape[1] == n + 64
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-6)
    assert results[1][1] == pytest.approx(results[0][1], abs=1e-6)
    assert all(torch.allclose(a, c, atol=1e-6) for a, c in zip(results[0][2], results[1][2], strict=True))


# ---------------------------------------------------------------------------------------------- parquet


def read_parquet_the_authors_way(path) -> list[tuple[list, list | None]]:
    """Their reading, restated: pandas.read_parquet, then numpy arrays turned into lists all the way
    down (keys that are null in a row stay, as None)."""
    pd = pytest.importorskip("pandas")
    import numpy as np

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, np.ndarray)):
            return [plain(v) for v in list(x)]
        return x

    frame = pd.read_parquet(path)
    tools = frame["tools"].map(plain).tolist() if "tools" in frame else [None] * len(frame)
    return list(zip(frame["messages"].map(plain).tolist(), tools, strict=True))


def test_the_3k_shaped_parquet_gives_the_authors_samples(qwen, hf, tmp_path):
    """Struct columns (tool-call arguments as objects): read our way and the authors' way (pandas, the
    real template prefix by prefix), every sample is the same."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from test_agentrl_parquet import FILE, records

    path = tmp_path / FILE
    pq.write_table(pa.Table.from_pylist(records(40, seed=3)), path)
    ours, _ = data.load_samples(path, qwen, max_len=4096)
    theirs = [authors_encoding(hf, m, t) for m, t in read_parquet_the_authors_way(path)]
    assert len(ours) == len(theirs) == 40
    for s, (ids, mask) in zip(ours, theirs, strict=True):
        assert (s.input_ids, s.loss_mask) == (ids, mask), s.source


def test_where_the_authors_parquet_reading_differs(qwen, hf, tmp_path):
    """Documented differences: (1) string tool-call arguments are rendered double-encoded by their
    template, parsed by ours; (2) in struct columns with one schema for all rows, pandas keeps a null
    for every key a row lacks and turns integers of a column with nulls into floats, so their
    tools block shows "description": null and 2.0 where the record had no description and 2."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    arguments = [{"role": "user", "content": "x"},
                 {"role": "assistant", "tool_calls": [call("code_interpreter", '{"code": "print(1)"}')]},
                 {"role": "tool", "content": "1"}, {"role": "assistant", "content": "1"}]
    tool_a = {"type": "function", "function": {"name": "a", "description": "A.", "parameters": {
        "type": "object", "properties": {"code": {"type": "string"}}}}}
    tool_b = {"type": "function", "function": {"name": "b", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "default": 2}}}}}
    plain = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": arguments, "tools": [tool_a]},
                                         {"messages": plain, "tools": [tool_b]}]), path)
    ours, _ = data.load_samples(path, qwen, max_len=4096)
    (m1, t1), (m2, t2) = read_parquet_the_authors_way(path)
    their_text = hf[0].decode(authors_encoding(hf, m1, t1)[0])
    assert '"arguments": "{\\"code\\": \\"print(1)\\"}"' in their_text  # double-encoded
    assert '"arguments": {"code": "print(1)"}' in qwen.decode(ours[0].input_ids, skip_special_tokens=False)
    their_tools = hf[0].decode(authors_encoding(hf, m2, t2)[0])
    assert '"description": null' in their_tools and '"default": 2.0' in their_tools and '"code": null' in their_tools
    our_tools = qwen.decode(ours[1].input_ids, skip_special_tokens=False)
    assert json.dumps(tool_b) in our_tools
