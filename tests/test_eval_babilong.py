"""eval_babilong.py: the benchmark's scoring, prompts, data layouts, predictions files, and a tiny model
end to end (synthetic data, resume, batched = one at a time, the user-facing error messages)."""

import csv
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import fake_server
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, cli_error

import data
import eval_babilong as ev
import evaluation
import qwen2
import synthetic

PLAIN = "instruction_yes_examples_yes_post_prompt_yes_chat_template_no_system_prompt_no"


# ----------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Qwen2 with a small BPE trained on bAbI stories, filler and the prompts."""
    rng = random.Random(0)
    texts = []
    for task in ev.SYNTHETIC_TASKS:
        for _ in range(40):
            facts, question, answer = synthetic.babi_story(rng, task)
            texts.append(f"{synthetic.haystack(rng, facts, 300, lambda s: len(s) // 4)} {question} {answer}")
    texts += [v for p in ev.PROMPTS.values() for v in p.values()]
    tokenizer = synthetic.train_tokenizer(texts, vocab_size=600)
    config = qwen2.Qwen2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=3072,
                               eos_token_id=tokenizer.token_to_id("<|endoftext|>"))
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    model = qwen2.random_model(config, seed=0)
    with torch.no_grad():  # large weights, so greedy decoding gives varied tokens, not one repeated argmax
        for p in model.parameters():
            p.mul_(15)
    model.save_pretrained(directory)
    synthetic.save_tokenizer_files(tokenizer, directory)
    return directory


def run_cli(argv: list[str]) -> str:
    return cli_error(ev.main, argv)


def expect_error(argv: list[str], *fragments: str) -> str:
    message = run_cli(argv)
    assert message.startswith("eval_babilong.py: error: "), message
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def rows(n: int, task: str = "qa1") -> list[dict]:
    return [{"input": f"Mary went to the kitchen. {task} sample {i}.", "question": "Where is Mary?",
             "target": "kitchen"} for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Scoring: every rule of the benchmark's comparison

Q1 = "Where is Mary?"
QA7 = "How many objects is Mary carrying?"
QA8 = "What is Mary carrying?"
QA19 = "How do you go from the kitchen to the garden?"


@pytest.mark.parametrize("task,target,output,question,expected", [
    # plain answers, any case
    ("qa1", "kitchen", "The most recent location of Mary is kitchen.", Q1, True),
    ("qa1", "kitchen", "KITCHEN", Q1, True),
    ("qa1", "Kitchen", "kitchen", Q1, True),
    ("qa1", "kitchen", "The most recent location of Mary is garden.", Q1, False),
    ("qa1", "kitchen", "", Q1, False),
    ("qa1", "kitchen", None, Q1, False),
    # two labels: wrong, even when one is the target
    ("qa1", "kitchen", "kitchen or office", Q1, False),
    # only the first sentence counts
    ("qa1", "kitchen", "Mary is in the kitchen. Before that she was in the office.", Q1, True),
    ("qa1", "kitchen", "Mary left. She is in the kitchen", Q1, False),
    # a model that starts writing the next example or context is cut there
    ("qa1", "kitchen", "kitchen\n<context>\nMary went to the office", Q1, True),
    ("qa1", "kitchen", "kitchen\n<example>\nJohn went to the office", Q1, True),
    ("qa1", "kitchen", "<example> kitchen", Q1, False),
    # labels named in the question are never the answer, so they are ignored in the output
    ("qa3", "office", "Before the kitchen the apple was in the office.",
     "Where was the apple before the kitchen?", True),
    ("qa3", "kitchen", "the kitchen", "Where was the apple before the kitchen?", False),
    ("qa5", "Bill", "Bill gave the milk to Jeff", "Who gave the milk to Jeff?", True),
    ("qa5", "Bill", "Fred gave the milk to Jeff", "Who gave the milk to Jeff?", False),
    ("qa5", "milk", "milk and apple", "What did Bill give to Fred?", False),
    ("qa20", "hungry", "He was hungry", "Why did Sumit go to the kitchen?", True),
    # qa8: a comma-separated target is matched by exactly its parts, in any order
    ("qa8", "apple,milk", "milk, apple", QA8, True),
    ("qa8", "apple,milk", "apple,milk", QA8, True),
    ("qa8", "apple,milk", "apple", QA8, False),
    ("qa8", "apple,milk", "apple, milk, football", QA8, False),
    ("qa8", "nothing", "nothing", QA8, True),
    ("qa8", "nothing", "nothing but the apple", QA8, False),
    # qa19: a two-letter target with a comma (3 characters) is a single label
    ("qa19", "n,w", "n,w", QA19, True),
    ("qa19", "n,w", "N,W", QA19, True),
    ("qa19", "n,w", "w,n", QA19, False),
    ("qa19", "s,s", "s,s", QA19, True),
    ("qa19", "n,w", "n,w or s,s", QA19, False),
    # yes / no / maybe / counts
    ("qa6", "yes", "Yes, he is", "Is John in the kitchen?", True),
    ("qa6", "no", "yes", "Is John in the kitchen?", False),
    ("qa10", "maybe", "maybe", "Is Julie in the school?", True),
    ("qa10", "no", "no, or maybe", "Is Julie in the school?", False),
    ("qa7", "two", "two", QA7, True),
    # substring matching, as the benchmark: "none" also contains "one", so it is never counted correct
    ("qa7", "none", "none", QA7, False),
])
def test_is_correct(task, target, output, question, expected):
    assert ev.is_correct(task, target, output, question) is expected


def test_is_correct_rejects_unknown_task():
    with pytest.raises(ev.EvalError, match="unknown task 'qa21'"):
        ev.is_correct("qa21", "x", "x", "q")


def test_label_sets_are_the_benchmarks():
    assert set(ev.TASK_LABELS) == {f"qa{i}" for i in range(1, 21)}
    assert ev.TASK_LABELS["qa5"] == ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk")
    assert len(ev.TASK_LABELS["qa19"]) == 12 and all(len(x) == 3 for x in ev.TASK_LABELS["qa19"])


# ----------------------------------------------------------------------------------------------
# Prompts


def test_prompt_layout_is_the_benchmarks():
    p = ev.default_prompt("qa1")
    text = p.format("  Mary went to the kitchen.\n", "Where is Mary?")
    assert text == (f"{p.instruction}\n\n{p.examples}\n\n{p.post_prompt}\n\n"
                    "<context>\nMary went to the kitchen.\n</context>\n\nQuestion: Where is Mary?")
    assert p.render("Mary went to the kitchen.", "Where is Mary?") == text  # plain text: nothing added
    assert p.name() == PLAIN
    assert ev.PromptConfig().name() == ("instruction_no_examples_no_post_prompt_no_chat_template_no_"
                                        "system_prompt_no")


@pytest.mark.parametrize("task", [f"qa{i}" for i in range(1, 11)])
def test_builtin_prompts(task):
    p = ev.default_prompt(task)
    assert p.instruction and p.post_prompt
    blocks = re.findall(r"<example>\n(.*?)\nAnswer: (.*?)\n</example>", p.examples, re.S)
    assert len(blocks) == 2
    labels = {label.lower() for label in ev.TASK_LABELS[task]}
    for story, answer in blocks:
        assert story.rstrip().endswith("?")
        # An example's answer must never score on a real sample (only yes/no/maybe/counts are shared).
        if task in ("qa1", "qa2", "qa3", "qa4", "qa5", "qa8"):
            assert not any(label in answer.lower() for label in labels - {"nothing"}), answer


def test_chat_rendering():
    p = ev.default_prompt("qa2", chat_template=True)
    text = p.render("ctx", "Where is the milk?")
    user = p.format("ctx", "Where is the milk?")
    assert text == data.render_chat([{"role": "user", "content": user}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    p.system_prompt = "Answer briefly."
    assert p.render("ctx", "Where is the milk?").startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")
    assert p.name().endswith("chat_template_yes_system_prompt_yes")


def test_builtin_prompts_stop_at_qa10():
    with pytest.raises(ev.EvalError, match="--prompt-config"):
        ev.default_prompt("qa11")


def test_builtin_prompts_file_is_read_with_one_clear_error(tmp_path):
    assert ev.load_prompts(ev.PROMPTS_FILE) == ev.PROMPTS  # the file shipped beside the script
    assert ev.PROMPTS["qa1"]["examples"].startswith("<example>\nOlivia walked into the attic.")
    (tmp_path / "bad.json").write_text('{"qa1": {"instruction": "x"}}')
    for path in (tmp_path / "missing.json", tmp_path / "bad.json"):
        with pytest.raises(SystemExit) as e:
            ev.load_prompts(path)
        assert str(e.value.code).startswith(f"eval_babilong.py: error: {path}: cannot read the built-in prompts")


PUBLISHED = {  # hand-written in the format the benchmark publishes beside each predictions CSV
    "prompt": {
        "instruction": "Read the facts and answer.",
        "examples": "<example>\nAl went to the den. Where is Al?\nAnswer: den\n</example>",
        "post_prompt": "One word only.",
        "template": "{instruction}\n{examples}\n{post_prompt}\nContext: {context}\n\nQuestion: {question}",
        "chat_template": True,
        "system_prompt": "You are terse.",
    },
    "generate_kwargs": {"max_new_tokens": 15, "num_beams": 1, "do_sample": False, "temperature": None,
                        "top_p": None, "top_k": None},
}


def test_load_prompt_config(tmp_path):
    path = tmp_path / "qa1_0k_instruction_yes_examples_yes_post_prompt_yes_chat_template_yes.json"
    path.write_text(json.dumps(PUBLISHED, indent=4))
    p, gen = ev.load_prompt_config(path)
    assert (p.instruction, p.post_prompt, p.chat_template, p.system_prompt) == (
        "Read the facts and answer.", "One word only.", True, "You are terse.")
    assert gen["max_new_tokens"] == 15
    assert p.format(" The facts. ", "Where is Al?") == (
        "Read the facts and answer.\n<example>\nAl went to the den. Where is Al?\nAnswer: den\n</example>\n"
        "One word only.\nContext: The facts.\n\nQuestion: Where is Al?")
    assert p.name() == "instruction_yes_examples_yes_post_prompt_yes_chat_template_yes_system_prompt_yes"

    keys = ("instruction", "examples", "post_prompt", "template")
    older = {"prompt": {k: PUBLISHED["prompt"][k] for k in keys}, "generate_kwargs": {"num_beams": 1}}
    path.write_text(json.dumps(older))
    p, _ = ev.load_prompt_config(path)
    assert (p.chat_template, p.system_prompt) == (False, "")


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "not valid JSON"),
    ('{"generate_kwargs": {}}', '"prompt" object'),
    ('{"prompt": {"template": "{instruction} {context} {answer}"}}', "does not format"),
    ('{"prompt": {"chat_template": "yes"}}', "chat_template must be true or false"),
])
def test_load_prompt_config_errors(tmp_path, content, fragment):
    path = tmp_path / "cfg.json"
    path.write_text(content)
    with pytest.raises(ev.EvalError, match=re.escape(fragment)) as e:
        ev.load_prompt_config(path)
    assert str(path) in str(e.value)


# ----------------------------------------------------------------------------------------------
# Data: layouts, local directory, hub (faked), synthetic


HUB_LISTING = [".gitattributes", "README.md", "0k/qa1/0000.parquet", "0k/qa10/0000.parquet",
               "qa1/0k/0000.parquet", "1k/qa1-00001-of-00002.parquet", "1k/qa1-00000-of-00002.parquet",
               "1k/qa1/0000.parquet", "2k/qa2.jsonl"]


@pytest.mark.parametrize("task,length,expected", [
    ("qa1", "0k", ["0k/qa1/0000.parquet"]),  # the length-first copy, not qa1/0k/...
    ("qa10", "0k", ["0k/qa10/0000.parquet"]),  # qa1 and qa10 are not confused
    ("qa1", "1k", ["1k/qa1-00000-of-00002.parquet", "1k/qa1-00001-of-00002.parquet"]),  # shards in order
    ("qa2", "2k", ["2k/qa2.jsonl"]),
    ("qa2", "1k", []),
])
def test_match_data_files(task, length, expected):
    assert ev.match_data_files(HUB_LISTING, task, length) == expected


def test_local_dir(tmp_path):
    write_parquet(tmp_path / "4k" / "qa1" / "0000.parquet", rows(3))
    (tmp_path / "0k").mkdir()
    (tmp_path / "0k" / "qa2.jsonl").write_text("\n".join(json.dumps(r) for r in rows(2, "qa2")) + "\n\n")
    source = ev.LocalData(tmp_path)
    assert source.samples("qa1", "4k", len) == rows(3)
    assert source.samples("qa2", "0k", len) == rows(2, "qa2")
    with pytest.raises(ev.EvalError, match=r"--data-dir .*no data file for qa3 at 4k.*lengths there: 0k 4k"):
        source.check([("qa1", "4k"), ("qa3", "4k")])


def test_read_samples_errors(tmp_path):
    write_parquet(tmp_path / "a.parquet", [{"input": "x", "question": "q"}])
    with pytest.raises(ev.EvalError, match=r"a.parquet: no column\(s\) target"):
        ev.read_samples(tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text(json.dumps(rows(1)[0]) + "\n{oops\n")
    with pytest.raises(ev.EvalError, match=r"b.jsonl:2: not valid JSON"):
        ev.read_samples(tmp_path / "b.jsonl")


def test_hub_lists_then_downloads(tmp_path, monkeypatch):
    local = tmp_path / "dl" / "4k" / "qa1" / "0000.parquet"
    write_parquet(local, rows(4))
    calls = []

    def list_repo_files(self, repo_id, *, revision=None, repo_type=None, token=None):
        calls.append(("list", repo_id, revision, repo_type))
        return ["README.md", "4k/qa1/0000.parquet", "4k/qa2/0000.parquet"]

    def hf_hub_download(repo_id, filename, *, repo_type=None, revision=None, **kw):
        calls.append(("download", repo_id, filename, revision, repo_type))
        return str(tmp_path / "dl" / filename)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    source = ev.HubData("RMT-team/babilong")
    assert source.samples("qa1", "4k", len) == rows(4)
    assert calls == [("list", "RMT-team/babilong", "main", "dataset"),
                     ("download", "RMT-team/babilong", "4k/qa1/0000.parquet", "main", "dataset")]
    with pytest.raises(ev.EvalError, match=r"--dataset RMT-team/babilong: no data file for qa1 at 8k.*"
                                           r"lengths there: 4k; tasks there: qa1 qa2"):
        source.check([("qa1", "8k")])


def test_hub_offline_uses_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    def offline(self, *args, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    def no_download(*args, **kwargs):
        raise AssertionError("must not download offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ev.EvalError, match=r"HF_HUB_OFFLINE is set.*not in the hub cache.*--data-dir"):
        ev.HubData("RMT-team/babilong").check([("qa1", "4k")])

    repo = tmp_path / "hub" / "datasets--RMT-team--babilong"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_parquet(repo / "snapshots" / commit / "4k" / "qa1" / "0000.parquet", rows(2))
    source = ev.HubData("RMT-team/babilong")
    assert source.samples("qa1", "4k", len) == rows(2)
    with pytest.raises(ev.EvalError, match=r"cached snapshot .*no data file for qa2 at 4k"):
        source.check([("qa2", "4k")])


def test_synthetic_token_count_lengths():
    # A plain number is a token count (for models below the benchmark's shortest split); names keep their sizes.
    assert ev.length_tokens("512") == 512 and ev.length_tokens("1k") == 1024
    count = synthetic.estimate_tokens
    lengths = [count(s["input"]) for s in ev.SyntheticData(count=2).samples("qa1", "300", count)]
    assert all(280 <= n <= 320 for n in lengths), lengths


def test_synthetic_is_deterministic(tiny_model):
    count = evaluation.load_tokenizer(tiny_model, "--model").encode
    n_tokens = lambda text: len(count(text, add_special_tokens=False).ids)
    a = ev.SyntheticData(seed=0, count=3).samples("qa2", "1k", n_tokens)
    assert a == ev.SyntheticData(seed=0, count=3).samples("qa2", "1k", n_tokens)
    assert a != ev.SyntheticData(seed=1, count=3).samples("qa2", "1k", n_tokens)
    assert a[:2] == ev.SyntheticData(seed=0, count=2).samples("qa2", "1k", n_tokens)  # sample i is fixed
    assert len({s["input"] for s in a}) == 3


def test_synthetic_answers_are_consistent(tiny_model):
    tokenizer = evaluation.load_tokenizer(tiny_model, "--model")
    n_tokens = lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)
    for task in ev.SYNTHETIC_TASKS:
        for length in ("0k", "1k"):
            for s in ev.SyntheticData(seed=0, count=4).samples(task, length, n_tokens):
                assert set(s) == {"input", "question", "target"}
                assert s["target"].lower() in {label.lower() for label in ev.TASK_LABELS[task]}
                assert ev.is_correct(task, s["target"], s["target"], s["question"]), s  # gold answer scores
                if length == "1k":
                    assert 900 <= n_tokens(s["input"]) <= 1150
                else:
                    assert n_tokens(s["input"]) < 300
                if task == "qa1":  # the answer is the asked person's last move in the text
                    person = s["question"].split()[-1].rstrip("?")
                    verbs = "moved|went|journeyed|travelled|went back"
                    moves = re.findall(rf"{person} (?:{verbs}) to the (\w+)\.", s["input"])
                    assert moves and moves[-1] == s["target"]


def test_synthetic_has_qa1_to_qa5_only():
    with pytest.raises(ev.EvalError, match="--synthetic builds qa1, qa2, qa3, qa4, qa5 only, not qa6"):
        ev.SyntheticData().check([("qa6", "0k")])


# ----------------------------------------------------------------------------------------------
# Predictions CSV, re-scoring, results table


def test_predictions_csv_roundtrip(tmp_path):
    predictions = [
        {"target": "kitchen", "output": 'The "kitchen", then\nthe office.', "question": "Where is Mary? "},
        {"target": "apple,milk", "output": "", "question": "What is John carrying?"},
    ]
    path = tmp_path / "qa8_1k_x.csv"
    ev.write_predictions(path, predictions)
    assert path.read_text().splitlines()[0] == ",target,output,question"  # pandas' index column first
    assert ev.read_predictions(path) == predictions
    assert not list(tmp_path.glob("*.tmp"))


def test_score_csv_cli(tmp_path, capsys):
    # The published format (pandas to_csv: an unnamed index column); rows 0 and 2 are right.
    path = tmp_path / "qa1_4k_instruction_yes_examples_yes_post_prompt_yes_chat_template_no.csv"
    path.write_text(",target,output,question\n"
                    "0,hallway,The most recent location of John is hallway.,Where is John? \n"
                    "1,bathroom,\"The most recent location of Mary is kitchen, not bathroom.\","
                    "Where is Mary? \n"
                    "2,office,\"Answer: office\n<example>\",Where is Daniel? \n")
    assert run_cli(["--score-csv", path, "--task", "qa1"]) == ""
    assert capsys.readouterr().out.splitlines()[-1] == "accuracy: 0.667 (2/3)"
    assert run_cli(["--score-csv", path]) == ""  # the task is read from the benchmark's file name
    assert capsys.readouterr().out.splitlines()[-1] == "accuracy: 0.667 (2/3)"

    plain = tmp_path / "preds.csv"  # no index column, and a spreadsheet's byte-order mark
    plain.write_text("\ufefftarget,output,question\nkitchen,kitchen,Where is Mary?\n", encoding="utf-8")
    run_cli(["--score-csv", plain, "--task", "qa1"])
    assert capsys.readouterr().out.splitlines()[-1] == "accuracy: 1.000 (1/1)"
    expect_error(["--score-csv", plain], "pass --task qaN")
    expect_error(["--score-csv", plain, "--task", "qa42"], "unknown task 'qa42'")

    old = tmp_path / "old.csv"
    old.write_text(",target,output\n0,kitchen,kitchen\n")
    expect_error(["--score-csv", old, "--task", "qa1"], str(old), "no column(s) question")
    expect_error(["--score-csv", tmp_path / "absent.csv", "--task", "qa1"], "absent.csv: no such file")


def test_results_table():
    counts = {("qa1", "0k"): (9, 10), ("qa1", "4k"): (5, 10), ("qa2", "0k"): (7, 10)}
    results = ev.collect_results(counts, ["qa1", "qa2"], ["0k", "4k"])
    assert results["accuracy"] == {"qa1": {"0k": 0.9, "4k": 0.5}, "qa2": {"0k": 0.7}}
    assert results["mean"] == {"0k": pytest.approx(0.8), "4k": None}  # qa2 4k missing: no mean
    assert ev.results_table(results, ["qa1", "qa2"], ["0k", "4k"]) == (
        "| task | 0k | 4k |\n| --- | ---: | ---: |\n| qa1 | 90.0 | 50.0 |\n| qa2 | 70.0 | - |\n"
        "| mean | 80.0 | - |")


# ----------------------------------------------------------------------------------------------
# Model side


def test_batched_equals_one_at_a_time(tiny_model):
    tokenizer = evaluation.load_tokenizer(tiny_model, "--model")
    setup = evaluation.Setup(tiny_model, tokenizer, None, evaluation.eos_token_ids(tiny_model, tokenizer), 12)
    source = ev.SyntheticData(count=3)
    samples = [s for n in ("0k", "1k") for s in source.samples("qa1", n, setup.count_tokens)]
    prompts = ev.encode_prompts(setup, ev.default_prompt("qa1"), samples)
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ: padding is exercised
    model = qwen2.from_pretrained(tiny_model)
    one = [qwen2.generate(model, [p], 12, setup.eos)[0] for p in prompts]
    assert evaluation.generate_batched(model, prompts, 1, 12, setup.eos) == one
    assert evaluation.generate_batched(model, prompts, 4, 12, setup.eos) == one
    assert len({tuple(o) for o in one}) > 1  # outputs differ between prompts: a real comparison


# ----------------------------------------------------------------------------------------------
# End to end


def test_end_to_end_synthetic_with_resume(tiny_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["--model", tiny_model, "--synthetic", "--tasks", "qa1", "qa4", "--lengths", "0k", "1k",
            "--max-samples", "3", "--batch-size", "2", "--out", out]
    assert run_cli(argv) == ""
    printed = capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{t}_{n}_{PLAIN}.{ext}" for t in ("qa1", "qa4") for n in ("0k", "1k")
                            for ext in ("csv", "json")] + ["results.json", "results.md"])

    tokenizer = evaluation.load_tokenizer(tiny_model, "--model")
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)
    with open(out / f"qa4_1k_{PLAIN}.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["", "target", "output", "question"] and [r[0] for r in table[1:]] == ["0", "1", "2"]
    gold = ev.SyntheticData(count=3).samples("qa4", "1k", count)
    assert [(r[1], r[3]) for r in table[1:]] == [(s["target"], s["question"]) for s in gold]

    saved = json.loads((out / f"qa1_0k_{PLAIN}.json").read_text())
    assert list(saved["prompt"]) == ["instruction", "examples", "post_prompt", "template", "chat_template",
                                     "system_prompt"]
    assert saved["prompt"]["instruction"] == ev.PROMPTS["qa1"]["instruction"]
    assert saved["generate_kwargs"]["max_new_tokens"] == 20 and saved["generate_kwargs"]["do_sample"] is False
    assert saved["samples"] == 3 and saved["dtype"] == "float32"

    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["qa1", "qa4"] and results["lengths"] == ["0k", "1k"]
    assert set(results["accuracy"]["qa4"]) == {"0k", "1k"}
    assert (out / "results.md").read_text().splitlines()[-1].startswith("| mean |")
    assert "| qa1 |" in printed and "accuracy" in printed

    # Rerun: every pair is finished, so the model is not even loaded and no file is rewritten.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("qa*")}
    monkeypatch.setattr(qwen2, "from_pretrained", lambda *a, **k: pytest.fail("model loaded on a rerun"))
    assert run_cli(argv) == ""
    assert capsys.readouterr().out.count("done before, skipped") == 4
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("qa*")}
    assert json.loads((out / "results.json").read_text())["accuracy"] == results["accuracy"]


@pytest.mark.parametrize("token_ids", [True, False], ids=["server-token-ids", "server-text-only"])
def test_server_engine_writes_the_same_predictions(tiny_model, tmp_path, token_ids):
    """--server against a local OpenAI-compatible server answering from the same model: the same files, byte
    for byte, whether the server returns token ids (vLLM) or only text."""
    argv = ["--model", tiny_model, "--synthetic", "--tasks", "qa1", "--lengths", "0k", "1k", "--max-samples", "3"]
    assert run_cli([*argv, "--out", tmp_path / "local"]) == ""
    model = qwen2.from_pretrained(tiny_model)
    tokenizer = evaluation.load_tokenizer(tiny_model, "--model")
    with fake_server.serve(fake_server.model_answer(model, tokenizer, token_ids)) as server:
        assert run_cli([*argv, "--out", tmp_path / "server", "--server", server.url, "--batch-size", "3"]) == ""
    assert len(server.requests) == 6 and all(r["temperature"] == 0 and r["max_tokens"] == 20 for r in server.requests)
    assert all(isinstance(r["prompt"], list) and isinstance(r["prompt"][0], int) for r in server.requests)
    for path in (tmp_path / "local").glob("*.csv"):
        assert (tmp_path / "server" / path.name).read_text() == path.read_text(), path.name
    saved = json.loads((tmp_path / "server" / f"qa1_1k_{PLAIN}.json").read_text())
    assert saved["server"] == server.url and saved["server_model"] == "served-model"
    assert len({r["output"] for r in ev.read_predictions(tmp_path / "local" / f"qa1_1k_{PLAIN}.csv")}) > 1


def test_end_to_end_with_prompt_config_and_chat(tiny_model, tmp_path):
    cfg = tmp_path / "published.json"
    cfg.write_text(json.dumps(PUBLISHED))
    out = tmp_path / "out"
    assert run_cli(["--model", tiny_model, "--synthetic", "--tasks", "qa2", "--lengths", "0k",
                    "--max-samples", "2", "--prompt-config", cfg, "--out", out]) == ""
    name = "instruction_yes_examples_yes_post_prompt_yes_chat_template_yes_system_prompt_yes"
    saved = json.loads((out / f"qa2_0k_{name}.json").read_text())
    assert saved["prompt"] == PUBLISHED["prompt"]
    assert saved["generate_kwargs"]["max_new_tokens"] == 15  # taken from the config


def test_benchmark_mode(tiny_model, capsys):
    assert run_cli(["--model", tiny_model, "--synthetic", "--tasks", "qa1", "--lengths", "0k",
                    "--max-samples", "4", "--batch-size", "4", "--benchmark"]) == ""
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "identical outputs batched and one at a time: yes" in printed


# ----------------------------------------------------------------------------------------------
# Errors a user can cause: one line naming the flag or file


def test_cli_errors(tiny_model, tmp_path):
    base = ["--model", tiny_model, "--out", tmp_path / "out", "--synthetic"]
    expect_error([*base, "--tasks", "qa21"], "--tasks: unknown task 'qa21'")
    expect_error([*base, "--lengths", "3k"], "--lengths: unknown length '3k'", "0k 1k 2k")
    expect_error([*base[:-1], "--lengths", "512"], "--lengths: unknown length '512'")  # counts: --synthetic only
    expect_error([*base, "--lengths", "0"], "--lengths: unknown length '0'")
    expect_error([*base, "--tasks", "qa6"], "--synthetic builds", "not qa6")
    expect_error([*base, "--batch-size", "0"], "--batch-size must be at least 1")
    expect_error([*base, "--server", "localhost:8000"], "--server localhost:8000: expected an http(s) URL")
    expect_error([*base, "--server", "http://127.0.0.1:9", "--dtype", "bfloat16"], "--dtype sets up the built-in")
    expect_error([*base, "--server-model", "m"], "--server-model goes with --server")
    expect_error([*base, "--server", "http://127.0.0.1:9", "--benchmark"], "--benchmark measures the built-in")
    expect_error([*base, "--server", "http://127.0.0.1:9", "--lengths", "0k", "--max-samples", "1"],
                 "--server http://127.0.0.1:9: cannot reach http://127.0.0.1:9/v1/models")
    expect_error([*base, "--system-prompt", "Hi"], "--system-prompt needs --chat-template")
    expect_error(["--model", tiny_model, "--out", tmp_path / "o", "--tasks", "qa11"],
                 "no built-in prompt for qa11", "--prompt-config")

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    expect_error(["--model", tiny_model, "--out", a_file, "--synthetic"], f"--out {a_file}: is a file")

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(PUBLISHED))
    expect_error([*base, "--prompt-config", cfg, "--tasks", "qa1", "qa2"], "holds one task's instruction")
    expect_error([*base, "--prompt-config", tmp_path / "nope.json"], "nope.json: no such file")
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"prompt": {**PUBLISHED["prompt"], "chat_template": False}}))
    expect_error([*base, "--prompt-config", plain, "--tasks", "qa1", "--system-prompt", "Hi"],
                 "--system-prompt needs --chat-template")

    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_model / name).read_bytes())
    expect_error(["--model", bare, "--out", tmp_path / "o2", "--synthetic"], f"no tokenizer.json in {bare}")
    expect_error(["--model", tmp_path / "absent", "--out", tmp_path / "o3", "--synthetic"], "absent")

    data_dir = tmp_path / "data"
    write_parquet(data_dir / "0k" / "qa1" / "0000.parquet", rows(2))
    expect_error(["--model", tiny_model, "--out", tmp_path / "o4", "--data-dir", data_dir, "--tasks", "qa1",
                  "qa2", "--lengths", "0k"], f"--data-dir {data_dir}", "no data file for qa2 at 0k")

    # 4k of context does not fit the tiny model's 3072 positions: refused before generating.
    message = expect_error([*base, "--tasks", "qa1", "--lengths", "4k", "--max-samples", "1"],
                           "qa1 4k: 1 of 1 prompts do not fit", "max_position_embeddings 3072",
                           "--overflow run")
    assert not list((tmp_path / "out").glob("*.csv")), message
    # ... unless asked to run anyway
    argv = [*base, "--tasks", "qa1", "--lengths", "4k", "--max-samples", "1"]
    assert run_cli([*argv, "--overflow", "run"]) == ""
    assert (tmp_path / "out" / f"qa1_4k_{PLAIN}.csv").is_file()


def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "eval_babilong.py"), "--model", str(tmp_path),
                           "--out", str(tmp_path / "o"), "--lengths", "5k"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "eval_babilong.py: error: --lengths: unknown length '5k' "
        "(the benchmark's: 0k 1k 2k 4k 8k 16k 32k 64k 128k 256k 512k 1M)"]
