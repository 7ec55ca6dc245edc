"""eval_longbench.py: LongBench's metrics, prompts, middle truncation, data sources and the full run."""

import json
import zipfile

import fake_server
import pytest

import data
import eval_longbench as lb
import qwen2

# ----------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("prediction, truth, expected", [
    ("Paris", "Paris", 1.0),
    ("The Paris!", "paris", 1.0),                # case, punctuation, article
    ("U.S.A.", "USA", 1.0),                      # punctuation is removed, not turned into spaces
    ("well-known", "well known", 0.0),           # ... so a hyphenated word stays one token
    ("“Paris”", "Paris", 0.0),                   # only ASCII punctuation is removed
    ("an apple, a pear", "apple pear", 1.0),     # articles go wherever they stand alone
    ("theatre anthem", "theatre anthem", 1.0),   # ... but not inside words
    ("New\n\tYork ", "new york", 1.0),           # whitespace collapsed
    ("a cat sat", "the cat", 2 / 3),             # P = 1/2, R = 1
    ("cat cat cat", "cat", 0.5),                 # repeated tokens count once per reference occurrence
    ("cat cat", "cat cat dog", 0.8),             # P = 1, R = 2/3
    ("", "Paris", 0.0),                          # empty prediction
    ("the", "Paris", 0.0),                       # a prediction of articles only is empty
    ("Paris", "", 0.0),                          # empty reference
])
def test_qa_f1_score(prediction, truth, expected):
    assert lb.qa_f1_score(prediction, truth) == pytest.approx(expected)


def test_normalize_answer():
    assert lb.normalize_answer("  The U.S. Army's  best-known, A unit!") == "us armys bestknown unit"


def test_sample_score_is_the_best_answer():
    assert lb.sample_score("hotpotqa", "the old bridge", ["bridge", "old bridge", "river"]) == 1.0
    assert lb.sample_score("hotpotqa", "old bridge", ["bridge"]) == pytest.approx(2 / 3)
    assert lb.sample_score("hotpotqa", "old bridge", []) == 0.0


def test_first_line_cut_is_triviaqa_only():
    pred = "\n\nParis\nQuestion: the capital of Italy? Answer: Rome"
    assert lb.sample_score("triviaqa", pred, ["Rome"]) == 0.0     # only "Paris" is scored
    assert lb.sample_score("triviaqa", pred, ["Paris"]) == 1.0    # after the leading newlines
    assert lb.sample_score("hotpotqa", pred, ["Rome"]) > 0.0      # QA tasks score the whole text


def test_task_score_rounds_the_mean_of_samples():
    rows = [{"pred": "c b", "answers": ["b"]}, {"pred": "x", "answers": ["y"]}, {"pred": "y", "answers": ["y"]}]
    assert lb.task_score("musique", rows) == round(100 * (2 / 3 + 0 + 1) / 3, 2) == 55.56


def test_other_metrics():
    assert lb.count_score("There are 12 unique paragraphs, not 13.", "12") == 0.5
    assert lb.count_score("no number", "12") == 0.0
    assert lb.retrieval_score("Paragraph 7", "Paragraph 7") == 1.0
    assert lb.retrieval_score("Paragraph 17 or 7", "Paragraph 7") == 0.5
    classes = ["Abbreviation", "Description and abstract concept", "Human being", "Location"]
    assert lb.classification_score("Location", "Location", classes) == 1.0
    assert lb.classification_score("Location or Human being", "Location", classes) == 0.5
    assert lb.classification_score("Human being", "Location", classes) == 0.0
    # each task goes to its metric (eval.py's dataset2metric)
    assert lb.sample_score("gov_report", "a b c.", ["x", "c b a"]) == pytest.approx(1 / 3, abs=1e-7)
    assert lb.sample_score("lcc", "# next\nx = 1\n", ["x = 2", "x = 1"]) == 1.0
    assert lb.sample_score("trec", "\nLocation\nHuman being", ["Location"], classes) == 1.0  # first line only
    assert {lb.METRICS[t] for t in ("qmsum", "multi_news", "repobench-p")} == {"rouge_score", "code_sim_score"}


@pytest.mark.parametrize("prediction, truth, expected", [
    ("the cat sat.", "the cat sat.", 1.0),
    ("cat cat cat", "cat", 1.0),         # `rouge` counts distinct words: no penalty for repeating one
    ("a. b. c", "c b a", 1.0),           # LCS per sentence pair, their union: order across sentences is free
    ("c b a", "a b c", 1 / 3),           # one sentence: LCS 1 of 3 words
    ("b a. b", "a b", 0.5),              # the back-trace picks "b" in the first pair (ties go left), as rouge's
    ("", "a", 0.0),                      # `rouge` raises on an empty text; LongBench scores 0
    ("...", "a", 0.0),                   # only full stops: no sentence
])
def test_rouge_score(prediction, truth, expected):
    assert lb.rouge_score(prediction, truth) == pytest.approx(expected, abs=1e-7)  # F has a +1e-8 in its divisor


def test_code_sim_score():
    # the first line without ` # // (after leading newlines), compared character by character
    assert lb.code_sim_score("\n# note\n```\n    return x\nmore", "    return x") == 1.0
    assert lb.code_sim_score("\n\n    return x", "    return x") == 1.0    # indentation is part of the line
    assert lb.code_sim_score("abcd", "abce") == 0.75                  # difflib: 2 x 3 matches / 8 characters
    assert lb.code_sim_score("abcdefgh", "aijklmno") == 0.12          # 12.5 rounds half to even, as round() does
    assert lb.code_sim_score("# all comments", "return x") == 0.0


def test_longbench_e_buckets_by_length():
    rows = [{"pred": "x", "answers": ["x"], "length": n} for n in (10, 3999)]
    rows += [{"pred": "x", "answers": ["y"], "length": 4000}, {"pred": "x", "answers": ["x"], "length": 7999}]
    assert lb.task_score_e("hotpotqa", rows) == {"0-4k": 100.0, "4-8k": 50.0, "8k+": None}
    with pytest.raises(lb.EvalError, match="prediction 1 has no numeric length"):
        lb.task_score_e("hotpotqa", [{"pred": "x", "answers": ["x"], "length": None}])


def test_classification_keeps_longbenchs_skip():
    # LongBench removes from the list it loops over, so "ab" (after the removed "a") is never examined
    # and stays: 1/2, where a clean filter would give 1.0. The benchmark's number is the reference.
    assert lb.classification_score("abc", "abc", ["a", "ab", "abc"]) == 0.5


# ----------------------------------------------------------------------------------------------
# Prompts and truncation


def test_prompts_are_longbenchs():
    assert set(lb.PROMPTS) == set(lb.TASKS) == set(lb.MAX_NEW_TOKENS) == set(lb.METRICS)
    narrative = lb.build_prompt("narrativeqa", {"context": "CTX", "input": "Who?"})
    assert narrative.count("asconcisely") == 2                      # the typo is the benchmark's
    assert "\n\nStory: CTX\n\n" in narrative and narrative.endswith("Question: Who?\n\nAnswer:")
    assert lb.build_prompt("multifieldqa_en", {"context": "C", "input": "Q"}).endswith("\n\nQuestion: Q\nAnswer:")
    assert lb.build_prompt("qasper", {"context": "C", "input": "Q"}).count("\n\n Answer the question") == 1
    assert lb.PROMPTS["2wikimqa"] == lb.PROMPTS["musique"] == lb.PROMPTS["hotpotqa"]
    # the context is data: braces in it stay as they are
    assert "{x} {}" in lb.build_prompt("hotpotqa", {"context": "{x} {}", "input": "Q", "answers": []})
    assert (lb.MAX_NEW_TOKENS["narrativeqa"], lb.MAX_NEW_TOKENS["qasper"], lb.MAX_NEW_TOKENS["multifieldqa_en"],
            lb.MAX_NEW_TOKENS["hotpotqa"]) == (128, 128, 64, 32)


def test_truncate_middle():
    ids = list(range(10))
    assert lb.truncate_middle(ids, 6) == [0, 1, 2, 7, 8, 9]
    assert lb.truncate_middle(ids, 7) == [0, 1, 2, 7, 8, 9]        # int(7 / 2) from each end
    assert lb.truncate_middle(ids, 10) == ids
    with pytest.raises(ValueError):
        lb.truncate_middle(ids, 1)


def long_sample(n_words: int = 3000) -> dict:
    return {"context": " ".join(f"fact{i} is {i % 7}." for i in range(n_words)), "input": "What is fact5?"}


def test_truncation_with_the_qwen_tokenizer(qwen_tokenizer):
    sample = long_sample()
    prompt = lb.build_prompt("hotpotqa", sample)
    full = qwen_tokenizer.encode(prompt).ids
    assert len(full) > 4 * 500
    text = lb.model_inputs("hotpotqa", [sample], qwen_tokenizer, 500, chat_template=False)[0]
    ids = qwen_tokenizer.encode(text).ids
    # exactly pred.py's: the first and last 250 tokens, decoded apart and joined (501 keeps 250 + 250 too)
    assert text == qwen_tokenizer.decode(full[:250], skip_special_tokens=True) + qwen_tokenizer.decode(full[-250:])
    assert lb.model_inputs("hotpotqa", [sample], qwen_tokenizer, 501, chat_template=False) == [text]
    assert abs(len(ids) - 500) <= 2                                  # re-encoding may merge at the seam
    assert ids[:240] == full[:240] and ids[-240:] == full[-240:]     # head and tail kept
    assert text.startswith("Answer the question based on the given passages.")
    assert text.endswith("Question: What is fact5?\nAnswer:")
    assert "fact1000 " not in text                                   # the middle is gone
    short = {"context": "fact1 is 1.", "input": "What is fact1?"}
    # a batch: only the prompts over the budget change
    both = lb.model_inputs("hotpotqa", [short, sample], qwen_tokenizer, 500, False)
    assert both == [lb.build_prompt("hotpotqa", short), text]


def test_chat_wrapping_comes_after_truncation(qwen_tokenizer):
    sample = long_sample()
    plain = lb.model_inputs("hotpotqa", [sample], qwen_tokenizer, 500, chat_template=False)[0]
    chat = lb.model_inputs("hotpotqa", [sample], qwen_tokenizer, 500, chat_template=True)[0]
    assert chat == data.render_chat([{"role": "user", "content": plain}], add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    # the chat tokens come on top of the budget: nothing of the truncated prompt is lost to them
    assert len(qwen_tokenizer.encode(chat).ids) > len(qwen_tokenizer.encode(plain).ids) + 10
    # few-shot tasks are never wrapped (pred.py)
    trivia = {"context": "Q: a? A: b", "input": "Q: c? A:"}
    assert lb.model_inputs("triviaqa", [trivia], qwen_tokenizer, 500, True) == [lb.build_prompt("triviaqa", trivia)]


# ----------------------------------------------------------------------------------------------
# Data and re-scoring


def record(i: int, task: str = "hotpotqa") -> dict:
    """A record in LongBench's format."""
    return {"input": f"Where is item{i}?", "context": f"Passage 1:\nitem{i} is in room{i}.", "answers": [f"room{i}"],
            "length": 5, "dataset": task, "language": "en", "all_classes": None, "_id": f"id{i}"}


def write_task(folder, task, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_folder_and_zip_data(tmp_path):
    write_task(tmp_path / "data", "hotpotqa", [record(0), record(1)])
    assert lb.FolderData(tmp_path / "data").samples("hotpotqa") == [record(0), record(1)]
    with pytest.raises(lb.EvalError, match=r"--data-dir .*: no qasper.jsonl"):
        lb.FolderData(tmp_path / "data").check(["hotpotqa", "qasper"])
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as z:  # the hub file's layout
        z.write(tmp_path / "data" / "hotpotqa.jsonl", "data/hotpotqa.jsonl")
        z.writestr("data/hotpotqa_e.jsonl", "")
    source = lb.ZipData("--data-dir x", {}, path=tmp_path / "data.zip")
    assert source.samples("hotpotqa") == [record(0), record(1)]
    with pytest.raises(lb.EvalError, match=r"no musique.jsonl in .*data.zip"):
        source.check(["musique"])


@pytest.mark.parametrize("line, fragment", [
    ("{not json", "bad.jsonl:2: not valid JSON"),
    ('{"input": "q", "context": "c"}', "bad.jsonl:2: missing field(s) answers"),
    ('{"input": "q", "context": "c", "answers": "a"}', "bad.jsonl:2: answers must be a list of strings"),
    ('{"input": "q", "context": "c", "answers": ["a"], "all_classes": "x"}', "all_classes must be null or a list"),
])
def test_bad_records_name_file_and_line(tmp_path, line, fragment):
    (tmp_path / "bad.jsonl").write_text(json.dumps(record(0)) + "\n" + line + "\n")
    with pytest.raises(lb.EvalError) as e:
        lb.parse_samples((tmp_path / "bad.jsonl").read_text().splitlines(), str(tmp_path / "bad.jsonl"))
    assert fragment in str(e.value)


def test_hub_zip_from_the_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(lb.EvalError, match=r"--dataset THUDM/LongBench: cannot get data.zip \(HF_HUB_OFFLINE is "
                                           r"set.*not in the hub cache.*--data-dir"):
        lb.hub_zip("THUDM/LongBench", "main")
    # a cache as huggingface_hub lays it out: refs/main names the snapshot holding data.zip
    repo, commit = tmp_path / "hub" / "datasets--THUDM--LongBench", "0123456789abcdef" * 2 + "01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    with zipfile.ZipFile(repo / "snapshots" / commit / "data.zip", "w") as z:
        z.writestr("data/qasper.jsonl", json.dumps(record(3, "qasper")) + "\n")
    source = lb.ZipData("--dataset THUDM/LongBench", {}, fetch=lambda: lb.hub_zip("THUDM/LongBench", "main"))
    assert source.samples("qasper") == [record(3, "qasper")]


def test_score_dir(tmp_path, capsys):
    rows = [{"pred": "room1", "answers": ["room1"], "all_classes": None, "length": 5},
            {"pred": "The room2.", "answers": ["x", "room2"], "all_classes": None, "length": 5},
            {"pred": "no", "answers": ["room3"], "all_classes": None, "length": 5}]
    write_task(tmp_path, "hotpotqa", rows)
    write_task(tmp_path, "triviaqa", [{"pred": "Rome\nParis", "answers": ["Paris"], "all_classes": None}])
    write_task(tmp_path, "samsum", [{"pred": "s", "answers": ["t"], "all_classes": None}])
    assert lb.score_dir(tmp_path) == {"hotpotqa": 66.67, "triviaqa": 0.0}
    assert json.loads((tmp_path / "result.json").read_text()) == {"hotpotqa": 66.67, "triviaqa": 0.0}
    out = capsys.readouterr().out
    assert "not scored (no metric here): samsum" in out
    assert "| hotpotqa | qa_f1_score | 3 | 66.67 |" in out and "| average | | | 33.34 |" in out


# ----------------------------------------------------------------------------------------------
# The full run on a tiny random model


def longbench_dir(root, tasks=("hotpotqa", "triviaqa"), n=2, n_items=150, long=0):
    """LongBench's data folder with n short records per task, sample `long` with a long context."""
    for task in tasks:
        records = [record(i, task) for i in range(n)]
        records[long]["context"] = " ".join(f"item{k} is in room{k}." for k in range(n_items))
        write_task(root, task, records)
    return root


def test_default_tasks_are_the_papers():
    args = lb.build_parser().parse_args(["--model", "m", "--out", "o"])
    lb.validate(args)
    assert args.tasks == ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa"] and args.max_length == 7500
    args = lb.build_parser().parse_args(["--model", "m", "--out", "o", "--longbench-e"])
    lb.validate(args)
    assert args.tasks == ["qasper", "multifieldqa_en", "hotpotqa"]  # NarrativeQA is not in LongBench-E


def test_end_to_end_with_resume(tiny, tmp_path, capsys, monkeypatch):
    # hotpotqa and triviaqa: the shortest outputs (32 tokens), one QA task and one that is never chat-wrapped
    data_dir, out = longbench_dir(tmp_path / "data"), tmp_path / "out"
    args = ["--model", str(tiny.model), "--data-dir", str(data_dir), "--out", str(out), "--max-length", "200",
            "--batch-size", "2", "--tasks", "hotpotqa", "triviaqa"]
    assert lb.main(args) == 0
    printed = capsys.readouterr().out
    assert "| task | metric | samples | score |" in printed and "| average | | |" in printed
    scores = json.loads((out / "result.json").read_text())
    assert list(scores) == ["hotpotqa", "triviaqa"]
    for task in scores:
        rows = [json.loads(line) for line in (out / f"{task}.jsonl").read_text().splitlines()]
        assert [list(r) for r in rows] == [["pred", "answers", "all_classes", "length"]] * 2  # LongBench's layout
        assert [r["answers"] for r in rows] == [["room0"], ["room1"]]                       # the data's order
        meta = json.loads((out / f"{task}.json").read_text())
        assert meta["generate_kwargs"]["max_new_tokens"] == lb.MAX_NEW_TOKENS[task]
        assert 190 <= meta["prompt_tokens"]["max"] <= 202                                   # truncated
        assert scores[task] == lb.task_score(task, rows)
    assert lb.score_dir(out) == scores                                                      # eval.py agrees
    capsys.readouterr()

    # a rerun reuses every finished task and never loads the model
    monkeypatch.setattr(lb.evaluation.LocalEngine, "generate", lambda *a, **k: pytest.fail("must not generate"))
    assert lb.main(args) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 2
    monkeypatch.undo()
    before = (out / "triviaqa.jsonl").read_text()
    (out / "hotpotqa.jsonl").unlink()  # as if killed during hotpotqa
    assert lb.main(args) == 0
    assert "1 of 2 tasks to run" in capsys.readouterr().out
    # the chat format changes hotpotqa's prompts only: triviaqa (few-shot) is never wrapped
    assert lb.main(args + ["--chat-template"]) == 0
    assert "1 of 2 tasks to run" in capsys.readouterr().out
    assert json.loads((out / "hotpotqa.json").read_text())["prompt"]["chat_template"] is True
    assert (out / "triviaqa.jsonl").read_text() == before


def test_server_engine_writes_the_same_predictions(tiny, tmp_path):
    """--server (an OpenAI-compatible completions server answering from the same model, text only, the
    harder case: the text is encoded again) gives the same prediction file."""
    data_dir = longbench_dir(tmp_path / "data", tasks=("hotpotqa",))
    argv = ["--model", str(tiny.model), "--data-dir", str(data_dir), "--max-length", "200", "--tasks", "hotpotqa"]
    assert lb.main([*argv, "--out", str(tmp_path / "local")]) == 0
    model, tokenizer = qwen2.from_pretrained(tiny.model), data.load_tokenizer(tiny.model)
    with fake_server.serve(fake_server.model_answer(model, tokenizer, token_ids=False)) as server:
        assert lb.main([*argv, "--out", str(tmp_path / "server"), "--server", server.url]) == 0
    assert [r["max_tokens"] for r in server.requests] == [32, 32]
    assert (tmp_path / "server" / "hotpotqa.jsonl").read_text() == (tmp_path / "local" / "hotpotqa.jsonl").read_text()
    assert json.loads((tmp_path / "server" / "hotpotqa.json").read_text())["server"] == server.url


def test_a_long_prompt_builds_no_square_mask(tiny, tmp_path, monkeypatch):
    """Prefill of a long prompt runs causal attention without a mask tensor: never an S x S mask."""
    import torch

    shapes, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append((q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape[-2:])))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    data_dir = longbench_dir(tmp_path / "data", tasks=("hotpotqa",), n=1)
    lb.main(["--model", str(tiny.model), "--data-dir", str(data_dir), "--out", str(tmp_path / "out"),
             "--tasks", "hotpotqa", "--max-length", "1000"])
    S = json.loads((tmp_path / "out" / "hotpotqa.json").read_text())["prompt_tokens"]["max"]
    assert S > 900 and (S, S, None) in shapes                      # the whole prompt in one causal pass
    assert all(mask is None or mask[0] < S for _, _, mask in shapes)


def test_another_model_in_the_same_out_reruns(tiny, tmp_path, capsys):
    data_dir, out = longbench_dir(tmp_path / "data", tasks=("hotpotqa",), n=1, n_items=5), tmp_path / "out"
    args = ["--data-dir", str(data_dir), "--out", str(out), "--tasks", "hotpotqa"]
    assert lb.main(["--model", str(tiny.model), *args]) == 0
    meta = json.loads((out / "hotpotqa.json").read_text())
    meta["model"] = "another/model"
    (out / "hotpotqa.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert lb.main(["--model", str(tiny.model), *args]) == 0
    assert "1 of 1 tasks to run" in capsys.readouterr().out


def test_a_killed_task_resumes_inside(tiny, tmp_path, monkeypatch, capsys):
    """Predictions are saved a chunk (4 x --batch-size prompts) at a time: a run killed in a task generates
    only the rest on the next run, and the files equal those of an uninterrupted run. The engine is a stand-in
    (this is about the bookkeeping): it answers each prompt with the tokens of its question."""
    calls, kill = [], {"on_call": None}

    def generate(self, prompts, max_new_tokens, progress=None, **kw):
        calls.append(len(prompts))
        if len(calls) == kill["on_call"]:
            raise KeyboardInterrupt
        return [p[-20:] for p in prompts]  # "...Question: Where is item{i}?\nAnswer:"

    monkeypatch.setattr(lb.evaluation.LocalEngine, "generate", generate)
    data_dir = longbench_dir(tmp_path / "data", tasks=("hotpotqa",), n=6, n_items=3, long=5)  # 5 goes first
    args = ["--model", str(tiny.model), "--data-dir", str(data_dir), "--tasks", "hotpotqa", "--batch-size", "1"]
    assert lb.main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert calls == [4, 2]
    whole = (tmp_path / "whole" / "hotpotqa.jsonl").read_text()
    assert all(f"item{i}?" in json.loads(line)["pred"] for i, line in enumerate(whole.splitlines()))

    out = tmp_path / "killed"
    calls.clear()
    kill["on_call"] = 2
    with pytest.raises(SystemExit, match="interrupted"):
        lb.main([*args, "--out", str(out)])
    assert len((out / "hotpotqa.partial").read_text().splitlines()) == 4 and not (out / "hotpotqa.jsonl").exists()
    calls.clear()
    kill["on_call"] = None
    assert lb.main([*args, "--out", str(out)]) == 0
    assert calls == [2] and "hotpotqa: resuming after 4 of 6 samples" in capsys.readouterr().out
    assert (out / "hotpotqa.jsonl").read_text() == whole
    assert not (out / "hotpotqa.partial").exists() and not (out / "hotpotqa.partial.json").exists()


def test_prompt_over_the_context_stops_before_generating(tiny, tmp_path, monkeypatch):
    data_dir = longbench_dir(tmp_path / "data", tasks=("hotpotqa",), n_items=400)  # ~5400 tokens > 4096
    monkeypatch.setattr(lb.evaluation.LocalEngine, "generate", lambda *a, **k: pytest.fail("must not generate"))
    with pytest.raises(SystemExit) as e:
        lb.main(["--model", str(tiny.model), "--data-dir", str(data_dir), "--out", str(tmp_path / "out"),
                 "--tasks", "hotpotqa", "--max-length", "8000"])
    message = str(e.value)
    assert message.startswith("eval_longbench.py: error: hotpotqa: 1 of 2 prompts do not fit the model's context")
    assert "--max-length" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_longbench_e_end_to_end(tiny, tmp_path, capsys):
    records = [record(0), record(1)]
    records[1]["length"] = 6000
    write_task(tmp_path / "data", "hotpotqa_e", records)
    out = tmp_path / "out"
    assert lb.main(["--model", str(tiny.model), "--data-dir", str(tmp_path / "data"), "--out", str(out),
                    "--longbench-e", "--tasks", "hotpotqa"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert list(result) == ["hotpotqa"] and list(result["hotpotqa"]) == ["0-4k", "4-8k", "8k+"]
    assert result["hotpotqa"]["8k+"] is None
    assert json.loads((out / "hotpotqa.json").read_text())["data"]["file"] == "hotpotqa_e.jsonl"
    assert "| task | metric | samples | 0-4k | 4-8k | 8k+ |" in capsys.readouterr().out
    assert lb.score_dir(out, longbench_e=True) == result
    with pytest.raises(SystemExit, match="--data-dir .*: no hotpotqa.jsonl"):  # plain LongBench: other files
        lb.main(["--model", str(tiny.model), "--data-dir", str(tmp_path / "data"), "--out", str(out),
                 "--tasks", "hotpotqa"])


@pytest.mark.parametrize("flags, fragment", [
    (["--tasks", "samsum"], "--tasks: LongBench's samsum is not implemented here (rouge_score with pred.py's"),
    (["--tasks", "hotpot"], "--tasks: unknown task 'hotpot'"),
    (["--tasks", "narrativeqa", "--longbench-e"], "--tasks: narrativeqa is not in LongBench-E"),
    (["--max-length", "1"], "--max-length must be at least 2"),
    (["--max-samples", "0"], "--max-samples must be at least 1"),
    (["--data-dir", "/nonexistent/longbench"], "--data-dir /nonexistent/longbench: no such folder"),
])
def test_cli_errors_are_one_line(tiny, tmp_path, flags, fragment):
    with pytest.raises(SystemExit) as e:
        lb.main(["--model", str(tiny.model), "--out", str(tmp_path / "out"), *flags])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_bad_data_and_predictions_are_one_line_errors(tiny, tmp_path):
    def error(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            lb.main([*map(str, argv)])
        assert str(e.value).startswith("eval_longbench.py: error: ") and "\n" not in str(e.value)
        return str(e.value)

    base = ["--model", tiny.model, "--out", tmp_path / "out", "--tasks", "hotpotqa"]
    write_task(tmp_path / "data", "hotpotqa", [record(0)])
    with open(tmp_path / "data" / "hotpotqa.jsonl", "a") as f:
        f.write('{"input": "q", "context": "c"}\n')
    assert "hotpotqa.jsonl:2: missing field(s) answers" in error(*base, "--data-dir", tmp_path / "data")
    (tmp_path / "data.zip").write_text("not a zip")
    assert "data.zip is not a readable zip file" in error(*base, "--data-dir", tmp_path / "data.zip")
    assert not (tmp_path / "out").exists()
    assert "--score-dir " in error("--score-dir", tmp_path / "nowhere")
    (tmp_path / "preds").mkdir()
    (tmp_path / "preds" / "hotpotqa.jsonl").write_text('{"pred": 1, "answers": []}\n')
    assert "hotpotqa.jsonl:1: expected LongBench's prediction record" in error("--score-dir", tmp_path / "preds")
