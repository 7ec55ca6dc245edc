"""LongBench (v1) evaluation with the benchmark's prompts, truncation and scoring.

    # the paper's four QA tasks at 8K (LongBench's 7500-token prompt budget), from the hub (cached)
    python eval_longbench.py --model Qwen/Qwen2.5-7B --out runs/longbench/qwen2.5-7b
    # a chat-tuned checkpoint: QA prompts wrapped in Qwen's chat format after truncation
    python eval_longbench.py --model CHECKPOINT_DIR --chat-template --out runs/longbench/focusft
    # the seven English tasks scored with LongBench's qa_f1_score (see --help for the others)
    python eval_longbench.py --model DIR --tasks narrativeqa qasper multifieldqa_en hotpotqa 2wikimqa \\
        musique triviaqa --out runs/longbench/qa7
    # offline: the hub cache (HF_HUB_OFFLINE=1), or LongBench's unzipped data/ folder (<task>.jsonl)
    python eval_longbench.py --model DIR --data-dir longbench/data --out runs/longbench/mine
    # re-score a folder of predictions in LongBench's layout (ours or LongBench's pred/<model>/)
    python eval_longbench.py --score-dir runs/longbench/qwen2.5-7b
    # LongBench-E: <task>_e.jsonl, scored per length bucket (0-4k, 4-8k, 8k+ words)
    python eval_longbench.py --model DIR --longbench-e --out runs/longbench-e/mine

The protocol is LongBench's (THUDM/LongBench, folder LongBench/: pred.py, eval.py, metrics.py and
config/*.json): each task's prompt template filled with the sample's `context` and `input`; the
formatted prompt cut in the middle to --max-length tokens (its first and last int(max_length/2)
tokens, each half decoded, the two strings joined and encoded again) and only then wrapped in the chat
format (except the few-shot and code tasks trec, triviaqa, lcc, repobench-p); greedy decoding of at
most the task's max new tokens; the prediction is the new text. A sample's score is the best over its
reference answers; a task's score is the mean x 100, rounded to two decimals. Predictions are written
as LongBench writes them: `<task>.jsonl` with one {"pred", "answers", "all_classes", "length"} object
per sample, so LongBench's own eval.py reads them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import string
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

import huggingface_hub
import numpy as np
import tokenizers

import data
import evaluation

PROG = "eval_longbench.py"


EvalError = evaluation.EvalError  # a problem the user can fix: one line, no traceback


# ----------------------------------------------------------------------------------------------
# The benchmark's facts: prompt templates, max new tokens, metrics, task lists

# The prompt templates, verbatim from LongBench/config/dataset2prompt.json (THUDM/LongBench @ 2e00731),
# typos included ("asconcisely" in narrativeqa, the leading space of qasper's second instruction):
# the text is the benchmark. Only the string literals are split, to keep lines short.
PROMPTS: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question asconcisely as you can, using a single phrase if possible. "
        "Do not provide any explanation.\n\nStory: {context}\n\n"
        "Now, answer the question based on the story asconcisely as you can, using a single phrase if possible. "
        "Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, "
        "using a single phrase or sentence if possible. If the question cannot be answered based on the "
        "information in the article, write \"unanswerable\". If the question is a yes/no question, answer "
        "\"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n"
        " Answer the question based on the above article as concisely as you can, using a single phrase or "
        "sentence if possible. If the question cannot be answered based on the information in the article, "
        "write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\n"
        "Now, answer the following question based on the above text, only give me the answer and do not "
        "output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:"
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query "
        "in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above "
        "meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
        "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output format "
        "should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\n"
        "Please enter the number of the paragraph that the abstract is from. The answer format must be like "
        "\"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: "
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
# 2WikiMQA and MuSiQue use HotpotQA's template word for word.
PROMPTS["2wikimqa"] = PROMPTS["musique"] = PROMPTS["hotpotqa"]

# LongBench/config/dataset2maxlen.json: new tokens generated at most, per task.
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "passage_count": 32,
    "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}

# The tasks this script runs, in LongBench's order (pred.py's list, less what it cannot score yet).
TASKS = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
         "multi_news", "trec", "triviaqa", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
PAPER_TASKS = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa")  # FocuSFT's LongBench QA at 8K
# LongBench-E (pred.py --e): the same tasks resampled evenly over lengths, in data/<task>_e.jsonl, scored per
# length bucket (eval.py's scorer_e: the record's `length` in words, < 4000, < 8000, the rest).
E_TASKS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
           "passage_count", "passage_retrieval_en", "lcc", "repobench-p")  # pred.py's list, less samsum
E_BUCKETS = ("0-4k", "4-8k", "8k+")
# The rest of LongBench v1, and why it is not here: the Chinese tasks' metrics segment words with jieba;
# samsum's generation stops at a newline after at least one token (pred.py), which the engines do not do.
NOT_IMPLEMENTED = {
    "multifieldqa_zh": "qa_f1_zh_score (jieba word segmentation)", "dureader": "rouge_zh_score (jieba)",
    "vcsum": "rouge_zh_score (jieba)", "lsht": "classification_score on Chinese news",
    "passage_retrieval_zh": "retrieval_zh_score (a Chinese task)",
    "samsum": "rouge_score with pred.py's newline stop and minimum length",
}
# pred.py: "chat models are better off without build prompts on these tasks" (few-shot / completion).
NO_CHAT_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# eval.py: the prediction of these tasks is cut to its first line (after leading newlines) before scoring.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
DEFAULT_MAX_LENGTH = 7500  # LongBench/config/model2maxlen.json: the prompt budget of its 8K models


# ----------------------------------------------------------------------------------------------
# Metrics (LongBench/metrics.py's definitions)


def normalize_answer(text: str) -> str:
    """LongBench's (and SQuAD's) normalisation, in its order: lower-case, drop ASCII punctuation, replace
    the articles a/an/the by a space, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def token_f1(prediction: list[str], reference: list[str]) -> float:
    """F1 of two token multisets: overlap counts each token min(times in prediction, times in reference)."""
    overlap = sum((Counter(prediction) & Counter(reference)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction), overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 of the normalised prediction against one reference answer."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def count_score(prediction: str, ground_truth: str) -> float:
    """passage_count: the fraction of the numbers in the prediction that equal the answer."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(ground_truth) for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, ground_truth: str) -> float:
    """passage_retrieval_en: the fraction of the numbers in the prediction that equal the paragraph
    number of the answer ("Paragraph 12")."""
    target = re.findall(r"Paragraph (\d+)", ground_truth)[0]
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def classification_score(prediction: str, ground_truth: str, all_classes: list[str]) -> float:
    """trec: the class names found in the prediction (substring match); names that are part of the answer
    without being it are dropped; 1/len(found) if the answer is among them, else 0.

    The dropping walks the list by index while removing from it, as LongBench's loop over a list it
    mutates does, so the entry right after a removed one is never examined (kept: it is the benchmark)."""
    found = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(found):
        term = found[i]
        if term in ground_truth and term != ground_truth:
            found.remove(term)
        i += 1
    return 1.0 / len(found) if ground_truth in found else 0.0


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's fuzz.ratio as LongBench runs it (its requirements leave out python-Levenshtein, so
    fuzzywuzzy falls back to difflib): 100 for equal strings, 0 if either is empty, else
    round(100 x SequenceMatcher ratio)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str) -> float:
    """lcc, repobench-p: the prediction's first line (after leading newlines) with no `, # or //, compared
    with the reference line by fuzz_ratio / 100 ('' when every line has one)."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((x for x in lines if "`" not in x and "#" not in x and "//" not in x), "")
    return fuzz_ratio(line, ground_truth) / 100


def _rouge_sentences(text: str) -> list[str]:
    """The `rouge` package's sentences: split at '.', pieces of length 0 dropped, whitespace collapsed."""
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """The words of one longest common subsequence of x and y, the one `rouge`'s back-trace picks (from the
    end: a match, else up when that cell is strictly larger, else left). Iterative: `rouge` recurses."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]  # table[i][j]: LCS length of x[:i], y[:j]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    words, i, j = [], len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_score(prediction: str, ground_truth: str) -> float:
    """gov_report, qmsum, multi_news: ROUGE-L F of the `rouge` package (1.0.1) that LongBench calls,
    summary level, on its defaults. Both texts are split into sentences at '.', words at single spaces, and
    every count is of DISTINCT words: m and n are the reference's and the prediction's distinct words, and
    the overlap is the distinct words of the union of LCS(reference sentence, prediction sentence) over all
    pairs. F = 2PR / (P + R + 1e-8), P = overlap / n, R = overlap / m. An empty text scores 0 (`rouge`
    raises, LongBench's bare except returns 0)."""
    hyp, ref = _rouge_sentences(prediction), _rouge_sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    m = len({w for sentence in ref for w in sentence.split(" ")})
    n = len({w for sentence in hyp for w in sentence.split(" ")})
    union: set[str] = set()
    for r in ref:
        for h in hyp:
            union.update(_lcs_words(r.split(" "), h.split(" ")))
    precision, recall = len(union) / n, len(union) / m
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


# LongBench/eval.py's dataset2metric, for the tasks above.
METRICS = {
    "narrativeqa": "qa_f1_score", "qasper": "qa_f1_score", "multifieldqa_en": "qa_f1_score",
    "hotpotqa": "qa_f1_score", "2wikimqa": "qa_f1_score", "musique": "qa_f1_score", "triviaqa": "qa_f1_score",
    "gov_report": "rouge_score", "qmsum": "rouge_score", "multi_news": "rouge_score",
    "trec": "classification_score", "passage_count": "count_score", "passage_retrieval_en": "retrieval_score",
    "lcc": "code_sim_score", "repobench-p": "code_sim_score",
}


def sample_score(task: str, prediction: str, answers: list[str], all_classes: list[str] | None = None) -> float:
    """One sample's score: the best over its reference answers (0 when none matches)."""
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[task]
    if metric == "classification_score":
        return max([classification_score(prediction, a, all_classes or []) for a in answers], default=0.0)
    scorer = {"qa_f1_score": qa_f1_score, "rouge_score": rouge_score, "count_score": count_score,
              "retrieval_score": retrieval_score, "code_sim_score": code_sim_score}[metric]
    return max([scorer(prediction, a) for a in answers], default=0.0)


def length_bucket(length: int) -> str:
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def task_score_e(task: str, rows: list[dict]) -> dict[str, float | None]:
    """eval.py's LongBench-E score: per length bucket, the mean x 100 (numpy's mean, as eval.py), rounded to
    two decimals; None for a bucket with no sample (eval.py writes NaN there)."""
    by_bucket: dict[str, list[float]] = {b: [] for b in E_BUCKETS}
    for n, r in enumerate(rows, 1):
        if not isinstance(r.get("length"), int | float):
            raise EvalError(f"{task}: prediction {n} has no numeric length (LongBench-E buckets by it)")
        by_bucket[length_bucket(r["length"])].append(sample_score(task, r["pred"], r["answers"], r.get("all_classes")))
    return {b: round(100 * float(np.mean(v)), 2) if v else None for b, v in by_bucket.items()}


def task_score(task: str, rows: list[dict]) -> float:
    """eval.py's score of a task: the samples' scores summed, x 100 / count, rounded to two decimals.
    Rows have LongBench's prediction fields pred, answers, all_classes."""
    if not rows:
        raise EvalError(f"{task}: no predictions to score")
    total = sum(sample_score(task, r["pred"], r["answers"], r.get("all_classes")) for r in rows)
    return round(100 * total / len(rows), 2)


# ----------------------------------------------------------------------------------------------
# Prompts and truncation


def build_prompt(task: str, sample: dict) -> str:
    """The task's template filled with the sample's context and question (LongBench: template.format(**sample))."""
    if task not in PROMPTS:
        raise EvalError(f"unknown task {task!r} (this script runs: {' '.join(TASKS)})")
    return PROMPTS[task].format(context=sample["context"], input=sample["input"])


def truncate_middle(ids: list[int], max_length: int) -> list[int]:
    """At most max_length tokens: unchanged if it fits, else the first and the last int(max_length / 2)
    tokens (pred.py keeps both ends because instructions sit at the start and the question at the end)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (got {max_length})")
    if len(ids) <= max_length:
        return list(ids)
    half = int(max_length / 2)
    return list(ids[:half]) + list(ids[-half:])


def truncate_prompts(tokenizer: tokenizers.Tokenizer, prompts: list[str], max_length: int) -> list[str]:
    """pred.py's truncation of formatted prompts: each encoded, cut in the middle (truncate_middle), each
    kept half decoded without special tokens and the two strings joined. The caller encodes the result
    again, so a few tokens can merge (or split) at the seam: the budget is LongBench's, not an exact count.
    The batch calls run on all cores (a NarrativeQA prompt is about 25K tokens before truncation)."""
    ids = [e.ids for e in tokenizer.encode_batch(prompts)]
    over = [i for i, x in enumerate(ids) if len(x) > max_length]
    half = int(max_length / 2)
    kept = [truncate_middle(ids[i], max_length) for i in over]
    heads = tokenizer.decode_batch([k[:half] for k in kept], skip_special_tokens=True)
    tails = tokenizer.decode_batch([k[half:] for k in kept], skip_special_tokens=True)
    out = list(prompts)
    for i, head, tail in zip(over, heads, tails, strict=True):
        out[i] = head + tail
    return out


def model_inputs(task: str, samples: list[dict], tokenizer: tokenizers.Tokenizer, max_length: int,
                 chat_template: bool, default_system: str | None = data.DEFAULT_SYSTEM) -> list[str]:
    """The texts the model reads: each prompt, truncated, then (--chat-template, not for NO_CHAT_TASKS) one
    user turn in Qwen's chat format ending in the assistant header. Wrapping comes after truncation, as in
    pred.py, so the chat tokens are outside the budget and never cut."""
    texts = truncate_prompts(tokenizer, [build_prompt(task, s) for s in samples], max_length)
    if chat_template and task not in NO_CHAT_TASKS:
        texts = [data.render_chat([{"role": "user", "content": t}], add_generation_prompt=True,
                                  default_system=default_system) for t in texts]
    return texts


# ----------------------------------------------------------------------------------------------
# Data: LongBench's <task>.jsonl files, from the hub's data.zip, a local folder or a local zip

HUB_DATASET = "THUDM/LongBench"
HUB_FILE = "data.zip"  # unzips to data/<task>.jsonl (and data/<task>_e.jsonl for LongBench-E)


def parse_samples(lines: Iterable[str], where: str) -> list[dict]:
    """LongBench's records (input, context, answers, length, all_classes, ...) from JSON lines; one clear
    error naming the file and line for a record the evaluation could not use."""
    samples = []
    for n, row in evaluation.jsonl_rows(lines, where, ("input", "context", "answers")):
        if not isinstance(row["input"], str) or not isinstance(row["context"], str):
            raise EvalError(f"{where}:{n}: input and context must be strings")
        answers = row["answers"]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise EvalError(f"{where}:{n}: answers must be a list of strings")
        classes = row.get("all_classes")
        if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise EvalError(f"{where}:{n}: all_classes must be null or a list of strings")
        samples.append(row)
    return samples


def zip_member(names: list[str], task: str) -> str | None:
    """The zip entry holding a task: data/<task>.jsonl (or <task>.jsonl at any depth, shallowest first)."""
    found = [n for n in names if PurePosixPath(n).name == f"{task}.jsonl"]
    return min(found, key=lambda n: (n.count("/"), n)) if found else None


class ZipData:
    """LongBench's data.zip: a local file, or the hub's copy (fetched on first use, so a rerun whose tasks
    are all done needs neither the network nor the cache)."""

    def __init__(self, where: str, record: dict, path: Path | None = None, fetch: Callable[[], Path] | None = None):
        self.where, self.record, self._path, self._fetch = where, record, path, fetch
        self._names: list[str] | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = self._fetch()
        return self._path

    @property
    def names(self) -> list[str]:
        if self._names is None:
            try:
                with zipfile.ZipFile(self.path) as z:
                    self._names = z.namelist()
            except (zipfile.BadZipFile, OSError) as e:
                raise EvalError(f"{self.where}: {self.path} is not a readable zip file ({e})") from None
        return self._names

    def check(self, tasks: list[str]) -> None:
        missing = [t for t in tasks if zip_member(self.names, t) is None]
        if missing:
            raise EvalError(f"{self.where}: no {', '.join(f'{t}.jsonl' for t in missing)} in {self.path}")

    def samples(self, task: str) -> list[dict]:
        self.check([task])
        member = zip_member(self.names, task)
        with zipfile.ZipFile(self.path) as z:
            text = z.read(member).decode("utf-8")
        return parse_samples(text.splitlines(), f"{self.path}:{member}")

    def describe(self) -> dict:
        return self.record


class FolderData:
    """A folder of LongBench's <task>.jsonl files (the unzipped data.zip's data/ folder)."""

    def __init__(self, root: Path):
        self.root, self.where = root, f"--data-dir {root}"

    def check(self, tasks: list[str]) -> None:
        missing = [t for t in tasks if not (self.root / f"{t}.jsonl").is_file()]
        if missing:
            raise EvalError(f"{self.where}: no {', '.join(f'{t}.jsonl' for t in missing)} (expected LongBench's "
                            f"files, <task>.jsonl, as in data.zip's data/ folder)")

    def samples(self, task: str) -> list[dict]:
        self.check([task])
        path = self.root / f"{task}.jsonl"
        with open(path, encoding="utf-8") as f:
            return parse_samples(f, str(path))

    def describe(self) -> dict:
        return {"data_dir": str(self.root.resolve())}


def hub_zip(repo: str, revision: str) -> Path:
    """data.zip from the hub, through (and with HF_HUB_OFFLINE=1 or no network, from) the hub cache."""
    return evaluation.from_hub(lambda: Path(huggingface_hub.hf_hub_download(
        repo, HUB_FILE, repo_type="dataset", revision=revision)), repo, revision, f"get {HUB_FILE}",
        "pass --data-dir with LongBench's <task>.jsonl files")


DataSource = ZipData | FolderData  # .where (for messages), .check(tasks), .samples(task), .describe()


def make_source(args: argparse.Namespace) -> DataSource:
    if args.data_dir:
        path = Path(args.data_dir).expanduser()
        if path.is_file() and path.suffix == ".zip":
            return ZipData(f"--data-dir {path}", {"data_zip": str(path.resolve())}, path=path)
        if not path.is_dir():
            raise EvalError(f"--data-dir {path}: no such folder (or data.zip file)")
        return FolderData(path)
    return ZipData(f"--dataset {args.dataset}", {"dataset": args.dataset, "revision": args.revision},
                   fetch=lambda: hub_zip(args.dataset, args.revision))


# ----------------------------------------------------------------------------------------------
# Predictions (LongBench's layout) and results


def prediction_rows(samples: list[dict], preds: list[str]) -> list[dict]:
    """pred.py's record per sample, in the data's order: pred, answers, all_classes, length."""
    return [{"pred": p, "answers": s["answers"], "all_classes": s.get("all_classes"), "length": s.get("length")}
            for s, p in zip(samples, preds, strict=True)]


def read_prediction_rows(path: Path) -> list[dict]:
    """A <task>.jsonl of predictions (ours or LongBench's pred/<model>/), checked field by field."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, row in evaluation.jsonl_rows(f, str(path)):
            if not isinstance(row, dict) or not isinstance(row.get("pred"), str) or not isinstance(
                    row.get("answers"), list):
                raise EvalError(f"{path}:{n}: expected LongBench's prediction record with a string pred and a "
                                f"list of answers")
            rows.append(row)
    return rows


def average(values: list[float | None]) -> float | None:
    """The mean of the tasks' (rounded) scores, rounded to two decimals, as LongBench's tables average;
    None when a task has no score (a LongBench-E bucket without samples)."""
    return None if not values or None in values else round(sum(values) / len(values), 2)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def results_table(scores: dict[str, float | dict], counts: dict[str, int]) -> str:
    """Markdown: one row per task (metric, samples, score x 100; LongBench-E: one column per length bucket),
    then the average over the tasks."""
    columns = list(E_BUCKETS) if any(isinstance(s, dict) for s in scores.values()) else ["score"]

    def values(score):
        return [score[c] for c in columns] if isinstance(score, dict) else [score]

    lines = ["| task | metric | samples | " + " | ".join(columns) + " |",
             "| --- | --- | ---: |" + " ---: |" * len(columns)]
    lines += [f"| {t} | {METRICS[t]} | {counts[t]} | " + " | ".join(map(_cell, values(s))) + " |"
              for t, s in scores.items()]
    means = [average([values(s)[i] for s in scores.values()]) for i in range(len(columns))]
    lines.append("| average | | | " + " | ".join(map(_cell, means)) + " |")
    return "\n".join(lines)


def score_dir(folder: str | Path, longbench_e: bool = False) -> dict[str, float | dict]:
    """eval.py on a folder: score every <task>.jsonl of a task this script knows, write result.json
    (LongBench's format: {task: score}, or {task: {bucket: score}} for LongBench-E) there, print the table;
    return the scores."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"--score-dir {folder}: no such folder")
    files = {p.stem: p for p in sorted(folder.glob("*.jsonl"))}
    tasks = [t for t in TASKS if t in files]
    skipped = sorted(set(files) - set(tasks))
    if not tasks:
        raise EvalError(f"--score-dir {folder}: no predictions of a task this script scores ({' '.join(TASKS)})")
    scores, counts = {}, {}
    for task in tasks:
        rows = read_prediction_rows(files[task])
        scores[task], counts[task] = (task_score_e if longbench_e else task_score)(task, rows), len(rows)
    evaluation.write_json(folder / "result.json", scores, indent=4)
    if skipped:
        print(f"not scored (no metric here): {', '.join(skipped)}")
    print(results_table(scores, counts))
    return scores


# ----------------------------------------------------------------------------------------------
# The evaluation run


def task_record(args: argparse.Namespace, task: str, setup: evaluation.Setup, source: DataSource) -> dict:
    """What a task's predictions depend on; a rerun reuses them only if all of it is the same."""
    return {"prompt": {"template": PROMPTS[task], "max_length": args.max_length,
                       "chat_template": bool(args.chat_template and task not in NO_CHAT_TASKS)},
            "generate_kwargs": setup.generate_kwargs(),
            "data": {**source.describe(), "file": f"{data_file(args, task)}.jsonl", "max_samples": args.max_samples},
            "model": str(args.model)}


def data_file(args: argparse.Namespace, task: str) -> str:
    """The task's file name in LongBench's data, without .jsonl: <task>, or <task>_e for LongBench-E."""
    return f"{task}_e" if args.longbench_e else task


RESUME_KEYS = ("prompt", "generate_kwargs", "data", "model")  # another model in the same --out reruns


@dataclasses.dataclass
class Job:
    task: str
    setup: evaluation.Setup  # with the task's max new tokens
    samples: list[dict]
    prompts: list[list[int]]
    record: dict


def prepare(args: argparse.Namespace, task: str, setup: evaluation.Setup, source: DataSource, record: dict) -> Job:
    """A task's samples and token-id prompts, checked against the model's context (before any generation)."""
    samples = source.samples(data_file(args, task))[:args.max_samples]  # [:None] is all
    if not samples:
        raise EvalError(f"{source.where}: {task} has no samples")
    texts = model_inputs(task, samples, setup.tokenizer, args.max_length, record["prompt"]["chat_template"],
                         setup.system)
    prompts = setup.encode(texts)  # as pred.py: tokenizer(prompt), also for the chat-wrapped text
    evaluation.check_overflow(task, [len(p) for p in prompts], setup, args.overflow,
                              f"lower --max-length (now {args.max_length})")
    return Job(task, setup, samples, prompts, record)


def partial_paths(out: Path, task: str) -> tuple[Path, Path]:
    """An unfinished task's predictions so far (JSON lines {"i", "pred"}) and the settings they were made
    with. Neither name ends in "jsonl": LongBench's eval.py reads every *jsonl file of the folder."""
    return out / f"{task}.partial", out / f"{task}.partial.json"


def generate_task(args: argparse.Namespace, job: Job, engine: evaluation.Engine, out: Path) -> list[str]:
    """The predictions of a task, in sample order. Prompts go longest first, a chunk of 4 x --batch-size at
    a time; after each chunk the predictions so far are saved, so a killed run resumes inside the task."""
    longest_first = sorted(range(len(job.prompts)), key=lambda i: -len(job.prompts[i]))
    return evaluation.generate_resumable(
        engine, encode=lambda idx: [job.prompts[i] for i in idx], order=longest_first,
        max_new_tokens=job.setup.max_new_tokens, batch_size=args.batch_size, partial=partial_paths(out, job.task),
        record=job.record, desc=job.task, field="pred",
        # pred.py's prediction is not stripped: eval.py cuts triviaqa/trec at the first line after leading
        # newlines only, so spaces matter
        result=lambda i, prompt, ids: job.setup.decode(ids, strip=False))


def evaluate(args: argparse.Namespace) -> dict[str, float | dict]:
    """Generate and score every requested task not already finished in --out; write the predictions,
    result.json (LongBench's format) and results.md; print the table; return the scores."""
    base = evaluation.load_setup(args.model, max_new_tokens=max(MAX_NEW_TOKENS[t] for t in args.tasks),
                                 weights=not args.server)
    source = make_source(args)
    out = Path(args.out)
    score_fn = task_score_e if args.longbench_e else task_score
    scores, counts, jobs = {}, {}, []
    for task in args.tasks:
        setup = dataclasses.replace(base, max_new_tokens=MAX_NEW_TOKENS[task])
        record = task_record(args, task, setup, source)
        preds, meta = out / f"{task}.jsonl", out / f"{task}.json"
        if evaluation.is_finished(preds, meta, record, RESUME_KEYS):
            rows = read_prediction_rows(preds)
            scores[task], counts[task] = score_fn(task, rows), len(rows)
            print(f"{task}: done before, skipped ({preds})")
        else:
            jobs.append((task, setup, record))
    if jobs:
        source.check([data_file(args, task) for task, _, _ in jobs])
        # Every prompt is built and checked before the first generation: a bad file or a prompt over the
        # model's context stops the run at the start, not after hours.
        jobs = [prepare(args, task, setup, source, record) for task, setup, record in jobs]
        out.mkdir(parents=True, exist_ok=True)
        engine = evaluation.make_engine(args, base)
        print(f"{len(jobs)} of {len(args.tasks)} tasks to run; writing to {out}")
    for job in jobs:
        rows = prediction_rows(job.samples, generate_task(args, job, engine, out))
        score = score_fn(job.task, rows)
        evaluation.write_jsonl(out / f"{job.task}.jsonl", rows)
        lengths = [len(p) for p in job.prompts]
        evaluation.write_json(out / f"{job.task}.json", {
            **engine.describe(), **job.record, "samples": len(rows), "score": score, "metric": METRICS[job.task],
            "prompt_tokens": {"max": max(lengths), "mean": round(sum(lengths) / len(lengths), 1)}})
        for path in partial_paths(out, job.task):
            path.unlink(missing_ok=True)
        scores[job.task], counts[job.task] = score, len(rows)
        shown = ", ".join(f"{b} {_cell(v)}" for b, v in score.items()) if isinstance(score, dict) else f"{score:.2f}"
        print(f"{job.task}: {METRICS[job.task]} {shown} ({len(rows)} samples) -> {out / job.task}.jsonl")

    scores = {t: scores[t] for t in args.tasks}
    table = results_table(scores, {t: counts[t] for t in args.tasks})
    chat = "on (except trec, triviaqa, lcc, repobench-p)" if args.chat_template else "off"
    header = (f"{'LongBench-E' if args.longbench_e else 'LongBench'} scores of {args.model} (x 100; the average "
              f"is over the tasks)\n\nprompt budget {args.max_length} tokens, middle truncation; chat template "
              f"{chat}; greedy; data {json.dumps(source.describe())}")
    evaluation.save_results(out, header, table, scores, json_name="result.json", indent=4, echo=False)
    print(f"\n{table}\n\nsaved {out / 'result.json'} and {out / 'results.md'}")
    return scores


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluation.add_common_args(p, out_help="predictions folder (LongBench's pred/<model>/ layout): <task>.jsonl "
                               "and <task>.json per task, result.json, results.md; finished tasks are skipped "
                               "on a rerun")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help=f"LongBench tasks (default: the paper's {' '.join(PAPER_TASKS)}; also: "
                        f"{' '.join(t for t in TASKS if t not in PAPER_TASKS)}; with --longbench-e the default is "
                        f"{' '.join(t for t in PAPER_TASKS if t in E_TASKS)})")
    p.add_argument("--longbench-e", action="store_true",
                   help="LongBench-E: the data's <task>_e.jsonl files, scored per length bucket (0-4k, 4-8k, 8k+ "
                        "words); also for --score-dir")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, metavar="N",
                   help=f"prompt budget in tokens before chat wrapping; longer prompts keep their first and last "
                        f"N/2 tokens (default: {DEFAULT_MAX_LENGTH}, LongBench's for 8K models; 31500 for 32K)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=False,
                   help="wrap the truncated prompt as one user turn in Qwen's chat format, as LongBench does for "
                        "chat models (not for the few-shot and code tasks trec, triviaqa, lcc, repobench-p); "
                        "default off, for a base model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", default=HUB_DATASET, metavar="REPO",
                     help=f"hub dataset holding LongBench's {HUB_FILE} (default: {HUB_DATASET}); downloaded once "
                          f"into the hub cache, then HF_HUB_OFFLINE=1 works")
    src.add_argument("--data-dir", metavar="DIR",
                     help="local data instead: a folder of LongBench's <task>.jsonl files (data.zip's data/), or "
                          "data.zip itself")
    p.add_argument("--revision", default="main", help="branch, tag or commit of --dataset (default: main)")
    p.add_argument("--max-samples", type=int, metavar="N", help="only the first N samples of each task (smoke runs)")
    p.add_argument("--score-dir", metavar="DIR",
                   help="only re-score a folder of predictions in LongBench's layout (<task>.jsonl with pred and "
                        "answers), as LongBench's eval.py does; writes result.json there")
    return p


def validate(args: argparse.Namespace) -> None:
    """Check the flags before anything is loaded; raises EvalError naming the flag."""
    evaluation.check_common_args(args)
    if args.tasks is None:
        args.tasks = [t for t in PAPER_TASKS if t in E_TASKS] if args.longbench_e else list(PAPER_TASKS)
    for task in args.tasks:
        if task in NOT_IMPLEMENTED:
            raise EvalError(f"--tasks: LongBench's {task} is not implemented here ({NOT_IMPLEMENTED[task]}); "
                            f"this script runs: {' '.join(TASKS)}")
        if task not in TASKS:
            raise EvalError(f"--tasks: unknown task {task!r} (LongBench tasks here: {' '.join(TASKS)})")
        if args.longbench_e and task not in E_TASKS:
            raise EvalError(f"--tasks: {task} is not in LongBench-E (its tasks here: {' '.join(E_TASKS)})")
    args.tasks = list(dict.fromkeys(args.tasks))
    evaluation.check_positive(args, "max_samples")
    if args.max_length < 2:
        raise EvalError(f"--max-length must be at least 2 (got {args.max_length})")


def run(args: argparse.Namespace) -> None:
    if args.score_dir:
        score_dir(args.score_dir, args.longbench_e)
    else:
        validate(args)
        evaluate(args)


def main(argv: list[str] | None = None) -> int:
    return evaluation.main(PROG, build_parser(), run, argv,
                           resume_note="finished tasks are saved, the same command resumes")


if __name__ == "__main__":
    sys.exit(main())
