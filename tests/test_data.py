"""Tests for data.py: Qwen2.5 chat rendering and tokenization against the real template and tokenizer,
loss masks, loading and validation, batching and sharding, the small tokenizer (synthetic.train_tokenizer),
generated data through the loader, the command line. The generators themselves: test_synthetic.py."""

import json
import pickle
import random
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from conftest import real_tokenizer_dir, require_real_tokenizer

import data
import synthetic

REPO = Path(__file__).resolve().parent.parent


def _need_qwen() -> Path:
    return require_real_tokenizer("chat_template.jinja")  # a skip for a developer, a failure in CI


def hf_text(hf, messages, tools=None, gen=False) -> str:
    tok, template = hf
    return tok.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=gen
    )


def hf_ids(hf, messages, tools=None, gen=False) -> list[int]:
    tok, template = hf
    out = tok.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=True, add_generation_prompt=gen
    )
    # transformers 5 returns a BatchEncoding (a mapping) by default; 4.x returned the list itself.
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


# ----------------------------------------------------------------------------------------------------
# Conversations covering what Qwen2.5's template supports

TOOLS = [
    {"type": "function", "function": {
        "name": "python", "description": "Run code. Returns <stdout> & 'stderr' — café ☕",
        "parameters": {"type": "object", "required": ["code"], "properties": {
            "code": {"type": "string"}, "timeout": {"type": "number", "default": 1.5}}},
    }},
    {"type": "function", "function": {"name": "read_log", "parameters": {"zeta": 1, "alpha": [True, None]}}},
]


def call(name, arguments, wrapped=True, **extra):
    fn = {"name": name, "arguments": arguments}
    return {"type": "function", "function": fn, **extra} if wrapped else fn


CONVERSATIONS = {
    "no_system": ([
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ], None),
    "system": ([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ], None),
    "tools_with_system": ([
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Run something."},
        {"role": "assistant", "content": "No need."},
    ], TOOLS),
    "tools_default_system": ([
        {"role": "user", "content": "Run something."},
        {"role": "assistant", "content": "Fine."},
    ], TOOLS),
    "tool_call_without_content": ([
        {"role": "user", "content": "Compute 3*7."},
        {"role": "assistant", "tool_calls": [call("python", {"code": "print(3*7)"}, id="call_1")]},
        {"role": "tool", "content": "21", "tool_call_id": "call_1", "name": "python"},
        {"role": "assistant", "content": "21"},
    ], TOOLS),
    "tool_call_with_content": ([
        {"role": "user", "content": "Compute 3*7."},
        {"role": "assistant", "content": "Let me run it.",
         "tool_calls": [call("python", {"code": "print(3*7)"})]},
        {"role": "tool", "content": "21"},
        {"role": "assistant", "content": "It is 21."},
    ], TOOLS),
    "tool_call_content_none": ([  # OpenAI style: "content": null next to tool_calls
        {"role": "user", "content": "Compute."},
        {"role": "assistant", "content": None, "tool_calls": [call("python", {"code": "1"})]},
        {"role": "tool", "content": "1"},
        {"role": "assistant", "content": "1"},
    ], TOOLS),
    "several_calls_consecutive_tools": ([
        {"role": "system", "content": "Be quick."},
        {"role": "user", "content": "Read both parts."},
        {"role": "assistant", "tool_calls": [
            call("read_log", {"path": "a.log", "part": 1}),
            call("read_log", {"part": 2, "path": "a.log"}, wrapped=False),
            call("python", {"code": "x = {'k': [1, 2.5, None, True]}\nprint(x)"}),
        ]},
        {"role": "tool", "content": "part one"},
        {"role": "tool", "content": "part two", "name": "read_log"},
        {"role": "tool", "content": "{'k': [1, 2.5, None, True]}"},
        {"role": "assistant", "content": "Done."},
    ], TOOLS),
    "tool_call_unwrapped": ([
        {"role": "user", "content": "Go."},
        {"role": "assistant", "tool_calls": [call("python", {"code": "pass"}, wrapped=False)]},
        {"role": "tool", "content": ""},
        {"role": "assistant", "content": "Nothing printed."},
    ], None),
    "many_turns_system_later": ([
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "1"},
        {"role": "user", "content": "two"}, {"role": "assistant", "content": "2"},
        {"role": "system", "content": "Now answer in words."},
        {"role": "user", "content": "three"}, {"role": "assistant", "content": "three"},
        {"role": "user", "content": "four"}, {"role": "assistant", "content": "four"},
        {"role": "assistant", "content": "and five"},
        {"role": "user", "content": "six\n"}, {"role": "assistant", "content": "six  "},
    ], None),
    "unicode_emoji": ([
        {"role": "system", "content": "Réponds en français. 日本語も可。"},
        {"role": "user", "content": "Grüße aus Köln 👋🏽 — naïve café, 🧑‍💻, العربية, \u00a0nbsp, tab\there"},
        {"role": "assistant", "content": "Bonjour ! 😀 Ça va ? «ok» ½ ∑",
         "tool_calls": [call("python", {"code": "print('é', \"<b>&'\")", "ключ": "значение 🎉"})]},
        {"role": "tool", "content": "é <b>&'\n🎉"},
        {"role": "assistant", "content": "Voilà 🎉"},
    ], TOOLS),
    "empty_content": ([
        {"role": "system", "content": ""},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "", "tool_calls": [call("python", {})]},
        {"role": "tool", "content": ""},
        {"role": "assistant", "content": ""},
    ], TOOLS),
    "whitespace_edges": ([
        {"role": "user", "content": "  leading spaces and trailing newline\n\n"},
        {"role": "assistant", "content": " starts with a space\n  and ends with spaces   "},
        {"role": "user", "content": "\n"},
        {"role": "assistant", "content": "Sure:\n\n```python\nprint(1)\n```\n"},
    ], None),
    "inline_tool_call_text": ([  # Qwen's raw format written into content by hand
        {"role": "user", "content": "Call it."},
        {"role": "assistant", "content": '<tool_call>\n{"name": "python", "arguments": {}}\n</tool_call>'},
        {"role": "user", "content": "<tool_response>\nok\n</tool_response>"},
        {"role": "assistant", "content": "ok"},
    ], TOOLS),
    "ends_with_tool": ([  # an evaluation prompt: the model answers after the tool output
        {"role": "user", "content": "Read it."},
        {"role": "assistant", "tool_calls": [call("read_log", {"path": "x", "part": 1})]},
        {"role": "tool", "content": "text"},
    ], TOOLS),
    "ends_with_user": ([{"role": "user", "content": "Question?"}], None),
    "tool_first": ([{"role": "tool", "content": "orphan"}, {"role": "user", "content": "?"}], []),
}


@pytest.mark.parametrize("gen", [False, True], ids=["plain", "generation_prompt"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_matches_qwen_template(hf, name, gen):
    messages, tools = CONVERSATIONS[name]
    assert data.render_chat(messages, tools, add_generation_prompt=gen) == hf_text(hf, messages, tools, gen)


@pytest.mark.parametrize("gen", [False, True], ids=["plain", "generation_prompt"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_ids_match_qwen_template(qwen, hf, name, gen):
    messages, tools = CONVERSATIONS[name]
    expected = hf_ids(hf, messages, tools, gen)
    if gen:
        ids = qwen.encode(data.render_chat(messages, tools, True), add_special_tokens=False).ids
    else:
        ids, mask = data.encode_chat(qwen, messages, tools)
        assert len(mask) == len(ids)
    assert ids == expected


def test_tojson_matches_transformers_not_jinja(hf):
    # transformers' tojson keeps key order, non-ASCII and < > & ' as they are; jinja's own would not.
    messages, tools = CONVERSATIONS["unicode_emoji"]
    text = data.render_chat(messages, tools)
    assert '{"zeta": 1, "alpha": [true, null]}' in text
    assert "<stdout> & 'stderr' — café ☕" in text
    assert '"ключ": "значение 🎉"' in text
    assert text == hf_text(hf, messages, tools)


def test_string_arguments_are_parsed_before_rendering(qwen, hf):
    as_object = [{"role": "user", "content": "x"},
                 {"role": "assistant", "tool_calls": [call("python", {"code": "print('é')", "n": 2})]}]
    as_string = [{"role": "user", "content": "x"},
                 {"role": "assistant", "tool_calls": [call("python", '{"code": "print(\'é\')", "n": 2}')]}]
    text = data.render_chat(as_string)
    assert text == hf_text(hf, as_object)
    assert text != hf_text(hf, as_string)  # the template itself would quote the string a second time
    assert '"arguments": {"code": "print(\'é\')", "n": 2}' in text
    assert data.encode_chat(qwen, as_string)[0] == hf_ids(hf, as_object)


@pytest.mark.parametrize("arguments", ['{"code": ', "print(1)", "[1, 2]", "42", None, ["a"]])
def test_bad_arguments_cannot_be_rendered(arguments):
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [call("python", arguments)]}]
    with pytest.raises(ValueError, match="arguments"):
        data.render_chat(messages)


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "robot", "content": "x"}],
    [{"role": "user", "content": ["part"]}],
    [{"role": "user"}],
    [{"role": "user", "content": "x"}, {"role": "assistant"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"arguments": {}}]}],
])
def test_unrenderable_conversations_raise_value_error(messages):
    with pytest.raises(ValueError, match="cannot render"):
        data.render_chat(messages)


# ----------------------------------------------------------------------------------------------------
# Loss masks


def runs(ids, mask):
    """The token runs with mask 1, as lists of ids."""
    out, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_loss_mask_hand_checked_ids(qwen):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, mask = data.encode_chat(qwen, messages)
    start, end, nl = qwen.token_to_id("<|im_start|>"), qwen.token_to_id("<|im_end|>"), qwen.encode("\n").ids
    assistant, hello = qwen.encode("assistant").ids, qwen.encode("Hello").ids
    assert [start, *assistant, *nl, *hello, end, *nl] == ids[-6:]
    assert mask == [0] * (len(ids) - 3) + [1, 1, 1]  # "Hello", <|im_end|>, "\n"; never the header


def test_loss_mask_covers_exactly_the_assistant_spans(qwen):
    messages, tools = CONVERSATIONS["several_calls_consecutive_tools"]
    ids, mask = data.encode_chat(qwen, messages, tools)
    decoded = [qwen.decode(r, skip_special_tokens=False) for r in runs(ids, mask)]
    assert decoded == [
        '<tool_call>\n{"name": "read_log", "arguments": {"path": "a.log", "part": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "read_log", "arguments": {"part": 2, "path": "a.log"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "python", "arguments": '
        '{"code": "x = {\'k\': [1, 2.5, None, True]}\\nprint(x)"}}\n</tool_call><|im_end|>\n',
        "Done.<|im_end|>\n",
    ]
    messages, tools = CONVERSATIONS["tool_call_with_content"]
    ids, mask = data.encode_chat(qwen, messages, tools)
    decoded = [qwen.decode(r, skip_special_tokens=False) for r in runs(ids, mask)]
    assert decoded == [
        'Let me run it.\n<tool_call>\n{"name": "python", "arguments": {"code": "print(3*7)"}}\n'
        "</tool_call><|im_end|>\n",
        "It is 21.<|im_end|>\n",
    ]


@pytest.mark.parametrize("name", [n for n in CONVERSATIONS if n not in ("tool_first", "ends_with_user")])
def test_loss_mask_runs_are_the_assistant_turns(qwen, name):
    # Each run of 1s is one assistant turn: everything after "<|im_start|>assistant\n" up to and including
    # its <|im_end|> and the "\n" after it; the header and all other turns are 0.
    messages, tools = CONVERSATIONS[name]
    ids, mask = data.encode_chat(qwen, messages, tools)
    text = data.render_chat(messages, tools)
    turns = re.findall(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)", text, flags=re.S)
    assert [qwen.decode(r, skip_special_tokens=False) for r in runs(ids, mask)] == turns
    end, offsets = qwen.token_to_id("<|im_end|>"), qwen.encode(text).offsets
    for t in range(len(ids)):  # every <|im_end|> of an assistant turn is trained on, no other
        if ids[t] == end:
            turn = text[: offsets[t][0]].rsplit("<|im_start|>", 1)[1]
            assert mask[t] == turn.startswith("assistant")


def test_leading_newlines_are_not_merged_into_the_header(qwen):
    # Encoded whole, "assistant\n" + "\n\nHi" gives "\n\n\n" as one token straddling the header, which no
    # generation after the header produces. The body is tokenized on its own (as the authors do):
    # the header's "\n", then "\n\n" as the body's first, trained, token.
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\n\nHi"}]
    ids, mask = data.encode_chat(qwen, messages)
    assert [qwen.decode(r, skip_special_tokens=False) for r in runs(ids, mask)] == ["\n\nHi<|im_end|>\n"]
    assert [qwen.id_to_token(i) for i in ids[-6:-3]] == ["assistant", "Ċ", "ĊĊ"] and mask[-6:-3] == [0, 0, 1]
    whole = qwen.encode(data.render_chat(messages), add_special_tokens=False).ids
    assert "ĊĊĊ" in [qwen.id_to_token(i) for i in whole] and whole != ids


# ----------------------------------------------------------------------------------------------------
# The small tokenizer


@pytest.fixture(scope="module")
def small():
    """synthetic.train_tokenizer's byte-level BPE, trained on synthetic conversations (fast, no files)."""
    rng = random.Random(0)
    texts = [data.render_chat(*synthetic.synthetic_conversation(rng, 600, synthetic.estimate_tokens).values())
             for _ in range(40)]
    texts += [data.render_chat(m, t) for m, t in CONVERSATIONS.values()]
    return synthetic.train_tokenizer(texts, vocab_size=2000)


@pytest.fixture(scope="module")
def small_dir(small, tmp_path_factory):
    d = tmp_path_factory.mktemp("small_tokenizer")
    synthetic.save_tokenizer_files(small, d)
    return d


def test_small_tokenizer_has_qwen_added_tokens(small):
    real = json.loads((_need_qwen() / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    added = sorted(small.get_added_tokens_decoder().items())
    assert [(t.content, t.special) for _, t in added] == [(t["content"], t["special"]) for t in real]
    ids = [i for i, _ in added]
    assert ids == list(range(ids[0], ids[0] + len(ids))) and ids[-1] == small.get_vocab_size() - 1


@pytest.mark.parametrize("text", [
    "plain ascii text", "Grüße 👋🏽 日本語 🧑‍💻 العربية", "  \n\n\ttabs  and   spaces \r\n",
    "<|im_start|>user\nhi<|im_end|>", "x" * 300, "digits 1234567890 and ½ ∑ ∞",
])
def test_small_tokenizer_round_trips(small, text):
    assert small.decode(small.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("name", [
    "system", "several_calls_consecutive_tools", "unicode_emoji", "empty_content", "whitespace_edges",
])
def test_small_tokenizer_gives_the_same_structure_as_qwen(qwen, small, name):
    messages, tools = CONVERSATIONS[name]
    structure = {}
    for key, tok in (("qwen", qwen), ("small", small)):
        ids, mask = data.encode_chat(tok, messages, tools)
        added = {tok.token_to_id(c) for c, _ in synthetic.QWEN_ADDED_TOKENS}
        structure[key] = (
            [tok.id_to_token(i) for i in ids if i in added],  # the control tokens, each a single token
            [tok.decode(r, skip_special_tokens=False) for r in runs(ids, mask)],  # the trained text
            tok.decode(ids, skip_special_tokens=False),
        )
    assert structure["small"] == structure["qwen"]
    assert structure["small"][0].count("<|im_start|>") == structure["small"][2].count("<|im_start|>") > 0


def test_saved_small_tokenizer_loads_in_transformers(small, small_dir):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(small_dir))
    assert auto.eos_token == "<|im_end|>" and auto.eos_token_id == small.token_to_id("<|im_end|>")
    assert auto.pad_token == "<|endoftext|>" and auto.pad_token_id == small.token_to_id("<|endoftext|>")
    text = data.render_chat(*CONVERSATIONS["unicode_emoji"])
    assert auto(text, add_special_tokens=False)["input_ids"] == small.encode(text).ids
    assert "chat_template" not in json.loads((small_dir / "tokenizer_config.json").read_text())


# ----------------------------------------------------------------------------------------------------
# Loading, validation, statistics


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n"
                            for x in lines), encoding="utf-8")
    return path


def record(name):
    messages, tools = CONVERSATIONS[name]
    return {"messages": messages, "tools": tools} if tools else {"messages": messages}


def test_load_samples_tokenizes_like_encode_chat(small, tmp_path):
    names = ["system", "tool_call_content_none", "several_calls_consecutive_tools", "unicode_emoji"]
    path = write_jsonl(tmp_path / "d.jsonl", [record(names[0]), "", "   ", *map(record, names[1:])])
    samples, stats = data.load_samples([path], small, max_len=4096)
    assert [s.source for s in samples] == [f"{path}:1", f"{path}:4", f"{path}:5", f"{path}:6"]
    for s, name in zip(samples, names, strict=True):
        assert (s.input_ids, s.loss_mask) == data.encode_chat(small, *CONVERSATIONS[name])
    lengths = sorted(len(s) for s in samples)
    assert (stats.n_read, stats.n_bad, stats.n_truncated, stats.n_dropped, stats.n_samples) == (4, 0, 0, 0, 4)
    assert (stats.length_min, stats.length_max, stats.length_median) == (lengths[0], lengths[-1], lengths[1])
    assert stats.n_target_tokens == sum(sum(s.loss_mask) for s in samples)


def test_truncation_and_dropping_are_counted(small, tmp_path):
    long_text = " ".join(f"word{i}" for i in range(400))
    def chat(question, answer):
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    short, answer_early, answer_late = chat("hi", "hello"), chat("hi", long_text), chat(long_text, "ok")
    path = write_jsonl(tmp_path / "d.jsonl", [short, answer_early, answer_late, short])
    max_len = 120
    assert len(data.encode_chat(small, short["messages"])[0]) < max_len
    samples, stats = data.load_samples(path, small, max_len=max_len)
    assert (stats.n_read, stats.n_truncated, stats.n_dropped, stats.n_samples) == (4, 2, 1, 3)
    assert [s.source.rsplit(":", 1)[1] for s in samples] == ["1", "2", "4"]
    full_ids, full_mask = data.encode_chat(small, answer_early["messages"])
    assert (samples[1].input_ids, samples[1].loss_mask) == (full_ids[:max_len], full_mask[:max_len])
    assert stats.length_max == max_len and stats.length_max_before_truncation > max_len
    summary = stats.summary()
    for needle in ("4 records read", "truncated to 120 tokens: 2", "dropped with no response token left: 1",
                   f"min {stats.length_min} /", f"p95 {stats.length_p95} /", "max 120"):
        assert needle in summary


def test_percentiles():
    assert data._percentile([1, 2, 3, 4], 0.5) == 2
    assert data._percentile(list(range(1, 101)), 0.95) == 95
    assert data._percentile([7], 0.95) == 7


# (line content, expected reason) for every class of bad record; line numbers are checked too.
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_LINES = [
    ('{"messages": [', "invalid JSON"),
    ("[1, 2]", "not a JSON object"),
    ({"conversation": []}, "no 'messages'"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "robot", "content": "x"}, GOOD["messages"][1]]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 42}, GOOD["messages"][1]]}, "content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}, GOOD["messages"][1]]},
     "content must be a string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
     "assistant message with neither content nor tool calls"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": []}]},
     "assistant message with neither content nor tool calls"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}, GOOD["messages"][1]]},
     "tool message with no tool call before it"),
    ({"messages": [{"role": "user", "content": "x"}]}, "without any assistant message"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
     "tool call without a name"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "tool_calls": [call("f", "{not json")]}]},
     "string that is not JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call("f", [1])]}]},
     "arguments must be a JSON object"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a<|im_end|>b"}]},
     "special token <|im_end|>"),
    ({"messages": GOOD["messages"], "tools": {"name": "f"}}, "'tools' must be a list"),
    ({"messages": [{"role": "user"}, GOOD["messages"][1]]}, "without content"),
    ({"messages": "hello"}, "'messages' must be a list"),
]


@pytest.fixture
def bad_file(tmp_path):
    # good, then each bad class, with a good record between each: bad record k sits on line 2k + 2
    lines = [GOOD]
    for line, _ in BAD_LINES:
        lines += [line, GOOD]
    return write_jsonl(tmp_path / "bad.jsonl", lines)


def test_every_bad_record_class_is_reported_with_its_line(small, bad_file):
    with pytest.raises(data.DataError) as err:
        data.load_samples(bad_file, small)
    problems = err.value.problems
    for k, (_, reason) in enumerate(BAD_LINES):
        prefix = f"{bad_file}:{2 * k + 2}: "
        mine = [p for p in problems if p.startswith(prefix)]
        assert mine and any(reason in p for p in mine), (prefix, reason, mine)
    assert all(re.match(rf"{re.escape(str(bad_file))}:\d+: ", p) for p in problems)
    good_lines = {2 * k + 1 for k in range(len(BAD_LINES) + 1)}
    assert not any(int(p.split(":")[1]) in good_lines for p in problems)


def test_skip_bad_skips_and_counts(small, bad_file):
    samples, stats = data.load_samples(bad_file, small, skip_bad=True)
    n = len(BAD_LINES)
    assert (stats.n_read, stats.n_bad, stats.n_samples) == (2 * n + 1, n, n + 1)
    assert [s.source for s in samples] == [f"{bad_file}:{2 * k + 1}" for k in range(n + 1)]
    assert f"{n} bad skipped" in stats.summary()


def test_file_problems_always_stop(small, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    missing = tmp_path / "missing.jsonl"
    for skip in (False, True):
        with pytest.raises(data.DataError) as err:
            data.load_samples([good, missing, empty], small, skip_bad=skip)
        assert err.value.problems == [f"{missing}: file does not exist",
                                      f"{empty}: file is empty (no records)"]


def test_nothing_usable_is_an_error(small, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(data.DataError, match="no usable samples"):
        data.load_samples(path, small, skip_bad=True)


def test_data_error_message_shows_twenty_then_a_count():
    err = data.DataError([f"f.jsonl:{i}: bad" for i in range(1, 26)])
    lines = str(err).splitlines()
    assert lines[0] == "25 problems in the data:"
    assert lines[1:21] == [f"f.jsonl:{i}: bad" for i in range(1, 21)]
    assert lines[21:] == ["... and 5 more"]
    assert len(err.problems) == 25
    assert str(data.DataError(["a:1: x"])) == "a:1: x"  # one problem, one line
    assert pickle.loads(pickle.dumps(err)).problems == err.problems  # crosses process boundaries intact


def test_invalid_utf8_and_bom(small, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(data.DataError) as err:
        data.load_samples(path, small)
    assert err.value.problems == [f"{path}:2: line is not valid UTF-8 (byte 14)"]


def string_arguments(tool_call):
    fn = tool_call.get("function", tool_call)
    return {"type": "function", "function": {"name": fn["name"], "arguments": json.dumps(fn["arguments"])}}


def test_parquet_input(small, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    # Parquet datasets usually store arguments as JSON strings; structs get null for absent keys.
    rows = []
    names = ["system", "tool_call_without_content", "several_calls_consecutive_tools", "unicode_emoji"]
    for name in names:
        messages, tools = CONVERSATIONS[name]
        messages = [dict(m, tool_calls=[string_arguments(c) for c in m["tool_calls"]]) if "tool_calls" in m
                    else m for m in messages]
        rows.append({"messages": messages, "tools": json.dumps(tools) if tools else None})
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    # Tools as structs too: the union schema adds null fields to each tool, which must not be rendered.
    structs = tmp_path / "structs.parquet"
    pq.write_table(pa.Table.from_pylist([dict(r, tools=json.loads(r["tools"]) if r["tools"] else None)
                                         for r in rows]), structs)
    jsonl = write_jsonl(tmp_path / "d.jsonl", [record(n) for n in names])
    reference, _ = data.load_samples(jsonl, small)
    for file in (path, structs):
        samples, stats = data.load_samples(file, small)
        pairs = [(s.input_ids, s.loss_mask) for s in samples]
        assert pairs == [(r.input_ids, r.loss_mask) for r in reference]
        assert [s.source for s in samples] == [f"{file}:{i}" for i in range(1, 5)] and stats.n_read == 4

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"messages": [{"role": "robot", "content": "x"}]}, GOOD]), bad)
    with pytest.raises(data.DataError) as err:
        data.load_samples(bad, small)
    assert [p.split(": ", 1)[0] for p in err.value.problems] == [f"{bad}:2", f"{bad}:2"]
    no_messages = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "x"}]), no_messages)
    with pytest.raises(data.DataError, match="no 'messages' column"):
        data.load_samples(no_messages, small)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(data.DataError, match="not a readable parquet file"):
        data.load_samples(broken, small)


def test_load_checks_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(ValueError, match="no <|im_start|> token"):
        data.load_samples(path, Tokenizer(models.BPE()))


def test_turn_markers_must_be_special_tokens(small, tmp_path):
    """A tokenizer that has <|im_end|> as an ordinary added token would let a message's text forge a turn."""
    weak = data.load_tokenizer(small_dir_of(small, tmp_path))
    assert data.load_samples(write_jsonl(tmp_path / "d.jsonl", [GOOD]), weak)[0]
    as_json = json.loads(weak.to_str())
    for token in as_json["added_tokens"]:
        token["special"] = token["special"] and token["content"] != data.IM_END
    (tmp_path / "weak.json").write_text(json.dumps(as_json))
    with pytest.raises(data.DataError, match="no special <\\|im_end\\|> token"):
        data.load_samples(tmp_path / "d.jsonl", data.load_tokenizer(tmp_path / "weak.json"))


def small_dir_of(tokenizer, tmp_path: Path) -> Path:
    synthetic.save_tokenizer_files(tokenizer, tmp_path / "tok")
    return tmp_path / "tok"


SMOLLM_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}")
NO_DEFAULT_TEMPLATE = ("{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + "
                       "'<|im_end|>\\n' }}{%- endif %}")


def test_default_system_prompt_comes_from_the_checkpoints_template(tmp_path):
    def checkpoint(name: str, template=None, jinja: str | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer_config.json").write_text(json.dumps({} if template is None else {"chat_template": template}))
        if jinja is not None:
            (d / "chat_template.jinja").write_text(jinja)
        return d

    smollm = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert data.default_system(checkpoint("smollm", SMOLLM_TEMPLATE)) == smollm
    assert data.default_system(checkpoint("none")) == data.DEFAULT_SYSTEM  # no template: Qwen2.5's format
    assert data.default_system(checkpoint("jinja", jinja=SMOLLM_TEMPLATE)) == smollm
    assert data.default_system(checkpoint("named", [{"name": "default", "template": SMOLLM_TEMPLATE}])) == smollm
    assert data.default_system(checkpoint("qwen3-like", NO_DEFAULT_TEMPLATE)) is None
    if (qwen := real_tokenizer_dir("chat_template.jinja")) is not None:  # Qwen2.5's own, "\n" escaped
        assert data.default_system(qwen) == data.DEFAULT_SYSTEM
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(data.DataError, match="tokenizer_config.json: not a valid JSON object"):
        data.default_system(tmp_path / "broken")


def test_render_with_another_default_system_or_none():
    user = [{"role": "user", "content": "Hi"}]
    assert data.render_chat(user, default_system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert data.render_chat(user, default_system=None) == "<|im_start|>user\nHi<|im_end|>\n"
    with_tools = data.render_chat(user, TOOLS, default_system=None)
    assert with_tools.startswith("<|im_start|>system\n# Tools\n\nYou may call")
    given = [{"role": "system", "content": "Mine."}, *user]  # a conversation's own system message wins
    assert data.render_chat(given, default_system="Be brief.") == data.render_chat(given)


def test_load_samples_and_the_evaluators_use_the_checkpoints_default(small, tmp_path):
    import evaluation

    d = small_dir_of(small, tmp_path)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": SMOLLM_TEMPLATE}))
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": small.get_vocab_size(),
                                               "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                                               "num_attention_heads": 2}))
    setup = evaluation.load_setup(d, max_new_tokens=4)
    assert setup.system.startswith("You are a helpful AI assistant named SmolLM")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    ids = data.load_samples(path, small, default_system=setup.system)[0][0].input_ids
    assert "named SmolLM" in small.decode(ids) and "Qwen" not in small.decode(ids)


# ----------------------------------------------------------------------------------------------------
# Batching and sharding


def test_collate_pads_on_the_right():
    a = data.Sample([5, 6, 7], [0, 1, 1], "a:1")
    b = data.Sample([8], [0], "a:2")
    batch = data.collate([a, b], pad_id=99)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())
    with pytest.raises(ValueError):
        data.collate([], pad_id=0)


def shards(lengths, mb, world, seed=1234, epoch=0, group=True):
    return [data.epoch_microbatches(lengths, mb, world, r, seed, epoch, group) for r in range(world)]


@pytest.mark.parametrize("n", [0, 1, 7, 100, 1001])
@pytest.mark.parametrize("mb,world", [(1, 1), (1, 3), (2, 2), (4, 3), (3, 8)])
@pytest.mark.parametrize("group", [True, False])
def test_sharding_is_a_disjoint_complete_equal_split(n, mb, world, group):
    lengths = [random.Random(i).randint(10, 4000) for i in range(n)]
    per_rank = shards(lengths, mb, world, group=group)
    assert len({len(r) for r in per_rank}) == 1  # same number of micro-batches on every rank
    flat = [i for r in per_rank for b in r for i in b]
    assert sorted(flat) == list(range(n))  # every sample exactly once
    for r in per_rank:
        assert all(0 < len(b) <= mb for b in r[:-1]) and len(r[-1] if r else [1]) <= mb
        assert all(b for b in r[:-1])  # an empty dummy micro-batch can only be the last one
    n_batches = -(-n // mb)
    assert sum(map(len, per_rank)) == -(-n_batches // world) * world  # padded with the fewest dummies
    assert all(sum(not b for b in r) <= 1 for r in per_rank)


def test_sharding_is_deterministic_reshuffled_and_ignores_global_rng():
    lengths = [random.Random(i).randint(10, 4000) for i in range(500)]
    random.seed(1)
    first = shards(lengths, 2, 4, seed=7, epoch=3)
    random.seed(2)
    torch.manual_seed(2)
    assert shards(lengths, 2, 4, seed=7, epoch=3) == first
    assert shards(lengths, 2, 4, seed=7, epoch=4) != first
    assert shards(lengths, 2, 4, seed=8, epoch=3) != first
    orders = {tuple(i for b in shards(lengths, 1, 1, epoch=e, group=False)[0] for i in b) for e in range(5)}
    assert len(orders) == 5


@pytest.mark.parametrize("mb", [1, 3])
def test_the_global_order_does_not_depend_on_the_world_size(mb):
    # so N ranks x accumulation A train on the same micro-batches per step as 1 rank x accumulation N*A
    lengths = [random.Random(i).randint(10, 4000) for i in range(1001)]
    single = shards(lengths, mb, 1)[0]
    for world in (2, 3, 8):
        per_rank = shards(lengths, mb, world)
        interleaved = [per_rank[j % world][j // world] for j in range(world * len(per_rank[0]))]
        assert [b for b in interleaved if b] == single


def test_length_grouping_reduces_padding_and_longest_goes_first():
    lengths = [random.Random(i).randint(50, 4096) for i in range(2000)]

    def padded(per_rank):
        return sum(len(b) * max(lengths[i] for i in b) for r in per_rank for b in r if b)

    grouped, plain = shards(lengths, 8, 2, group=True), shards(lengths, 8, 2, group=False)
    waste = {k: padded(v) - sum(lengths) for k, v in (("grouped", grouped), ("plain", plain))}
    assert waste["grouped"] < 0.1 * waste["plain"]
    costs = [len(b) * max(lengths[i] for i in b) for r in grouped for b in r if b]
    assert len(grouped[0][0]) * max(lengths[i] for i in grouped[0][0]) == max(costs)
    # micro-batches are still spread over the epoch: the sorted order is not kept
    firsts = [max(lengths[i] for i in b) for b in grouped[0] if b]
    assert firsts[1:] != sorted(firsts[1:]) and firsts[1:] != sorted(firsts[1:], reverse=True)


def test_sharding_rejects_bad_arguments():
    for mb, world, rank in [(0, 1, 0), (1, 0, 0), (1, 2, 2), (1, 2, -1)]:
        with pytest.raises(ValueError):
            data.epoch_microbatches([1, 2, 3], mb, world, rank, 0, 0)


# ----------------------------------------------------------------------------------------------------
# Generated data (synthetic.py) through the loader


def test_write_synthetic_is_deterministic_and_loads(small, tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    synthetic.write_synthetic(a, 6, 800, seed=3)
    synthetic.write_synthetic(b, 6, 800, seed=3)
    synthetic.write_synthetic(c, 6, 800, seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    samples, stats = data.load_samples(a, small, max_len=100_000)
    assert stats.n_samples == 6 and stats.n_bad == 0
    # sample i depends only on (seed, i)
    synthetic.write_synthetic(b, 3, 800, seed=3)
    assert a.read_text().splitlines()[:3] == b.read_text().splitlines()


# ----------------------------------------------------------------------------------------------------
# Command line


def test_cli_synth_then_check(small_dir, tmp_path, capsys):
    out = tmp_path / "synth.jsonl"
    assert synthetic.main(["write", "--out", str(out), "--samples", "5", "--tokens", "600", "--seed", "1"]) == 0
    assert len(out.read_text().splitlines()) == 5
    assert data.main(["check", "--data", str(out), str(out), "--tokenizer", str(small_dir),
                      "--max-len", "300", "--show", "1"]) == 0
    printed = capsys.readouterr().out
    assert "10 records read from 2 file(s)" in printed and "truncated to 300 tokens" in printed
    assert f"--- {out}:1 (300 tokens)" in printed and "«" in printed


def test_cli_check_bad_data_exits_nonzero_without_traceback(small_dir, bad_file):
    cmd = [sys.executable, str(REPO / "data.py"), "check", "--data", str(bad_file),
           "--tokenizer", str(small_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "--skip-bad-samples skips" in result.stderr
    expected = f"data.py: error: {len(BAD_LINES)} problems in the data:\n{bad_file}:2: invalid JSON"
    assert result.stderr.startswith(expected)


def test_cli_check_skip_bad_samples(small_dir, bad_file, capsys):
    args = ["check", "--data", str(bad_file), "--tokenizer", str(small_dir)]
    assert data.main(args) == 1
    assert data.main([*args, "--skip-bad-samples"]) == 0
    assert f"{len(BAD_LINES)} bad skipped" in capsys.readouterr().out


def test_cli_reports_a_missing_or_broken_tokenizer(tmp_path, capsys):
    assert data.main(["check", "--data", "x.jsonl", "--tokenizer", str(tmp_path)]) == 1
    assert f"{tmp_path / 'tokenizer.json'}: tokenizer file not found" in capsys.readouterr().err
    (tmp_path / "tokenizer.json").write_text("{}")
    assert data.main(["check", "--data", "x.jsonl", "--tokenizer", str(tmp_path)]) == 1
    assert "not a valid tokenizer.json" in capsys.readouterr().err
