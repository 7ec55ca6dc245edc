"""BABILong evaluation with the benchmark's data, prompt format and scoring.

    # the benchmark's data from the hub (100 samples per task and length; cached, then works offline)
    python eval_babilong.py --model Qwen/Qwen2.5-7B --out runs/babilong/qwen2.5-7b \\
        --tasks qa1 qa2 qa3 qa4 qa5 --lengths 0k 1k 2k 4k 8k 16k 32k
    # 1000 samples per task and length, Qwen's chat format
    python eval_babilong.py --model CHECKPOINT_DIR --dataset RMT-team/babilong-1k-samples \\
        --chat-template --out runs/babilong/focusft-1k
    # offline: the hub cache (HF_HUB_OFFLINE=1), or a local copy in the hub layout / JSONL files
    python eval_babilong.py --model DIR --data-dir babilong/ --out runs/babilong/mine
    # no download at all: built-in seeded qa1-qa5 stories hidden in filler text
    python eval_babilong.py --model DIR --synthetic --lengths 0k 1k 4k --out runs/babilong/synthetic
    # re-score predictions in the benchmark's CSV format (ours or published ones)
    python eval_babilong.py --score-csv qa1_4k_instruction_yes_examples_yes_post_prompt_yes.csv --task qa1
    # samples/s, batched against one at a time (writes nothing)
    python eval_babilong.py --model DIR --synthetic --tasks qa1 --lengths 1k --max-samples 16 --benchmark

The protocol is the benchmark's: prompt = task instruction, two in-context examples, answer-format
post-prompt, then `<context>\\n{input}\\n</context>\\n\\nQuestion: {question}`; greedy decoding of at most
20 new tokens; an answer is correct when, after lower-casing and cutting it at the first '.',
'<context>' and '<example>', the task's label words found in it (less those found in the question) are
exactly the target. Predictions are written in the benchmark's format and naming
(`{task}_{length}_{prompt name}.csv` with columns target, output, question, and a `.json` beside it
with the prompt and generation settings), so they compare row for row with published predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath

import huggingface_hub

import data
import evaluation
import synthetic
from evaluation import EvalError, Setup

PROG = "eval_babilong.py"


# ----------------------------------------------------------------------------------------------
# Tasks, labels and lengths (facts about the benchmark)

_ROOMS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
_YES_NO = ("no", "yes")
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "qa1": _ROOMS, "qa2": _ROOMS, "qa3": _ROOMS, "qa4": _ROOMS,
    "qa5": ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"),
    "qa6": _YES_NO,
    "qa7": ("none", "one", "three", "two"),
    "qa8": ("apple", "football", "milk", "nothing"),
    "qa9": _YES_NO,
    "qa10": ("maybe", "no", "yes"),
    "qa11": _ROOMS, "qa12": _ROOMS, "qa13": _ROOMS,
    "qa14": ("bedroom", "cinema", "kitchen", "office", "park", "school"),
    "qa15": ("cat", "mouse", "sheep", "wolf"),
    "qa16": ("gray", "green", "white", "yellow"),
    "qa17": _YES_NO, "qa18": _YES_NO,
    "qa19": ("e,e", "e,n", "e,s", "n,e", "n,n", "n,w", "s,e", "s,s", "s,w", "w,n", "w,s", "w,w"),
    "qa20": ("bedroom", "bored", "garden", "hungry", "kitchen", "thirsty", "tired"),
}
TASKS = tuple(TASK_LABELS)
# The split names the benchmark publishes; "0k" is the bare bAbI story without filler.
LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k", "1M")
DEFAULT_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
DEFAULT_LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k")
SYNTHETIC_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")  # the worlds synthetic.babi_story builds
MAX_NEW_TOKENS = 20


def length_tokens(length: str) -> int:
    """Nominal context size of a split name: '4k' -> 4096, '1M' -> 1048576; a plain number (--synthetic
    only, for models smaller than the benchmark's shortest split) is the token count itself: '512' -> 512."""
    if length.isdigit():
        return int(length)
    return int(length[:-1]) * (1024 if length[-1] == "k" else 1024 * 1024)


# ----------------------------------------------------------------------------------------------
# Scoring


def clean_output(output: str) -> str:
    """The benchmark's clean-up: lower-case, keep the first sentence, drop anything from a `<context>`
    or `<example>` on (a model that starts writing another example)."""
    output = (output or "").lower()
    return output.split(".")[0].split("<context>")[0].split("<example>")[0]


def is_correct(task: str, target: str, output: str, question: str) -> bool:
    """The benchmark's rule for one prediction.

    The task's label words are looked for as substrings of the cleaned output; labels that also occur
    in the question are never the answer and are ignored; what remains must be exactly the target. A
    comma-separated target longer than 3 characters (qa8: "apple,milk") must be matched by exactly its
    parts; a short one (qa19: "n,w") is a single label. Substring matching is the benchmark's: in qa7
    the output "none" also contains "one", so the benchmark never counts a "none" answer correct.
    """
    if task not in TASK_LABELS:
        raise EvalError(f"unknown task {task!r} (BABILong has {TASKS[0]}-{TASKS[-1]})")
    labels = {label.lower() for label in TASK_LABELS[task]}
    output = clean_output(output)
    question = (question or "").lower()
    target = (target or "").lower()
    found = {label for label in labels if label in output} - {label for label in labels if label in question}
    if "," in target and len(target) > 3:
        parts = target.split(",")
        return len(found) == len(parts) and all(part in found for part in parts)
    return found == {target}


def score(task: str, rows: list[dict]) -> tuple[int, int]:
    """(correct, total) over rows with keys target, output, question."""
    correct = sum(is_correct(task, r["target"], r["output"], r["question"]) for r in rows)
    return correct, len(rows)


# ----------------------------------------------------------------------------------------------
# Prompts

# The benchmark's prompt layout ({context} is the sample's `input`; {input} is accepted as well).
DEFAULT_TEMPLATE = ("{instruction}\n\n{examples}\n\n{post_prompt}\n\n"
                    "<context>\n{context}\n</context>\n\nQuestion: {question}")

PROMPTS_FILE = Path(__file__).with_name("babilong_prompts.json")


def load_prompts(path: Path = PROMPTS_FILE) -> dict[str, dict[str, str]]:
    """The built-in prompts of qa1-qa10: this project's own texts with the benchmark's answer formats,
    kept beside this script. Their examples use places, names and objects outside the tasks' label sets,
    so copying an example's answer never scores."""
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
        return {task: {"instruction": p["instruction"],
                       "examples": "\n\n".join(f"<example>\n{e['story']}\nAnswer: {e['answer']}\n</example>"
                                                for e in p["examples"]),
                       "post_prompt": p["post_prompt"]} for task, p in texts.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{PROG}: error: {path}: cannot read the built-in prompts ({type(e).__name__}: {e}); "
                         f"it ships beside {PROG}") from None


PROMPTS = load_prompts()


@dataclass
class PromptConfig:
    """The benchmark's prompt configuration (the "prompt" object of its JSON, in its key order)."""

    instruction: str = ""
    examples: str = ""
    post_prompt: str = ""
    template: str = DEFAULT_TEMPLATE
    chat_template: bool = False
    system_prompt: str = ""

    def name(self) -> str:
        """The benchmark's file-name part: which fields are in use, e.g. 'instruction_yes_..._no'."""
        d = asdict(self)
        return "_".join(f"{k}_{'yes' if d[k] else 'no'}" for k in d if k != "template")

    def format(self, context: str, question: str) -> str:
        """The user message: the template filled in, stripped (as the benchmark does)."""
        context = context.strip()
        return self.template.format(instruction=self.instruction, examples=self.examples,
                                    post_prompt=self.post_prompt, context=context, input=context,
                                    question=question).strip()

    def render(self, context: str, question: str, default_system: str | None = data.DEFAULT_SYSTEM) -> str:
        """The full model input: one user turn in Qwen's ChatML with the assistant header, or plain text.
        Without the chat template a system prompt (from a loaded config) goes first, then a blank line."""
        text = self.format(context, question)
        if self.chat_template:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": text})
            return data.render_chat(messages, add_generation_prompt=True, default_system=default_system)
        return f"{self.system_prompt}\n\n{text}" if self.system_prompt else text


def default_prompt(task: str, chat_template: bool = False, system_prompt: str = "") -> PromptConfig:
    if task not in PROMPTS:
        raise EvalError(f"no built-in prompt for {task} (built in: qa1-qa10); pass the benchmark's "
                        f"--prompt-config FILE.json for it")
    return PromptConfig(**PROMPTS[task], chat_template=chat_template, system_prompt=system_prompt or "")


def check_template(template: str, source: str) -> None:
    try:
        template.format(instruction="", examples="", post_prompt="", context="", input="", question="")
    except (KeyError, IndexError, ValueError) as e:
        raise EvalError(f"{source}: the prompt template does not format ({type(e).__name__}: {e}); its "
                        f"placeholders are {{instruction}} {{examples}} {{post_prompt}} {{context}} "
                        f"{{question}}") from None


def load_prompt_config(path: str | os.PathLike) -> tuple[PromptConfig, dict]:
    """Read the benchmark's JSON ({"prompt": {...}, "generate_kwargs": {...}}). Keys absent from older
    published files (chat_template, system_prompt) take their defaults; other top-level keys are ignored."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--prompt-config {path}: no such file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"--prompt-config {path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("prompt"), dict):
        raise EvalError(f"--prompt-config {path}: expected an object with a \"prompt\" object "
                        f"(the benchmark's format: {{\"prompt\": {{...}}, \"generate_kwargs\": {{...}}}})")
    p = d["prompt"]
    fields = {k: p[k] for k in ("instruction", "examples", "post_prompt", "template", "system_prompt")
              if p.get(k) is not None}
    for key in (k for k, v in fields.items() if not isinstance(v, str)):
        raise EvalError(f"--prompt-config {path}: prompt.{key} must be a string")
    chat = p.get("chat_template", False)
    if not isinstance(chat, bool):
        raise EvalError(f"--prompt-config {path}: prompt.chat_template must be true or false")
    config = PromptConfig(**fields, chat_template=chat)
    check_template(config.template, f"--prompt-config {path}")
    gen = d.get("generate_kwargs") or {}
    if not isinstance(gen, dict):
        raise EvalError(f"--prompt-config {path}: generate_kwargs must be an object")
    return config, gen


# ----------------------------------------------------------------------------------------------
# Data: the hub, a local directory in the hub layout, or built-in synthetic samples

Sample = dict  # {"input": str, "question": str, "target": str}
DATA_SUFFIXES = (".parquet", ".jsonl")


def _path_names(path: str) -> set[str]:
    """The names a data file's path carries: its folders and the '-'/'_' pieces of its file name, so
    '4k/qa1/0000.parquet', 'qa1/4k/0000.parquet', '4k/qa1-00000-of-00002.parquet' and 'qa1_4k.jsonl'
    all name ('qa1', '4k'), while '4k/qa10/...' does not name qa1."""
    p = PurePosixPath(path)
    stem = p.name.split(".")[0]
    return set(p.parts[:-1]) | set(re.split(r"[-_]", stem))


def match_data_files(paths: list[str], task: str, length: str) -> list[str]:
    """The files (relative posix paths) that hold (task, length), in shard order.

    Several layouts of the same data can sit side by side (the hub's parquet conversion adds
    '{length}/{task}/0000.parquet' beside an upload's '{length}/{task}-00000-of-00001.parquet'):
    one is chosen, preferring the one filed under the length folder, parquet, then the shallowest."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in paths:
        if path.endswith(DATA_SUFFIXES) and {task, length} <= _path_names(path):
            p = PurePosixPath(path)
            groups[(str(p.parent), p.suffix)].append(path)
    if not groups:
        return []

    def rank(key: tuple[str, str]) -> tuple:
        parent, suffix = key
        return (PurePosixPath(parent).parts[:1] != (length,), suffix != ".parquet", parent.count("/"), key)

    return sorted(groups[min(groups, key=rank)])


def read_samples(path: Path) -> list[Sample]:
    """Rows with the benchmark's fields from a parquet or JSONL file."""
    fields = ("input", "question", "target")
    if path.suffix == ".parquet":
        rows = evaluation.read_parquet(path, fields)
    else:
        with open(path, encoding="utf-8") as f:
            rows = [row for _, row in evaluation.jsonl_rows(f, str(path), fields)]
    return [{k: "" if r[k] is None else str(r[k]) for k in fields} for r in rows]


class DataSource:
    """Where samples come from. `describe()` is recorded with the predictions (resume compares it)."""

    def check(self, pairs: list[tuple[str, str]]) -> None:
        """Fail early, before any generation, if a (task, length) is not available."""

    def samples(self, task: str, length: str, count_tokens: Callable[[str], int]) -> list[Sample]:
        """The samples of (task, length) in the data's order; count_tokens measures synthetic contexts."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def files(self, task: str, length: str) -> list[str]:
        """The data files (task, length)'s samples come from, recorded with the predictions; none when built."""
        return []


class FileData(DataSource):
    """Data files in the hub's layout, listed in `paths` (relative posix paths)."""

    where: str  # the flag and value, for messages
    paths: list[str]

    def files(self, task: str, length: str) -> list[str]:
        found = match_data_files(self.paths, task, length)
        if not found:
            names = set().union(*(_path_names(p) for p in self.paths if p.endswith(DATA_SUFFIXES)))
            there = [" ".join(x for x in known if x in names) or "none" for known in (LENGTHS, TASKS)]
            raise EvalError(f"{self.where}: no data file for {task} at {length} (looked for a .parquet or .jsonl "
                            f"path naming both, e.g. {length}/{task}/0000.parquet, {length}/{task}-00000-of-00001"
                            f".parquet or {length}/{task}.jsonl, among {len(self.paths)} files; lengths there: "
                            f"{there[0]}; tasks there: {there[1]})")
        return found

    def check(self, pairs):
        for task, length in pairs:
            self.files(task, length)

    def local(self, filename: str) -> Path:
        """The file on this machine (downloaded if need be)."""
        raise NotImplementedError

    def samples(self, task, length, count_tokens):
        return [s for f in self.files(task, length) for s in read_samples(self.local(f))]


class LocalData(FileData):
    """A directory in the hub's layout (parquet or JSONL files)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.where = f"--data-dir {self.root}"
        if not self.root.is_dir():
            raise EvalError(f"{self.where}: no such directory")
        self.paths = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                            if p.is_file() and p.suffix in DATA_SUFFIXES)

    def local(self, filename):
        return self.root / filename

    def describe(self):
        return {"data_dir": str(self.root.resolve())}


class HubData(FileData):
    """The benchmark's parquet files on the Hugging Face hub, downloaded into (and read from) the hub cache.

    The file layout is found by listing the repository, not assumed. When the hub cannot be reached
    (no network, HF_HUB_OFFLINE=1) the cached snapshot of the revision is listed instead."""

    def __init__(self, repo: str, revision: str = "main"):
        self.repo, self.revision = repo, revision
        self.where = evaluation.hub_flags(repo, revision)
        self._paths: list[str] | None = None
        self.snapshot: Path | None = None  # set when working from the cache

    @property
    def paths(self) -> list[str]:  # listed on first use: a run with every pair done needs no network
        if self._paths is None:
            self._paths = evaluation.from_hub(
                lambda: list(huggingface_hub.HfApi().list_repo_files(self.repo, repo_type="dataset",
                                                                     revision=self.revision)),
                self.repo, self.revision, "list the dataset on the hub", "use --data-dir / --synthetic",
                cached=self._cached)
        return self._paths

    def _cached(self) -> list[str]:
        self.snapshot = Path(huggingface_hub.snapshot_download(self.repo, repo_type="dataset", revision=self.revision,
                                                               local_files_only=True))
        self.where += f" (cached snapshot {self.snapshot}; the hub was unreachable)"
        return sorted(p.relative_to(self.snapshot).as_posix() for p in self.snapshot.rglob("*") if p.is_file())

    def local(self, filename):
        if self.snapshot is not None:
            return self.snapshot / filename
        return evaluation.from_hub(lambda: Path(huggingface_hub.hf_hub_download(
            self.repo, filename, repo_type="dataset", revision=self.revision)), self.repo, self.revision,
            f"get {filename}", "use --data-dir / --synthetic")

    def describe(self):
        return {"dataset": self.repo, "revision": self.revision}


class SyntheticData(DataSource):
    """Seeded qa1-qa5 samples built from synthetic.py's bAbI-style worlds: the story's facts, kept in order,
    hidden in filler text until the context holds about `length` tokens of the model's tokenizer
    ('4k' -> 4096). Sample i of (task, length) depends only on (seed, task, length, i)."""

    def __init__(self, seed: int = 0, count: int = 100):
        self.seed, self.count = seed, count

    def check(self, pairs):
        for task, _ in pairs:
            if task not in SYNTHETIC_TASKS:
                raise EvalError(f"--synthetic builds {', '.join(SYNTHETIC_TASKS)} only, not {task}")

    def samples(self, task, length, count_tokens):
        self.check([(task, length)])
        out = []
        for i in range(self.count):
            rng = self.story_rng(task, length, i)
            facts, question, answer = synthetic.babi_story(rng, task)
            text = synthetic.haystack(rng, facts, length_tokens(length), count_tokens)  # '0k': the facts alone
            out.append({"input": text, "question": question, "target": answer})
        return out

    def story_rng(self, task: str, length: str, i: int) -> random.Random:
        """The generator of sample i: its first draw is the story (synthetic.babi_story), then the filler. A
        training set can so check that it holds none of the evaluation's stories (experiments/real_base.py)."""
        return random.Random(f"babilong-synthetic/{self.seed}/{task}/{length}/{i}")

    def describe(self):
        return {"synthetic": True, "seed": self.seed}


# ----------------------------------------------------------------------------------------------
# Predictions files (the benchmark's CSV format) and results table

CSV_COLUMNS = ("target", "output", "question")


def write_predictions(path: Path, rows: list[dict]) -> None:
    """The benchmark's CSV: a leading unnamed index column (as pandas writes it), then target, output,
    question."""
    evaluation.write_csv(path, ["", *CSV_COLUMNS], [[i, *(r[c] for c in CSV_COLUMNS)] for i, r in enumerate(rows)])


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """Rows of a predictions CSV (with or without the index column). Empty cells read as ''."""
    return evaluation.read_csv(path, CSV_COLUMNS)


def score_csv(path: str | os.PathLike, task: str | None = None) -> tuple[int, int]:
    """(correct, total) of a predictions CSV; the task is read from a benchmark file name if not given."""
    if task is None:
        m = re.match(r"(qa\d+)_", Path(path).name)
        if not m:
            raise EvalError(f"--score-csv {path}: pass --task qaN (the file name does not start with one)")
        task = m.group(1)
    if task not in TASK_LABELS:
        raise EvalError(f"--task: unknown task {task!r} (BABILong has {TASKS[0]}-{TASKS[-1]})")
    rows = read_predictions(path)
    if not rows:
        raise EvalError(f"--score-csv {path}: no rows")
    return score(task, rows)


def results_table(results: dict, tasks: list[str], lengths: list[str]) -> str:
    """Markdown: accuracy in % per task (rows) and length (columns), then the mean over the tasks."""
    rows = [(task, results["accuracy"][task]) for task in tasks] + [("mean", results["mean"])]
    return evaluation.markdown_table(["task", *lengths], [[name, *(evaluation.percent(values.get(n)) for n in lengths)]
                                                          for name, values in rows])


def collect_results(counts: dict[tuple[str, str], tuple[int, int]], tasks: list[str],
                    lengths: list[str]) -> dict:
    """The JSON results: accuracy and counts per (task, length); mean over tasks where all have a value."""
    acc = {t: {n: counts[t, n][0] / counts[t, n][1] for n in lengths if (t, n) in counts} for t in tasks}
    mean = {n: (sum(acc[t][n] for t in tasks) / len(tasks) if all(n in acc[t] for t in tasks) else None)
            for n in lengths}
    return {"tasks": tasks, "lengths": lengths, "accuracy": acc, "mean": mean,
            "correct": {t: {n: counts[t, n][0] for n in acc[t]} for t in tasks},
            "total": {t: {n: counts[t, n][1] for n in acc[t]} for t in tasks}}


# ----------------------------------------------------------------------------------------------
# The evaluation run


def encode_prompts(setup: Setup, prompt: PromptConfig, samples: list[Sample]) -> list[list[int]]:
    """As the benchmark: plain text gets the tokenizer's special tokens (none for Qwen), a rendered chat
    prompt already holds its own."""
    texts = [prompt.render(s["input"], s["question"], setup.system) for s in samples]
    return setup.encode(texts, add_special_tokens=not prompt.chat_template)


def pair_paths(out: Path, task: str, length: str, prompt: PromptConfig) -> tuple[Path, Path]:
    stem = f"{task}_{length}_{prompt.name()}"
    return out / f"{stem}.csv", out / f"{stem}.json"


def prompts_for(args: argparse.Namespace, task: str) -> PromptConfig:
    """The prompt of a task: built-in or --prompt-config, with --chat-template/--system-prompt on top."""
    prompt = args.loaded_prompt if args.prompt_config else default_prompt(task)
    flags = {"chat_template": args.chat_template, "system_prompt": args.system_prompt}
    return replace(prompt, **{k: v for k, v in flags.items() if v is not None})


def make_source(args: argparse.Namespace) -> DataSource:
    if args.synthetic:
        return SyntheticData(seed=args.seed, count=args.max_samples or 100)
    if args.data_dir:
        return LocalData(args.data_dir)
    return HubData(args.dataset, args.revision)


def pending_pairs(args: argparse.Namespace, setup: Setup, data_record: dict, counts: dict) -> list[tuple]:
    """The (task, length) pairs still to run, longest contexts first (a prompt that does not fit or runs
    out of memory shows up at the start); finished ones are scored from their CSV into `counts`."""
    pairs = [(t, n) for n in sorted(args.lengths, key=length_tokens, reverse=True) for t in args.tasks]
    jobs = []
    for task, length in pairs:
        prompt = prompts_for(args, task)
        csv_path, json_path = pair_paths(Path(args.out), task, length, prompt)
        record = {"prompt": asdict(prompt), "generate_kwargs": setup.generate_kwargs(), "data": data_record}
        if evaluation.is_finished(csv_path, json_path, record):
            counts[task, length] = score(task, read_predictions(csv_path))
            print(f"{task} {length}: done before, skipped ({csv_path.name})")
        else:
            jobs.append((task, length, prompt, csv_path, json_path, record))
    if jobs:
        print(f"{len(jobs)} of {len(pairs)} (task, length) pairs to run, longest first; writing to {args.out}")
    return jobs


def load_samples(args: argparse.Namespace, source: DataSource, setup: Setup, task: str, length: str,
                 prompt: PromptConfig) -> tuple[list[Sample], list[list[int]]]:
    """The samples of (task, length) and their prompts' token ids, checked to fit the model."""
    samples = source.samples(task, length, setup.count_tokens)
    if args.max_samples:
        samples = samples[:args.max_samples]
    if not samples:
        raise EvalError(f"{task} {length}: the data has no samples")
    ids = encode_prompts(setup, prompt, samples)
    evaluation.check_overflow(f"{task} {length}", [len(p) for p in ids], setup, args.overflow,
                              f"leave out --lengths {length}")
    return samples, ids


def evaluate(args: argparse.Namespace) -> dict:
    """Generate and score every requested (task, length) not already finished in --out; write the
    predictions, results.md and results.json; return the results."""
    setup = evaluation.load_setup(args.model, args.max_new_tokens, weights=not args.server)
    source = make_source(args)
    out = Path(args.out)
    data_record = {**source.describe(), "max_samples": args.max_samples}
    counts: dict[tuple[str, str], tuple[int, int]] = {}
    jobs = pending_pairs(args, setup, data_record, counts)
    source.check([(t, n) for t, n, *_ in jobs])
    out.mkdir(parents=True, exist_ok=True)  # only once the data is known to be there

    engine = evaluation.make_engine(args, setup)  # loads the model on its first use: not at all when all is done
    for task, length, prompt, csv_path, json_path, record in jobs:
        samples, ids = load_samples(args, source, setup, task, length, prompt)
        outputs = evaluation.generate_texts(engine, setup, ids, desc=f"{task} {length}")
        rows = [{"target": s["target"], "output": o, "question": s["question"]}
                for s, o in zip(samples, outputs, strict=True)]
        write_predictions(csv_path, rows)
        counts[task, length] = c, n = score(task, rows)
        evaluation.write_json(json_path, {**record, "files": source.files(task, length), "model": str(args.model),
                                          **engine.describe(), "samples": n, "accuracy": c / n}, indent=4)
        print(f"{task} {length}: accuracy {c / n:.3f} ({c}/{n}) -> {csv_path}")
    return write_results(args, setup, counts, data_record)


def write_results(args: argparse.Namespace, setup: Setup, counts: dict, data_record: dict) -> dict:
    """results.md and results.json of the run (every requested pair, finished now or before)."""
    out = Path(args.out)
    tasks, lengths = list(args.tasks), sorted(args.lengths, key=length_tokens)
    results = collect_results(counts, tasks, lengths)
    table = results_table(results, tasks, lengths)
    names = sorted({prompts_for(args, t).name() for t in tasks})
    results = {"model": str(args.model), "prompt": names[0] if len(names) == 1 else names,
               "data": data_record, **results}
    header = (f"BABILong accuracy (%) of {args.model}\n\nprompt: {', '.join(names)}; data: "
              f"{json.dumps(data_record)}; greedy, at most {setup.max_new_tokens} new tokens")
    evaluation.save_results(out, header, table, results)
    return results


def benchmark(args: argparse.Namespace) -> dict:
    """Samples/s of batched generation against one prompt at a time, on the first (task, length)."""
    args.max_samples = args.max_samples or 16
    setup = evaluation.load_setup(args.model, args.max_new_tokens, weights=not args.server)
    source = make_source(args)
    task, length = args.tasks[0], args.lengths[0]
    source.check([(task, length)])
    _, ids = load_samples(args, source, setup, task, length, prompts_for(args, task))
    return evaluation.benchmark_batching(evaluation.make_engine(args, setup), ids, f"{task} {length}")


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluation.add_common_args(p, out_help="results folder of this model: a predictions CSV and JSON per task and "
                               "length, results.md, results.json; finished (task, length) pairs are skipped on a rerun")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), metavar="qaN",
                   help="tasks to evaluate (default: qa1-qa5; built-in prompts for qa1-qa10, the others "
                        "need --prompt-config)")
    p.add_argument("--lengths", nargs="+", default=list(DEFAULT_LENGTHS), metavar="LEN",
                   help=f"context lengths, the benchmark's split names: {' '.join(LENGTHS)} "
                        f"(default: {' '.join(DEFAULT_LENGTHS)}); with --synthetic also a token count such as 512")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", default="RMT-team/babilong", metavar="REPO",
                     help="hub dataset (default: RMT-team/babilong, 100 samples per task and length; "
                          "RMT-team/babilong-1k-samples has 1000); cached, then works offline")
    src.add_argument("--data-dir", metavar="DIR",
                     help="local data in the hub layout ({length}/{task}/*.parquet, "
                          "{length}/{task}-*.parquet) or JSONL files ({length}/{task}.jsonl), with the "
                          "fields input, question, target")
    src.add_argument("--synthetic", action="store_true",
                     help="built-in seeded qa1-qa5 samples: no download (tests, demos, offline use)")
    p.add_argument("--revision", default="main", help="branch, tag or commit of --dataset (default: main)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --synthetic samples (default: 0)")
    p.add_argument("--prompt-config", metavar="FILE.json",
                   help="the benchmark's prompt configuration JSON (published beside each predictions "
                        "CSV), to reproduce a published prompt exactly; it holds one task's texts")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="the prompt as one user turn in Qwen's ChatML, ending in the assistant header "
                        "(default: plain text, or what --prompt-config says)")
    p.add_argument("--system-prompt", metavar="TEXT",
                   help="system turn for --chat-template (default: none, so Qwen's template adds its own)")
    p.add_argument("--max-samples", type=int, metavar="N",
                   help="only the first N samples of each task and length (default: all; 100 for "
                        "--synthetic)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"generated tokens at most (default: {MAX_NEW_TOKENS}, the benchmark's protocol, or "
                        f"the max_new_tokens of --prompt-config)")
    p.add_argument("--score-csv", metavar="FILE",
                   help="only re-score a predictions CSV in the benchmark's format (columns target, output, "
                        "question) and print 'accuracy: A (correct/total)'")
    p.add_argument("--task", metavar="qaN", help="task of --score-csv (default: read from the file name)")
    p.add_argument("--benchmark", action="store_true",
                   help="print samples/s of batched decoding (--batch-size) against one prompt at a time, "
                        "on the first task and length (16 samples unless --max-samples); writes nothing")
    return p


def validate(args: argparse.Namespace) -> None:
    """Check the flags before anything is loaded; raises EvalError naming the flag."""
    evaluation.check_common_args(args, need_out=not args.benchmark)
    for task in args.tasks:
        if task not in TASK_LABELS:
            raise EvalError(f"--tasks: unknown task {task!r} (BABILong has {TASKS[0]}-{TASKS[-1]})")
    for length in args.lengths:
        if args.synthetic and length.isdigit() and int(length) > 0:
            continue  # a token count: the synthetic data can be built at any length
        if length not in LENGTHS:
            raise EvalError(f"--lengths: unknown length {length!r} (the benchmark's: {' '.join(LENGTHS)})")
    args.tasks, args.lengths = list(dict.fromkeys(args.tasks)), list(dict.fromkeys(args.lengths))
    evaluation.check_positive(args, "max_samples", "max_new_tokens")
    if args.task:
        raise EvalError("--task goes with --score-csv; use --tasks to choose what to evaluate")
    if args.benchmark and args.server:
        raise EvalError("--benchmark measures the built-in model; it does not take --server")
    if args.synthetic:
        SyntheticData().check([(t, "0k") for t in args.tasks])
    validate_prompt(args)


def validate_prompt(args: argparse.Namespace) -> None:
    """--prompt-config, --chat-template, --system-prompt and the --max-new-tokens they imply."""
    gen = {}
    if args.prompt_config:
        args.loaded_prompt, gen = load_prompt_config(args.prompt_config)
        p = args.loaded_prompt
        if len(args.tasks) > 1 and (p.instruction or p.examples or p.post_prompt):
            raise EvalError(f"--prompt-config {args.prompt_config} holds one task's instruction and "
                            f"examples; evaluate one task with it (--tasks qaN) or one config per run")
        if gen.get("do_sample") or (gen.get("num_beams") or 1) > 1:
            print(f"note: --prompt-config {args.prompt_config} asks for sampling or beam search; this "
                  f"evaluation decodes greedily, as the benchmark's leaderboard runs do")
    else:
        for task in args.tasks:
            default_prompt(task)  # tasks past qa10 need a prompt config
    chat = args.chat_template if args.chat_template is not None else (
        args.prompt_config is not None and args.loaded_prompt.chat_template)
    if args.system_prompt is not None and not chat:
        raise EvalError("--system-prompt needs --chat-template (only the chat format has a system turn)")
    if args.max_new_tokens is None:
        args.max_new_tokens = gen.get("max_new_tokens") or MAX_NEW_TOKENS
        if not isinstance(args.max_new_tokens, int) or args.max_new_tokens < 1:
            raise EvalError(f"--prompt-config {args.prompt_config}: generate_kwargs.max_new_tokens must be a "
                            f"positive integer")


def run(args: argparse.Namespace) -> None:
    if args.score_csv:
        correct, total = score_csv(args.score_csv, args.task)
        print(f"accuracy: {correct / total:.3f} ({correct}/{total})")
        return
    validate(args)
    if args.benchmark:
        benchmark(args)
    else:
        evaluate(args)


def main(argv: list[str] | None = None) -> int:
    return evaluation.main(PROG, build_parser(), run, argv,
                           resume_note="finished (task, length) pairs are saved, the same command resumes")


if __name__ == "__main__":
    sys.exit(main())
