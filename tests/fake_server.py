"""A minimal OpenAI-compatible completions server on 127.0.0.1 for tests: GET /v1/models and
POST /v1/completions, answered by a Python function, in a background thread."""

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import qwen2


class _Handler(BaseHTTPRequestHandler):
    def _send(self, status: int, obj) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": name} for name in self.server.models]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.path != "/v1/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        status, answer = self.server.answer(body)
        self._send(status, answer)

    def log_message(self, *args):  # quiet
        pass


@contextlib.contextmanager
def serve(answer: Callable[[dict], tuple[int, dict]], models: tuple[str, ...] = ("served-model",)) -> Iterator:
    """Yield the server (its `.url` and the `.requests` it got); `answer(body) -> (status, json)`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.answer, server.models, server.requests = answer, list(models), []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def choice(ids: list[int], text: str, finish_reason: str, token_ids: bool) -> tuple[int, dict]:
    """A completions answer with one choice; vLLM's `token_ids` only when `token_ids`."""
    c = {"index": 0, "text": text, "finish_reason": finish_reason, **({"token_ids": ids} if token_ids else {})}
    return 200, {"id": "cmpl-test", "object": "text_completion", "choices": [c]}


def model_answer(model, tokenizer, token_ids: bool = True) -> Callable[[dict], tuple[int, dict]]:
    """Answers from a qwen2.py model, greedy, as vLLM does: stop at `stop_token_ids`, the text without the
    stop token and special tokens."""
    lock = threading.Lock()

    def answer(body: dict) -> tuple[int, dict]:
        eos = body.get("stop_token_ids") or []
        with lock:
            ids = qwen2.generate(model, [body["prompt"]], body["max_tokens"], eos)[0]
        stopped = bool(ids) and ids[-1] in eos
        text = tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
        return choice(ids, text, "stop" if stopped else "length", token_ids)

    return answer
