"""Generated data and small tokenizers, for the tests, the offline demo, `eval_babilong.py --synthetic`
and the replication; a user's training never needs this file (data.py is the path a user's data takes).

- a small byte-level BPE with Qwen2.5's added tokens, trained on whatever texts a random model will see;
- bAbI-style stories (qa1-qa5): people moving between rooms, carrying and giving objects, and a question
  whose answer is correct by construction;
- filler sentences and haystacks: the facts, in order, among distractors, to a length in tokens;
- agentic conversations: a bAbI question about a log, read with tool calls whose outputs hide the facts.

Every generator draws from the random.Random (or the seed) it is given: the same seed, the same bytes.

    python synthetic.py write --out demo.jsonl --samples 64 --tokens 2048 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

import data

# Qwen2.5's added tokens, in tokenizer.json order, with their `special` flags. The tool-call and FIM
# markers are not special: decoding with skip_special_tokens keeps them.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    *((t, True) for t in (
        data.ENDOFTEXT, data.IM_START, data.IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
        "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    )),
    *((t, False) for t in (
        "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
        "<|repo_name|>", "<|file_sep|>",
    )),
)
# Qwen2's pre-tokenizer split (digits one by one, letters with an optional leading non-letter, ...).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# ----------------------------------------------------------------------------------------------------
# Small tokenizers for random models


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> Tokenizer:
    """A small byte-level BPE with Qwen2's normalizer, pre-tokenizer, decoder and Qwen2.5's added tokens
    (same order and special flags), for tests and the offline demo. Any text round-trips."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # as Qwen's: no ids added
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    for content, special in QWEN_ADDED_TOKENS:  # one at a time keeps the ids in Qwen's order
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    return tok


def save_tokenizer_files(tokenizer: Tokenizer, directory: str | Path) -> None:
    """tokenizer.json plus a minimal tokenizer_config.json that transformers' AutoTokenizer loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": data.IM_END,
        "pad_token": data.ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 131072,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# bAbI-style stories: people, rooms and objects, and questions answered by the facts

BABI_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
ROOMS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
PEOPLE = ("Mary", "John", "Daniel", "Sandra")
QA5_PEOPLE = ("Bill", "Fred", "Jeff", "Mary")
DIRECTIONS = {"north": "south", "south": "north", "east": "west", "west": "east"}
_STEP = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
_MOVE = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
_PICK = ("picked up", "got", "grabbed", "took")
_DROP = ("dropped", "discarded", "put down", "left")
_GIVE = ("gave", "handed", "passed")


class _World:
    """People moving between rooms and carrying objects; every action is a bAbI-style fact."""

    def __init__(self, rng: random.Random, people: Sequence[str], rooms: Sequence[str]):
        self.rng, self.people, self.rooms = rng, list(people), list(rooms)
        self.at: dict[str, str] = {}  # person -> room
        self.holder: dict[str, str] = {}  # object -> person carrying it
        self.placed: dict[str, str] = {}  # object -> the room it is in (it follows its carrier)
        self.history: dict[str, list[str]] = {o: [] for o in OBJECTS}  # rooms an object has been in
        self.gives: list[tuple[str, str, str]] = []  # (giver, object, receiver)
        self.facts: list[str] = []

    def _place(self, obj: str, room: str) -> None:
        self.placed[obj] = room
        if not self.history[obj] or self.history[obj][-1] != room:
            self.history[obj].append(room)

    def actions(self, kinds: str) -> list[tuple]:
        """Possible next actions of the given kinds (m=move, p=pick up, d=drop, g=give)."""
        acts: list[tuple] = []
        for p in self.people:
            if "m" in kinds:
                acts += [("m", p, r) for r in self.rooms if r != self.at.get(p)]
            if p not in self.at:
                continue
            held = [o for o, h in self.holder.items() if h == p]
            if "p" in kinds and len(held) < 2:
                acts += [("p", p, o) for o in OBJECTS
                         if o not in self.holder and self.placed.get(o, self.at[p]) == self.at[p]]
            if "d" in kinds:
                acts += [("d", p, o) for o in held]
            if "g" in kinds:
                near = [q for q in self.people if q != p and self.at.get(q) == self.at[p]]
                acts += [("g", p, o, q) for o in held for q in near]
        return acts

    def do(self, act: tuple) -> None:
        kind, p = act[0], act[1]
        if kind == "m":
            self.at[p] = act[2]
            self.facts.append(f"{p} {self.rng.choice(_MOVE)} the {act[2]}.")
            for o, h in self.holder.items():
                if h == p:
                    self._place(o, act[2])
        elif kind == "p":
            self.holder[act[2]] = p
            self._place(act[2], self.at[p])
            self.facts.append(f"{p} {self.rng.choice(_PICK)} the {act[2]}.")
        elif kind == "d":
            del self.holder[act[2]]
            self.facts.append(f"{p} {self.rng.choice(_DROP)} the {act[2]}.")
        else:
            _, _, o, q = act
            self.holder[o] = q
            self.gives.append((p, o, q))
            self.facts.append(f"{p} {self.rng.choice(_GIVE)} the {o} to {q}.")

    def run(self, steps: int, kinds: str, prefer: str = "") -> None:
        for _ in range(steps):
            acts = self.actions(kinds)
            preferred = [a for a in acts if a[0] in prefer]
            if preferred and self.rng.random() < 0.6:
                acts = preferred
            self.do(self.rng.choice(acts))


def _babi_relations(rng: random.Random) -> tuple[list[str], str, str]:
    # Rooms on a grid, each new one next to a placed one: stated relations can never contradict.
    rooms = rng.sample(ROOMS, rng.randint(3, 4))
    cell = {rooms[0]: (0, 0)}
    facts, relations = [], []
    for room in rooms[1:]:
        while True:
            other, d = rng.choice(list(cell)), rng.choice(list(DIRECTIONS))
            x, y = cell[other][0] + _STEP[d][0], cell[other][1] + _STEP[d][1]
            if (x, y) not in cell.values():
                break
        cell[room] = (x, y)
        if rng.random() < 0.5:  # "room is d of other", or the same relation stated the other way round
            relations.append((room, d, other))
        else:
            relations.append((other, DIRECTIONS[d], room))
        facts.append("The {} is {} of the {}.".format(*relations[-1]))
    a, d, b = rng.choice(relations)
    if rng.random() < 0.5:  # ask about the inverse relation
        a, d, b = b, DIRECTIONS[d], a
    if rng.random() < 0.5:
        return facts, f"What is {d} of the {b}?", a
    return facts, f"What is the {a} {d} of?", b


def babi_story(rng: random.Random, task: str) -> tuple[list[str], str, str]:
    """(facts, question, answer) of a bAbI-style story; the answer is correct by construction."""
    if task == "qa4":
        return _babi_relations(rng)
    if task not in BABI_TASKS:
        raise ValueError(f"unknown bAbI task {task!r} (expected one of {', '.join(BABI_TASKS)})")
    while True:  # retry until the story supports a question of the task's kind (a few tries at most)
        if task == "qa1":
            w = _World(rng, rng.sample(PEOPLE, rng.randint(2, 4)), ROOMS)
            w.run(rng.randint(4, 10), "m")
            person = rng.choice(list(w.at))
            return w.facts, f"Where is {person}?", w.at[person]
        if task == "qa5":
            w = _World(rng, QA5_PEOPLE, rng.sample(ROOMS, 2))
            w.run(rng.randint(8, 14), "mpdg", prefer="pg")
            story = _qa5_question(rng, w)
        else:
            w = _World(rng, rng.sample(PEOPLE, rng.randint(2, 4)), ROOMS)
            w.run(rng.randint(6, 14), "mpd", prefer="p" if task == "qa2" else "pm")
            story = _qa2_question(rng, w) if task == "qa2" else _qa3_question(rng, w)
        if story is not None:
            return story


def _qa2_question(rng: random.Random, w: _World) -> tuple[list[str], str, str] | None:
    known = [o for o in OBJECTS if o in w.placed]
    if not known:
        return None
    obj = rng.choice(known)
    return w.facts, f"Where is the {obj}?", w.placed[obj]  # placed follows the person carrying it


def _qa3_question(rng: random.Random, w: _World) -> tuple[list[str], str, str] | None:
    # "before the X" is unambiguous only for a room the object was in exactly once.
    options = [(o, k) for o, h in w.history.items() for k in range(1, len(h)) if h.count(h[k]) == 1]
    if not options:
        return None
    obj, k = rng.choice(options)
    return w.facts, f"Where was the {obj} before the {w.history[obj][k]}?", w.history[obj][k - 1]


def _qa5_question(rng: random.Random, w: _World) -> tuple[list[str], str, str] | None:
    # Each question form pins a (giver, object, receiver) triple down to one give in the story.
    forms = [
        ("Who received the {o}?", lambda g: (g[1],), 2),
        ("Who gave the {o}?", lambda g: (g[1],), 0),
        ("What did {p} give to {q}?", lambda g: (g[0], g[2]), 1),
        ("Who gave the {o} to {q}?", lambda g: (g[1], g[2]), 0),
        ("Who did {p} give the {o} to?", lambda g: (g[0], g[1]), 2),
    ]
    options = []
    for question, key, answer in forms:
        for g in w.gives:
            if sum(key(h) == key(g) for h in w.gives) == 1:
                options.append((question.format(p=g[0], o=g[1], q=g[2]), g[answer]))
    if not options:
        return None
    question, answer = rng.choice(options)
    return w.facts, question, answer


# ----------------------------------------------------------------------------------------------------
# Filler text and haystacks

# Distractor sentences: none of these words is, or contains, a name, room, object or direction of the facts.
_SUBJECTS = (
    "The committee", "A traveller", "The old clockmaker", "The village council", "A young painter",
    "The night watchman", "The librarian", "The weather station", "A merchant from the coast",
    "The orchestra", "The harbour pilot", "The town crier", "A group of students", "The surveyor",
    "The baker on the square", "The museum guide", "A retired sailor", "The printing press",
    "The mountain guide", "Her cousin",
)
_VERBS = (
    "repaired", "described", "praised", "measured", "painted", "forgot", "studied", "discussed", "ignored",
    "admired", "questioned", "photographed", "recorded", "sketched", "counted", "polished", "delivered",
    "examined", "mentioned", "returned",
)
_THINGS = (
    "the broken lantern", "an old map of the valley", "the annual budget", "a letter from the mayor",
    "the river bridge", "the copper kettle", "a collection of stamps", "the winter harvest", "the town clock",
    "a basket of pears", "the lighthouse", "the wooden boat", "a book about birds", "the stone wall",
    "the market stalls", "a pair of boots", "the village well", "the church bells", "a box of candles",
    "the railway timetable", "the weather report", "a jar of honey", "the school roof",
    "the festival posters", "a painting of the harbour",
)
_TAILS = (
    "before the rain started", "after a long discussion", "with great care", "for the third time that week",
    "without saying a word", "while the bells were ringing", "late in the evening",
    "at the request of the council",
    "as the fog lifted", "during the festival", "in the early morning light", "despite the cold wind",
    "on the way to the market", "with a patient smile", "as everyone expected", "for no obvious reason",
    "once the crowd had gone", "before anyone noticed", "under a grey sky", "in a hurry",
)


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_THINGS)} {rng.choice(_TAILS)}."


_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token count: one per word or punctuation mark, within ~25% of Qwen's count on
    English prose, code and these conversations (characters / 4 is 30% off on the synthetic filler)."""
    return len(_WORD_OR_MARK.findall(text))


def _haystack_sentences(
    rng: random.Random, facts: Sequence[str], n_tokens: int, count_tokens: Callable[[str], int]
) -> list[str]:
    probe = [filler_sentence(rng) for _ in range(16)]
    per_sentence = max(count_tokens(" ".join(probe)) / len(probe), 1.0)
    slots = sorted(rng.random() for _ in facts)  # where each fact sits, as a fraction of the filler
    fact_tokens = count_tokens(" ".join(facts)) if facts else 0
    filler = probe[: max(0, round((n_tokens - fact_tokens) / per_sentence))]

    def assemble() -> list[str]:
        out, done = [], 0
        for fact, slot in zip(facts, slots, strict=True):
            at = round(slot * len(filler))
            out += filler[done:at]
            out.append(fact)
            done = at
        return out + filler[done:]

    # Estimate, then correct from a few whole-text counts (never one count per sentence).
    for _ in range(6):
        missing = n_tokens - count_tokens(" ".join(assemble()))
        if abs(missing) <= per_sentence / 2:
            break
        change = round(missing / per_sentence) or (1 if missing > 0 else -1)
        if change > 0:
            filler += [filler_sentence(rng) for _ in range(change)]
        elif filler:
            del filler[max(0, len(filler) + change) :]
        else:
            break
    return assemble()


def haystack(
    rng: random.Random, facts: Sequence[str], n_tokens: int, count_tokens: Callable[[str], int]
) -> str:
    """The facts, in order, scattered among distractor sentences; about n_tokens long by count_tokens."""
    return " ".join(_haystack_sentences(rng, facts, n_tokens, count_tokens))


# ----------------------------------------------------------------------------------------------------
# Agentic conversations (bAbI facts hidden in tool outputs)

SYNTH_TOOLS = [
    {"type": "function", "function": {
        "name": "read_log",
        "description": "Read one part of a log file.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": "Path of the log file."},
            "part": {"type": "integer", "description": "Which part to read, starting at 1."},
        }, "required": ["path", "part"]},
    }},
    {"type": "function", "function": {
        "name": "python",
        "description": "Run Python code in a sandbox and return what it prints.",
        "parameters": {"type": "object", "properties": {
            "code": {"type": "string", "description": "The code to run."},
        }, "required": ["code"]},
    }},
]
_SYSTEM_PROMPTS = (
    "You are a careful assistant. Use the tools to look things up before you answer.",
    "You are a helpful assistant with access to tools. Answer briefly.",
    "You answer questions about log files. Read the logs with the tools; never guess.",
)
_FIRST_THOUGHTS = ("", "Let me read the log.", "I'll look at the log first.")
_LATER_THOUGHTS = ("", "I need the rest of the log.", "Let me read the next part.")
_ANSWERS = ("The answer is {}.", "{}", "Based on the log: {}.", "According to the notes, the answer is {}.")


def synthetic_conversation(rng: random.Random, n_tokens: int, count_tokens: Callable[[str], int]) -> dict:
    """One agentic record whose rendered length is about n_tokens: the user asks a bAbI question about a
    log, the assistant reads the log with one or more tool calls (in one or more rounds), the tool outputs
    hide the facts among distractors, and the final assistant message states the answer."""
    task = rng.choice(BABI_TASKS)
    facts, question, answer = babi_story(rng, task)
    tool = rng.choice(["read_log", "python"])
    n_parts = rng.randint(1, 3)
    rounds = [list(range(n_parts))] if rng.random() < 0.5 else [[k] for k in range(n_parts)]
    if n_parts == 3 and rng.random() < 0.3:
        rounds = [[0], [1, 2]]
    path = f"logs/{rng.choice(['house', 'site', 'ward', 'depot'])}_{rng.randint(1, 99)}.log"
    system = rng.choice(_SYSTEM_PROMPTS)
    thoughts = [rng.choice(_LATER_THOUGHTS if r else _FIRST_THOUGHTS) for r in range(len(rounds))]
    ids = [f"call_{rng.getrandbits(32):08x}" for _ in range(n_parts)]
    final = rng.choice(_ANSWERS).format(answer)

    def assemble(chunks: list[str]) -> list[dict]:
        user = (f"What happened in the house is logged in {path} ({n_parts} part"
                f"{'s' if n_parts > 1 else ''}). Read the log with the tools and answer: {question}")
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        for thought, parts in zip(thoughts, rounds, strict=True):
            calls = []
            for k in parts:
                if tool == "read_log":
                    args = {"path": path, "part": k + 1}
                else:
                    args = {"code": f"with open({path!r}) as f:\n    print(f.read().split('\\n\\n')[{k}])"}
                function = {"name": tool, "arguments": args}
                calls.append({"id": ids[k], "type": "function", "function": function})
            message = {"role": "assistant", "tool_calls": calls}
            if thought:
                message["content"] = thought
            messages.append(message)
            messages += [{"role": "tool", "tool_call_id": ids[k], "name": tool, "content": chunks[k]}
                         for k in parts]
        messages.append({"role": "assistant", "content": final})
        return messages

    overhead = count_tokens(data.render_chat(assemble([""] * n_parts), SYNTH_TOOLS))
    sentences = _haystack_sentences(rng, facts, max(n_tokens - overhead, 0), count_tokens)
    bounds = [round(k * len(sentences) / n_parts) for k in range(n_parts + 1)]
    chunks = [" ".join(sentences[bounds[k] : bounds[k + 1]]) for k in range(n_parts)]
    return {"messages": assemble(chunks), "tools": copy.deepcopy(SYNTH_TOOLS)}


def write_synthetic(
    path: str | Path,
    n_samples: int,
    n_tokens: int,
    seed: int,
    count_tokens: Callable[[str], int] | None = None,
) -> None:
    """n_samples synthetic records as JSONL. Sample i depends only on (seed, i)."""
    count = count_tokens or estimate_tokens
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n_samples):
            record = synthetic_conversation(random.Random(f"{seed}-{i}"), n_tokens, count)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synthetic.py", description="FocuSFT's generated data.")
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write seeded synthetic agentic long-context conversations (JSONL)")
    write.add_argument("--out", required=True, help="JSONL file to write")
    write.add_argument("--samples", type=data.positive_int, default=64,
                       help="number of conversations (default 64)")
    write.add_argument("--tokens", type=data.positive_int, default=2048,
                       help="approximate length of each rendered conversation in tokens (default 2048)")
    write.add_argument("--seed", type=int, default=1234,
                       help="random seed; same seed, same file (default 1234)")
    write.add_argument("--tokenizer", default=None,
                       help="count tokens with this tokenizer (directory or tokenizer.json) instead of "
                            "estimating one token per word or punctuation mark")
    args = parser.parse_args(argv)
    try:
        count = None
        if args.tokenizer:
            tok = data.load_tokenizer(args.tokenizer)
            count = lambda s: len(tok.encode(s, add_special_tokens=False).ids)
        write_synthetic(args.out, args.samples, args.tokens, args.seed, count)
    except (ValueError, OSError) as e:  # a missing or broken tokenizer (data.DataError), an unwritable --out
        print(f"synthetic.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.samples} conversations to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
