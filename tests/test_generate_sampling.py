"""qwen2's sampling (temperature, top-p, a seeded generator) and the multi-turn Decoder, whose KV cache
continues across a rollout's turns."""

import pytest
import torch

import qwen2


@pytest.fixture(scope="module")
def model():
    config = qwen2.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return qwen2.random_model(config, seed=1, dtype=torch.float64)  # float64: no near-ties between paths


def randint(n: int, seed: int) -> list[int]:
    return torch.randint(10, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_continuation_equals_encoding_the_whole_context(model):
    prompts = [randint(n, i) for i, n in enumerate((7, 30, 12))]
    dec = qwen2.Decoder(model)
    first = dec.extend(prompts, [6, 9, 4])
    assert [len(o) for o in first] == [6, 9, 4]
    tools = [randint(5, 10), [], randint(11, 11)]  # the middle rollout has ended: no budget
    second = dec.extend(tools, [5, 0, 8])
    assert second[1] == []
    for b in (0, 2):
        context = prompts[b] + first[b] + tools[b]
        assert second[b] == qwen2.generate(model, [context], [5, 0, 8][b])[0]
    third = dec.extend([[3], [], [4, 5]], [4, 0, 4])  # a third turn after a second extension
    context = prompts[2] + first[2] + tools[2] + second[2] + [4, 5]
    assert third[2] == qwen2.generate(model, [context], 4)[0]


def test_select_keeps_rows_and_their_caches(model):
    prompts = [randint(n, 20 + i) for i, n in enumerate((9, 4, 15))]
    full, kept = qwen2.Decoder(model), qwen2.Decoder(model)
    assert full.extend(prompts, [5] * 3) == kept.extend(prompts, [5] * 3)
    tools = [randint(3, 30), randint(6, 31), randint(2, 32)]
    expected = full.extend(tools, [4] * 3)
    kept.select([2, 0])
    assert kept.extend([tools[2], tools[0]], [4, 4]) == [expected[2], expected[0]]


def test_eos_and_per_row_budgets(model):
    prompt = randint(10, 45)
    greedy = qwen2.generate(model, [prompt], 12)[0]
    eos = greedy[7]
    assert greedy.index(eos) > 1
    out = qwen2.Decoder(model).extend([prompt, prompt], [12, 2], [eos])
    assert out[0] == greedy[:greedy.index(eos) + 1] and out[1] == greedy[:2]


def test_next_token_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log().repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(qwen2.next_token(logits, 1.0, 0.6, g), minlength=4)
    assert counts[2] == counts[3] == 0 and 0.55 < counts[0] / 4000 < 0.70  # 0.5 / 0.8 renormalised
    assert torch.equal(qwen2.next_token(logits, 1.0, 0.5, g), torch.zeros(4000, dtype=torch.long))
    counts = torch.bincount(qwen2.next_token(logits, 1.0, 1.0, g), minlength=4)
    assert counts[3] == 0 and counts[2] > 600
    assert torch.equal(qwen2.next_token(logits[:1], 0.0), torch.tensor([0]))


def test_sampling_is_seeded_and_batched(model):
    prompts = [randint(n, 50 + i) for i, n in enumerate((6, 13))]

    def sample(seed, **kw):
        return qwen2.generate(model, prompts, 20, temperature=1.0, top_p=0.6,
                              generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(0) == sample(0) == sample(0, prefill_chunk=4)
    assert sample(0) != sample(1)
    greedy = qwen2.generate(model, prompts, 20)
    assert qwen2.generate(model, prompts, 20, temperature=1.0, top_p=1e-6) == greedy  # the nucleus: one token
    assert sample(0) != greedy
