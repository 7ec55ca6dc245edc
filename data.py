"""Agentic SFT data for FocuSFT: Qwen2.5 chat rendering, tokenization, loss masks, batching, sharding.

Records are chat conversations in the OpenAI / Hugging Face format, one per JSONL line or parquet row:

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

They are rendered exactly as Qwen2.5's chat template renders them and every assistant turn's body (what
follows `<|im_start|>assistant\n`, through its `<|im_end|>` and the newline after it) is marked in the
loss mask; the bodies are tokenized apart from the text around them, as the model generates them after
the header and as the authors' data pipeline does. The whole dataset is
validated before training starts. Generated data (the tests', the demo's, synthetic BABILong's) and
the small tokenizers of random models are synthetic.py's.

    python data.py check --data demo.jsonl --tokenizer path/to/Qwen2.5-7B
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

# ----------------------------------------------------------------------------------------------------
# Qwen2.5 chat format

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
ROLES = ("system", "user", "assistant", "tool")
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_TOOLS_INTRO = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>" + IM_END + "\n"
)

def _tojson(value: Any) -> str:
    # The template's `tojson` is transformers' override of jinja's filter: plain json.dumps with default
    # separators, keys in their given order, non-ASCII kept and no HTML escaping of < > & '.
    return json.dumps(value, ensure_ascii=False)


def _parse_arguments(arguments: Any) -> dict:
    # OpenAI-style data stores arguments as a JSON string; the template would quote it a second time
    # ("arguments": "{\"x\": 1}"), a format Qwen never produces. We parse it and render the object.
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"arguments are a string that is not JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments must be a JSON object (or a string holding one), got {_kind(arguments)}")
    return arguments


def _parse_tools(tools: Any) -> list:
    # `tools` may also be a JSON string holding the list, as parquet datasets often store it.
    if tools is None:
        return []
    tools = _json_field(tools, "'tools'")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("'tools' must be a list of objects (function schemas)")
    try:
        _tojson(tools)
    except (TypeError, ValueError) as e:
        raise ValueError(f"'tools' cannot be written as JSON ({e})") from None
    return tools


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "an integer", float: "a number"}
    return names.get(type(value), f"a {type(value).__name__}")


def _call_problems(call: Any) -> list[str]:
    if not isinstance(call, dict):
        return [f"is {_kind(call)}, not an object"]
    fn = call["function"] if "function" in call else call  # with or without the OpenAI wrapper
    if not isinstance(fn, dict):
        return ["'function' must be an object"]
    problems = []
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        problems.append("tool call without a name")
    if "arguments" not in fn:
        problems.append("tool call without 'arguments' (use {} for none)")
    else:
        try:
            _tojson(_parse_arguments(fn["arguments"]))
        except (TypeError, ValueError) as e:
            problems.append(f"tool call {str(e)}")
    return problems


def conversation_problems(messages: Any, tools: Any = None, training: bool = True) -> list[str]:
    """Reasons this conversation cannot be rendered (training=False) or trained on (training=True)."""
    if not isinstance(messages, list):
        return [f"'messages' must be a list of messages, got {_kind(messages)}"]
    if not messages:
        return ["'messages' is empty"]
    problems = []
    try:
        _parse_tools(tools)
    except ValueError as e:
        problems.append(str(e))
    has_assistant = False
    after_call = False  # the nearest earlier non-tool message is an assistant message with tool calls
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{where} is {_kind(m)}, not a message object")
            after_call = False
            continue
        role = m.get("role")
        if role not in ROLES:
            problems.append(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
            after_call = False
            continue
        where = f"{where} ({role})"
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            problems.append(f"{where}: content must be a string, got {_kind(content)}")
        if role == "assistant":
            has_assistant = True
            calls = m.get("tool_calls")
            if calls is not None and not isinstance(calls, list):
                problems.append(f"{where}: tool_calls must be a list, got {_kind(calls)}")
                calls = None
            for j, call in enumerate(calls or []):
                problems += [f"{where} tool_calls[{j}]: {p}" for p in _call_problems(call)]
            # The template fails on a missing content. It renders "" as an empty turn, but training on one
            # teaches the model to answer nothing, so for training that is bad data too.
            if not calls and (content is None or (training and content == "")):
                problems.append(f"{where}: assistant message with neither content nor tool calls")
            after_call = bool(calls)
        else:
            if content is None:
                problems.append(f"{where}: message without content")
            if role == "tool":
                if training and not after_call:
                    problems.append(f"{where}: tool message with no tool call before it")
            else:
                after_call = False
    if training and not has_assistant:
        problems.append("conversation without any assistant message (nothing to train on)")
    return problems


def _render(messages: list, tools: Any, add_generation_prompt: bool,
            default_system: str | None = DEFAULT_SYSTEM) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans [start, end) of the assistant turns' bodies: after the
    "<|im_start|>assistant\n" header, through <|im_end|> and the "\n" after it. A conversation with no
    system message gets `default_system`; with None, no system turn (but the tools block, if any)."""
    problems = conversation_problems(messages, tools, training=False)
    if problems:
        raise ValueError("cannot render conversation: " + "; ".join(problems))
    tools = _parse_tools(tools)
    parts: list[str] = []
    size = 0
    spans: list[tuple[int, int]] = []

    def emit(text: str) -> int:
        nonlocal size
        parts.append(text)
        size += len(text)
        return size

    system = messages[0]["content"] if messages[0]["role"] == "system" else default_system
    if tools:
        intro = _TOOLS_INTRO if system is not None else _TOOLS_INTRO.lstrip("\n")
        emit(IM_START + "system\n" + (system or "") + intro + "".join("\n" + _tojson(t) for t in tools))
        emit(_TOOLS_OUTRO)
    elif system is not None:
        emit(IM_START + "system\n" + system + IM_END + "\n")
    last = len(messages) - 1
    for i, m in enumerate(messages):
        role, calls = m["role"], m.get("tool_calls")
        if role == "system" and i == 0:
            continue  # already in the system turn above
        if role == "tool":  # consecutive tool results share one user turn
            if i == 0 or messages[i - 1]["role"] != "tool":
                emit(IM_START + "user")
            emit("\n<tool_response>\n" + m["content"] + "\n</tool_response>")
            if i == last or messages[i + 1]["role"] != "tool":
                emit(IM_END + "\n")
            continue
        # Each turn opens with "<|im_start|>role\n"; in assistant turns the model generates what follows,
        # up to and including <|im_end|>. The span trained on also takes the "\n" after <|im_end|>: the
        # authors' pipeline gives an assistant message's whole rendering after the header loss 1.
        start = emit(IM_START + role + "\n")
        if role == "assistant" and calls:
            pieces = [m["content"]] if m.get("content") else []
            for call in calls:
                fn = call["function"] if "function" in call else call
                args = _tojson(_parse_arguments(fn["arguments"]))
                call_json = '{"name": "' + fn["name"] + '", "arguments": ' + args + "}"
                pieces.append("<tool_call>\n" + call_json + "\n</tool_call>")
            emit("\n".join(pieces) + IM_END + "\n")
        else:
            emit(m["content"] + IM_END + "\n")
        if role == "assistant":
            spans.append((start, size))
    if add_generation_prompt:
        emit(IM_START + "assistant\n")
    return "".join(parts), spans


def render_chat(
    messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
    default_system: str | None = DEFAULT_SYSTEM,
) -> str:
    """The conversation as Qwen2.5's chat template renders it (tool-call arguments given as JSON strings
    are parsed first, see _parse_arguments). Raises ValueError on what the template cannot render.
    `default_system`: the system turn of a conversation without one (a checkpoint's: `default_system`)."""
    return _render(messages, tools, add_generation_prompt, default_system)[0]


# A chat template's own system turn, as a string literal: '<|im_start|>system\n' TEXT '<|im_end|>\n', the
# newlines written as "\n" escapes or as themselves (Qwen2.5's and SmolLM2's templates).
_TEMPLATE_SYSTEM = re.compile(r"""(['"])<\|im_start\|>system(?:\\n|\n)([^'"{}]*?)<\|im_end\|>(?:\\n|\n)\1""")


def default_system(directory: str | Path) -> str | None:
    """The system prompt a checkpoint's chat template gives a conversation that has none.

    Read from the template in tokenizer_config.json or chat_template.jinja, where it is the one string
    literal that opens and closes a system turn. No template: Qwen2.5's default (the format rendered here
    is Qwen2.5's, and test or random checkpoints carry no template). A template with no such literal
    (Qwen3's, for one): None, no system turn."""
    directory = Path(directory)
    template = None
    config = directory / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise DataError([f"{config}: not a valid JSON object ({e})"]) from None
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template:
        return DEFAULT_SYSTEM
    found = {m.group(2).replace("\\n", "\n") for m in _TEMPLATE_SYSTEM.finditer(template)}
    return found.pop() if len(found) == 1 else None


def _pieces(text: str, spans: list[tuple[int, int]]) -> list[tuple[str, int]]:
    """The text cut at the assistant bodies' edges: (piece, 1 for a body else 0), in order."""
    out, at = [], 0
    for a, b in spans:
        if a > at:
            out.append((text[at:a], 0))
        out.append((text[a:b], 1))
        at = b
    if at < len(text):
        out.append((text[at:], 0))
    return out


def _encode_rendered(tokenizer: Tokenizer, rendered: list[tuple[str, list[tuple[int, int]]]]
                     ) -> list[tuple[list[int], list[int]]]:
    """(input_ids, loss_mask) per rendered conversation, each piece tokenized on its own.

    Every other edge between pieces sits next to a special token (<|im_start|> after the body's "\n"),
    where the tokenizer splits anyway; only a body's start can differ from encoding the whole text: a
    body opening with newlines would merge them with the header's "\n" into one token that no
    generation after "<|im_start|>assistant\n" ever produces."""
    cut = [_pieces(text, spans) for text, spans in rendered]
    flat = [piece for pieces in cut for piece, _ in pieces]
    encoded = iter(tokenizer.encode_batch(flat, add_special_tokens=False) if flat else [])
    out = []
    for pieces in cut:
        ids: list[int] = []
        mask: list[int] = []
        for _, trained in pieces:
            piece_ids = next(encoded).ids
            ids += piece_ids
            mask += [trained] * len(piece_ids)
        out.append((ids, mask))
    return out


def _check_tokenizer(tokenizer: Tokenizer) -> None:
    """Any tokenizer renders Qwen2.5's ChatML whose turn markers and end-of-text are single special tokens
    (Qwen2.5's, SmolLM2's); <tool_call> and the like may be plain text."""
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for token in (IM_START, IM_END, ENDOFTEXT):
        if token not in special:
            raise ValueError(f"the tokenizer has no special {token} token: it is not a ChatML tokenizer")
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        raise ValueError("the tokenizer has truncation or padding enabled; call no_truncation()/no_padding()")


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
    default_system: str | None = DEFAULT_SYSTEM,
) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of a conversation, as the authors' pipeline gives them: mask 1 on every
    assistant turn's body (content, tool calls, <|im_end|> and the "\n" after it), 0 on the
    "<|im_start|>assistant\n" header and on every other turn; the bodies tokenized on their own."""
    _check_tokenizer(tokenizer)
    return _encode_rendered(tokenizer, [_render(messages, tools, False, default_system)])[0]


def special_token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of a special token, looked up in the tokenizer (e.g. the pad id: ENDOFTEXT)."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {token} token")
    return token_id


# ----------------------------------------------------------------------------------------------------
# Loading and validation


class DataError(ValueError):
    """Bad input data; .problems lists every problem as 'file:line: reason'."""

    def __init__(self, problems: list[str], shown: int = 20):
        self.problems = list(problems)
        self.shown = shown
        super().__init__(self.problems)  # args that rebuild the error (pickling across processes)

    def __str__(self) -> str:
        n = len(self.problems)
        if n == 1:  # one problem, one line
            return self.problems[0]
        lines = [f"{n} problems in the data:", *self.problems[: self.shown]]
        if n > self.shown:
            lines.append(f"... and {n - self.shown} more")
        return "\n".join(lines)


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[int]
    source: str  # "file:line"

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    files: list[str] = field(default_factory=list)
    max_len: int = 0
    n_read: int = 0  # records read (bad ones included)
    n_bad: int = 0  # bad records skipped (skip_bad)
    n_truncated: int = 0  # samples longer than max_len, cut on the right
    n_dropped: int = 0  # samples left without a response token after truncation
    n_samples: int = 0  # samples kept
    n_tokens: int = 0  # tokens in the kept samples
    n_target_tokens: int = 0  # of which trained on (loss mask 1)
    length_min: int = 0
    length_median: int = 0
    length_p95: int = 0
    length_max: int = 0
    length_max_before_truncation: int = 0

    def summary(self) -> str:
        share = self.n_target_tokens / max(self.n_tokens, 1)
        return "\n".join([
            f"data: {self.n_read} records read from {len(self.files)} file(s), {self.n_bad} bad skipped, "
            f"{self.n_samples} samples kept",
            f"  truncated to {self.max_len} tokens: {self.n_truncated} (longest was "
            f"{self.length_max_before_truncation}); dropped with no response token left: {self.n_dropped}",
            f"  tokens per sample: min {self.length_min} / median {self.length_median} / "
            f"p95 {self.length_p95} / max {self.length_max}; {self.n_tokens} tokens, {share:.1%} trained on",
        ])


def _drop_none(value: Any) -> Any:
    # Parquet structs have one schema for all rows, so a key absent from a row reads back as null.
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _json_field(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is a string that is not JSON ({e.msg} at char {e.pos})") from None


def _decode_json_fields(record: dict) -> dict:
    """Parquet datasets store nested data either as structs and lists (read as dicts and lists) or as
    JSON strings: a whole column, each element of a list column (one message or one tool schema per
    string), or a message's tool_calls. Any mix of these reads as the same record. (Tool-call
    arguments, and a `tools` string in JSONL, are parsed where they are used.)"""
    record = dict(record)
    for column in ("messages", "tools"):
        if column not in record:
            continue
        value = _json_field(record[column], f"'{column}'")
        if isinstance(value, list):
            value = [_json_field(v, f"{column}[{i}]") for i, v in enumerate(value)]
        record[column] = value
    if isinstance(record.get("messages"), list):
        record["messages"] = [
            {**m, "tool_calls": _json_field(m["tool_calls"], f"messages[{i}].tool_calls")}
            if isinstance(m, dict) and "tool_calls" in m else m
            for i, m in enumerate(record["messages"])]
    return record


class _Bad(str):
    """A record that could not even be parsed; the string is the reason."""


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, _Bad(f"line is not valid UTF-8 (byte {e.start})")
                continue
            if lineno == 1:
                text = text.removeprefix("\ufeff")
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                hint = " (this reader wants JSON Lines: one object per line)" if text.strip() == "[" else ""
                yield lineno, _Bad(f"invalid JSON: {e.msg} at column {e.colno}{hint}")


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq  # only parquet users need pyarrow
    except ImportError:
        raise _FileProblem(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if "messages" not in names:
            raise _FileProblem(f"{path}: no 'messages' column (columns: {', '.join(names)})")
        batches = pf.iter_batches(batch_size=256, columns=[c for c in ("messages", "tools") if c in names])
        records = (record for batch in batches for record in batch.to_pylist())
        for row, record in enumerate(records, 1):
            try:
                yield row, _drop_none(_decode_json_fields(record))
            except ValueError as e:
                yield row, _Bad(str(e))
    except _FileProblem:
        raise
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise _FileProblem(f"{path}: not a readable parquet file ({e})") from None


class _FileProblem(Exception):
    pass


def _read_file(path: Path) -> Iterator[tuple[int, Any]]:
    if not path.is_file():
        raise _FileProblem(f"{path}: file does not exist" if not path.exists() else f"{path}: not a file")
    reader = _read_parquet if path.suffix.lower() in (".parquet", ".pq") else _read_jsonl
    n = 0
    for item in reader(path):
        n += 1
        yield item
    if n == 0:
        raise _FileProblem(f"{path}: file is empty (no records)")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _record_problems(record: Any, specials: list[str]) -> tuple[list[str], list | None, Any]:
    """Problems of one parsed record, and its messages and tools (messages None when bad)."""
    if isinstance(record, _Bad):
        return [str(record)], None, None
    if not isinstance(record, dict):
        hint = " (this reader wants JSON Lines: one object per line)" if isinstance(record, list) else ""
        return [f"record is {_kind(record)}, not a JSON object{hint}"], None, None
    if "messages" not in record:
        return ["record has no 'messages'"], None, None
    # A key set to null counts as absent everywhere ("content": null next to tool_calls), as in transformers.
    messages, tools = record["messages"], record.get("tools")
    problems = conversation_problems(messages, tools, training=True)
    if not problems:
        # A special token typed inside a message would be encoded as the real control token and forge a
        # turn boundary (or an end of turn inside a response).
        text = "\0".join(_strings([messages, tools]))
        problems = [f"contains the special token {s} as text" for s in specials if s in text]
    return problems, (messages if not problems else None), tools


def _percentile(sorted_values: list[int], q: float) -> int:
    # Nearest rank: the smallest value with at least q of the values at or below it.
    if not sorted_values:
        return 0
    k = math.ceil(q * len(sorted_values)) - 1
    return sorted_values[min(max(k, 0), len(sorted_values) - 1)]


def load_samples(
    paths: str | Path | Iterable[str | Path],
    tokenizer: Tokenizer,
    max_len: int = 4096,
    skip_bad: bool = False,
    default_system: str | None = DEFAULT_SYSTEM,
) -> tuple[list[Sample], DataStats]:
    """Read, validate (all of it, before anything else), tokenize and truncate a dataset. Conversations
    without a system message get `default_system` (the checkpoint's: see `default_system()`).

    Bad records raise one DataError listing them all, unless skip_bad (then they are skipped and
    counted). File problems (missing, empty, unreadable) always raise: skipping a whole file is a
    configuration mistake, not a bad sample."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    try:
        _check_tokenizer(tokenizer)
    except ValueError as e:
        raise DataError([str(e)]) from None
    specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    stats = DataStats(files=[str(p) for p in paths], max_len=max_len)

    file_problems: list[str] = []
    problems: list[str] = []
    good: list[tuple[str, list, Any]] = []
    for path in paths:
        try:
            for line, record in _read_file(path):
                stats.n_read += 1
                reasons, messages, tools = _record_problems(record, specials)
                if reasons:
                    stats.n_bad += 1
                    problems += [f"{path}:{line}: {r}" for r in reasons]
                else:
                    good.append((f"{path}:{line}", messages, tools))
        except _FileProblem as e:
            file_problems.append(str(e))
        except OSError as e:
            file_problems.append(f"{path}: cannot read ({e.strerror or e})")
    if file_problems or (problems and not skip_bad):
        raise DataError(file_problems + problems)

    samples: list[Sample] = []
    lengths_before: list[int] = []
    for chunk in range(0, len(good), 256):  # encode_batch tokenizes in parallel; chunks bound memory
        batch = good[chunk : chunk + 256]
        encoded = _encode_rendered(tokenizer, [_render(messages, tools, False, default_system)
                                                      for _, messages, tools in batch])
        for (source, _, _), (ids, mask) in zip(batch, encoded, strict=True):
            lengths_before.append(len(ids))
            if len(ids) > max_len:
                stats.n_truncated += 1
                ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask[1:]):  # position 0 has no previous token to predict it from
                stats.n_dropped += 1
                continue
            samples.append(Sample(ids, mask, source))
    if not samples:
        raise DataError([f"no usable samples in {', '.join(map(str, paths))} ({stats.n_read} read, "
                         f"{stats.n_bad} bad, {stats.n_dropped} without a response token)"])

    lengths = sorted(len(s) for s in samples)
    stats.n_samples = len(samples)
    stats.n_tokens = sum(lengths)
    stats.n_target_tokens = sum(sum(s.loss_mask) for s in samples)
    stats.length_min, stats.length_max = lengths[0], lengths[-1]
    stats.length_median, stats.length_p95 = _percentile(lengths, 0.5), _percentile(lengths, 0.95)
    stats.length_max_before_truncation = max(lengths_before)
    return samples, stats


# ----------------------------------------------------------------------------------------------------
# Batching and sharding


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, S) LongTensors input_ids, loss_mask, attention_mask (1 = real token)."""
    if not samples:
        raise ValueError("collate() needs at least one sample")
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(samples), width), dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[b, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        loss_mask[b, :n] = torch.tensor(s.loss_mask, dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}


def epoch_microbatches(
    lengths: Sequence[int],
    micro_batch: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
) -> list[list[int]]:
    """This rank's micro-batches (sample indices) for one epoch.

    Every rank computes the same global list from (seed, epoch, micro_batch) and takes micro-batches
    rank, rank + world_size, ...; all ranks get the same number of micro-batches (DDP steps in
    lock-step), so when the count does not divide evenly some ranks end with one empty micro-batch [].
    The global list does not depend on world_size: N ranks with gradient accumulation A see the same
    micro-batches in each optimizer step as one process with accumulation N * A."""
    if micro_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad sharding: micro_batch={micro_batch}, world_size={world_size}, rank={rank}")
    rng = random.Random(f"{seed}-{epoch}")  # never the global RNG: every rank must agree
    order = list(range(len(lengths)))
    rng.shuffle(order)
    grouped = group_by_length and micro_batch > 1
    if grouped:
        # Sort inside large shuffled chunks: micro-batches of similar lengths (little padding) while
        # the epoch stays random at the scale of the chunks.
        chunk = 256 * micro_batch
        by_length = lengths.__getitem__
        order = [i for c in range(0, len(order), chunk) for i in sorted(order[c : c + chunk], key=by_length)]
    batches = [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)]
    if grouped:
        rng.shuffle(batches)
    if group_by_length and batches:
        # The largest padded micro-batch goes first (to rank 0), so an out-of-memory error shows up at
        # the first step rather than hours into the run.
        cost = [len(b) * max(lengths[i] for i in b) for b in batches]
        batches.insert(0, batches.pop(cost.index(max(cost))))
    steps = -(-len(batches) // world_size)
    batches += [[] for _ in range(steps * world_size - len(batches))]
    return batches[rank::world_size]


# ----------------------------------------------------------------------------------------------------
# Tokenizers


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizers.Tokenizer from a directory holding tokenizer.json, or from the file itself."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError([f"{file}: tokenizer file not found (give a model directory or its tokenizer.json)"])
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a plain Exception
        raise DataError([f"{file}: not a valid tokenizer.json ({e})"]) from None


# ----------------------------------------------------------------------------------------------------
# Command line


def _show_sample(tokenizer: Tokenizer, sample: Sample, color: bool) -> str:
    # The decoded sample with the trained-on tokens marked.
    on, off = ("\x1b[32m", "\x1b[0m") if color else ("«", "»")
    out, start = [], 0
    for t in range(1, len(sample.loss_mask) + 1):
        if t == len(sample.loss_mask) or sample.loss_mask[t] != sample.loss_mask[start]:
            text = tokenizer.decode(sample.input_ids[start:t], skip_special_tokens=False)
            out.append(on + text + off if sample.loss_mask[start] else text)
            start = t
    return "".join(out)


def positive_int(text: str) -> int:  # an argparse type (synthetic.py's command line uses it too)
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="data.py", description="FocuSFT data tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate and tokenize training data and print its statistics")
    check.add_argument("--data", nargs="+", required=True, help="JSONL or parquet files of chat records")
    check.add_argument("--tokenizer", required=True,
                       help="model directory holding tokenizer.json, or the file itself")
    check.add_argument("--max-len", type=positive_int, default=4096,
                       help="truncate samples to this many tokens (default 4096)")
    check.add_argument("--skip-bad-samples", action="store_true",
                       help="skip and count bad records instead of stopping")
    check.add_argument("--show", type=int, default=0, metavar="N",
                       help="print the first N samples with the trained-on tokens marked")
    args = parser.parse_args(argv)
    try:
        tok = load_tokenizer(args.tokenizer)
        samples, stats = load_samples(args.data, tok, args.max_len, skip_bad=args.skip_bad_samples)
        for s in samples[: args.show]:
            print(f"--- {s.source} ({len(s)} tokens)\n{_show_sample(tok, s, sys.stdout.isatty())}")
        print(stats.summary())
    except (DataError, ValueError, OSError) as e:
        # One problem is one line; several are listed, one per line.
        message = str(e)
        if isinstance(e, DataError) and all(re.search(r":\d+: ", p) for p in e.problems):
            hint = "(--skip-bad-samples skips bad records and counts them)"
            message += ("\n" if len(e.problems) > 1 else " ") + hint
        print(f"data.py: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
