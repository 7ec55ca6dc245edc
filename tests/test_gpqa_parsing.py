"""Tool-call parsing and scoring pinned to Open-AgentRL's definitions (tool_parser.py HermesToolParser,
tool_agent_loop.py _call_tool, math_dapo.py strict box check)."""

import eval_gpqa as g


def test_parse_tool_call_takes_the_first_valid_call():
    text = ('I will compute.\n<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "1+1"}}\n</tool_call>'
            '\n<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "2+2"}}\n</tool_call><|im_end|>')
    assert g.parse_tool_call(text) == {"name": "code_interpreter", "arguments": {"code": "1+1"}}
    bad_first = '<tool_call>{not json}</tool_call><tool_call>{"name": "x", "arguments": [1]}</tool_call>'
    assert g.parse_tool_call(bad_first) == {"name": "x", "arguments": [1]}


def test_parse_tool_call_rejects():
    assert g.parse_tool_call("no call \\boxed{B}") is None
    assert g.parse_tool_call('<tool_call>{"name": "code_interpreter", "arguments": {}}') is None  # unclosed
    assert g.parse_tool_call('<tool_call>{"name": "code_interpreter"}</tool_call>') is None  # no arguments
    assert g.parse_tool_call('<tool_call>["code_interpreter"]</tool_call>') is None
    assert g.parse_tool_call("<tool_call>{'name': 'code_interpreter'}</tool_call>") is None  # not JSON


def test_tool_code_errors_are_the_tool_text():
    assert g.tool_code({"name": "code_interpreter", "arguments": {"code": "1"}}) == ("1", None)
    assert g.tool_code({"name": "python", "arguments": {"code": "1"}}) == (None, "Error when executing tool: 'python'")
    assert g.tool_code({"name": "code_interpreter", "arguments": {"src": "1"}}) == (
        None, "Error when executing tool: 'code'")
    code, err = g.tool_code({"name": "code_interpreter", "arguments": {"code": 5}})
    assert code is None and err.startswith("Error when executing tool: expected string")


def test_boxed_answer():
    assert g.boxed_answer("so the answer is \\boxed{B}.") == "B"
    assert g.boxed_answer("\\boxed{A} no, \\boxed{C}") == "C"  # the last box
    assert g.boxed_answer("\\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"  # nested braces
    assert g.boxed_answer("\\boxed{B") is None  # unbalanced
    assert g.boxed_answer("\\boxed{B}" + "x" * 100) is None  # starts outside the last 100 characters
    assert g.boxed_answer("x" * 1000 + "\\boxed{D}" + "y" * 91) == "D"  # 100 characters: inside
    assert g.boxed_answer("\\boxed{C}" + "y" * 92) is None  # 101: outside
    # A box straddling the cut: only its tail counts, and that has no "\boxed{".
    assert g.boxed_answer("\\boxed{" + "A" * 95 + "}") is None


def test_is_correct_is_exact():
    assert g.is_correct("... \\boxed{B}", "B")
    for wrong in ("\\boxed{(B)}", "\\boxed{ B}", "\\boxed{b}", "\\boxed{\\text{B}}", "\\boxed{'B'}", "B"):
        assert not g.is_correct(wrong, "B"), wrong
    assert not g.is_correct("\\boxed{B} and finally \\boxed{C}", "B")
