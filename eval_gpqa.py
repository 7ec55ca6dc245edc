"""Agentic GPQA-Diamond: the model solves each problem with a sandboxed Python tool, over several turns,
and is scored as Open-AgentRL (github.com/Gen-Verse/Open-AgentRL, the DemyAgent evaluation) scores it.

    # Open-AgentRL's setting: 32 rollouts per problem, temperature 1.0, top-p 0.6, the built-in model
    python eval_gpqa.py --model CHECKPOINT_DIR --data gpqa_diamond.parquet --out runs/gpqa/focusft
    # the same on a vLLM server (`vllm serve CHECKPOINT_DIR`), 128 requests in flight
    python eval_gpqa.py --model CHECKPOINT_DIR --data gpqa_diamond.parquet --out runs/gpqa/focusft \\
        --server http://localhost:8000 --batch-size 128
    # GPQA's own CSV (options shuffled with --shuffle-seed), a quick look: 20 problems, 4 rollouts
    python eval_gpqa.py --model CHECKPOINT_DIR --data gpqa_diamond.csv --max-problems 20 --rollouts 4 --out try

Each problem is one user turn (Open-AgentRL's prompt) with the code_interpreter tool in Qwen2.5's tools
system block; the model generates until <|im_end|>; its first valid <tool_call> runs in the sandbox below
and the result comes back as a <tool_response> user turn; a turn without a valid call ends the rollout.
Scoring: the last \\boxed{...} in the last 100 characters of the response equals the letter exactly.
See docs/gpqa.md for the protocol with its sources, the data and the sandbox.
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import os
import random
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import data
import evaluation

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
# then the code copied from the call's directory (still the cwd) to the same path in every call, so what
# the model sees (tracebacks name the file) does not depend on a random directory name.
SANDBOX_DIR = "/tmp/sandbox"
_PRIVATE_TMP = ('for d in /tmp /var/tmp /dev/shm; do if [ -d "$d" ]; then '
                'mount -t tmpfs -o size=256m,mode=1777 tmpfs "$d" || exit 97; fi; done; '
                f'mkdir -m 777 {SANDBOX_DIR} && cp main.py {SANDBOX_DIR}/ && cd {SANDBOX_DIR} && unset PWD OLDPWD '
                '&& exec "$@"')


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
        home = workdir if sandbox_mode() == "process-group" else SANDBOX_DIR
        proc = subprocess.Popen(_wrapper(uid, memory_mb) + [_sandbox_python(), "-I", "main.py"], cwd=workdir,
                                env=_sandbox_env(home), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
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
    descendants = _descendants(proc.pid)
    for pid in [proc.pid, *descendants]:
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
    # SIGKILL takes effect asynchronously: return only once the orphaned descendants are gone too.
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in descendants) and time.monotonic() < deadline:
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


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
    cores = evaluation.usable_cores()
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


# ----------------------------------------------------------------------------------------------
# The prompt (Open-AgentRL recipe/demystify/reward.py: map_fn_gpqa with math_prompt_2, agent_prompt and
# answer_format, verbatim: they are the benchmark), one user turn with the tool in the system block

PROMPT_HEAD = "Analyze and solve the following {domain} problem step by step. \n\n"
PROMPT_TAIL = (
    "\n\nThe tool could be used for more precise and efficient calculation and could help you to verify your "
    "result before you reach the final answer."
    "\n\n**Note: You should first analyze the problem and form a high-level solution strategy, then utilize "
    "the tools to help you solve the problem.**"
    "\nRemember once you make sure the current answer is your final answer, do not call the tools again and "
    "directly output the final answer in the following text format, the answer format must be: "
    "\\boxed{'The final answer goes here.'}."
    "\n Here you need to put the final uppercase letter option of this problem into \\boxed{}"
)


def user_prompt(problem: str, domain: str) -> str:
    return PROMPT_HEAD.format(domain=domain) + problem + PROMPT_TAIL


def prompt_messages(problem: str, domain: str) -> list[dict]:
    return [{"role": "user", "content": user_prompt(problem, domain)}]


def tool_turn_text(result: str) -> str:
    """The tokens appended after a tool call, as Open-AgentRL builds them (the chat template of the tool
    message with a generation prompt, less the default system turn): a user turn holding the
    <tool_response>, then the next assistant header. It follows the model's <|im_end|> directly: unlike
    the chat template, which renders a newline after every <|im_end|>, the rollout has none there."""
    return (data.IM_START + "user\n<tool_response>\n" + result + "\n</tool_response>" + data.IM_END + "\n"
            + data.IM_START + "assistant\n")


# ----------------------------------------------------------------------------------------------
# Rollouts: generate a turn, run its tool call, append the result, generate again


@dataclass
class Limits:
    """Open-AgentRL's multi-turn limits (recipe/demystify eval script; verl rollout settings)."""

    max_turns: int = 16  # assistant turns (and tool turns) at most
    max_response_tokens: int = 20480  # assistant + tool tokens after the prompt
    max_prompt_tokens: int = 4096  # longer prompts are filtered out (filter_overlong_prompts)
    context: int = 4096 + 20480  # vLLM's max_model_len: each turn may generate up to context - tokens so far


@dataclass
class Rollout:
    problem: int  # index of the problem in the data
    index: int  # which of the problem's rollouts
    prompt: list[int]
    messages: list[dict]
    response: list[int] = field(default_factory=list)  # assistant and tool tokens, in order
    mask: list[int] = field(default_factory=list)  # 1 on the model's tokens, 0 on the tool turns
    assistant_turns: int = 0
    tool_calls: int = 0
    tool_timeouts: int = 0
    tool_errors: int = 0
    stop: str = ""  # why it ended: 'answer' (a turn without a valid tool call), 'turns', 'length', 'context'


def _decode(tokenizer, ids: list[int], skip_special: bool) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip_special)


def _tool_message(text: str, call: dict) -> dict:
    """The assistant turn as a chat message with its (first valid) tool call, in the form the chat template
    renders back: the content is the text before the first <tool_call>, less the joining newline."""
    content = text[:text.find("<tool_call>")].removesuffix("\n")
    return {"role": "assistant", "content": content,
            "tool_calls": [{"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]}


_EXCEPTION_LINE = re.compile(r"^\w+(Error|Exception|Exit|Interrupt)\b", re.MULTILINE)


def is_tool_error(result: str) -> bool:
    """A tool result that shows a failure: the tool's own error text, or a Python exception."""
    return result.startswith("Error when executing tool:") or bool(_EXCEPTION_LINE.search(result))


def run_rollouts(turns: evaluation.Conversations, rollouts: list[Rollout], tokenizer, eos: list[int], pool: SandboxPool,
                 limits: Limits, progress=None) -> None:
    """Run a batch of rollouts to their end, as Open-AgentRL's ToolAgentLoop runs one (tool_agent_loop.py):
    after each turn stop on the response budget, then on the turn limit, then when the turn has no valid
    tool call; otherwise run the call and append its result, unless that reaches the response budget."""
    active = list(range(len(rollouts)))  # rollouts[active[i]] is row i of `turns`
    tokens = [r.prompt for r in rollouts]
    while active:
        live = [rollouts[a] for a in active]
        budgets = [max(0, limits.context - len(r.prompt) - len(r.response)) for r in live]
        outputs = turns.extend(tokens, budgets)
        going, calls = [], []
        for i, (r, out) in enumerate(zip(live, outputs, strict=True)):
            if budgets[i] == 0:
                r.stop = "context"
                continue
            r.response += out
            r.mask += [1] * len(out)
            r.assistant_turns += 1
            text = _decode(tokenizer, out, skip_special=False)
            # The message holds the turn without its stop token (<|im_end|>, or a base model's <|endoftext|>):
            # the chat template adds <|im_end|> back.
            body = _decode(tokenizer, out[:-1], skip_special=False) if out and out[-1] in eos else text
            call = parse_tool_call(text)
            if len(r.response) >= limits.max_response_tokens:
                r.stop = "length"
            elif r.assistant_turns >= limits.max_turns:
                r.stop = "turns"
            elif call is None:
                r.stop = "answer"
            if r.stop or call is None:
                r.messages.append({"role": "assistant", "content": body})
                continue
            r.messages.append(_tool_message(body, call))
            going.append(i)
            calls.append(tool_code(call))
        results = iter(pool.map([code for code, err in calls if err is None]))
        tokens = []
        for i, (_code, err) in zip(list(going), calls, strict=True):
            r = live[i]
            result = err if err is not None else next(results)
            r.tool_calls += 1
            r.tool_timeouts += result == NO_STDOUT
            r.tool_errors += is_tool_error(result)
            r.messages.append({"role": "tool", "content": result})
            ids = tokenizer.encode(tool_turn_text(result), add_special_tokens=False).ids
            if len(r.response) + len(ids) >= limits.max_response_tokens:
                r.stop = "length"
                going.remove(i)
                continue
            r.response += ids
            r.mask += [0] * len(ids)
            tokens.append(ids)
        if progress is not None:
            progress.update(len(active) - len(going))
        if going:
            turns.select(going)
        active = [active[i] for i in going]


def score_rollout(r: Rollout, tokenizer, solution: str, limits: Limits) -> dict:
    """Open-AgentRL's reward input: the whole response (assistant and tool tokens, cut at the response
    budget) decoded without special tokens, then the strict boxed-letter rule."""
    text = _decode(tokenizer, r.response[:limits.max_response_tokens], skip_special=True)
    return {"pred": boxed_answer(text), "correct": is_correct(text, solution), "response": text}


# ----------------------------------------------------------------------------------------------
# Data: Open-AgentRL's eval layout (problem with its options, solution letter, domain) as parquet or JSONL,
# or the original GPQA CSV, whose options are shuffled here with a seeded generator

LETTERS = "ABCD"
GPQA_CSV_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


@dataclass
class Problem:
    id: str
    problem: str  # the question with its lettered options
    solution: str  # the correct letter
    domain: str


def _rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return evaluation.read_parquet(path, where="--data ")
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f))
    return evaluation.read_jsonl(path)


def shuffled_options(row: dict, rng: random.Random) -> tuple[str, str]:
    """A GPQA CSV row as (problem, letter): the question, a blank line, then '(A) ...' to '(D) ...' in an
    order drawn from rng (one permutation per row, in file order), and the correct option's letter."""
    options = [row[c].strip() for c in GPQA_CSV_COLUMNS[1:]]
    order = rng.sample(range(4), 4)  # order[j]: which option goes to letter j (option 0 is the correct one)
    lines = [f"({LETTERS[j]}) {options[k]}" for j, k in enumerate(order)]
    return row["Question"].strip() + "\n\n" + "\n".join(lines), LETTERS[order.index(0)]


def load_problems(path: str | os.PathLike, shuffle_seed: int = 0) -> list[Problem]:
    """The problems of --data; a file without the expected columns is one EvalError line."""
    path = Path(path)
    if not path.is_file():
        raise evaluation.EvalError(f"--data {path}: no such file")
    rows = _rows(path)
    if not rows:
        raise evaluation.EvalError(f"--data {path}: no rows")
    problems = []
    if "problem" in rows[0]:
        for i, row in enumerate(rows):
            missing = [c for c in ("problem", "solution", "domain") if not isinstance(row.get(c), str)]
            if missing:
                raise evaluation.EvalError(f"--data {path}: row {i + 1} has no text in {', '.join(missing)} "
                                           f"(expected problem, solution (a letter), domain)")
            problems.append(Problem(str(row.get("id", i)), row["problem"], row["solution"], row["domain"]))
    elif all(c in rows[0] for c in GPQA_CSV_COLUMNS):
        rng = random.Random(shuffle_seed)
        for i, row in enumerate(rows):
            problem, letter = shuffled_options(row, rng)
            domain = (row.get("High-level domain") or "").strip() or "science"
            problems.append(Problem(str(row.get("Record ID") or i), problem, letter, domain))
    else:
        raise evaluation.EvalError(f"--data {path}: expected the columns problem, solution, domain (Open-AgentRL's "
                                   f"layout) or GPQA's {', '.join(GPQA_CSV_COLUMNS)}; found {', '.join(rows[0])}")
    return problems


# ----------------------------------------------------------------------------------------------
# Metrics: pass@1 (the mean over all rollouts, what the paper reports), maj@N, pass@N; tool use


def majority(preds: list[str | None]) -> str | None:
    """The most frequent prediction (no answer never wins); a tie goes to the one seen first."""
    counts: dict[str, int] = {}
    for p in preds:
        if p is not None:
            counts[p] = counts.get(p, 0) + 1
    return max(counts, key=counts.get) if counts else None


def metrics(records: list[dict], solutions: dict[str, str]) -> dict:
    """Accuracy figures and tool-use statistics of a set of rollout records (one problem's rollouts are
    the records with its id)."""
    by_problem: dict[str, list[dict]] = {}
    for r in records:
        by_problem.setdefault(r["id"], []).append(r)
    n = len(records)
    return {
        "problems": len(by_problem),
        "rollouts": n,
        "pass@1": sum(r["correct"] for r in records) / n,
        "maj@n": sum(majority([r["pred"] for r in rs]) == solutions[p] for p, rs in by_problem.items())
        / len(by_problem),
        "pass@n": sum(any(r["correct"] for r in rs) for rs in by_problem.values()) / len(by_problem),
        "answered": sum(r["pred"] is not None for r in records) / n,
        "tool_calls": sum(r["stats"]["tool_calls"] for r in records) / n,
        "tool_timeouts": sum(r["stats"]["tool_timeouts"] for r in records) / n,
        "tool_errors": sum(r["stats"]["tool_errors"] for r in records) / n,
        "turns": sum(r["stats"]["assistant_turns"] for r in records) / n,
        "response_tokens": sum(r["stats"]["response_tokens"] for r in records) / n,
    }


def results_table(overall: dict, domains: dict[str, dict], n: int) -> str:
    header = ["domain", "problems", "pass@1", f"maj@{n}", f"pass@{n}", "answered", "tool calls", "timeouts",
              "tool errors", "turns", "tokens"]

    def row(name, m):
        return [name, m["problems"], evaluation.percent(m["pass@1"]), evaluation.percent(m["maj@n"]),
                evaluation.percent(m["pass@n"]), evaluation.percent(m["answered"]), f"{m['tool_calls']:.2f}",
                f"{m['tool_timeouts']:.2f}", f"{m['tool_errors']:.2f}", f"{m['turns']:.2f}",
                f"{m['response_tokens']:.0f}"]

    return evaluation.markdown_table(header, [row(d, m) for d, m in sorted(domains.items())]
                                     + [row("all", overall)])


# ----------------------------------------------------------------------------------------------
# The run: rollouts appended to rollouts.jsonl as they finish (a rerun skips them), then the tables


def read_rollouts(path: Path) -> tuple[list[dict], bool]:
    """Finished rollouts of an earlier run, and whether the file ends with a newline (False: a kill cut the
    last line, and appending needs it rewritten); a last line cut short is dropped (it is redone)."""
    if not path.is_file():
        return [], True
    with open(path, encoding="utf-8", newline="") as f:  # newline="": the file's own line ends, untranslated
        text = f.read()
    # "\n" alone ends a record: json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085 unescaped
    # inside a transcript, and str.splitlines would split there too.
    lines = text.split("\n")
    if lines[-1] == "":  # what follows the final "\n"
        lines.pop()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) and not text.endswith(("\n", "\r")):  # "\r": an editor's line end, not a cut
                break
            raise evaluation.EvalError(f"{path}:{n}: not valid JSON; move the file away to start again") from None
    return records, text.endswith("\n")


def rollout_record(r: Rollout, p: Problem, scored: dict) -> dict:
    """One line of rollouts.jsonl: the transcript in the chat format data.py reads (messages + tools), so
    correct rollouts can be training data, with the score and the tool-use counts."""
    return {"id": p.id, "rollout": r.index, "domain": p.domain, "solution": p.solution, "pred": scored["pred"],
            "correct": scored["correct"], "messages": r.messages, "tools": [CODE_TOOL],
            "stats": {"assistant_turns": r.assistant_turns, "tool_calls": r.tool_calls,
                      "tool_timeouts": r.tool_timeouts, "tool_errors": r.tool_errors,
                      "response_tokens": len(r.response), "stop": r.stop}}


def settings_record(args, limits: Limits, data_path: Path, engine) -> dict:
    return {"data": str(data_path), "data_bytes": data_path.stat().st_size, "shuffle_seed": args.shuffle_seed,
            "engine": engine.describe(), "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
            "limits": vars(limits), "tool_timeout": args.tool_timeout, "tool_memory_mb": args.tool_memory_mb}


def evaluate(args: argparse.Namespace) -> dict:
    evaluation.check_common_args(args)
    problems = load_problems(args.data, args.shuffle_seed)[:args.max_problems]
    setup = evaluation.load_setup(args.model, max_new_tokens=args.max_response_tokens, weights=not args.server)
    limits = Limits(args.max_turns, args.max_response_tokens, args.max_prompt_tokens,
                    args.max_prompt_tokens + args.max_response_tokens)
    limit, what = evaluation.context_limit(setup.config)
    if limits.context > limit:
        evaluation.handle_overflow(f"a rollout may reach {limits.context} tokens (--max-prompt-tokens "
                                   f"{args.max_prompt_tokens} + --max-response-tokens {args.max_response_tokens}), "
                                   f"more than the model's {what} {limit}", args.overflow,
                                   "lower --max-response-tokens")
    prompts = setup.encode([data.render_chat(prompt_messages(p.problem, p.domain), [CODE_TOOL], True, setup.system)
                            for p in problems], add_special_tokens=False)
    long = {i for i, ids in enumerate(prompts) if len(ids) > limits.max_prompt_tokens}
    if long:  # verl's filter_overlong_prompts: these problems are not evaluated
        print(f"warning: {len(long)} of {len(problems)} prompts exceed --max-prompt-tokens "
              f"{limits.max_prompt_tokens} and are left out, as Open-AgentRL filters them")
        problems = [p for i, p in enumerate(problems) if i not in long]
        prompts = [ids for i, ids in enumerate(prompts) if i not in long]

    out = Path(args.out)
    engine = evaluation.make_engine(args, setup)
    settings = settings_record(args, limits, Path(args.data), engine)
    run_path, rollouts_path = out / "run.json", out / "rollouts.jsonl"
    if run_path.is_file():
        saved = json.loads(run_path.read_text(encoding="utf-8"))
        if saved != settings:
            changed = [k for k in settings if saved.get(k) != settings[k]]
            raise evaluation.EvalError(f"--out {out}: holds rollouts made with other settings ({', '.join(changed)}); "
                                       f"use another --out or the same flags")
    out.mkdir(parents=True, exist_ok=True)
    evaluation.write_json(run_path, settings)
    finished, whole = read_rollouts(rollouts_path)
    if not whole:
        evaluation.write_jsonl(rollouts_path, finished)
    done = {(r["id"], r["rollout"]) for r in finished}
    todo = [(i, k) for i, p in enumerate(problems) for k in range(args.rollouts) if (p.id, k) not in done]
    pool = SandboxPool(args.tool_workers, args.tool_timeout, args.tool_memory_mb)
    print(f"{len(problems)} problems x {args.rollouts} rollouts: {len(todo)} to run ({len(done)} done before); "
          f"sandbox: {sandbox_mode()}, {pool.workers or default_workers(args.tool_memory_mb)} workers")

    with tqdm(total=len(todo), desc="rollouts", unit="rollout", leave=False) as bar:
        for start in range(0, len(todo), args.batch_size):
            group = todo[start:start + args.batch_size]
            rollouts = [Rollout(i, k, prompts[i], prompt_messages(problems[i].problem, problems[i].domain))
                        for i, k in group]
            sampling = evaluation.Sampling(args.temperature, args.top_p, seed=args.seed * 1_000_003 + start)
            turns = engine.conversations(sampling)
            try:
                run_rollouts(turns, rollouts, setup.tokenizer, setup.eos, pool, limits, progress=bar)
            except torch.cuda.OutOfMemoryError:
                raise evaluation.EvalError(f"out of GPU memory with --batch-size {args.batch_size} rollouts of up to "
                                           f"{limits.context} tokens each; lower --batch-size (finished rollouts "
                                           f"are saved)") from None
            lines = [rollout_record(r, problems[r.problem], score_rollout(r, setup.tokenizer,
                     problems[r.problem].solution, limits)) for r in rollouts]
            with open(rollouts_path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)

    ids = {p.id for p in problems}
    records = [r for r in read_rollouts(rollouts_path)[0] if r["id"] in ids and r["rollout"] < args.rollouts]
    solutions = {p.id: p.solution for p in problems}
    overall = metrics(records, solutions)
    domains = {d: metrics([r for r in records if r["domain"] == d], solutions) for d in {r["domain"] for r in records}}
    table = results_table(overall, domains, args.rollouts)
    results = {"settings": settings, "sandbox": sandbox_mode(), "overall": overall, "domains": domains}
    header = (f"GPQA agentic (Open-AgentRL protocol) of {args.model}: {args.rollouts} rollouts per problem, "
              f"temperature {args.temperature}, top-p {args.top_p}; pass@1 is the mean over all rollouts")
    evaluation.save_results(out, header, table, results, echo=False)
    print(f"\n{header}\n\n{table}\n\nsaved {out / 'results.md'}, {out / 'results.json'} and {rollouts_path}")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluation.add_common_args(p, out_help="results folder: rollouts.jsonl (every transcript, appended as "
                               "rollouts finish; a rerun skips them), run.json, results.md, results.json",
                               batch_size=32)
    p.add_argument("--data", metavar="FILE", help="problems: Open-AgentRL's eval file (parquet or JSONL with "
                   "problem, solution, domain) or GPQA's CSV (gpqa_diamond.csv; options shuffled by --shuffle-seed)")
    p.add_argument("--rollouts", type=int, default=32, metavar="N",
                   help="rollouts per problem (default: 32, Open-AgentRL's)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default: 1.0)")
    p.add_argument("--top-p", type=float, default=0.6, help="nucleus sampling mass (default: 0.6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (default: 0)")
    p.add_argument("--shuffle-seed", type=int, default=0,
                   help="seed of the option order when --data is GPQA's CSV (default: 0)")
    p.add_argument("--max-problems", type=int, metavar="N", help="only the first N problems (default: all)")
    p.add_argument("--max-turns", type=int, default=16, metavar="N", help="assistant turns at most (default: 16)")
    p.add_argument("--max-response-tokens", type=int, default=20480, metavar="N",
                   help="assistant and tool tokens after the prompt at most (default: 20480)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096, metavar="N",
                   help="longer prompts are left out; with --max-response-tokens it sets each turn's "
                        "budget (default: 4096)")
    p.add_argument("--tool-timeout", type=float, default=TOOL_TIMEOUT, metavar="S",
                   help=f"wall-clock seconds per tool call (default: {TOOL_TIMEOUT:g})")
    p.add_argument("--tool-memory-mb", type=int, default=TOOL_MEMORY_MB, metavar="MB",
                   help=f"address-space limit per tool call (default: {TOOL_MEMORY_MB})")
    p.add_argument("--tool-workers", type=int, default=0, metavar="N",
                   help="tool calls run at once (default: one per core, as many as memory allows)")
    return p


def validate(args: argparse.Namespace) -> None:
    if not args.data:
        raise evaluation.EvalError("--data is required (Open-AgentRL's gpqa_diamond.parquet, or GPQA's CSV)")
    evaluation.check_positive(args, "rollouts", "max_problems", "max_turns", "max_response_tokens",
                              "max_prompt_tokens", "tool_memory_mb")
    if args.temperature < 0:
        raise evaluation.EvalError(f"--temperature must be at least 0 (got {args.temperature})")
    if not 0 < args.top_p <= 1:
        raise evaluation.EvalError(f"--top-p must be in (0, 1] (got {args.top_p})")
    if args.tool_timeout <= 0 or args.tool_workers < 0:
        raise evaluation.EvalError("--tool-timeout must be positive and --tool-workers at least 0")


def run(args: argparse.Namespace) -> None:
    validate(args)
    evaluate(args)


def main(argv: list[str] | None = None) -> int:
    return evaluation.main(PROG, build_parser(), run, argv,
                           resume_note="finished rollouts are in rollouts.jsonl, the same command resumes")


if __name__ == "__main__":
    sys.exit(main())
