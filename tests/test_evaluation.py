"""evaluation.py: the engines (built-in model and an OpenAI-compatible server started here), EOS ids and
decoding, context limits, result files and resume, the common flags, and the docstring's example run as written."""

import argparse
import json
import sys
import textwrap
import time

import fake_server
import huggingface_hub
import pytest

import evaluation
import qwen2


@pytest.fixture(scope="module")
def setup(tiny):
    return evaluation.load_setup(tiny.model, max_new_tokens=6)


def scripted(table: dict[tuple, tuple], token_ids: bool = True, delay: dict | None = None):
    """Answers from a table {prompt ids: (generated ids, text, finish reason)}; prompts in `delay` wait."""
    def answer(body):
        time.sleep((delay or {}).get(tuple(body["prompt"]), 0.0))
        ids, text, finish = table[tuple(body["prompt"])]
        return fake_server.choice(ids, text, finish, token_ids)
    return answer


def test_server_engine_keeps_the_prompts_order_and_sends_the_protocol(setup):
    prompts = [[5, 6, 7], [8], [9, 10]]
    eos = setup.eos[0]
    table = {tuple(p): ([20 + i, 30 + i, eos], f"out{i}", "stop") for i, p in enumerate(prompts)}
    # The first prompt answers last: results must still come back in the prompts' order.
    with fake_server.serve(scripted(table, delay={(5, 6, 7): 0.3})) as server:
        engine = evaluation.ServerEngine(server.url + "/v1/", setup, concurrency=3)
        assert engine.generate(prompts, 6) == [table[tuple(p)][0] for p in prompts]
    body = next(r for r in server.requests if r["prompt"] == [8])
    assert body["model"] == "served-model" and body["max_tokens"] == 6 and body["temperature"] == 0
    assert body["stop_token_ids"] == setup.eos and "seed" not in body
    assert engine.describe() == {"server": server.url + "/v1/", "server_model": "served-model"}


def test_server_engine_without_token_ids_encodes_the_text(setup):
    text = "the kitchen"
    ids = setup.encode([text], add_special_tokens=False)[0]
    table = {(5,): ([], text, "stop"), (6,): ([], text, "length")}
    with fake_server.serve(scripted(table, token_ids=False)) as server:
        stopped, cut = evaluation.ServerEngine(server.url, setup).generate([[5], [6]], 6)
    assert stopped == [*ids, setup.eos[0]] and cut == ids  # EOS only where the server says it stopped
    assert setup.decode(stopped) == setup.decode(cut) == text


def test_server_engine_sampling_seeds_each_prompt(setup):
    table = {(5,): ([1], "a", "length")}
    with fake_server.serve(scripted(table)) as server:
        sampling = evaluation.Sampling(temperature=1.0, top_p=0.6, seed=7)
        evaluation.ServerEngine(server.url, setup).generate([[5], [5], [5]], 1, sampling=sampling)
    sent = sorted((r["seed"], r["temperature"], r["top_p"]) for r in server.requests if "prompt" in r)
    assert sent == [(7, 1.0, 0.6), (8, 1.0, 0.6), (9, 1.0, 0.6)]
    # The built-in engine samples too: seeded, so a rerun draws the same tokens.
    local = evaluation.LocalEngine(setup.directory, setup, batch_size=2)
    drawn = local.generate([[5, 6], [5, 6], [7]], 8, sampling=sampling)
    assert drawn == local.generate([[5, 6], [5, 6], [7]], 8, sampling=sampling)
    assert drawn != local.generate([[5, 6], [5, 6], [7]], 8, sampling=evaluation.Sampling(1.0, 0.6, seed=8))


def test_server_engine_errors_are_one_line(setup):
    with fake_server.serve(lambda body: (400, {"error": {"message": "prompt too long\nfor this model"}}),
                           models=("a", "b")) as server:
        with pytest.raises(evaluation.EvalError, match="serves 2 models .*--server-model"):
            evaluation.ServerEngine(server.url, setup).generate([[5]], 1)
        with pytest.raises(evaluation.EvalError) as e:
            evaluation.ServerEngine(server.url, setup, model_name="a").generate([[5]], 1)
    assert "answered HTTP 400" in str(e.value) and "prompt too long for this model" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(evaluation.EvalError, match="cannot reach"):
        evaluation.ServerEngine(server.url, setup, model_name="a").generate([[5]], 1)  # server gone


def test_eos_ids_and_decode(tiny, setup):
    eos = evaluation.eos_token_ids(tiny.model, tiny.tokenizer)
    assert tiny.tokenizer.token_to_id("<|im_end|>") in eos and tiny.tokenizer.token_to_id("<|endoftext|>") in eos
    assert setup.eos == eos
    ids = tiny.tokenizer.encode("the kitchen", add_special_tokens=False).ids
    assert evaluation.decode(tiny.tokenizer, [*ids, eos[0], 5, 6], eos) == "the kitchen"  # cut at the EOS


def test_context_limit_follows_yarn_scaling():
    def config(**kw):
        shape = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=32768)
        return qwen2.Qwen2Config.from_dict({**shape, **kw})

    assert evaluation.context_limit(config()) == (32768, "max_position_embeddings")
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert evaluation.context_limit(config(rope_scaling=yarn))[0] == 131072
    # transformers 5 spelling
    yarn5 = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
    assert evaluation.context_limit(config(rope_parameters=yarn5))[0] == 131072
    assert evaluation.context_limit(config(rope_scaling=None))[0] == 32768


def test_is_finished_compares_the_settings(tmp_path):
    record = {"prompt": {"instruction": "a"}, "generate_kwargs": {"max_new_tokens": 20}, "data": {"seed": 0}}
    result, meta = tmp_path / "p.csv", tmp_path / "p.json"
    assert not evaluation.is_finished(result, meta, record)
    meta.write_text(json.dumps({**record, "accuracy": 0.5}))
    assert not evaluation.is_finished(result, meta, record)  # no result file
    evaluation.write_csv(result, ["a"], [])
    assert evaluation.is_finished(result, meta, record)
    assert not evaluation.is_finished(result, meta, {**record, "data": {"seed": 1}})
    assert evaluation.is_finished(result, meta, {**record, "data": {"seed": 1}}, keys=("prompt",))
    meta.write_text("{broken")
    assert not evaluation.is_finished(result, meta, record)


def test_result_files_are_written_whole(tmp_path):
    rows = [{"q": "a\nb", "n": 1}, {"q": "ü", "n": 2}]
    evaluation.write_jsonl(tmp_path / "r.jsonl", rows)
    assert evaluation.read_jsonl(tmp_path / "r.jsonl") == rows
    evaluation.write_csv(tmp_path / "r.csv", ["q", "n"], [[r["q"], r["n"]] for r in rows])
    assert evaluation.read_csv(tmp_path / "r.csv", ("q",)) == [{"q": "a\nb"}, {"q": "ü"}]
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "bad.jsonl").write_text('{"q": 1}\n{broken\n')
    with pytest.raises(evaluation.EvalError, match=r"bad.jsonl:2: not valid JSON"):
        evaluation.read_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(evaluation.EvalError, match=r"no column\(s\) x"):
        evaluation.read_csv(tmp_path / "r.csv", ("q", "x"))


def test_markdown_table():
    assert evaluation.markdown_table(["", "a"], [["x", evaluation.percent(0.5)], ["y", evaluation.percent(None)]]) \
        == "| | a |\n| --- | ---: |\n| x | 50.0 |\n| y | - |"


def test_setup_for_a_server_downloads_no_weights(tiny, monkeypatch):
    asked = []

    def snapshot_download(repo, allow_patterns):
        asked.append(allow_patterns)
        return str(tiny.model)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert evaluation.load_setup("org/served", 5, weights=False).directory == tiny.model
    assert evaluation.load_setup("org/local", 5).directory == tiny.model
    assert "config.json" in asked[0] and "tokenizer.json" in asked[0] and "*.safetensors" in asked[1]
    assert not [p for p in asked[0] if "safetensors" in p]


def test_common_flags():
    parser = argparse.ArgumentParser()
    evaluation.add_common_args(parser)
    check = lambda *argv: evaluation.check_common_args(parser.parse_args(["--model", "m", "--out", "o", *argv]))
    check()
    check("--server", "http://gpu-node:8000", "--server-model", "qwen")
    for argv, message in [(("--batch-size", "0"), "--batch-size must be at least 1"),
                          (("--server", "gpu-node:8000"), "expected an http"),
                          (("--server", "http://h:1", "--device", "cuda"), "--device sets up the built-in"),
                          (("--server-model", "q"), "--server-model goes with --server")]:
        with pytest.raises(evaluation.EvalError, match=message):
            check(*argv)


def test_docstring_example_runs(tiny, tmp_path, monkeypatch, capsys):
    """The module docstring's 'new benchmark' runs as written."""
    doc = evaluation.__doc__
    code = textwrap.dedent(doc[doc.index("    import argparse"):])
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["eval_arith.py", "--model", str(tiny.model), "--out", str(out)])
    exec(compile(code, "evaluation-docstring", "exec"), {"__name__": "example"})
    rows = evaluation.read_jsonl(out / "arith.jsonl")
    assert len(rows) == 1 and set(rows[0]) == {"question", "answer", "output", "correct"}
    assert capsys.readouterr().out.splitlines()[:2] == ["| task | accuracy |", "| --- | ---: |"]


def test_from_hub_failures_are_one_line(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def failing(error):
        def call():
            raise error
        return call

    def get(error, cached=None):
        return evaluation.from_hub(failing(error), "org/data", "v1", "get data.zip", "pass --data-dir", cached)

    assert evaluation.from_hub(lambda: 7, "org/data", "main", "get x", "") == 7
    with pytest.raises(evaluation.EvalError, match=r"^--dataset org/data --revision v1: cannot get data.zip \(the "
                                                    r"dataset has no such file\)$"):
        get(EntryNotFoundError("404\nmore"))
    assert get(ConnectionError("down"), cached=lambda: "from the cache") == "from the cache"
    with pytest.raises(evaluation.EvalError, match=r"cannot get data.zip \(ConnectionError: down\) and it is not in "
                                                    r"the hub cache .*; run once online, or pass --data-dir$"):
        get(ConnectionError("down\ntraceback"), cached=failing(LocalEntryNotFoundError("not cached")))
    with pytest.raises(evaluation.EvalError, match=r"\(the hub is unreachable\) and it is not in the hub cache"):
        get(LocalEntryNotFoundError("long\nmessage"))


def test_read_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"a": 1, "b": "x"}]), tmp_path / "ok.parquet")
    assert evaluation.read_parquet(tmp_path / "ok.parquet") == [{"a": 1, "b": "x"}]
    assert evaluation.read_parquet(tmp_path / "ok.parquet", ("b",)) == [{"b": "x"}]
    with pytest.raises(evaluation.EvalError, match=r"ok.parquet: no column\(s\) c \(has: a, b\)"):
        evaluation.read_parquet(tmp_path / "ok.parquet", ("b", "c"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(evaluation.EvalError, match=r"^--data .*bad.parquet: not a readable parquet file \("):
        evaluation.read_parquet(tmp_path / "bad.parquet", where="--data ")
