"""The README tells the truth about the commands: CI runs its test command, and every flag it shows
for a script is a flag that script accepts."""

import re
import subprocess
import sys

from conftest import ROOT

README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    demo, tests = blocks[0], blocks[1]
    assert "pip install torch==2.13.0 && pip install -r requirements.txt && python demo.py" in demo
    assert "pip install torch==2.13.0 && pip install -r requirements-dev.txt" in tests
    command = next(line for line in tests.splitlines() if "pytest" in line)
    assert command in CI  # .ci/run extracts and runs this very line
    assert "pip install -q torch==2.13.0" in CI and "pip install -q -r requirements-dev.txt" in CI


SCRIPTS = {"focusft.py": [[]], "eval_babilong.py": [[]], "bench.py": [[]], "demo.py": [[]],
           "data.py": [["synth"], ["check"]]}


def test_every_flag_in_the_readme_exists():
    helps = {}
    for script, variants in SCRIPTS.items():
        text = ""
        for sub in variants:
            out = subprocess.run([sys.executable, str(ROOT / script), *sub, "--help"], capture_output=True, text=True,
                                 cwd=ROOT)
            assert out.returncode == 0, out.stderr
            text += out.stdout
        helps[script] = set(re.findall(r"--[a-z][a-z0-9-]*", text))
    checked = 0
    for line in README.splitlines():
        scripts = [s for s in SCRIPTS if s in line]
        if len(scripts) != 1:
            continue
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", line):
            if flag in ("--nproc_per_node",):  # torchrun's own
                continue
            assert flag in helps[scripts[0]], f"README: {scripts[0]} has no flag {flag}: {line.strip()}"
            checked += 1
    assert checked > 30
