"""Agentic GPQA-Diamond: the model solves each problem with a sandboxed Python tool, over several turns,
and is scored as Open-AgentRL (github.com/Gen-Verse/Open-AgentRL, the DemyAgent evaluation) scores it.

    python eval_gpqa.py --model CHECKPOINT_DIR --data gpqa_diamond.parquet --out runs/gpqa/focusft

See docs/gpqa.md for the protocol, the data and the sandbox.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

PROG = "eval_gpqa.py"

# ----------------------------------------------------------------------------------------------
# The sandbox: model-written code is untrusted input.
#
# Each call runs `python -I main.py` in a fresh process inside a fresh temporary directory, with a minimal
# environment, in its own session (process group), under rlimits (address space, processes, file size,
# core dumps), and is killed with its whole group after the wall-clock timeout. Where the OS allows
# (util-linux `unshare`, as root or with user namespaces) it also gets a new network namespace (no
# network at all, loopback down), a new PID namespace (when its first process ends, the kernel kills every
# process it left, daemons included) and, as root, an unprivileged uid of its own: RLIMIT_NPROC does not
# bind root, it counts per uid, so a fresh uid per call makes it a per-call process limit, and the code
# can neither write the host's files nor signal the host's processes. sandbox_mode() says which applies.

TOOL_TIMEOUT = 30.0  # seconds (Open-AgentRL's sandbox_fusion_tool_config.yaml default_timeout)
TOOL_MEMORY_MB = 2048  # Open-AgentRL's memory_limit_mb
MAX_PROCESSES = 64  # processes and threads per call (RLIMIT_NPROC)
MAX_FILE_BYTES = 256 * 2**20  # largest file a call may write (RLIMIT_FSIZE)
OUTPUT_CAP = 2**20  # bytes kept per stream, as SandboxFusion's runner
TOOL_RESPONSE_CHARS = 256  # Open-AgentRL's max_tool_response_length, truncated in the middle
NO_STDOUT = "no stdout here"  # what the model sees after a timeout (Open-AgentRL's sandbox_fusion_tools.py)
_UID_BASE = 2_000_000_000  # sandbox uids (as root): far above any real account
_uids = itertools.count()


def _sandbox_env(home: str) -> dict[str, str]:
    # Nothing of the host's environment (tokens, paths) reaches the code. One thread per math library:
    # threads count against the process limit, and many calls run side by side anyway.
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
           "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg"}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[name] = "1"
    return env


def _limits(memory_mb: int) -> list[str]:
    # prlimit(1) sets the limits in the exec chain, so no preexec_fn (unsafe with threads) is needed.
    return ["prlimit", f"--as={memory_mb * 2**20}", f"--nproc={MAX_PROCESSES}", f"--fsize={MAX_FILE_BYTES}",
            "--core=0", "--"]


# Run by sh inside the new mount namespace, as root there: fresh tmpfs over the world-writable directories,
# then the call's directory recreated at the same path on the new /tmp (from the old one, still the cwd).
_PRIVATE_TMP = ('src=$PWD; for d in /tmp /var/tmp /dev/shm; do if [ -d "$d" ]; then '
                'mount -t tmpfs -o size=256m,mode=1777 tmpfs "$d" || exit 97; fi; done; '
                'mkdir -p -m 777 "$src" && cp main.py "$src/" && cd "$src" && unset PWD OLDPWD && exec "$@"')


def _isolation_prefixes(uid: int) -> list[tuple[str, list[str]]]:
    """Candidate wrappers, strongest first: (name, argv prefix put before `python -I main.py`)."""
    # A mount namespace with fresh tmpfs over the world-writable directories: what the code writes there
    # (its own directory included) vanishes with the namespace instead of staying on the host.
    ns = ["--net", "--pid", "--fork", "--kill-child", "--mount", "sh", "-c", _PRIVATE_TMP, "sh"]
    if os.geteuid() != 0:
        return [("userns+netns+pidns+mntns", ["unshare", "--user", "--map-root-user", *ns])]
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    # Some installs keep the interpreter where only root may look (e.g. under /root); the dropped uid then
    # keeps one capability, read-only access to files, and nothing else.
    read = ["--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search",
            "--bounding-set=-all,+dac_read_search"]
    return [("netns+pidns+mntns+uid", ["unshare", *ns, *drop, "--bounding-set=-all", "--"]),
            ("netns+pidns+mntns+uid(read-all)", ["unshare", *ns, *drop, *read, "--"])]


def _sandbox_python() -> str:
    return sys.executable


@functools.cache
def sandbox_mode() -> str:
    """The isolation this machine allows, found once by running a probe through each candidate wrapper:
    one of the names of _isolation_prefixes, or 'process-group' (rlimits and a session only; no network or
    PID namespace, and no process limit, which would count every process of this user)."""
    for name, prefix in _isolation_prefixes(_UID_BASE):
        if not all(shutil.which(cmd) for cmd in ("prlimit", "unshare", "sh", "setpriv")[:4 if "uid" in name else 3]):
            continue
        try:
            with tempfile.TemporaryDirectory(prefix="gpqa-sandbox-") as workdir:
                open(os.path.join(workdir, "main.py"), "w").close()
                probe = subprocess.run(_limits(TOOL_MEMORY_MB) + prefix + [_sandbox_python(), "-I", "main.py"],
                                       env=_sandbox_env(workdir), cwd=workdir, capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return name
    return "process-group"


def _wrapper(uid: int, memory_mb: int) -> list[str]:
    mode = sandbox_mode()
    if mode == "process-group":
        return ["prlimit", f"--as={memory_mb * 2**20}", f"--fsize={MAX_FILE_BYTES}", "--core=0", "--"]
    return _limits(memory_mb) + dict(_isolation_prefixes(uid))[mode]


def _read_capped(proc: subprocess.Popen, deadline: float) -> tuple[bytes, bytes, bool]:
    """Read both pipes until they close or the deadline passes: (stdout, stderr, closed in time). Keeps the
    first OUTPUT_CAP bytes of each and drains the rest, so a flood neither blocks the code nor fills memory."""
    kept = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    with selectors.DefaultSelector() as sel:
        for pipe in kept:
            os.set_blocking(pipe.fileno(), False)
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(kept[proc.stdout]), bytes(kept[proc.stderr]), False
            for key, _ in sel.select(timeout=left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = kept[key.fileobj]
                buf += chunk[:max(0, OUTPUT_CAP - len(buf))]
    return bytes(kept[proc.stdout]), bytes(kept[proc.stderr]), True


def run_code(code: str, timeout: float = TOOL_TIMEOUT, memory_mb: int = TOOL_MEMORY_MB) -> tuple[str, str, bool]:
    """Run Python code in the sandbox: (stdout, stderr, finished). finished is False after a timeout; a
    crash, a traceback or a signal still counts as finished (SandboxFusion's run_status 'Finished')."""
    uid = _UID_BASE + (os.getpid() % 1000) * 1_000_000 + next(_uids) % 1_000_000
    workdir = tempfile.mkdtemp(prefix="gpqa-sandbox-")
    proc = None
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        proc = subprocess.Popen(_wrapper(uid, memory_mb) + [_sandbox_python(), "-I", "main.py"], cwd=workdir,
                                env=_sandbox_env(workdir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        out, err, closed = _read_capped(proc, deadline)
        finished = closed
        if closed:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # pipes closed but the process lives on: still a timeout
                finished = False
        return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), finished
    finally:
        if proc is not None:
            _kill_group(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of a process, from /proc (children lists of each thread)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _kill_group(proc: subprocess.Popen) -> None:
    # SIGKILL to the wrapper's session group takes the code with it. Code that left the group (setsid) is
    # found as a descendant first; in the namespace modes, killing the PID namespace's first process makes
    # the kernel kill everything else in it, daemons included. (--kill-child alone is not enough: the
    # death signal it arms is cleared when the code's uid is set.)
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()


_FENCED = re.compile(r"```python(.*?)```", re.DOTALL)


def prepare_code(code: str) -> str:
    """Open-AgentRL's code handling (recipe/demystify/reward.py, CustomSandboxFusionTool.execute): keep the
    first ```python fenced block if there is one, then wrap the last non-empty line in print(...) unless
    it starts with 'print'. The rewrite is literal text, as theirs: `x = 1` becomes `print(x = 1)`, an
    indented last line a SyntaxError, and the model sees that error."""
    blocks = _FENCED.findall(code)
    if blocks:
        code = blocks[0].strip()
    lines = code.split("\n")
    for i in range(len(lines) - 1, -1, -1):
        if lines[i] == "":
            continue
        if not lines[i].startswith("print"):
            lines[i] = f"print({lines[i]})"
        break
    return "\n".join(lines)


def truncate_middle(text: str, limit: int = TOOL_RESPONSE_CHARS) -> str:
    """Open-AgentRL's tool-response truncation (tool_agent_loop.py, side 'middle'): the first and last
    limit // 2 characters around '...(truncated)...'."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + "...(truncated)..." + text[-half:]


def execute(code: str, timeout: float = TOOL_TIMEOUT, memory_mb: int = TOOL_MEMORY_MB) -> str:
    """The tool result the model sees for a code_interpreter call: stdout + stderr of the prepared code
    (tracebacks included), 'no stdout here' after a timeout, truncated in the middle to 256 characters."""
    out, err, finished = run_code(prepare_code(code), timeout, memory_mb)
    return truncate_middle(out + err if finished else NO_STDOUT)


def default_workers(memory_mb: int = TOOL_MEMORY_MB) -> int:
    """Parallel sandbox calls this machine holds: one per CPU core, and no more than the available memory
    fits at each call's limit."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        by_memory = avail_kb // 1024 // memory_mb
    except (OSError, StopIteration, ValueError):
        by_memory = cores
    return max(1, min(cores, by_memory))


@dataclass
class SandboxPool:
    """Runs many tool calls at once, at most `workers` at a time (Open-AgentRL's pool has 128 workers on
    a cluster node; here the default is what the machine holds)."""

    workers: int = 0
    timeout: float = TOOL_TIMEOUT
    memory_mb: int = TOOL_MEMORY_MB

    def map(self, codes: Iterable[str]) -> list[str]:
        codes = list(codes)
        if not codes:
            return []
        workers = min(self.workers or default_workers(self.memory_mb), len(codes))
        with ThreadPoolExecutor(workers) as ex:
            return list(ex.map(lambda c: execute(c, self.timeout, self.memory_mb), codes))


# ----------------------------------------------------------------------------------------------
# Tool calls and scoring, as Open-AgentRL parses and scores them

TOOL_NAME = "code_interpreter"
# The tool schema of Open-AgentRL's recipe/demystify/sandbox_fusion_tool_config.yaml (dumped without unset
# fields, so no "strict"), rendered into Qwen2.5's tools system block.
CODE_TOOL = {"type": "function", "function": {
    "name": TOOL_NAME, "description": "A tool for executing code.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "The code to execute."}},
                   "required": ["code"]}}}
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_call(text: str) -> dict | None:
    """The first valid hermes tool call of an assistant turn, {"name": ..., "arguments": ...}, or None.

    As Open-AgentRL's HermesToolParser: every <tool_call>...</tool_call> body is JSON-decoded and needs
    "name" and "arguments"; invalid ones are skipped; max_parallel_calls = 1 keeps only the first valid one.
    """
    if "<tool_call>" not in text or "</tool_call>" not in text:
        return None
    for body in _TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
            return {"name": call["name"], "arguments": call["arguments"]}
        except Exception:  # noqa: BLE001 - theirs skips any failure (bad JSON, a list, a missing key)
            continue
    return None


def tool_code(call: dict) -> tuple[str | None, str | None]:
    """(code to run, None) or (None, the error text the model sees): Open-AgentRL's _call_tool answers an
    unknown tool or bad arguments with 'Error when executing tool: <exception>', untruncated."""
    try:
        if call["name"] != TOOL_NAME:
            raise KeyError(call["name"])
        code = call["arguments"]["code"]
        _FENCED.findall(code)  # a non-string fails here, as in theirs
        return code, None
    except Exception as e:  # noqa: BLE001 - any failure becomes the tool's text
        return None, f"Error when executing tool: {e}"


def boxed_answer(text: str) -> str | None:
    """The content of the last brace-balanced \\boxed{...} that starts in the last 100 characters, or None
    (math_dapo.py with strict_box_verify: the last 300 characters, then the last 100 of those)."""
    tail = text[-300:][-100:]
    start = tail.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(tail)):
        if tail[i] == "{":
            depth += 1
        elif tail[i] == "}":
            depth -= 1
            if depth == 0:
                return tail[start + len("\\boxed{"):i]
    return None  # unbalanced: no answer


def is_correct(response: str, solution: str) -> bool:
    """Open-AgentRL's strict rule: the boxed answer equals the solution letter exactly (no stripping, no
    normalising: \\boxed{(B)} and \\boxed{ B} are wrong)."""
    return boxed_answer(response) == solution
