"""Shared test helpers: tiny random Qwen2 checkpoints built in the HF format by transformers itself."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def real_tokenizer_dir(*needed: str) -> Path | None:
    """The real Qwen2.5 tokenizer and chat template, from $QWEN_TOKENIZER_DIR only (no guessed location),
    if it holds tokenizer.json and the `needed` files."""
    if not os.environ.get("QWEN_TOKENIZER_DIR"):
        return None
    path = Path(os.environ["QWEN_TOKENIZER_DIR"])
    return path if all((path / name).is_file() for name in ("tokenizer.json", *needed)) else None


def in_ci() -> bool:
    """CI services set CI=true (.ci/run does too)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_real_tokenizer(*needed: str) -> Path:
    """The real tokenizer directory. Without it the chat-template tests cannot run: a skip with the
    reason for a developer, a failure in CI (where it is always provided, so a green run with dozens
    of skips cannot hide a broken setup)."""
    path = real_tokenizer_dir(*needed)
    if path is None:
        what = ", ".join(("tokenizer.json", *needed))
        reason = f"the real Qwen2.5 tokenizer ({what}) is absent: set QWEN_TOKENIZER_DIR"
        if in_ci():
            pytest.fail(f"{reason} (required when CI is set)", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    return require_real_tokenizer()


def hf_config(tied: bool = False, **overrides):
    """A tiny transformers Qwen2Config: 3 layers, 4 query heads over 2 KV heads (GQA)."""
    from transformers import Qwen2Config

    kw = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=1,
              eos_token_id=2)
    kw.update(overrides)
    return Qwen2Config(**kw)


def hf_model(config, seed: int = 0):
    """A transformers Qwen2ForCausalLM with every tensor random, including the q/k/v biases and norm
    weights (which a default init leaves at 0 / 1, where a bug in their use would go unseen)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def save_hf(tmp_path: Path, tied: bool = False, seed: int = 0, **overrides):
    """Save a random tiny HF checkpoint with transformers; return (directory, the HF model)."""
    model = hf_model(hf_config(tied, **overrides), seed)
    directory = tmp_path / f"hf-{'tied' if tied else 'untied'}-{seed}"
    model.save_pretrained(directory)
    return directory, model


def report(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    """Print and return the max abs difference (the mean too), so `pytest -s` shows the parity figures."""
    diff = (a.double() - b.double()).abs()
    print(f"[parity] {name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")
    return diff.max().item()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny training setup with no download: synthetic agentic data, a small byte-level BPE
    tokenizer trained on it (Qwen's special tokens), and a random 4-layer Qwen2 checkpoint with the
    tokenizer files beside it. Returns a namespace: model (dir), data (jsonl), tokenizer, root."""
    import json
    from types import SimpleNamespace

    import data
    import qwen2

    root = tmp_path_factory.mktemp("tiny")
    data.write_synthetic(root / "train.jsonl", n_samples=12, n_tokens=400, seed=0)
    records = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    tokenizer = data.train_tokenizer([data.render_chat(r["messages"], r.get("tools")) for r in records],
                                     vocab_size=500)
    config = qwen2.Qwen2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, tie_word_embeddings=True,
                               eos_token_id=tokenizer.token_to_id("<|endoftext|>"))
    qwen2.random_model(config, seed=0).save_pretrained(root / "model")
    data.save_tokenizer_files(tokenizer, root / "model")
    return SimpleNamespace(root=root, model=root / "model", data=root / "train.jsonl", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def reference(tiny, tmp_path_factory):
    """The uninterrupted training runs (test_resume.command's flags) that every interrupted run must
    reproduce bit for bit, on 1 and 2 processes: {nproc: output directory}. One per session, shared by
    test_resume.py and test_fsdp.py (which compares FSDP with the 2-process DDP run)."""
    from test_resume import REFERENCE_FLAGS, command, run

    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for nproc in (1, 2):
        out = root / f"nproc{nproc}"
        result = run(command(tiny, out, *REFERENCE_FLAGS, nproc=nproc))
        assert result.returncode == 0, result.stderr
        runs[nproc] = out
    return runs
