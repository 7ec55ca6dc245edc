"""The GPQA tool sandbox under attack: every call ends in a clean tool result, with no process or file left
behind; Open-AgentRL's code handling and truncation."""

import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

import eval_gpqa as g

MODE = g.sandbox_mode()
NAMESPACES = MODE != "process-group"
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason=f"sandbox mode {MODE}: no PID/network namespace here")


def sandbox_processes() -> list[int]:
    """Processes running a sandboxed script (their command line is `python -I main.py`), or its forks."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().endswith(b"\0-I\0main.py\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def leftovers() -> list[str]:
    return [p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("gpqa-sandbox-")]


@pytest.fixture(autouse=True)
def nothing_left_behind():
    before = set(leftovers())
    yield
    assert sandbox_processes() == []
    assert set(leftovers()) <= before


def test_result_text_is_stdout_then_stderr_with_tracebacks():
    assert g.execute("1 + 1") == "2\n"  # the last line is printed
    out = g.execute("import sys\nprint('out')\nprint('err', file=sys.stderr)\n1 / 0")
    assert out.startswith("out\nerr\nTraceback") and out.endswith("ZeroDivisionError: division by zero\n")


def test_prepare_code_follows_open_agentrl():
    assert g.prepare_code("x = 2\nx * 3") == "x = 2\nprint(x * 3)"
    assert g.prepare_code("x = 1") == "print(x = 1)"  # literal, as theirs
    assert g.prepare_code("print(1)\n\n") == "print(1)\n\n"  # empty lines skipped, print left alone
    assert g.prepare_code("a = 1\n  ") == "a = 1\nprint(  )"  # only '' counts as empty
    fenced = "Let me compute.\n```python\nimport math\nmath.pi\n```\nthen\n```python\n2\n```"
    assert g.prepare_code(fenced) == "import math\nprint(math.pi)"
    assert g.execute("for i in range(2):\n    i").startswith("  File")  # an indented last line: a SyntaxError


def test_truncate_middle():
    assert g.truncate_middle("a" * 256) == "a" * 256
    text = "".join(chr(65 + i % 26) for i in range(300))
    assert g.truncate_middle(text) == text[:128] + "...(truncated)..." + text[-128:]


def test_infinite_loop_times_out():
    assert g.execute("while True:\n    pass\nprint(1)", timeout=1) == g.NO_STDOUT


def test_code_that_leaves_the_session_is_still_killed():
    assert g.execute("import os\nos.setsid()\nwhile True:\n    pass\nprint(1)", timeout=1) == g.NO_STDOUT


def test_sleeping_child_that_left_the_session_does_not_outlive_the_call():
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\n"
            "print('parent done')")
    result = g.execute(code, timeout=3 if NAMESPACES else 1)
    # With a PID namespace the parent's exit ends the call; without one the child holds the pipes open.
    assert result == ("parent done\n" if NAMESPACES else g.NO_STDOUT)


@needs_namespaces
def test_fork_bomb_is_contained():
    # First a bounded count (a machine where the limit did not bind would see 500, not a fork bomb).
    n = g.execute("import os\nn = 0\ntry:\n    while n < 500:\n        if os.fork() == 0:\n            import time\n"
                  "            time.sleep(30)\n        n += 1\nexcept OSError:\n    pass\nn")
    assert 0 < int(n) < g.MAX_PROCESSES
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\nprint(1)"
    assert g.execute(code, timeout=2) == g.NO_STDOUT


def test_memory_hog_gets_a_memory_error():
    out = g.execute("x = bytearray(3 * 2**30)\nprint(len(x))")
    assert out.rstrip().endswith("MemoryError")


def test_huge_print_is_capped_and_truncated():
    out = g.execute("print('a' * (100 * 2**20))")
    assert out == "a" * 128 + "...(truncated)..." + "a" * 128  # the capture stops at OUTPUT_CAP
    stdout, _, finished = g.run_code("print('b' * (100 * 2**20))")
    assert finished and len(stdout) == g.OUTPUT_CAP


@needs_namespaces
def test_no_network():
    with socket.create_server(("127.0.0.1", 0)) as server:  # reachable from the host, not from the sandbox
        port = server.getsockname()[1]
        out = g.execute(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                        f"print('connected')")
    assert "connected\n" not in out and "Network is unreachable" in out


@needs_namespaces
def test_cannot_kill_the_parent():
    for target in (os.getpid(), os.getppid()):
        out = g.execute(f"import os, signal\nos.kill({target}, signal.SIGKILL)\nprint('sent')")
        assert "sent" not in out and ("ProcessLookupError" in out or "PermissionError" in out)
    assert g.execute("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('alive')") == "alive\n"


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("GPQA_TEST_SECRET", "hunter2")
    out, _, _ = g.run_code("import os\nprint(sorted(os.environ.items()))")
    assert "GPQA_TEST_SECRET" not in out and "hunter2" not in out
    assert [k for k, _ in eval(out)] == sorted(g._sandbox_env("/x"))


def test_calls_are_stateless():
    marker = uuid.uuid4().hex
    g.execute(f"open('state.txt', 'w').write('{marker}')\nimport builtins\nbuiltins.KEPT = 1\nprint(1)")
    out = g.execute("import os, builtins\n[os.listdir('.'), hasattr(builtins, 'KEPT')]")
    assert out == "[['main.py'], False]\n"


@needs_namespaces
def test_world_writable_directories_are_private():
    name = f"gpqa-test-{uuid.uuid4().hex}"
    out = g.execute(f"for d in ('/tmp', '/dev/shm'):\n    open(d + '/{name}', 'w').write('x')\nprint('ok')")
    assert out == "ok\n"
    assert not any(Path(d, name).exists() for d in ("/tmp", "/dev/shm"))


def test_pool_runs_calls_in_parallel_in_order():
    pool = g.SandboxPool(workers=2, timeout=2)
    codes = ["while True:\n    pass\nprint(0)", "6 * 7", "1 / 0", "print('x')"]
    out = pool.map(codes)
    assert out[0] == g.NO_STDOUT and out[1] == "42\n" and "ZeroDivisionError" in out[2] and out[3] == "x\n"
    assert 1 <= g.default_workers() <= (os.cpu_count() or 1)
