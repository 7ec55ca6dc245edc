"""The suite's own guarantees: what a green run means (no silent skips in CI), markers, launches."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, require_real_tokenizer


def outcome(*needed: str) -> tuple[type, str]:
    """What require_real_tokenizer raises (a skip or a failure), caught so neither ends this test."""
    try:
        require_real_tokenizer(*needed)
    except (pytest.skip.Exception, pytest.fail.Exception) as e:
        return type(e), str(e)
    return type(None), ""


def test_missing_tokenizer_is_a_skip_for_a_developer_and_a_failure_in_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_TOKENIZER_DIR", str(tmp_path))  # an empty directory
    monkeypatch.delenv("CI", raising=False)
    kind, message = outcome()
    assert kind is pytest.skip.Exception and "set QWEN_TOKENIZER_DIR" in message
    monkeypatch.setenv("CI", "true")
    kind, message = outcome("chat_template.jinja")
    assert kind is pytest.fail.Exception and "required when CI is set" in message


@pytest.mark.slow
def test_chat_template_tests_fail_in_ci_without_the_tokenizer(tmp_path):
    """Through pytest itself, on chat-template tests: skipped for a developer, failed with CI set."""
    selection = ["tests/test_data.py::test_loss_mask_hand_checked_ids",
                 "tests/test_data.py::test_tojson_matches_transformers_not_jinja"]
    base = {k: v for k, v in os.environ.items() if k != "CI"}
    base.update(QWEN_TOKENIZER_DIR=str(tmp_path), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection]
    dev = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=base, timeout=300)
    assert dev.returncode == 0 and f"{len(selection)} skipped" in dev.stdout, dev.stdout + dev.stderr
    ci = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**base, "CI": "true"}, timeout=300)
    assert ci.returncode == 1 and f"{len(selection)} error" in ci.stdout, ci.stdout + ci.stderr
    assert "required when CI is set" in ci.stdout
