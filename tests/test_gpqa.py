"""eval_gpqa's rollout loop: the token layout against the real Qwen2.5 template, a scripted policy through
the real loop and sandbox, data loading, metrics, and the command line end to end with a tiny model."""

import csv
import json
import random

import pytest

import data
import eval_gpqa as g

CALL = '<tool_call>\n{{"name": "code_interpreter", "arguments": {{"code": "{}"}}}}\n</tool_call>'


class ScriptedTurns(g.evaluation.Conversations):
    """A fake model: row r's n-th turn is script[r][n] (text, encoded), ending with <|im_end|>. Records the
    tokens each row was extended with."""

    def __init__(self, tokenizer, scripts: list[list[str]]):
        self.tokenizer, self.scripts = tokenizer, scripts
        self.rows = list(range(len(scripts)))  # row -> script
        self.fed: list[list[list[int]]] = [[] for _ in scripts]

    def extend(self, tokens, budgets):
        outs = []
        for row, (toks, budget) in enumerate(zip(tokens, budgets, strict=True)):
            r = self.rows[row]
            self.fed[r].append(list(toks))
            text = self.scripts[r][len(self.fed[r]) - 1] + data.IM_END
            outs.append(self.tokenizer.encode(text, add_special_tokens=False).ids[:budget])
        return outs

    def select(self, rows):
        self.rows = [self.rows[i] for i in rows]


def run_script(tokenizer, scripts, limits=None, timeout=5.0, turns=None):
    eos = [tokenizer.token_to_id(data.IM_END)]
    turns = turns or ScriptedTurns(tokenizer, scripts)
    rollouts = []
    for k in range(len(scripts)):
        messages = g.prompt_messages(f"What is 6 x 7?\n\n(A) 42\n(B) 41\n(C) 40\n(D) 6{k}", "Physics")
        ids = tokenizer.encode(data.render_chat(messages, [g.CODE_TOOL], True), add_special_tokens=False).ids
        rollouts.append(g.Rollout(0, k, ids, messages))
    g.run_rollouts(turns, rollouts, tokenizer, eos, g.SandboxPool(2, timeout), limits or g.Limits())
    return rollouts, turns


TWO_CALLS = ["Let me compute.\n" + CALL.format("6 * 7"), CALL.format("print(40 + 2)"),
             "Both give 42, so the answer is \\boxed{A}"]


def test_token_layout_equals_the_qwen_template_less_the_newlines_open_agentrl_drops(qwen_tokenizer_dir,
                                                                                    qwen_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = qwen_tokenizer
    (r,), turns = run_script(tokenizer, [TWO_CALLS])
    assert [m["role"] for m in r.messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert [m["content"] for m in r.messages if m["role"] == "tool"] == ["42\n", "42\n"]
    assert r.stop == "answer" and r.tool_calls == 2 and r.assistant_turns == 3
    ours = r.prompt + r.response

    hf = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    template = hf.apply_chat_template(r.messages, tools=[g.CODE_TOOL], tokenize=False)
    # Open-AgentRL appends each tool turn right after the model's <|im_end|>: the newline the template
    # puts there is not in a rollout (nor after the last turn, where generation stopped).
    rollout_text = template.replace(data.IM_END + "\n" + data.IM_START + "user\n<tool_response>",
                                    data.IM_END + data.IM_START + "user\n<tool_response>")
    assert rollout_text.endswith(data.IM_END + "\n")
    assert ours == hf.encode(rollout_text[:-1], add_special_tokens=False)
    # The two differ only by those newline tokens; data.py renders the transcript as the template does.
    assert len(hf.encode(template, add_special_tokens=False)) == len(ours) + 3
    assert data.render_chat(r.messages, [g.CODE_TOOL]) == template
    # Each turn after the first was extended with exactly the tool turn (after the carried last token).
    assert turns.fed[0][1] == tokenizer.encode(g.tool_turn_text("42\n"), add_special_tokens=False).ids
    assert g.score_rollout(r, tokenizer, "A", g.Limits())["correct"]


@pytest.fixture(scope="module")
def tok(tiny):
    return data.load_tokenizer(tiny.model)


def test_scripted_policy_through_the_real_loop_and_sandbox(tok, tmp_path):
    scripts = [TWO_CALLS,
               [CALL.format("while True: pass"), "\\boxed{A}"],  # a SyntaxError from the print wrap
               [CALL.format("import time\\nwhile True:\\n    time.sleep(1)\\nprint(1)"), "\\boxed{(A)}"],
               ["<tool_call>{not json}</tool_call>", "never reached"],
               [CALL.format("1 / 0"), '<tool_call>\n{"name": "python", "arguments": {}}\n</tool_call>', "\\boxed{B}"]]
    rollouts, _ = run_script(tok, scripts, timeout=1.0)
    stats = [(r.stop, r.assistant_turns, r.tool_calls, r.tool_timeouts, r.tool_errors) for r in rollouts]
    assert stats == [("answer", 3, 2, 0, 0), ("answer", 2, 1, 0, 1), ("answer", 2, 1, 1, 0), ("answer", 1, 0, 0, 0),
                     ("answer", 3, 2, 0, 2)]
    assert rollouts[2].messages[2]["content"] == g.NO_STDOUT
    assert rollouts[4].messages[4]["content"] == "Error when executing tool: 'python'"
    scores = [g.score_rollout(r, tok, "A", g.Limits())["correct"] for r in rollouts]
    assert scores == [True, True, False, False, False]
    # The correct rollouts' records are training data as they are: data.py loads them.
    problem = g.Problem("0", "", "A", "Physics")
    lines = [g.rollout_record(r, problem, g.score_rollout(r, tok, "A", g.Limits())) for r in rollouts[:2]]
    (tmp_path / "correct.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    samples, _ = data.load_samples(tmp_path / "correct.jsonl", tok)
    assert len(samples) == 2 and sum(samples[0].loss_mask) > 0


def test_turn_and_token_limits(tok):
    always = [CALL.format("1")] * 20
    (r,), _ = run_script(tok, [always], g.Limits(max_turns=4))
    assert (r.stop, r.assistant_turns, r.tool_calls) == ("turns", 4, 3)
    (r,), _ = run_script(tok, [always], g.Limits(max_response_tokens=120))
    assert r.stop == "length" and len(r.response) < 120 and r.response[-1] == tok.token_to_id(data.IM_END)
    assert r.mask[-1] == 1  # ends on the model's turn: the tool turn that would reach the budget is not added
    (r,), _ = run_script(tok, [always], g.Limits(context=len(r.prompt) + 30))
    assert r.stop == "context"


@pytest.mark.parametrize("token_ids", [True, False])
def test_server_conversations_give_the_same_transcripts(tok, token_ids):
    """The scripted policy served by a local OpenAI-compatible server (vLLM's token ids in the answer, or
    only the text): the same transcripts and tokens as the built-in path."""
    from fake_server import choice, serve

    scripts = [TWO_CALLS, [CALL.format("1 / 0"), "\\boxed{B}"], ["\\boxed{A}"]]
    if g.sandbox_mode() == "process-group":  # tracebacks name a random directory there
        scripts[1][0] = CALL.format("1 / 4")

    def answer(body):
        text = tok.decode(body["prompt"], skip_special_tokens=False)
        row = int(text.split("(D) 6")[1][0])  # which rollout: its problem says
        out = scripts[row][text.count("<tool_response>")]
        ids = tok.encode(out + data.IM_END, add_special_tokens=False).ids
        assert body["stop_token_ids"] == [tok.token_to_id(data.IM_END)] and body["max_tokens"] > len(ids)
        return choice(ids, out, "stop", token_ids)

    local, _ = run_script(tok, scripts)
    with serve(answer) as server:
        setup = g.evaluation.Setup(None, tok, None, [tok.token_to_id(data.IM_END)], 100)
        engine = g.evaluation.ServerEngine(server.url, setup)
        remote, _ = run_script(tok, scripts, turns=engine.conversations(g.evaluation.Sampling(1.0, 0.6, seed=7)))
        seeds = sorted({r["seed"] for r in server.requests if "seed" in r})
        assert seeds == [7, 8, 9] and {r["top_p"] for r in server.requests[1:]} == {0.6}
    for a, b in zip(local, remote, strict=True):
        assert a.messages == b.messages and a.response == b.response and a.mask == b.mask and a.stop == b.stop
    # Each turn's request is the whole conversation so far: the prompt, then every earlier turn and tool result.
    sent = {tuple(r["prompt"]) for r in server.requests if "prompt" in r}
    for r in local:
        starts = [i for i, m in enumerate(r.mask) if m and (i == 0 or not r.mask[i - 1])]
        assert {tuple(r.prompt + r.response[:i]) for i in starts} <= sent
    assert len(sent) == sum(r.assistant_turns for r in local)


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[*g.GPQA_CSV_COLUMNS, "High-level domain"])
        w.writeheader()
        w.writerows(rows)


def test_gpqa_csv_options_are_shuffled_by_the_seed(tmp_path):
    rows = [{"Question": f"Q{i}?", "Correct Answer": f"right{i}", "Incorrect Answer 1": "w1",
             "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3", "High-level domain": "Chemistry"}
            for i in range(20)]
    write_csv(tmp_path / "gpqa.csv", rows)
    problems = g.load_problems(tmp_path / "gpqa.csv", shuffle_seed=0)
    for i, p in enumerate(problems):
        assert f"({p.solution}) right{i}\n" in p.problem + "\n" and p.domain == "Chemistry"
    assert len({p.solution for p in problems}) == 4  # the correct option moves around
    assert [p.problem for p in problems] == [p.problem for p in g.load_problems(tmp_path / "gpqa.csv", 0)]
    assert [p.solution for p in problems] != [p.solution for p in g.load_problems(tmp_path / "gpqa.csv", 1)]
    rng = random.Random(0)
    assert problems[0].solution == "ABCD"[rng.sample(range(4), 4).index(0)]  # the documented rule


def test_data_errors_are_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(g.evaluation.EvalError, match="expected the columns problem, solution, domain"):
        g.load_problems(tmp_path / "bad.jsonl")
    with pytest.raises(g.evaluation.EvalError, match="no such file"):
        g.load_problems(tmp_path / "missing.parquet")


def test_a_context_shorter_than_the_protocol_stops_before_generating(tiny, tmp_path):
    synthetic_items(tmp_path / "items.jsonl")
    argv = ["--model", str(tiny.model), "--data", str(tmp_path / "items.jsonl"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="may reach 24576 tokens .* max_position_embeddings 4096; pass --overflow run"):
        g.main(argv)
    assert not (tmp_path / "out").exists()


def test_metrics():
    def rec(pid, pred, sol="A"):
        return {"id": pid, "pred": pred, "correct": pred == sol,
                "stats": {"tool_calls": 1, "tool_timeouts": 0, "tool_errors": 0, "assistant_turns": 2,
                          "response_tokens": 10}}

    records = [rec("p", "A"), rec("p", "B"), rec("p", "B"), rec("q", "A"), rec("q", None), rec("q", None)]
    m = g.metrics(records, {"p": "A", "q": "A"})
    assert m["pass@1"] == 2 / 6 and m["pass@n"] == 1.0 and m["maj@n"] == 0.5 and m["answered"] == 4 / 6
    assert g.majority(["B", "A", "A", "B"]) == "B" and g.majority([None]) is None


def test_rollouts_file_keeps_unicode_line_separators_in_transcripts(tmp_path):
    """json.dumps(ensure_ascii=False), as evaluate writes rollouts.jsonl, leaves U+2028, U+2029 and U+0085
    unescaped; str.splitlines would break a line at each. Only "\\n" ends a record, and a cut last line
    is still dropped."""
    records = [{"id": "0", "rollout": k, "messages": [{"role": "assistant", "content": f"a{sep}b"}]}
               for k, sep in enumerate(("\u2028", "\u2029", "\x85"))]
    path = tmp_path / "rollouts.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    assert g.read_rollouts(path) == (records, True)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "1", "messages": "c\u2028')  # a line cut short by a kill
    assert g.read_rollouts(path) == (records, False)


def synthetic_items(path, n=3):
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(2, 50), rng.randint(2, 50)
            options = "\n".join(f"({x}) {v}" for x, v in zip("ABCD", (a * b, a * b + 1, a * b - 3, a + b), strict=True))
            f.write(json.dumps({"problem": f"What is {a} times {b}?\n\n{options}", "solution": "A",
                                "domain": ["Physics", "Chemistry", "Biology"][i % 3]}) + "\n")


@pytest.mark.slow
def test_command_line_end_to_end_and_resume(tiny, tmp_path, capsys):
    synthetic_items(tmp_path / "items.jsonl")
    out = tmp_path / "out"
    argv = ["--model", str(tiny.model), "--data", str(tmp_path / "items.jsonl"), "--rollouts", "2", "--out", str(out),
            "--max-prompt-tokens", "720", "--max-response-tokens", "40", "--tool-timeout", "2"]
    assert g.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| all | 3 |" in printed and "pass@1" in printed and "maj@2" in printed
    records = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["rollout"]) for r in records) == [(str(i), k) for i in range(3) for k in range(2)]
    for r in records:
        assert data.conversation_problems(r["messages"], r["tools"], training=False) == []
    results = json.loads((out / "results.json").read_text())
    assert results["overall"]["rollouts"] == 6 and set(results["domains"]) == {"Physics", "Chemistry", "Biology"}
    # A rerun runs nothing; more rollouts run only the new ones; other settings are refused.
    assert g.main(argv) == 0 and "6 to run" not in capsys.readouterr().out
    with open(out / "rollouts.jsonl", "a") as f:
        f.write('{"id": "0", "rollo')  # a line cut short by a kill
    assert g.main([*argv[:5], "3", *argv[6:]]) == 0
    assert "3 to run (6 done before)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings \\(temperature\\)"):
        g.main([*argv, "--temperature", "0.5"])


@pytest.mark.slow
def test_server_engine_end_to_end_equals_the_built_in_model(tiny, tmp_path):
    """Greedy, the same rollouts from the built-in model and from a local server answering with it."""
    from fake_server import model_answer, serve

    import qwen2

    synthetic_items(tmp_path / "items.jsonl", n=2)
    common = ["--model", str(tiny.model), "--data", str(tmp_path / "items.jsonl"), "--rollouts", "1",
              "--max-prompt-tokens", "720", "--max-response-tokens", "40", "--temperature", "0"]
    assert g.main([*common, "--out", str(tmp_path / "local")]) == 0
    model = qwen2.from_pretrained(tiny.model, dtype="float32").eval()
    with serve(model_answer(model, data.load_tokenizer(tiny.model))) as server:
        assert g.main([*common, "--out", str(tmp_path / "server"), "--server", server.url]) == 0
    rows = [[{k: v for k, v in json.loads(line).items()} for line in (tmp_path / d / "rollouts.jsonl").open()]
            for d in ("local", "server")]
    assert rows[0] == rows[1]
