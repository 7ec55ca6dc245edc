"""Shared test helpers: tiny random Qwen2 checkpoints built in the HF format by transformers itself."""

import os
import subprocess
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


def cli_error(main, argv: list) -> str:
    """A script's main(argv) run in this process: the one error line it exits with ('' on success). An
    exit with a number (argparse's usage error, status 2) is not such a line, so it propagates."""
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        if isinstance(e.code, str):
            return e.code
        raise
    return ""


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


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    """The real Qwen2.5 tokenizer (tokenizer.json only), as the evaluators load it."""
    import data

    return data.load_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def qwen():
    """The real Qwen2.5 tokenizer through `tokenizers`, as data.py uses it."""
    import data

    return data.load_tokenizer(require_real_tokenizer("chat_template.jinja"))


@pytest.fixture(scope="session")
def hf():
    """The reference: transformers' tokenizer + the real jinja chat template."""
    d = require_real_tokenizer("chat_template.jinja")
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    return tok, (d / "chat_template.jinja").read_text(encoding="utf-8")


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
    import synthetic

    root = tmp_path_factory.mktemp("tiny")
    synthetic.write_synthetic(root / "train.jsonl", n_samples=12, n_tokens=400, seed=0)
    records = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    tokenizer = synthetic.train_tokenizer([data.render_chat(r["messages"], r.get("tools")) for r in records],
                                          vocab_size=500)
    config = qwen2.Qwen2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, tie_word_embeddings=True,
                               eos_token_id=tokenizer.token_to_id("<|endoftext|>"))
    qwen2.random_model(config, seed=0).save_pretrained(root / "model")
    synthetic.save_tokenizer_files(tokenizer, root / "model")
    return SimpleNamespace(root=root, model=root / "model", data=root / "train.jsonl", tokenizer=tokenizer)


def batch_of(tiny, n: int = 3, start: int = 0) -> dict:
    """Samples start..start+n-1 of the tiny data as one padded batch."""
    import data

    samples, _ = data.load_samples([tiny.data], tiny.tokenizer, max_len=4096)
    return data.collate(samples[start:start + n], pad_id=tiny.tokenizer.token_to_id("<|endoftext|>"))


def fixed_init_A(model, layers, rank, seed=0):
    """Seeded fast-weight A factors for `layers`, so two computations start from the same phi_0."""
    import focusft

    g = torch.Generator().manual_seed(seed)
    return {(i, n): torch.randn(rank, getattr(model.model.layers[i].mlp, n).weight.shape[1], generator=g) * 0.1
            for i in layers for n in focusft.TARGETS}


# ----------------------------------------------------------------------------------------------
# Training runs: focusft.py in subprocesses (torchrun for several processes) or in this process

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
STEPS = 6
# The flags of the uninterrupted reference runs (`reference`), besides command()'s: diagnostics every
# 2 steps change no weight, and make the 2-process run test_fsdp.py's DDP run too.
REFERENCE_FLAGS = ("--attn-every", "2")


def launcher(nproc: int) -> list[str]:
    # --standalone: a free port per launch, so back-to-back or parallel runs never collide
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [sys.executable]


def command(tiny, out: Path, *extra: str, nproc: int = 1, script: Path | None = None) -> list[str]:
    """The short run the resume and FSDP tests interrupt and compare: STEPS steps, a checkpoint each."""
    # --alpha 16 (scale alpha / rank = 4, not the default's 16): with the inner loop's SGD at lr 1.0 this tiny
    # model's training is then stable -- one ulp in one initial weight moves the final weights by ~1e-6 -- where at
    # scale 16 the same ulp turns step 5's grad norm from 35.6 into 17.5 (tests/test_fsdp.py compares runs).
    return launcher(nproc) + [str(script or ROOT / "focusft.py"), "--model", str(tiny.model), "--data",
                              str(tiny.data), "--out", str(out), "--max-steps", str(STEPS), "--grad-accum", "2",
                              "--lr", "1e-3", "--rank", "4", "--alpha", "16", "--ckpt-every", "1", "--keep", "3",
                              *extra]


def run(cmd, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """cmd with ENV (plus `env`), its output captured as text."""
    return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout)


def train_in_process(tiny, out, *extra) -> None:
    """One process, in this one (no interpreter start-up): focusft.main with an argv list (which puts
    pytest's SIGINT/SIGTERM handlers back when it returns)."""
    import focusft

    focusft.main(["--model", str(tiny.model), "--data", str(tiny.data), "--out", str(out), *extra])


def step_rows(out: Path) -> list[dict]:
    """The optimizer steps' rows of out/metrics.jsonl (skipped steps included; not the step-0 row)."""
    import focusft

    return [r for r in focusft.read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="session")
def reference(tiny, tmp_path_factory):
    """The uninterrupted training runs (command()'s flags) that every interrupted run must reproduce
    bit for bit, on 1 and 2 processes: {nproc: output directory}. One per session, shared by
    test_resume.py and test_fsdp.py (which compares FSDP with the 2-process DDP run)."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for nproc in (1, 2):
        out = root / f"nproc{nproc}"
        result = run(command(tiny, out, *REFERENCE_FLAGS, nproc=nproc))
        assert result.returncode == 0, result.stderr
        runs[nproc] = out
    return runs
