"""The attention diagnostics (paper sections 2.2 and 4.4) pinned to expected values: by hand where the
attention is uniform, and against transformers' eager attention probabilities otherwise.

Only the public `focusft.attention_diagnostics` is used; its inputs are what the trainer passes
(ids, loss mask, attention mask, the training mask or None for causal, optional fast weights)."""

from fractions import Fraction

import pytest
import torch
from conftest import hf_config, hf_model

import focusft
import qwen2

SINK = 5  # the paper's sink: the first five tokens


def diagnostics(model, ids, loss_mask, attention_mask, causal, fast=None) -> dict[str, float]:
    mask = None if causal else focusft.hybrid_mask(loss_mask, attention_mask)
    return focusft.attention_diagnostics(model, ids, loss_mask, attention_mask, mask, fast)


def as_batch(*rows: tuple[list[int], list[int]], vocab: int = 211, seed: int = 0):
    """(loss_mask, n_real) rows -> right-padded ids, loss mask, attention mask (B, S)."""
    S = max(len(lm) for lm, _ in rows)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(rows), S), generator=g)
    lm = torch.zeros(len(rows), S, dtype=torch.long)
    am = torch.zeros(len(rows), S, dtype=torch.long)
    for b, (loss_mask, n_real) in enumerate(rows):
        lm[b, :len(loss_mask)] = torch.tensor(loss_mask)
        am[b, :n_real] = 1
    lm *= am
    return ids.masked_fill(am == 0, 0), lm, am


# Context (8) | response (3) | context (4) | response (2): 17 tokens, 5 response queries.
LONG = [0] * 8 + [1] * 3 + [0] * 4 + [1] * 2
# Context (7) | response (3) | context (2) | response (2): 14 tokens, also 5 response queries.
SHORT = [0] * 7 + [1] * 3 + [0] * 2 + [1] * 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random HF checkpoint (3 layers, 4 query heads over 2 KV heads, random q/k/v biases),
    its queries scaled up so the attention is far from uniform (a wrong score shows)."""
    model = hf_model(hf_config())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20.0)
            layer.self_attn.q_proj.bias.mul_(20.0)
    directory = tmp_path_factory.mktemp("diag") / "checkpoint"
    model.save_pretrained(directory)
    return directory


def uniform_model(directory):
    """q = 0 in every layer (weights and bias): every score is 0, so each query attends uniformly
    to the keys its mask row allows, whatever RoPE, GQA and the hidden states do."""
    model = qwen2.from_pretrained(directory)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.q_proj.bias.zero_()
    return model


def by_hand_uniform(loss_mask: list[int]) -> tuple[Fraction, Fraction]:
    """Response query i sees keys 0..i (earlier turns whole, its own turn causally): 1/(i+1) each.
    Sink: the first 5 of them; engagement: the other context keys among them."""
    sink, content, queries = Fraction(0), Fraction(0), 0
    for i, is_response in enumerate(loss_mask):
        if not is_response:
            continue
        seen = i + 1
        sink += Fraction(min(SINK, seen), seen)
        content += Fraction(sum(1 for j in range(SINK, seen) if loss_mask[j] == 0), seen)
        queries += 1
    return sink / queries, content / queries


def test_by_hand_expected_values_are_what_the_paper_defines():
    # The hand formula itself, on LONG: queries 8, 9, 10 see 9, 10, 11 keys with 3 content keys
    # (5, 6, 7); queries 15, 16 see 16, 17 keys with 7 content keys (5-7 and 11-14).
    sink, content = by_hand_uniform(LONG)
    assert sink == (Fraction(5, 9) + Fraction(5, 10) + Fraction(5, 11) + Fraction(5, 16) + Fraction(5, 17)) / 5
    assert content == (Fraction(3, 9) + Fraction(3, 10) + Fraction(3, 11) + Fraction(7, 16) + Fraction(7, 17)) / 5


@pytest.mark.parametrize("causal", [False, True], ids=["hybrid", "causal"])
def test_uniform_attention_gives_the_hand_computed_masses(checkpoint, causal):
    model = uniform_model(checkpoint)
    ids, lm, am = as_batch((LONG, len(LONG)))
    got = diagnostics(model, ids, lm, am, causal)
    sink, content = by_hand_uniform(LONG)
    print(f"[diagnostics] uniform: sink {got['sink_mass']:.6f} (by hand {float(sink):.6f}), "
          f"engagement {got['context_engagement']:.6f} (by hand {float(content):.6f})")
    assert got["sink_mass"] == pytest.approx(float(sink), abs=1e-6)
    assert got["context_engagement"] == pytest.approx(float(content), abs=1e-6)


def test_uniform_attention_ignores_padding(checkpoint):
    """A right-padded row: padding keys are never attended, padding queries never counted. Both rows
    have 5 response queries, so the batch value is the mean of the rows' whatever the weighting."""
    model = uniform_model(checkpoint)
    ids, lm, am = as_batch((LONG, len(LONG)), (SHORT + [0] * 3, len(SHORT)))
    got = diagnostics(model, ids, lm, am, causal=False)
    (s1, c1), (s2, c2) = by_hand_uniform(LONG), by_hand_uniform(SHORT)
    assert got["sink_mass"] == pytest.approx(float((s1 + s2) / 2), abs=1e-6)
    assert got["context_engagement"] == pytest.approx(float((c1 + c2) / 2), abs=1e-6)


# ---------------------------------------------------------------------------------------------- vs transformers


def eager_reference(directory, ids, loss_mask, attention_mask, causal, state=None) -> dict[str, float]:
    """transformers' eager attention probabilities, summed over the sink and content keys for each
    response query, averaged over heads, queries and layers; one sample at a time on its real tokens."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    if state is not None:
        ref.load_state_dict(state)
    per_sample = []
    for b in range(ids.shape[0]):
        n = int(attention_mask[b].sum())
        x, lm = ids[b:b + 1, :n], loss_mask[b:b + 1, :n]
        kw = {}
        if not causal:  # a custom 4D additive mask is used by transformers as given
            allowed = focusft.hybrid_mask(lm, torch.ones_like(lm))
            kw["attention_mask"] = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        with torch.no_grad():
            attentions = ref(x, output_attentions=True, **kw).attentions  # L x (1, H, n, n)
        rows = lm[0].bool()
        content = (lm[0] == 0) & (torch.arange(n) >= SINK)
        sink = torch.stack([a[0][:, rows][..., :SINK].sum(-1).mean() for a in attentions]).mean()
        engaged = torch.stack([a[0][:, rows][..., content].sum(-1).mean() for a in attentions]).mean()
        per_sample.append((sink.item(), engaged.item(), int(rows.sum())))
    assert len({q for _, _, q in per_sample}) == 1  # equal query counts: any weighting of samples agrees
    return {"sink_mass": sum(s for s, _, _ in per_sample) / len(per_sample),
            "context_engagement": sum(c for _, c, _ in per_sample) / len(per_sample)}


@pytest.mark.parametrize("causal", [False, True], ids=["hybrid", "causal"])
def test_matches_transformers_eager_attention(checkpoint, causal):
    """Real (non-uniform) attention: RoPE at the right positions, KV head g serving query heads
    g*n_rep .. (g+1)*n_rep-1, the training mask's rows for the response queries, padding left out."""
    model = qwen2.from_pretrained(checkpoint)
    ids, lm, am = as_batch((LONG, len(LONG)), (SHORT + [0] * 3, len(SHORT)))
    got = diagnostics(model, ids, lm, am, causal)
    want = eager_reference(checkpoint, ids, lm, am, causal)
    print(f"[diagnostics] {'causal' if causal else 'hybrid'}: ours {got}, transformers eager {want}")
    # far from uniform, so the comparison says something about the scores
    uniform = (by_hand_uniform(LONG)[1] + by_hand_uniform(SHORT)[1]) / 2
    assert abs(got["context_engagement"] - float(uniform)) > 0.02
    assert got["sink_mass"] == pytest.approx(want["sink_mass"], abs=1e-6)
    assert got["context_engagement"] == pytest.approx(want["context_engagement"], abs=1e-6)


def test_fast_weights_are_those_of_the_merged_model(checkpoint):
    """With fast weights the diagnostics are those of the model whose FFN weights are W + s * B A
    (checked against transformers' eager attention of that merged model)."""
    model = qwen2.from_pretrained(checkpoint)
    g = torch.Generator().manual_seed(1)
    fast, state = {}, {k: v.clone() for k, v in model.state_dict().items()}
    for i in (1, 2):  # layer 1's FFN feeds layer 2's attention
        fast[i] = {}
        for name in focusft.TARGETS:
            W = getattr(model.model.layers[i].mlp, name).weight
            A = torch.randn(4, W.shape[1], generator=g) * 0.3
            B = torch.randn(W.shape[0], 4, generator=g) * 0.3
            fast[i][name] = qwen2.LowRank(A, B, 2.0)
            state[f"model.layers.{i}.mlp.{name}.weight"] = W.detach() + 2.0 * B @ A
    ids, lm, am = as_batch((LONG, len(LONG)))
    got = diagnostics(model, ids, lm, am, causal=False, fast=fast)
    base = diagnostics(model, ids, lm, am, causal=False)
    want = eager_reference(checkpoint, ids, lm, am, causal=False, state=state)
    assert abs(got["sink_mass"] - base["sink_mass"]) > 1e-4  # the fast weights do change the attention
    assert got["sink_mass"] == pytest.approx(want["sink_mass"], abs=1e-6)
    assert got["context_engagement"] == pytest.approx(want["context_engagement"], abs=1e-6)
