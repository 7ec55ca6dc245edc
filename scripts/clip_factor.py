"""How much the fast weights' outer gradients change the global gradient-norm clip (no download).

    python scripts/clip_factor.py                     # a random 8-layer Qwen2, synthetic agentic data
    python scripts/clip_factor.py --steps 20 --lr 1e-4

The authors' trainer clips the norm over all model parameters, among which are its fast weights, so
||dL_outer/dphi_K|| counts in the norm (focusft.clip_gradients does the same). This trains a small
random model with focusft.py's step and schedule, and prints per optimizer step the base weights'
gradient norm, the fast weights' outer gradient norm, and the clip factor min(1, c / norm) with and
without the latter.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import focusft  # noqa: E402
import qwen2  # noqa: E402
import synthetic  # noqa: E402
import training  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="clip_factor.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW peak lr (10%% warmup, cosine)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per synthetic conversation")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the random model")
    p.add_argument("--layers", type=int, default=8, help="decoder layers")
    p.add_argument("--seed", type=int, default=1234, help="seed")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        n = args.steps * args.grad_accum
        synthetic.write_synthetic(path, n_samples=n, n_tokens=args.tokens, seed=args.seed)
        records = [json.loads(line) for line in path.read_text().splitlines()]
        texts = [data.render_chat(r["messages"], r.get("tools")) for r in records]
        tokenizer = synthetic.train_tokenizer(texts, vocab_size=2000)
        samples, _ = data.load_samples(path, tokenizer, max_len=4096)
    config = qwen2.Qwen2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden,
                               intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    model = qwen2.random_model(config, seed=args.seed)
    optimizer = torch.optim.AdamW(focusft.param_groups(model, 0.01), lr=args.lr)
    pad = data.special_token_id(tokenizer, data.ENDOFTEXT)
    run = training.Processes()  # one process, no group
    print("step  |grad theta|  |grad phi_K|  clip factor without  with   with/without")
    ratios = []
    for step in range(args.steps):
        fast_grads = None
        for j in range(args.grad_accum):
            b = data.collate([samples[step * args.grad_accum + j]], pad)
            gen = focusft.fast_weight_generator(args.seed, 0, step * args.grad_accum + j)
            out = focusft.focusft_step(model, b["input_ids"], b["loss_mask"], b["attention_mask"], generator=gen)
            (out.loss / args.grad_accum).backward()
            fast_grads = focusft.add_fast_grads(fast_grads, out.fast)
        theta = float(torch.nn.utils.get_total_norm([q.grad for q in model.parameters()]))
        phi = float(torch.cat([g.flatten() for g in fast_grads]).norm())
        total = focusft.clip_gradients(model, fast_grads, 1.0, run)  # the trainer's clip, applied
        without, with_ = min(1.0, 1.0 / (theta + 1e-6)), min(1.0, 1.0 / (total + 1e-6))
        ratios.append(with_ / without)
        print(f"{step + 1:4d}  {theta:11.4f}  {phi:12.4f}  {without:19.4f}  {with_:.4f}  {with_ / without:.4f}")
        assert math.isclose(total, math.hypot(theta, phi), rel_tol=1e-4)
        for group in optimizer.param_groups:
            group["lr"] = focusft.lr_at(step, args.steps, args.lr, 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"clip factor with / without the fast weights' gradients: median {statistics.median(ratios):.4f}, "
          f"min {min(ratios):.4f}, max {max(ratios):.4f}")


if __name__ == "__main__":
    main()
