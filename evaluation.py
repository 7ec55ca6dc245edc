"""What every generative benchmark needs; a benchmark file adds only its data, prompts and scoring.

eval_babilong.py, eval_ruler.py, eval_longbench.py and eval_gpqa.py are built on this module:

- the model side: `load_setup(model, max_new_tokens)` -> `Setup` (model directory, tokenizer, config, EOS
  ids; `encode`, `count_tokens`, `decode`), `context_limit`, and `check_overflow`, which stops with one
  line before any generation when prompts do not fit the model's context (`handle_overflow`: the same
  stop-or-warn for any other input that may not fit);
- engines: `make_engine(args, setup)` -> an `Engine`, whose `generate(prompts, max_new_tokens, progress,
  sampling)` turns token-id prompts into generated token ids (list in, list out, in order; each output
  ends with its EOS id when generation stopped there). `LocalEngine` is the built-in qwen2.py model
  (batched longest first, the batch size halved on CUDA out-of-memory, prefill in chunks); it
  loads the weights on its first call, so a run whose results are all on disk never loads them.
  `ServerEngine` (--server URL) sends the same token ids to any OpenAI-compatible /v1/completions
  endpoint (`vllm serve CHECKPOINT`), so the same command scales out to a GPU node. `Sampling`
  (temperature, top_p, seed) defaults to greedy. Multi-turn callers use `engine.conversations(sampling)`:
  a batch of conversations extended turn by turn (the built-in model keeps each one's KV cache between
  turns; a server gets each turn's whole conversation as the next prompt, which vLLM's prefix cache
  keeps cheap). `generate_texts` decodes the outputs of a list of prompts; `generate_resumable` saves
  results a chunk at a time, so a killed run resumes inside a task;
- the command line: `add_common_args(parser)` adds --model, --out, --batch-size, --dtype, --device,
  --prefill-chunk, --overflow, --server and --server-model; `check_common_args(args)` checks them, naming
  the flag;
- data: `from_hub` (a hub dataset request whose failures are one line, with the hub cache offline),
  `jsonl_rows` (JSON lines checked line by line), `read_parquet`;
- files: `atomic_write`, `write_json`, `write_jsonl`, `read_jsonl`, `write_csv`, `read_csv` (a killed run
  never leaves half a file), `is_finished` (resume: a result counts only if it was made with the same
  settings), `markdown_table`, `percent` and `save_results` (results.md and results.json);
  `benchmark_batching` measures batched decoding against one prompt at a time;
- `main(prog, parser, run, argv, resume_note)`: parses, runs, and turns EvalError, CheckpointError, OSError
  and Ctrl-C into one line on stderr, never a traceback.

A new benchmark, in full (data, prompt and scoring are the benchmark's own):

    import argparse, evaluation
    from pathlib import Path

    def run(args):
        evaluation.check_common_args(args)
        setup = evaluation.load_setup(args.model, max_new_tokens=32, weights=not args.server)
        samples = [{"question": "2+2?", "answer": "4"}]                 # the benchmark's data
        prompts = setup.encode([f"Q: {s['question']}\\nA:" for s in samples])
        evaluation.check_overflow("arith", [len(p) for p in prompts], setup, args.overflow, "use shorter inputs")
        engine = evaluation.make_engine(args, setup)
        outputs = evaluation.generate_texts(engine, setup, prompts, desc="arith")
        rows = [{**s, "output": o, "correct": o.startswith(s["answer"])} for s, o in zip(samples, outputs)]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        evaluation.write_jsonl(Path(args.out) / "arith.jsonl", rows)
        print(evaluation.markdown_table(["task", "accuracy"], [["arith", evaluation.percent(
            sum(r["correct"] for r in rows) / len(rows))]]))

    parser = argparse.ArgumentParser(prog="eval_arith.py")
    evaluation.add_common_args(parser)
    evaluation.main("eval_arith.py", parser, run, resume_note="the same command starts again")
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import tokenizers
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm import tqdm

import data
import qwen2

T = TypeVar("T")
SERVER_TIMEOUT_S = 3600.0  # one completion at 128K tokens of context can take minutes on a busy server


class EvalError(Exception):
    """A problem the user can fix (bad flag, missing file, ...). The message is one line for the user."""


# ----------------------------------------------------------------------------------------------
# Model side: tokenizer, EOS ids, context limit


def load_tokenizer(directory: Path, flag: str) -> tokenizers.Tokenizer:
    if not (directory / "tokenizer.json").is_file():
        raise EvalError(f"{flag}: no tokenizer.json in {directory} (the model directory needs the "
                        f"tokenizer files next to config.json; copy them from the base model)")
    try:
        return data.load_tokenizer(directory)
    except data.DataError as e:
        raise EvalError(str(e)) from None  # one problem: its one line


def eos_token_ids(directory: Path, tokenizer: tokenizers.Tokenizer) -> list[int]:
    """Stop ids: generation_config.json's and config.json's eos_token_id, plus Qwen's end-of-turn and
    end-of-text tokens where the tokenizer has them (a base model's config names only one of them)."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.is_file():
            try:
                eos = json.loads(path.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError) as e:
                raise EvalError(f"{path}: not a valid JSON object ({e})") from None
            ids.update([eos] if isinstance(eos, int) else eos or [])
    for token in ("<|im_end|>", "<|endoftext|>"):
        if (i := tokenizer.token_to_id(token)) is not None:
            ids.add(i)
    return sorted(ids)


def decode(tokenizer: tokenizers.Tokenizer, ids: list[int], eos: list[int], strip: bool = True) -> str:
    """The text of generated ids up to the first EOS, special tokens dropped, stripped unless strip=False
    (LongBench keeps the spaces: its eval.py cuts some tasks' predictions at the first line)."""
    stop_ids = set(eos)
    stop = next((k for k, t in enumerate(ids) if t in stop_ids), len(ids))
    text = tokenizer.decode(ids[:stop], skip_special_tokens=True)
    return text.strip() if strip else text


def context_limit(config: qwen2.Qwen2Config) -> tuple[int, str]:
    """Positions a model is meant for: max_position_embeddings, or more with YaRN scaling (Qwen2.5's
    long-context recipe keeps max_position_embeddings and adds a rope_scaling factor)."""
    limit, what = config.max_position_embeddings, "max_position_embeddings"
    scaling = config.rope_scaling or {}
    if scaling.get("factor") and scaling.get("original_max_position_embeddings"):
        scaled = int(scaling["factor"] * scaling["original_max_position_embeddings"])
        if scaled > limit:
            limit, what = scaled, "rope_scaling factor x original_max_position_embeddings"
    return limit, what


@dataclass
class Setup:
    """What a run needs besides the model weights: the tokenizer side and the model's config."""

    directory: Path
    tokenizer: tokenizers.Tokenizer
    config: qwen2.Qwen2Config
    eos: list[int]
    max_new_tokens: int
    system: str | None = data.DEFAULT_SYSTEM  # the system turn a chat prompt gets by default (the checkpoint's)

    def encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text (encode_batch runs on all cores). A rendered chat prompt holds its own
        special tokens: pass add_special_tokens=False for it (Qwen's tokenizer adds none either way)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], strip: bool = True) -> str:
        return decode(self.tokenizer, ids, self.eos, strip)

    def generate_kwargs(self) -> dict:
        """The generation settings in transformers' `generate` vocabulary (greedy), for result files."""
        return {"max_new_tokens": self.max_new_tokens, "num_beams": 1, "do_sample": False,
                "temperature": None, "top_p": None, "top_k": None, "eos_token_id": self.eos}


def load_setup(model: str | os.PathLike, max_new_tokens: int, weights: bool = True) -> Setup:
    """Tokenizer, config and EOS ids of --model (a directory or hub id); the weights are not loaded, and
    with weights=False (pass `not args.server`) a hub id's weights are not even downloaded."""
    directory = qwen2.checkpoint_dir(model, weights)
    tokenizer = load_tokenizer(directory, f"--model {model}")
    config = qwen2.Qwen2Config.from_json(directory / "config.json")  # a clear CheckpointError if bad
    try:
        system = data.default_system(directory)
    except data.DataError as e:
        raise EvalError(str(e)) from None
    return Setup(directory, tokenizer, config, eos_token_ids(directory, tokenizer), max_new_tokens, system)


def check_overflow(where: str, lengths: list[int], setup: Setup, policy: str, remedy: str) -> None:
    """Prompts (their `lengths` in tokens) plus the new tokens must fit the model's context: stop (policy
    'error') or warn ('run'). `where` names the prompts ('qa1 4k'), `remedy` says how to leave them out
    ('leave out --lengths 4k')."""
    limit, what_limit = context_limit(setup.config)
    over = [n for n in lengths if n + setup.max_new_tokens > limit]
    if over:
        handle_overflow(f"{where}: {len(over)} of {len(lengths)} prompts do not fit the model's context (longest "
                        f"{max(over)} prompt tokens + {setup.max_new_tokens} new > {what_limit} {limit})",
                        policy, remedy)


def handle_overflow(what: str, policy: str, remedy: str) -> None:
    """--overflow `policy` when inputs do not fit the model's context (`what` says which and by how much):
    'error' stops with one line offering --overflow run or `remedy`, 'run' warns and goes on."""
    if policy == "error":
        raise EvalError(f"{what}; pass --overflow run to generate past the trained positions anyway, or "
                        f"{remedy}")
    tqdm.write(f"warning: {what}; generating anyway (--overflow run)")


def one_line(e: BaseException) -> str:
    """An exception as `Type: first line of its message` (hub errors run over many lines)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def hub_flags(repo: str, revision: str) -> str:
    """How messages name a hub dataset: '--dataset R', plus '--revision V' when not main."""
    return f"--dataset {repo}" + (f" --revision {revision}" if revision != "main" else "")


def from_hub(call: Callable[[], T], repo: str, revision: str, what: str, remedy: str,
             cached: Callable[[], T] | None = None) -> T:
    """`call()`, a huggingface_hub request about the dataset `repo` at `revision`, its failures one line
    saying `what` failed ('get data.zip'). Offline (HF_HUB_OFFLINE=1), or with the hub unreachable,
    `cached()` answers from the hub cache when given; with nothing cached the line says how to go on
    without the hub (`remedy`: 'pass --data-dir ...')."""
    where = hub_flags(repo, revision)
    try:
        return call()
    except RepositoryNotFoundError as e:  # GatedRepoError is one
        raise EvalError(f"{where}: no such dataset on the hub, or no access ({type(e).__name__})") from None
    except RevisionNotFoundError:
        raise EvalError(f"{where}: the dataset has no such revision") from None
    except Exception as e:  # offline, no network, hub down, a file not there, ...
        if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
            raise EvalError(f"{where}: cannot {what} (the dataset has no such file)") from None
        if cached is not None:
            with contextlib.suppress(LocalEntryNotFoundError):
                return cached()
        offline = hub_constants.HF_HUB_OFFLINE or isinstance(e, OfflineModeIsEnabled)
        reason = ("HF_HUB_OFFLINE is set" if offline else "the hub is unreachable"
                  if isinstance(e, LocalEntryNotFoundError) else one_line(e))
        raise EvalError(f"{where}: cannot {what} ({reason}) and it is not in the hub cache "
                        f"({hub_constants.HF_HUB_CACHE}); run once online, or {remedy}") from None


# ----------------------------------------------------------------------------------------------
# Engines: token-id prompts in, generated token ids out


def generate_batched(model: torch.nn.Module, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
                     eos: list[int], prefill_chunk: int | None = None, progress=None,
                     sampling: Sampling | None = None) -> list[list[int]]:
    """Greedy (or sampled) outputs for every prompt, in the prompts' order. Sampling draws each batch from
    a generator seeded with sampling.seed + the batch's first position in that order.

    Prompts go longest first in batches of similar length (little padding, and an out-of-memory shows
    on the first batch). On a CUDA out-of-memory the batch size is halved for the rest of the run."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int] | None] = [None] * len(prompts)
    kwargs = {"prefill_chunk": prefill_chunk} if prefill_chunk else {}
    start = 0
    while start < len(order):
        idx = order[start:start + batch_size]
        try:
            if sampling is not None and not sampling.greedy:
                kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p,
                              generator=torch.Generator(model.device).manual_seed(sampling.seed + start))
            new = qwen2.generate(model, [prompts[i] for i in idx], max_new_tokens, eos, **kwargs)
        except torch.cuda.OutOfMemoryError:
            new = None
        if new is None:  # out of memory (handled here, once the failed batch's tensors are released)
            torch.cuda.empty_cache()
            if batch_size == 1:
                raise EvalError(f"out of GPU memory on one prompt of {len(prompts[idx[0]])} tokens; try "
                                f"--prefill-chunk 4096 or shorter prompts") from None
            batch_size //= 2
            tqdm.write(f"out of GPU memory: --batch-size lowered to {batch_size}")
            continue
        for i, ids in zip(idx, new, strict=True):
            outputs[i] = ids
        start += len(idx)
        if progress is not None:
            progress.update(len(idx))
    return outputs


@dataclass(frozen=True)
class Sampling:
    """How to pick each token. The default, temperature 0, is greedy decoding (every benchmark but GPQA).
    With sampling, prompt i of a `generate` call is seeded with `seed + i`, so equal prompts (rollouts of
    one problem) get different samples and a rerun gets the same ones."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


class Engine:
    """Generates continuations of token-id prompts.

    `generate` returns, for each prompt in order, the new token ids: ending with the first EOS id when
    generation stopped there, otherwise cut at max_new_tokens; `Setup.decode` turns them into text.
    Token ids (not text) are the common currency: the prompt the model saw is exactly the one the
    benchmark built, whichever engine runs it, and a multi-turn caller can append the ids it got to its
    next prompt. `describe()` is recorded beside the results (which model, dtype or server)."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int, progress=None,
                 sampling: Sampling = GREEDY) -> list[list[int]]:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def conversations(self, sampling: Sampling = GREEDY) -> Conversations:
        """A new batch of multi-turn conversations (see Conversations)."""
        raise NotImplementedError


class LocalEngine(Engine):
    """The built-in qwen2.py model; the weights are loaded on the first `generate` call."""

    def __init__(self, model: str | os.PathLike, setup: Setup, batch_size: int = 8, dtype: str = "auto",
                 device: str | None = None, prefill_chunk: int | None = None):
        self.name, self.setup = str(model), setup
        self.batch_size, self.prefill_chunk = batch_size, prefill_chunk
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype if dtype != "auto" else ("bfloat16" if self.device.startswith("cuda") else "float32")
        self._model: torch.nn.Module | None = None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = qwen2.from_pretrained(self.setup.directory, dtype=self.dtype, device=self.device).eval()
        return self._model

    def generate(self, prompts, max_new_tokens, progress=None, sampling=GREEDY):
        return generate_batched(self.model, prompts, self.batch_size, max_new_tokens, self.setup.eos,
                                self.prefill_chunk, progress=progress, sampling=sampling)

    def conversations(self, sampling=GREEDY):
        return LocalConversations(self.model, self.setup.eos, sampling, self.prefill_chunk)

    def describe(self):
        return {"model": self.name, "dtype": self.dtype}


def _error_detail(raw: bytes) -> str:
    """The message of an error answer (OpenAI: {"error": {"message"}}, vLLM: {"message"}), on one line."""
    text = raw.decode("utf-8", "replace")
    with contextlib.suppress(ValueError, AttributeError):
        answer = json.loads(text)
        error = answer.get("error") if isinstance(answer.get("error"), dict) else answer
        text = str(error.get("message", text))
    return " ".join(text.split())[:300]


class ServerEngine(Engine):
    """Any OpenAI-compatible completions endpoint (`vllm serve CHECKPOINT`, SGLang, ...).

    Each prompt is one POST to {url}/v1/completions with the prompt as a list of token ids, so the
    server sees exactly the tokens the built-in engine would; up to `concurrency` requests are in flight
    and the server batches them. The body asks for `stop_token_ids` (our EOS ids) and `return_token_ids`
    (vLLM's extensions; other servers ignore them). Without token ids in the answer, the returned text is
    encoded again and, when the server says it stopped (finish_reason 'stop'), ends with our first EOS
    id; the decoded text, what a benchmark scores, is the same either way. $OPENAI_API_KEY, when set,
    is sent as the bearer token (vllm serve --api-key)."""

    def __init__(self, url: str, setup: Setup, model_name: str | None = None, concurrency: int = 8,
                 timeout: float = SERVER_TIMEOUT_S):
        base = url.rstrip("/")
        self.url, self.setup, self.concurrency, self.timeout = url, setup, concurrency, timeout
        self.api = base if base.endswith("/v1") else f"{base}/v1"
        self._model_name = model_name

    def _request(self, path: str, body: dict | None = None) -> dict:
        """One call to the server: JSON in and out; any failure is an EvalError naming --server."""
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        payload = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.api}/{path}", data=payload, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise EvalError(f"--server {self.url}: {path} answered HTTP {e.code} ({_error_detail(e.read())})") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise EvalError(f"--server {self.url}: cannot reach {self.api}/{path} ({reason})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvalError(f"--server {self.url}: {path} did not answer JSON ({e})") from None

    def model_name(self) -> str:
        """--server-model, or the one model the server lists (GET /v1/models)."""
        if self._model_name is None:
            listed = [m.get("id") for m in self._request("models").get("data", []) if isinstance(m, dict)]
            if len(listed) != 1:
                raise EvalError(f"--server {self.url}: serves {len(listed)} models ({', '.join(map(str, listed))}); "
                                f"name one with --server-model")
            self._model_name = listed[0]
        return self._model_name

    def complete(self, prompt: list[int], max_new_tokens: int, sampling: Sampling) -> list[int]:
        body = {"model": self.model_name(), "prompt": prompt, "max_tokens": max_new_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "stop_token_ids": self.setup.eos,
                "return_token_ids": True}
        if not sampling.greedy:
            body["seed"] = sampling.seed
        answer = self._request("completions", body)
        try:
            choice = answer["choices"][0]
            if isinstance(choice.get("token_ids"), list):
                return [int(t) for t in choice["token_ids"]]
            ids = self.setup.encode([choice["text"]], add_special_tokens=False)[0]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise EvalError(f"--server {self.url}: completions answered without choices[0].text "
                            f"({type(e).__name__}: {e})") from None
        if choice.get("finish_reason") == "stop" and not set(ids) & set(self.setup.eos):
            ids.append(self.setup.eos[0])
        return ids

    def generate(self, prompts, max_new_tokens, progress=None, sampling=GREEDY):
        self.model_name()  # listed once here, before the requests fan out
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self.complete, p, max_new_tokens, replace(sampling, seed=sampling.seed + i))
                       for i, p in enumerate(prompts)]
            for future in concurrent.futures.as_completed(futures):
                future.result()  # the first failure stops the run
                if progress is not None:
                    progress.update(1)
        return [f.result() for f in futures]

    def describe(self):
        return {"server": self.url, "server_model": self.model_name()}

    def conversations(self, sampling=GREEDY):
        return ServerConversations(self, sampling)


class Conversations:
    """A batch of multi-turn conversations (agentic rollouts) that grow turn by turn.

    `extend(tokens, budgets)` appends tokens[b] to conversation b (its prompt on the first call, then
    e.g. a tool turn) and returns what the model generates next, at most budgets[b] tokens and ending with
    the first EOS id; a budget of 0 leaves the conversation as it is. What the model generated stays
    part of the conversation. `select(rows)` keeps only those conversations, in that order (the finished
    ones cost nothing more)."""

    def extend(self, tokens: list[list[int]], budgets: list[int]) -> list[list[int]]:
        raise NotImplementedError

    def select(self, rows: list[int]) -> None:
        raise NotImplementedError


class LocalConversations(Conversations):
    """The built-in model: one qwen2.Decoder, so each conversation's KV cache continues from turn to turn
    (nothing is encoded twice); one generator seeded with sampling.seed draws every sample of the batch."""

    def __init__(self, model: torch.nn.Module, eos: list[int], sampling: Sampling, prefill_chunk: int | None):
        self.decoder = qwen2.Decoder(model, prefill_chunk)
        self.eos, self.sampling = eos, sampling
        self.generator = torch.Generator(model.device).manual_seed(sampling.seed)

    def extend(self, tokens, budgets):
        s = self.sampling
        return self.decoder.extend(tokens, budgets, self.eos, s.temperature, s.top_p, self.generator)

    def select(self, rows):
        self.decoder.select(rows)


class ServerConversations(Conversations):
    """A completions server: each turn sends the conversation so far as one token-id prompt (vLLM's prefix
    cache keeps that cheap), up to the engine's concurrency at a time; conversation b's requests are
    seeded with sampling.seed + b."""

    def __init__(self, engine: ServerEngine, sampling: Sampling):
        self.engine, self.sampling = engine, sampling
        self.contexts: list[list[int]] = []
        self.seeds: list[int] = []

    def extend(self, tokens, budgets):
        if not self.contexts:
            self.contexts = [[] for _ in tokens]
            self.seeds = [self.sampling.seed + b for b in range(len(tokens))]
        for b, t in enumerate(tokens):
            self.contexts[b] += t
        self.engine.model_name()  # listed once here, before the requests fan out
        with concurrent.futures.ThreadPoolExecutor(self.engine.concurrency) as pool:
            futures = {b: pool.submit(self.engine.complete, self.contexts[b], n, replace(self.sampling,
                                      seed=self.seeds[b])) for b, n in enumerate(budgets) if n > 0}
        outputs = [futures[b].result() if b in futures else [] for b in range(len(tokens))]
        for b, out in enumerate(outputs):
            self.contexts[b] += out
        return outputs

    def select(self, rows):
        self.contexts = [self.contexts[r] for r in rows]
        self.seeds = [self.seeds[r] for r in rows]


def make_engine(args: argparse.Namespace, setup: Setup) -> Engine:
    """The engine the common flags ask for (nothing is loaded or contacted yet)."""
    if args.server:
        return ServerEngine(args.server, setup, args.server_model, concurrency=args.batch_size)
    return LocalEngine(args.model, setup, args.batch_size, args.dtype, args.device, args.prefill_chunk)


def generate_texts(engine: Engine, setup: Setup, prompts: list[list[int]], desc: str) -> list[str]:
    """Decoded outputs of every prompt, with a progress bar."""
    with tqdm(total=len(prompts), desc=desc, unit="sample", leave=False) as bar:
        new = engine.generate(prompts, setup.max_new_tokens, progress=bar)
    return [setup.decode(ids) for ids in new]


def generate_resumable(engine: Engine, *, encode: Callable[[list[int]], list[list[int]]], order: list[int],
                       max_new_tokens: int, batch_size: int, partial: tuple[Path, Path], record: dict,
                       desc: str, field: str, result: Callable[[int, list[int], list[int]], T]) -> list[T]:
    """`result(i, prompt, new_ids)` of every prompt i, in index order, with a progress bar `desc`.

    `order` (a permutation of range(n)) is the order of generation; `encode(indices)` builds those prompts,
    4 x batch_size at a time. After each chunk, partial = (rows file, meta file) gets the results so far as
    JSON lines {"i": i, field: result} and `record`, the settings they were made with: a killed run resumes
    after them when every value of its record is the same. The caller deletes both files once its final
    files are written."""
    rows_path, meta_path = partial
    done: dict[int, T] = {}
    if is_finished(rows_path, meta_path, record, tuple(record)):
        done = {r["i"]: r[field] for r in read_jsonl(rows_path)}
        print(f"{desc}: resuming after {len(done)} of {len(order)} samples")
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(meta_path, record)
    todo = [i for i in order if i not in done]
    chunk = 4 * batch_size
    with tqdm(total=len(order), initial=len(done), desc=desc, unit="sample", leave=False) as bar:
        for start in range(0, len(todo), chunk):
            idx = todo[start:start + chunk]
            prompts = encode(idx)
            new = engine.generate(prompts, max_new_tokens, progress=bar)
            for i, prompt, ids in zip(idx, prompts, new, strict=True):
                done[i] = result(i, prompt, ids)
            write_jsonl(rows_path, [{"i": i, field: r} for i, r in sorted(done.items())])
    return [done[i] for i in range(len(order))]


def benchmark_batching(engine: LocalEngine, prompts: list[list[int]], what: str, rounds: int = 3) -> dict:
    """Samples/s of the built-in model decoding `prompts` in batches of its batch size against one at a
    time (printed, and returned with whether both gave the same outputs). The two settings alternate for
    a few rounds and each keeps its best: on a shared machine both see the same load, and the minimum is
    the least noisy estimate."""
    model, setup, batch = engine.model, engine.setup, engine.batch_size

    def generate(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
        return generate_batched(model, prompts, batch_size, setup.max_new_tokens, setup.eos, engine.prefill_chunk)

    print(f"benchmark: {len(prompts)} prompts of {what} (mean {sum(map(len, prompts)) / len(prompts):.0f} "
          f"tokens), up to {setup.max_new_tokens} new tokens, {model.device} {engine.dtype}")
    generate(prompts[:1], 1)  # warm-up
    sizes = sorted({1, batch})
    seconds, outputs = {bs: [] for bs in sizes}, {}
    for _ in range(rounds):
        for bs in sizes:
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outputs[bs] = generate(prompts, bs)
            seconds[bs].append(time.perf_counter() - t0)
    report = {bs: len(prompts) / min(seconds[bs]) for bs in sizes}
    for bs in sizes:
        print(f"batch size {bs:>3}: {min(seconds[bs]):8.2f} s, {report[bs]:8.2f} samples/s"
              + (f" ({report[bs] / report[1]:.1f}x)" if bs != 1 else "") + f"   (best of {rounds} alternating rounds)")
    same = outputs[1] == outputs[batch]
    print(f"identical outputs batched and one at a time: {'yes' if same else 'no'}")
    return {"samples_per_s": report, "identical": same}


def usable_cores() -> int:
    """The CPU cores this process may run on: a container's or taskset's limit, not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------
# Command line


def add_common_args(p: argparse.ArgumentParser, out_help: str = "results folder; finished parts are "
                    "skipped on a rerun", batch_size: int = 8) -> None:
    """The flags every benchmark has: the model, the results folder, and how to generate."""
    p.add_argument("--model", metavar="DIR_OR_ID",
                   help="model directory or hub id (config.json, safetensors weights, tokenizer.json)")
    p.add_argument("--out", metavar="DIR", help=out_help)
    p.add_argument("--batch-size", type=int, default=batch_size, metavar="N",
                   help=f"prompts decoded together, halved on CUDA out-of-memory (default: {batch_size})")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights and activations (default auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--prefill-chunk", type=int, metavar="N",
                   help="prefill long prompts N tokens at a time, to bound activation memory")
    p.add_argument("--overflow", choices=["error", "run"], default="error",
                   help="prompts (plus the new tokens) longer than the model's context: stop with an error "
                        "before generating them (default), or run them anyway with a warning")
    p.add_argument("--server", metavar="URL",
                   help="generate with an OpenAI-compatible completions server instead of the built-in model, "
                        "e.g. http://localhost:8000 for `vllm serve CHECKPOINT`; prompts go as token ids, "
                        "--batch-size requests at a time; --model still gives the tokenizer and config.json")
    p.add_argument("--server-model", metavar="NAME",
                   help="model name to ask --server for (default: the one model it lists)")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Integer flags that, when given, must be at least 1 (names as attributes: 'batch_size')."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


def check_common_args(args: argparse.Namespace, need_out: bool = True) -> None:
    """Check the common flags before anything is loaded; raises EvalError naming the flag."""
    if not args.model:
        raise EvalError("--model is required (a model directory or hub id)")
    if need_out and not args.out:
        raise EvalError("--out is required (the folder for predictions and results)")
    check_positive(args, "batch_size", "prefill_chunk")
    if args.server:
        url = urllib.parse.urlparse(args.server)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise EvalError(f"--server {args.server}: expected an http(s) URL such as http://localhost:8000")
        local = [f for f, v in (("--dtype", args.dtype != "auto"), ("--device", args.device),
                                ("--prefill-chunk", args.prefill_chunk)) if v]
        if local:
            raise EvalError(f"{local[0]} sets up the built-in model; with --server the server decides it")
    elif args.server_model:
        raise EvalError("--server-model goes with --server")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise EvalError(f"--out {args.out}: is a file, expected a folder")


def main(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], object],
         argv: list[str] | None = None, resume_note: str = "finished results are saved, the same command "
         "resumes") -> int:
    """Parse argv and run; a problem the user can fix ends in one line `{prog}: error: ...`."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except (EvalError, qwen2.CheckpointError, OSError) as e:  # OSError: permissions, full disk, ...
        sys.exit(f"{prog}: error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"{prog}: interrupted; {resume_note}")
    return 0


# ----------------------------------------------------------------------------------------------
# Result files: written whole or not at all; resume; tables


def atomic_write(path: Path, write: Callable) -> None:
    """Write through a temporary file and rename, so a killed run never leaves a half file behind."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        write(f)
    os.replace(tmp, path)


def write_json(path: Path, obj, indent: int = 2) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent) + "\n"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def jsonl_rows(lines: Iterable[str], where: str, fields: tuple[str, ...] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, value) of each non-blank line of JSON lines; with `fields`, each value must be an
    object holding them. A bad line is an EvalError naming `where` and the line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{where}:{n}: not valid JSON ({e})") from None
        if fields is not None:
            missing = [k for k in fields if not isinstance(row, dict) or k not in row]
            if missing:
                raise EvalError(f"{where}:{n}: missing field(s) {', '.join(missing)} (expected {', '.join(fields)})")
        yield n, row


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a bad line is an EvalError naming file and line."""
    with open(path, encoding="utf-8") as f:
        return [row for _, row in jsonl_rows(f, str(path))]


def read_parquet(path: Path, columns: tuple[str, ...] = (), where: str = "") -> list[dict]:
    """Rows of a parquet file: all columns, or only `columns`, each required. An unreadable file or a
    missing column is an EvalError naming the file (after `where`, e.g. '--data ')."""
    import pyarrow.parquet as pq  # only parquet users need pyarrow

    try:
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise EvalError(f"{where}{path}: no column(s) {', '.join(missing)} (has: {', '.join(names)})")
        return pq.read_table(path, columns=list(columns) or None).to_pylist()
    except EvalError:
        raise
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise EvalError(f"{where}{path}: not a readable parquet file ({type(e).__name__}: {e})") from None


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    def write(f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    atomic_write(path, write)


def read_csv(path: str | os.PathLike, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a CSV as {column: cell} for the given columns (others, e.g. an index, are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise EvalError(f"{path}: empty file (expected a CSV with columns {', '.join(columns)})")
            missing = [c for c in columns if c not in header]
            if missing:
                raise EvalError(f"{path}: no column(s) {', '.join(missing)} (has: {', '.join(header)}); "
                                f"expected the benchmark's CSV with columns {', '.join(columns)}")
            where = {c: header.index(c) for c in columns}
            rows = []
            for n, row in enumerate(reader, 2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise EvalError(f"{path}:{n}: {len(row)} fields, the header has {len(header)}")
                rows.append({c: row[i] for c, i in where.items()})
    except (UnicodeDecodeError, csv.Error) as e:
        raise EvalError(f"{path}: not a readable CSV ({type(e).__name__}: {e})") from None
    return rows


def is_finished(result_path: Path, meta_path: Path, record: dict,
                keys: tuple[str, ...] = ("prompt", "generate_kwargs", "data")) -> bool:
    """A result is done when both files exist and the JSON `meta_path` was made with the same settings
    (`record`'s values under `keys`). Result files are written whole, so they are never partial."""
    if not (result_path.is_file() and meta_path.is_file()):
        return False
    try:
        saved = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(saved, dict) and all(saved.get(k) == record[k] for k in keys)


def save_results(out: Path, header: str, table: str, results: dict, json_name: str = "results.json",
                 indent: int = 2, echo: bool = True) -> None:
    """results.md (the header, then the markdown table) and `json_name` in `out` (LongBench's is result.json
    with indent 4); with echo, the table is printed and where it went (echo=False: the caller says it)."""
    atomic_write(out / "results.md", lambda f: f.write(f"{header}\n\n{table}\n"))
    write_json(out / json_name, results, indent)
    if echo:
        print(f"\n{table}\n\nsaved {out / 'results.md'} and {out / json_name}")


def percent(value: float | None) -> str:
    """A fraction as a table cell in %, '-' when missing."""
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; the first column left-aligned (names), the others right-aligned (numbers)."""
    def line(cells) -> str:
        return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"

    return "\n".join([line(header), "| --- |" + " ---: |" * (len(header) - 1), *map(line, rows)])
