"""Tests for synthetic.py's generators: every bAbI answer checked by an independent replay of the facts,
filler that never mentions the facts' vocabulary, haystacks of the asked length, agentic conversations,
the tokenizer-free token estimate. (The small tokenizer and the generated file through data.py's loader
and command line are in test_data.py.)"""

import random
import re
from collections import defaultdict
from pathlib import Path

import pytest

import data
import synthetic

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------------
# bAbI stories: an independent replay of the facts checks every answer

OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
MOVE = re.compile(r"(\w+) (?:moved|went|journeyed|travelled|went back) to the (\w+)\.")
PICK = re.compile(r"(\w+) (?:picked up|got|grabbed|took) the (\w+)\.")
DROP = re.compile(r"(\w+) (?:dropped|discarded|put down|left) the (\w+)\.")
GIVE = re.compile(r"(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.")
RELATION = re.compile(r"The (\w+) is (north|south|east|west) of the (\w+)\.")
FACT = re.compile("|".join(f"(?:{p.pattern})" for p in (MOVE, PICK, DROP, GIVE, RELATION)))


def only(values):
    assert len(values) == 1, values
    return values[0]


def replay(facts, question):
    """The answer the facts imply, by a state machine that also checks the facts are possible."""
    person_at, carrier, thing_at, trail, gives, relations = {}, {}, {}, defaultdict(list), [], set()

    def put(thing, room):
        thing_at[thing] = room
        if not trail[thing] or trail[thing][-1] != room:
            trail[thing].append(room)

    for fact in facts:
        if m := MOVE.fullmatch(fact):
            person, room = m.groups()
            assert person_at.get(person) != room
            person_at[person] = room
            for thing in [t for t, c in carrier.items() if c == person]:
                put(thing, room)
        elif m := PICK.fullmatch(fact):
            person, thing = m.groups()
            assert person in person_at and thing not in carrier
            assert thing_at.get(thing, person_at[person]) == person_at[person]
            carrier[thing] = person
            put(thing, person_at[person])
        elif m := DROP.fullmatch(fact):
            person, thing = m.groups()
            assert carrier.pop(thing) == person
        elif m := GIVE.fullmatch(fact):
            giver, thing, receiver = m.groups()
            assert carrier[thing] == giver and person_at[receiver] == person_at[giver] and giver != receiver
            carrier[thing] = receiver
            gives.append((giver, thing, receiver))
        elif m := RELATION.fullmatch(fact):
            a, d, b = m.groups()
            relations |= {(a, d, b), (b, OPPOSITE[d], a)}
        else:
            raise AssertionError(f"not a fact: {fact!r}")

    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return thing_at[m[1]]
    if m := re.fullmatch(r"Where is (\w+)\?", question):
        return person_at[m[1]]
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question):
        rooms = trail[m[1]]
        assert rooms.count(m[2]) == 1 and rooms.index(m[2]) > 0
        return rooms[rooms.index(m[2]) - 1]
    if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", question):
        return only([a for a, d, b in relations if d == m[1] and b == m[2]])
    if m := re.fullmatch(r"What is the (\w+) (\w+) of\?", question):
        return only([b for a, d, b in relations if a == m[1] and d == m[2]])
    if m := re.fullmatch(r"Who received the (\w+)\?", question):
        return only([g for g in gives if g[1] == m[1]])[2]
    if m := re.fullmatch(r"Who gave the (\w+)\?", question):
        return only([g for g in gives if g[1] == m[1]])[0]
    if m := re.fullmatch(r"What did (\w+) give to (\w+)\?", question):
        return only([g for g in gives if (g[0], g[2]) == (m[1], m[2])])[1]
    if m := re.fullmatch(r"Who gave the (\w+) to (\w+)\?", question):
        return only([g for g in gives if (g[1], g[2]) == (m[1], m[2])])[0]
    if m := re.fullmatch(r"Who did (\w+) give the (\w+) to\?", question):
        return only([g for g in gives if (g[0], g[1]) == (m[1], m[2])])[2]
    raise AssertionError(f"unknown question {question!r}")


LABELS = {task: set(synthetic.ROOMS) for task in ("qa1", "qa2", "qa3", "qa4")}
LABELS["qa5"] = {"Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"}


@pytest.mark.parametrize("task", synthetic.BABI_TASKS)
def test_babi_answers_follow_from_the_facts(task):
    questions = set()
    for seed in range(300):
        facts, question, answer = synthetic.babi_story(random.Random(f"{task}-{seed}"), task)
        assert replay(facts, question) == answer, (facts, question, answer)
        assert answer in LABELS[task]
        questions.add(re.sub(r"(Bill|Fred|Jeff|Mary|John|Daniel|Sandra|the \w+|north|south|east|west)", "_",
                             question))
    if task == "qa5":  # all five question forms occur
        assert {"Who received _?", "Who gave _?", "What did _ give to _?", "Who gave _ to _?",
                "Who did _ give _ to?"} <= questions
    if task == "qa4":
        assert {"What is _ of _?", "What is _ _ of?"} <= questions


def test_babi_story_is_deterministic():
    for task in synthetic.BABI_TASKS:
        assert synthetic.babi_story(random.Random(5), task) == synthetic.babi_story(random.Random(5), task)
    with pytest.raises(ValueError, match="unknown bAbI task"):
        synthetic.babi_story(random.Random(0), "qa9")


def test_filler_never_mentions_the_facts_vocabulary():
    words = [*synthetic.ROOMS, *synthetic.OBJECTS, *synthetic.PEOPLE, *synthetic.QA5_PEOPLE]
    rng = random.Random(0)
    for _ in range(3000):
        sentence = synthetic.filler_sentence(rng).lower()
        assert not any(w.lower() in sentence for w in words), sentence
        assert not re.search(r"\b(north|south|east|west)\b", sentence)
        assert not FACT.search(synthetic.filler_sentence(rng))


def test_haystack_keeps_facts_in_order_and_hits_the_length(qwen):
    calls = []

    def count(text):
        calls.append(len(text))
        return len(qwen.encode(text, add_special_tokens=False).ids)

    facts, _, _ = synthetic.babi_story(random.Random(1), "qa2")
    for n_tokens in (300, 3000, 12000):
        calls.clear()
        text = synthetic.haystack(random.Random(n_tokens), facts, n_tokens, count)
        assert [m.group(0) for m in FACT.finditer(text)] == facts
        assert abs(count(text) - n_tokens) <= 0.03 * n_tokens + 10
        assert len(calls) <= 10  # estimate and correct; never one count per sentence
    assert synthetic.haystack(random.Random(0), facts, 5, count) == " ".join(facts)
    assert synthetic.haystack(random.Random(3), facts, 2000, synthetic.estimate_tokens) == \
        synthetic.haystack(random.Random(3), facts, 2000, synthetic.estimate_tokens)


def test_synthetic_conversations_are_valid_consistent_and_varied(qwen):
    count = lambda s: len(qwen.encode(s, add_special_tokens=False).ids)
    shapes = set()
    for seed in range(40):
        rec = synthetic.synthetic_conversation(random.Random(seed), 1500, count)
        messages, tools = rec["messages"], rec["tools"]
        assert set(rec) == {"messages", "tools"}
        assert data.conversation_problems(messages, tools) == []
        assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
        assert messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]
        question = re.search(r"answer: (.*\?)$", messages[1]["content"])[1]
        tool_outputs = [m["content"] for m in messages if m["role"] == "tool"]
        facts = [m.group(0) for text in tool_outputs for m in FACT.finditer(text)]
        answer = replay(facts, question)
        assert re.search(rf"\b{answer}\b", messages[-1]["content"])
        n_tokens = len(data.encode_chat(qwen, messages, tools)[0])
        assert 1300 <= n_tokens <= 1700, n_tokens
        calls = [c for m in messages for c in m.get("tool_calls", [])]
        assert all(isinstance(c["function"]["arguments"], dict) for c in calls)
        shapes.add(tuple(m["role"] if m["role"] != "assistant" else f"a{len(m.get('tool_calls', []))}"
                         for m in messages))
    assert len(shapes) >= 4  # single call, parallel calls, several rounds, ...


def test_token_estimate_is_close_to_qwen(qwen):
    rng = random.Random(0)
    records = [synthetic.synthetic_conversation(rng, n, synthetic.estimate_tokens) for n in (500, 2000, 6000)]
    texts = [data.render_chat(r["messages"], r["tools"]) for r in records]
    texts.append((REPO / "data.py").read_text(encoding="utf-8"))
    for text in texts:
        assert 0.75 < synthetic.estimate_tokens(text) / len(qwen.encode(text).ids) < 1.35


# ----------------------------------------------------------------------------------------------------
# Command line


def test_cli_write_reports_a_missing_tokenizer_in_one_line(tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    assert synthetic.main(["write", "--out", str(out), "--tokenizer", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("synthetic.py: error: ") and "tokenizer file not found" in err and err.count("\n") == 1
    assert not out.exists()
