"""A small OpenAI-compatible HTTP server for tests and benchmarks (stdlib only, 127.0.0.1).

It speaks enough of the API for the real ``openai`` client: ``POST /v1/chat/completions``,
``POST /v1/files`` (multipart upload), ``GET /v1/files/{id}[/content]``, ``POST /v1/batches``,
``GET /v1/batches/{id}`` (plus ``GET /stub/counts``: its counters as JSON, for benchmarks).
Behaviour is scripted per sample: ``plan[marker]`` is a queue of behaviours used, one per request,
for requests whose user message contains ``marker``:

``"ok"`` (default: spans found by simple rules), ``{"spans": [...]}`` (exact answer),
``"429:S"`` (rate limited, ``Retry-After: S``), ``"429ms:MS"`` (``retry-after-ms``), ``"500"``,
``"timeout:S"`` (answer after S seconds), ``"malformed"`` (content is not JSON), ``"refusal"``,
``"length"`` (truncated), ``"garbage"`` (HTTP 200 with an HTML body), ``"401"`` (echoes the
Authorization header back, as a careless proxy would: the client must not repeat it),
``"notfound"`` (spans that are not in the answer), and transient faults: ``"empty_choices"`` (HTTP
200 with ``choices: []``), ``"error200"`` (HTTP 200 whose body is a 503 error object, as some
proxies send), ``"reset"`` (the connection is closed without an answer).

Bounded: at most ``max_requests`` requests are served (then 503), and the server shuts itself down
after ``lifetime`` seconds.  Usage is counted with tiktoken from what was actually received.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import socket
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from preprocess.extractors.llm.cost import load_encoding

_ANSWER = re.compile(r"<answer>\n(.*)\n</answer>", re.S)
_MATH = re.compile(r"<<[^>]*>>|#### *\S+")
_CODE = re.compile(r"^\s*((?:if|elif|while|for|return)\b[^\n]*?):?\s*$", re.M)


def auto_spans(user: str) -> list[dict[str, Any]]:
    """Rule-made 'model answer': calculator annotations/final answer, or code conditions."""
    m = _ANSWER.search(user)
    answer = m.group(1) if m else ""
    out: list[dict[str, Any]] = []
    seen: Counter = Counter()
    for rx, kind, grp in ((_MATH, "operation", 0), (_CODE, "condition", 1)):
        for hit in rx.finditer(answer):
            text = hit.group(grp)
            seen[text] += 1
            out.append({"text": text, "kind": kind, "occurrence": seen[text]})
    return out


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # the default backlog of 5 refuses connections at concurrency 64
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no error
            super().handle_error(request, client_address)


class StubOpenAI:
    """Start with ``with StubOpenAI() as s:``; ``s.base_url`` for the client; counters after."""

    def __init__(self, *, latency: float = 0.0, max_requests: int = 20_000, lifetime: float = 300.0,
                 batch_steps: int = 2, count_tokens: bool = True):
        self.latency = latency
        self.max_requests = max_requests
        self.lifetime = lifetime
        self.batch_steps = batch_steps  # retrieves before a batch completes
        self.plan: dict[str, deque] = {}
        self.counts: Counter = Counter()
        self.prompt_tokens: dict[str, int] = {}  # marker-free: user message → prompt tokens counted
        self.auth_headers: list[str] = []
        self.files: dict[str, tuple[str, bytes]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.expire_markers: set[str] = set()  # requests left unanswered by an 'expired' batch
        self.fail_batches = False  # new batches fail validation (e.g. enqueued-token limit)
        self.lock = threading.RLock()  # batch runs call chat() under the lock
        self.inflight = 0
        self.last_body: dict[str, Any] = {}  # the last chat request body as received
        self.arrivals: list[tuple[float, str]] = []  # (monotonic time, user message) per chat request
        self.max_inflight = 0
        self.enc = load_encoding("o200k_base") if count_tokens else None
        self._httpd = _Server(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    # -- lifecycle --
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> StubOpenAI:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> StubOpenAI:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def script(self, marker: str, behaviours: Iterable[Any]) -> None:
        with self.lock:
            self.plan.setdefault(marker, deque()).extend(behaviours)

    # -- chat behaviour --
    def _behaviour(self, user: str) -> Any:
        with self.lock:
            for marker, q in self.plan.items():
                if marker in user and q:
                    return q.popleft()
        return "ok"

    def count_prompt_tokens(self, body: dict[str, Any]) -> int:
        """Independent count of what arrived: 3/message + role + content, +3, + schema JSON."""
        if self.enc is None:
            return 0
        n = 3
        for m in body.get("messages", []):
            n += 3 + len(self.enc.encode(m.get("role", ""))) + len(self.enc.encode(m.get("content", "")))
        rf = body.get("response_format") or {}
        if "json_schema" in rf:
            n += len(self.enc.encode(json.dumps(rf["json_schema"], separators=(",", ":"))))
        return n

    def chat(self, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        """(status, headers, JSON body or sleep marker) for one chat request."""
        user = next((m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"), "")
        self.last_body = body
        with self.lock:
            self.arrivals.append((time.monotonic(), user))
        b = self._behaviour(user)
        if isinstance(b, str) and b.startswith("timeout:"):
            time.sleep(float(b.split(":", 1)[1]))
            b = "ok"
        if b == "garbage":  # a 200 whose body is not JSON, as from a misbehaving proxy
            return 200, {"content-type": "text/html"}, "<html>upstream error</html>"
        if b == "reset":
            return 0, {}, None
        if b == "error200":
            return 200, {}, {"error": {"message": "upstream unavailable", "type": "server_error",
                                       "code": 503}}
        if b == "empty_choices":
            return 200, {}, {"id": "chatcmpl-empty", "object": "chat.completion", "created": int(time.time()),
                             "model": body.get("model", "stub"), "choices": [],
                             "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
        if b == "500":
            return 500, {}, {"error": {"message": "internal error", "type": "server_error"}}
        if isinstance(b, str) and b.startswith("429"):
            kind, val = b.split(":", 1)
            hdr = {"retry-after-ms": val} if kind == "429ms" else {"retry-after": val}
            return 429, hdr, {"error": {"message": "Rate limit reached", "type": "rate_limit"}}
        if b == "401":
            return 401, {}, {"error": {"message": f"Incorrect API key provided: {self.auth_headers[-1]}",
                                       "type": "invalid_request_error", "code": "invalid_api_key"}}
        content: str | None
        refusal = None
        finish = "stop"
        if b == "malformed":
            content = '{"spans": [ {"text": "unterminated'
        elif b == "refusal":
            content, refusal = None, "I can't help with that."
        elif b == "length":
            content, finish = '{"spans": [{"text": "x", "kind"', "length"
        elif b == "notfound":
            content = json.dumps({"spans": [{"text": "NOT IN THE ANSWER AT ALL", "kind": "result",
                                             "occurrence": 1}]})
        elif isinstance(b, dict):
            content = json.dumps(b)
        else:
            content = json.dumps({"spans": auto_spans(user)})
        ptok = self.count_prompt_tokens(body)
        ctok = len(self.enc.encode(content)) if (self.enc is not None and content) else 0
        with self.lock:
            self.counts["prompt_tokens"] += ptok
            self.counts["completion_tokens"] += ctok
            self.prompt_tokens[user] = ptok
        return 200, {}, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "stub"),
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content, "refusal": refusal}}],
            "usage": {"prompt_tokens": ptok, "completion_tokens": ctok, "total_tokens": ptok + ctok},
        }

    # -- batch behaviour --
    def file_object(self, fid: str) -> dict[str, Any]:
        purpose, data = self.files[fid]
        return {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": f"{fid}.jsonl", "purpose": purpose, "status": "processed"}

    def create_batch(self, body: dict[str, Any]) -> tuple[int, Any]:
        fid = body.get("input_file_id")
        if fid not in self.files:
            return 400, {"error": {"message": f"input file {fid} not found"}}
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return 400, {"error": {"message": "unsupported endpoint or completion window"}}
        lines = [json.loads(x) for x in self.files[fid][1].decode("utf-8").splitlines() if x.strip()]
        ids = [x["custom_id"] for x in lines]
        if len(lines) > 50_000 or len(self.files[fid][1]) > 200 * 1024 * 1024 or len(set(ids)) != len(ids):
            return 400, {"error": {"message": "batch file over limits or duplicate custom_id"}}
        if any(x.get("method") != "POST" or x.get("url") != "/v1/chat/completions" for x in lines):
            return 400, {"error": {"message": "bad request line"}}
        bid = f"batch_{uuid.uuid4().hex[:12]}"
        self.batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"],
                             "input_file_id": fid, "completion_window": "24h", "status": "validating",
                             "created_at": int(time.time()),
                             "output_file_id": None, "error_file_id": None, "_polls": 0,
                             "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
        self.counts["batches_created"] += 1
        if self.fail_batches:
            self.batches[bid].update(status="failed", errors={"object": "list", "data": [
                {"code": "token_limit_exceeded", "message": "Enqueued token limit reached", "line": None}]})
        return 200, self._public(self.batches[bid])

    def retrieve_batch(self, bid: str) -> tuple[int, Any]:
        b = self.batches.get(bid)
        if b is None:
            return 404, {"error": {"message": f"no batch {bid}"}}
        b["_polls"] += 1
        if b["status"] in ("validating", "in_progress") and b["_polls"] >= self.batch_steps:
            self._run_batch(b)
        elif b["status"] == "validating":
            b["status"] = "in_progress"
        return 200, self._public(b)

    def _run_batch(self, b: dict[str, Any]) -> None:
        out, err = [], []
        expired = False
        for raw in self.files[b["input_file_id"]][1].decode("utf-8").splitlines():
            req = json.loads(raw)
            user = next(m["content"] for m in req["body"]["messages"] if m["role"] == "user")
            rid = f"batch_req_{uuid.uuid4().hex[:8]}"
            if any(m in user for m in self.expire_markers):
                expired = True
                err.append({"id": rid, "custom_id": req["custom_id"], "response": None,
                            "error": {"code": "batch_expired", "message": "not completed in time"}})
                continue
            status, _, body = self.chat(req["body"])
            line = {"id": rid, "custom_id": req["custom_id"], "error": None,
                    "response": {"status_code": status, "request_id": rid, "body": body}}
            (out if status == 200 else err).append(line)
        for kind, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                fid = f"file-{uuid.uuid4().hex[:12]}"
                self.files[fid] = ("batch_output", "".join(json.dumps(r) + "\n" for r in rows).encode())
                b[kind] = fid
        b["status"] = "expired" if expired else "completed"
        b["request_counts"].update(completed=len(out), failed=len(err))

    @staticmethod
    def _public(b: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in b.items() if not k.startswith("_")}


def _make_handler(stub: StubOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # Headers and body go out as two writes; without TCP_NODELAY, Nagle + the client's
            # delayed ACK add ~40 ms to every request and the benchmark would measure that.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None,
                  raw: bytes | None = None) -> None:
            if isinstance(payload, str):
                raw, headers = payload.encode(), {"Content-Type": "text/html", **(headers or {})}
            data = raw if raw is not None else json.dumps(payload).encode()
            headers = dict(headers or {})
            ctype = headers.pop("Content-Type", None) or headers.pop("content-type", None)
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype or ("application/octet-stream" if raw is not None
                                                           else "application/json"))
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # client gave up (timeout test)
                pass

        def _admit(self) -> bool:
            with stub.lock:
                stub.counts["requests"] += 1
                stub.counts[f"{self.command} {self.path.split('?')[0]}"] += 1
                stub.auth_headers.append(self.headers.get("Authorization", ""))
                over = stub.counts["requests"] > stub.max_requests
            if over:
                self._send(503, {"error": {"message": "stub request budget exhausted"}})
            return not over

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            raw = self._body()
            if not self._admit():
                return
            path = self.path.split("?")[0]
            if path == "/v1/chat/completions":
                if not raw:  # a client cancelled while sending (the failure-budget tests do)
                    self._send(400, {"error": {"message": "empty request body"}})
                    return
                with stub.lock:
                    stub.counts["chat"] += 1
                    stub.inflight += 1
                    stub.max_inflight = max(stub.max_inflight, stub.inflight)
                try:
                    if stub.latency:
                        time.sleep(stub.latency)
                    status, hdr, payload = stub.chat(json.loads(raw))
                finally:
                    with stub.lock:
                        stub.inflight -= 1
                if status == 0:  # "reset": hang up without a response
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._send(status, payload, hdr)
            elif path == "/v1/files":
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
                parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
                purpose = parts["purpose"].get_content().strip() if "purpose" in parts else ""
                data = parts["file"].get_payload(decode=True)
                fid = f"file-{uuid.uuid4().hex[:12]}"
                with stub.lock:
                    stub.files[fid] = (purpose, data)
                    stub.counts["files_uploaded"] += 1
                self._send(200, stub.file_object(fid))
            elif path == "/v1/batches":
                with stub.lock:
                    status, payload = stub.create_batch(json.loads(raw))
                self._send(status, payload)
            else:
                self._send(404, {"error": {"message": f"no route {path}"}})

        def do_GET(self) -> None:  # noqa: N802
            if not self._admit():
                return
            path = self.path.split("?")[0]
            if path == "/stub/counts":  # for benchmarks that run the stub in another process
                with stub.lock:
                    self._send(200, {**stub.counts, "max_inflight": stub.max_inflight})
                return
            m = re.fullmatch(r"/v1/files/([^/]+)(/content)?", path)
            if m and m.group(1) in stub.files:
                if m.group(2):
                    self._send(200, None, raw=stub.files[m.group(1)][1])
                else:
                    self._send(200, stub.file_object(m.group(1)))
                return
            m = re.fullmatch(r"/v1/batches/([^/]+)", path)
            if m:
                with stub.lock:
                    status, payload = stub.retrieve_batch(m.group(1))
                self._send(status, payload)
                return
            self._send(404, {"error": {"message": f"no route {path}"}})

    return Handler
