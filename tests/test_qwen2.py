"""qwen2.py against transformers' Qwen2ForCausalLM (the numerical reference), on tiny random checkpoints."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, hf_config, hf_model, report, save_hf

import qwen2


def ids(batch: int, length: int, vocab: int = 211, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_transformers_fp32(tmp_path, tied):
    directory, ref = save_hf(tmp_path, tied)
    model = qwen2.from_pretrained(directory)
    assert model.dtype == torch.float32
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    x = ids(3, 41)
    with torch.no_grad():
        ours, theirs = model(x), ref(x).logits
    assert report(f"fp32 logits ({'tied' if tied else 'untied'})", ours, theirs) == 0.0  # docs/model.md: 0.0


def test_logits_match_transformers_bf16(tmp_path):
    from transformers import AutoModelForCausalLM

    directory, ref32 = save_hf(tmp_path)
    model = qwen2.from_pretrained(directory, dtype=torch.bfloat16)
    # transformers loading in bf16 (not `.to(bf16)`, which would also round its fp32 RoPE buffer)
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    x = ids(2, 64)
    with torch.no_grad():
        exact = ref32(x).logits
        ours, theirs = model(x).float(), ref(x).logits.float()
    assert model(x).dtype == torch.bfloat16
    # The same operations in the same order: the bf16 roundings are transformers' bit for bit (one
    # extra rounding anywhere would show), and the distance to the fp32 result is bf16's, not a bug's.
    assert report("bf16 logits vs transformers bf16", ours, theirs) == 0.0  # docs/model.md: 0.0
    err = report("bf16 logits vs fp32 logits", ours, exact)
    assert err <= 5e-2 * exact.abs().max().item()


def test_explicit_causal_mask_equals_causal_path(tmp_path):
    directory, ref = save_hf(tmp_path)
    model = qwen2.from_pretrained(directory)
    x = ids(2, 30)
    mask = torch.ones(30, 30, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        masked, causal, theirs = model(x, attn_mask=mask), model(x), ref(x).logits
    assert report("explicit causal mask vs causal path", masked, causal) == 0.0
    assert report("explicit causal mask vs transformers", masked, theirs) == 0.0


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_transformers(tmp_path, side):
    directory, ref = save_hf(tmp_path)
    model = qwen2.from_pretrained(directory)
    lengths, S = [25, 17, 9], 25
    x = ids(3, S)
    real = torch.zeros(3, S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if side == "right":
            real[b, :n] = True
        else:
            real[b, S - n:] = True
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    # Real queries see earlier real keys; padding queries see only themselves (no empty row, no NaN).
    mask = torch.ones(S, S, dtype=torch.bool).tril() & real[:, None, :]
    mask = (mask | torch.eye(S, dtype=torch.bool))[:, None]
    with torch.no_grad():
        ours = model(x, attn_mask=mask, positions=positions)
        theirs = ref(x, attention_mask=real.long(), position_ids=positions).logits
    assert not ours.isnan().any()
    assert report(f"{side}-padded batch, real positions", ours[real], theirs[real]) == 0.0


def test_attention_probabilities_are_the_attention_the_model_applies(tmp_path):
    """attention_probabilities (what the diagnostics measure) equals transformers' eager attention
    weights (causal), and under an explicit mask it is exactly what forward applies to the values."""
    from transformers import AutoModelForCausalLM

    directory, _ = save_hf(tmp_path)
    model = qwen2.from_pretrained(directory)
    ref = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    B, S = 2, 20
    x, every = ids(B, S), torch.ones(B, S, dtype=torch.bool)
    mask = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(1)) < 0.5
    mask |= torch.eye(S, dtype=torch.bool)  # no empty row
    with torch.no_grad():
        theirs = ref(x, output_attentions=True).attentions  # per layer (B, H, S, S)
        h = model.embed(x)
        for i in range(model.config.num_hidden_layers):
            causal = torch.stack(model.attention_probabilities(h, i, every))
            assert report(f"layer {i} attention probabilities vs transformers", causal, theirs[i]) <= 1e-6
            probs = model.attention_probabilities(h, i, every, mask=mask)
            attn = model.model.layers[i].self_attn
            cos, sin = model.rope(torch.arange(S)[None], h.dtype)
            _, _, v = attn.project(model.model.layers[i].input_layernorm(h), cos, sin)
            v = v.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)  # (B, H, S, hd)
            y = torch.stack([p @ v[b] for b, p in enumerate(probs)]).transpose(1, 2).flatten(2)
            assert report(f"layer {i} probabilities @ values vs forward", h + attn.o_proj(y),
                          model.run_attention(h, i, mask=mask)) <= 1e-5
            assert all((p[:, ~mask[b, 0]] == 0).all() for b, p in enumerate(probs))
            h = model.run_layers(h, i, i + 1)


def test_yarn_rope_scaling_matches_transformers(tmp_path):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    directory, ref = save_hf(tmp_path, rope_scaling=yarn)
    saved = json.loads((directory / "config.json").read_text())
    model = qwen2.from_pretrained(directory)
    assert model.config.rope_scaling["factor"] == 4.0, saved
    inv_freq, scale = qwen2.rope_inv_freq(model.config)
    assert scale == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    assert torch.equal(inv_freq, ref.model.rotary_emb.inv_freq)
    x = ids(1, 200)  # well past the original 64 positions
    with torch.no_grad():
        assert report("yarn logits", model(x), ref(x).logits) == 0.0


# ---------------------------------------------------------------------------------------------- saving


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_pretrained_loads_in_transformers(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    directory, _ = save_hf(tmp_path, tied)
    model = qwen2.from_pretrained(directory)
    out = tmp_path / "ours"
    model.save_pretrained(out)
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    x = ids(2, 33)
    with torch.no_grad():
        assert report("our save -> transformers load", model(x), theirs(x).logits) == 0.0
    again = qwen2.from_pretrained(out)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_sharded_save_loads_identically(tmp_path):
    from transformers import AutoModelForCausalLM

    directory, _ = save_hf(tmp_path)
    model = qwen2.from_pretrained(directory)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    again = qwen2.from_pretrained(out)
    x = ids(2, 20)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
        theirs = AutoModelForCausalLM.from_pretrained(out)(x).logits
        assert report("sharded save -> transformers", theirs, model(x)) == 0.0
    model.save_pretrained(out)  # back to one file: the stale shards and index must go
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_bf16_save_and_load_dtype(tmp_path):
    directory, _ = save_hf(tmp_path)
    model = qwen2.from_pretrained(directory, dtype="bf16")
    out = tmp_path / "bf16"
    model.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert qwen2.from_pretrained(out).dtype == torch.bfloat16  # default: the checkpoint's own dtype


# ---------------------------------------------------------------------------------------------- generation


def full_forward_greedy(model, prompt, steps, eos):
    seq, new = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            token = model(torch.tensor([seq]))[0, -1].argmax().item()
        new.append(token)
        seq.append(token)
        if token in eos:
            break
    return new


def test_generate_matches_full_forwards_and_transformers(tmp_path):
    directory, ref = save_hf(tmp_path)
    model = qwen2.from_pretrained(directory)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 211, (n,), generator=g).tolist() for n in (5, 23, 1, 14)]
    steps = 12
    # Pick an EOS the model emits for some rows, so stopping is exercised.
    probe = full_forward_greedy(model, prompts[1], steps, eos=[])
    eos = [probe[4]]
    out = qwen2.generate(model, prompts, max_new_tokens=steps, eos_token_ids=eos)
    expected = [full_forward_greedy(model, p, steps, eos) for p in prompts]
    assert out == expected
    assert any(len(o) < steps for o in out)
    assert qwen2.generate(model, prompts, steps, eos, prefill_chunk=4) == expected
    for p, o in zip(prompts, out, strict=True):
        theirs = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=0)
        assert theirs[0, len(p):len(p) + len(o)].tolist() == o


def test_generate_edge_cases(tmp_path):
    directory, _ = save_hf(tmp_path)
    model = qwen2.from_pretrained(directory)
    assert qwen2.generate(model, [[1, 2]], max_new_tokens=0) == [[]]
    assert qwen2.generate(model, [], max_new_tokens=3) == []
    assert len(qwen2.generate(model, [[5]], max_new_tokens=3, eos_token_ids=None)[0]) == 3
    with pytest.raises(ValueError, match="at least one token"):
        qwen2.generate(model, [[1], []], max_new_tokens=2)


def test_long_prompt_prefills_without_square_mask(monkeypatch):
    """A long prompt goes through the causal path (or chunk x S masks): never an S x S mask."""
    cfg = qwen2.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    model = qwen2.random_model(cfg, seed=0)
    S = 4096
    prompt = torch.randint(0, 64, (S,), generator=torch.Generator().manual_seed(0)).tolist()
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(0 if attn_mask is None else attn_mask.numel())
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    whole = qwen2.generate(model, [prompt, prompt[:100]], max_new_tokens=3)
    assert max(seen) < S * 8  # decode masks are (B, 1, 1, T)
    seen.clear()
    chunked = qwen2.generate(model, [prompt, prompt[:100]], max_new_tokens=3, prefill_chunk=512)
    assert max(seen) <= 512 * S
    assert chunked == whole


# ---------------------------------------------------------------------------------------------- fast weights


def test_fast_weight_slots(tmp_path):
    directory, _ = save_hf(tmp_path)
    model = qwen2.from_pretrained(directory)
    cfg = model.config
    x = ids(2, 16)
    shapes = {"gate_proj": (cfg.hidden_size, cfg.intermediate_size),
              "up_proj": (cfg.hidden_size, cfg.intermediate_size),
              "down_proj": (cfg.intermediate_size, cfg.hidden_size)}
    r, L = 4, cfg.num_hidden_layers

    def fast(zero_b: bool):
        g = torch.Generator().manual_seed(1)
        return {i: {n: qwen2.LowRank(torch.randn(r, d_in, generator=g).requires_grad_(),
                                     (torch.zeros if zero_b else torch.randn)(d_out, r).requires_grad_(),
                                     2.0)
                    for n, (d_in, d_out) in shapes.items()} for i in range(1, L)}

    def run(f):
        return model.logits(model.run_layers(model.embed(x), 0, L, fast=f))

    plain = run(None)
    assert torch.equal(run(fast(zero_b=True)), plain)  # B = 0: bit for bit the plain model
    f = fast(zero_b=False)
    out = run(f)
    # The slot computes W x + scale * B (A x): same as the model with merged weights W + scale * B A.
    merged = qwen2.from_pretrained(directory)
    with torch.no_grad():
        for i, per in f.items():
            for n, (A, B, s) in per.items():
                getattr(merged.model.layers[i].mlp, n).weight += s * B @ A
        assert report("fast weights vs merged weights", out, merged(x)) <= 1e-4
    out.square().mean().backward()
    for per in f.values():
        for lr in per.values():
            assert lr.A.grad is not None and lr.A.grad.abs().sum() > 0
            assert lr.B.grad is not None and lr.B.grad.abs().sum() > 0
    names = {*model.state_dict(), *(n for n, _ in model.named_parameters()),
             *(n for n, _ in model.named_buffers())}
    assert not any("lora" in n or "fast" in n for n in names)
    assert sum(p.numel() for p in model.parameters()) == sum(
        t.numel() for k, t in qwen2._checkpoint_keys(cfg, model.state_dict()).items())


def test_activation_checkpointing_same_gradients(tmp_path):
    directory, _ = save_hf(tmp_path)
    x = ids(2, 24)
    grads = []
    for ckpt in (False, True):
        model = qwen2.from_pretrained(directory)
        model.gradient_checkpointing = ckpt
        model(x).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_random_model_is_deterministic():
    cfg = qwen2.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    a, b = qwen2.random_model(cfg, seed=5), qwen2.random_model(cfg, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert not any(p.is_meta for p in a.parameters())
    assert qwen2.random_model(cfg, dtype="bf16").dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- config


def test_config_from_transformers_5_layout_and_back(tmp_path):
    directory, _ = save_hf(tmp_path, rope_theta=12345.0)
    raw = json.loads((directory / "config.json").read_text())
    cfg = qwen2.Qwen2Config.from_json(directory / "config.json")
    assert cfg.rope_theta == 12345.0 and cfg.rope_scaling is None and cfg.num_key_value_heads == 2
    out = cfg.to_dict()
    assert out["rope_theta"] == 12345.0 and out["model_type"] == "qwen2"
    assert "rope_parameters" not in out, raw
    assert qwen2.Qwen2Config.from_dict(out) == cfg


def write_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"use_sliding_window": True, "max_window_layers": 1, "layer_types": None}, "sliding-window"),
    ({"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "sliding-window"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "'linear' is not implemented"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "not a multiple"),
])
def test_unsupported_config_is_refused(tmp_path, changes, message):
    directory, _ = save_hf(tmp_path)
    write_config(directory, **changes)
    with pytest.raises(qwen2.CheckpointError, match=message) as e:
        qwen2.from_pretrained(directory)
    assert "config.json" in str(e.value)


def test_missing_field_and_bad_json(tmp_path):
    directory, _ = save_hf(tmp_path)
    cfg = json.loads((directory / "config.json").read_text())
    del cfg["hidden_size"]
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(qwen2.CheckpointError, match="missing required field.*hidden_size"):
        qwen2.from_pretrained(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(qwen2.CheckpointError, match="not valid JSON"):
        qwen2.from_pretrained(directory)


# ---------------------------------------------------------------------------------------------- bad input


def rewrite_weights(directory, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path):
    directory, _ = save_hf(tmp_path)

    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(7)
        t["model.extra.weight"] = torch.zeros(2)

    rewrite_weights(directory, edit)
    with pytest.raises(qwen2.CheckpointError) as e:
        qwen2.from_pretrained(directory)
    message = str(e.value)
    assert "1 missing tensor(s): model.layers.1.mlp.up_proj.weight" in message
    assert "1 unexpected tensor(s): model.extra.weight" in message
    assert "model.layers.0.self_attn.q_proj.bias [7] (expected [64])" in message
    assert "\n" not in message


def test_no_config_no_weights_not_a_dir(tmp_path):
    directory, _ = save_hf(tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(qwen2.CheckpointError, match="no model.safetensors"):
        qwen2.from_pretrained(directory)
    (directory / "config.json").unlink()
    with pytest.raises(qwen2.CheckpointError, match="no such file.*config.json"):
        qwen2.from_pretrained(directory)
    with pytest.raises(qwen2.CheckpointError, match="no such directory"):
        qwen2.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(qwen2.CheckpointError, match="no such directory"):
        qwen2.from_pretrained("./a/b/c")


def test_truncated_safetensors(tmp_path):
    directory, _ = save_hf(tmp_path)
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(qwen2.CheckpointError, match="cannot read safetensors"):
        qwen2.from_pretrained(directory)


def test_hub_id_offline_from_cache_and_uncached(tmp_path):
    """The hub path with HF_HUB_OFFLINE=1: a cached snapshot loads; an uncached id fails clearly."""
    directory, _ = save_hf(tmp_path)
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--org--tiny" / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in directory.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text(commit)
    code = ("import qwen2, sys\n"
            "m = qwen2.from_pretrained('org/tiny'); print('layers', m.config.num_hidden_layers)\n"
            "try:\n    qwen2.from_pretrained('org/absent')\n"
            "except qwen2.CheckpointError as e:\n    print('error:', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "layers 3" in out.stdout
    assert "error: org/absent: not a local directory, and the hub download failed (HF_HUB_OFFLINE" \
        in out.stdout


def test_transformers_reference_is_really_random():
    # Guard for the helpers above: biases and norms must not be at their default init values.
    model = hf_model(hf_config())
    assert model.model.layers[0].self_attn.q_proj.bias.abs().min() > 0
    assert not torch.all(model.model.norm.weight == 1)
