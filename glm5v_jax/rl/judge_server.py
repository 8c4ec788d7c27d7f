"""A trained VLM run as an OpenAI-compatible judge: `python -m glm5v_jax.rl.judge_server --workdir=RUN
[--port=0] [--host=127.0.0.1] [--max_slots=8] [--max_seq_len=1024] [--step=N] [--model_name=judge]`.

    POST /v1/chat/completions   {"messages": [...], "max_tokens", "temperature", "top_p", "n", "seed"}
    GET  /v1/models, GET /health

Messages are OpenAI chat messages (roles system, user, assistant, and tool, which becomes the chat
template's observation); a content is a string or a list of parts `{"type": "text", "text": ...}` and
`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` (data URLs only: the server
fetches nothing). The reply is OpenAI's: `choices[i].message.content` (the decoded answer, stop tokens
dropped), `finish_reason` ("stop" | "length"), `usage`. A bad request gets HTTP 400 with an OpenAI-style
error whose `param` names the field; the server keeps serving.

Handler threads (`http.server.ThreadingHTTPServer`) submit to one generation `Engine` (thread-safe under its
lock) with an `on_done` that sets an event; one engine thread loops `engine.step()` while anything is queued
or running, so concurrent requests share continuous batches. It prints "serving on http://host:port" once
bound (the port is the bound one with --port=0). `start_server(workdir)` runs it in a thread (for tests).
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any, Callable

from absl import flags

from glm5v_jax.rl.http_json import JSONHandler

log = logging.getLogger(__name__)
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "observation"}
MAX_BODY_BYTES = 64 << 20
FINISH = {"stop": "stop", "length": "length", "capacity": "length", "abort": "abort"}


class BadRequest(ValueError):
    """A request that cannot run: `param` names the field (OpenAI's error `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _number(body: dict, name: str, default, kind: type, low: float, high: float | None = None):
    value = body.get(name, default)
    if value is None:
        value = default
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (kind is int and value != int(value))):
        raise BadRequest(name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r:.40}")
    if value < low or (high is not None and value > high):
        raise BadRequest(name, f"must be in [{low}, {high if high is not None else 'inf'}], got {value}")
    return kind(value)


def _image(url: Any, where: str) -> bytes:
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise BadRequest(where, "must be a data URL (data:image/png;base64,...); the server fetches nothing")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(where, "is not valid base64") from None


def engine_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages -> the engine's (`generate.chat`): image_url parts become PNG/JPEG bytes."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "must be a non-empty list of {'role', 'content'}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(where, f"must be an object, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise BadRequest(f"{where}.role", f"must be one of {sorted(ROLES)}, got {m.get('role')!r:.40}")
        content = m.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": ROLES[m["role"]], "content": content or ""})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"{where}.content", "must be a string or a list of parts")
        parts = []
        for j, p in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                parts.append({"type": "text", "text": p["text"]})
            elif kind == "image_url":
                image_url = p.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                parts.append({"type": "image", "image": _image(url, f"{pw}.image_url.url")})
            else:
                raise BadRequest(pw, "must be {'type': 'text', 'text': str} or {'type': 'image_url', "
                                     "'image_url': {'url': 'data:...'}}")
        out.append({"role": ROLES[m["role"]], "content": parts})
    return out


class JudgeService:
    """The engine, its stepping thread, and the translation between OpenAI bodies and engine requests."""

    def __init__(self, model, tokenizer, *, max_slots: int = 8, max_seq_len: int = 1024, name: str = "judge",
                 request_timeout_s: float = 600.0):
        from glm5v_jax.generate.chat import chat_stops
        from glm5v_jax.generate.engine import Engine

        self.engine = Engine(model, max_slots=max_slots, max_seq_len=max_seq_len, tokenizer=tokenizer)
        self.tokenizer, self.name, self.max_slots = tokenizer, name, max_slots
        self.stops = chat_stops(tokenizer)
        self.request_timeout_s = request_timeout_s
        self._work, self._stop = threading.Event(), threading.Event()
        self._pending: dict[int, dict] = {}  # request id -> its waiter, while the engine holds it
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="judge-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._work.clear()
            if self.engine.idle:
                self._work.wait(0.5)
                continue
            try:
                self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail what is running, keep serving
                log.exception("engine step failed")
                with self._lock:
                    pending, self._pending = self._pending, {}
                try:
                    self.engine.abort(list(pending))
                except Exception:  # noqa: BLE001 - an id the failed step already finished
                    log.exception("abort after a failed step")
                for waiter in pending.values():
                    waiter["error"] = f"{type(e).__name__}: {e}"
                    waiter["event"].set()

    def close(self) -> None:
        self._stop.set()
        self._work.set()
        self._thread.join(timeout=30)

    def chat(self, body: Any) -> dict[str, Any]:
        """An OpenAI chat-completion body -> the OpenAI response; BadRequest names a field."""
        from glm5v_jax.generate.requests import Request, Sampling

        if not isinstance(body, dict):
            raise BadRequest("body", "must be a JSON object")
        if body.get("stream"):
            raise BadRequest("stream", "streaming is not supported")
        if body.get("stop"):
            raise BadRequest("stop", "stop strings are not supported (the chat template's stop tokens apply)")
        messages = engine_messages(body.get("messages"))
        max_tokens = _number(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                             128, int, 1)
        sampling = Sampling(temperature=_number(body, "temperature", 1.0, float, 0.0),
                            top_p=_number(body, "top_p", 1.0, float, 1e-6, 1.0),
                            seed=None if body.get("seed") is None else _number(body, "seed", 0, int, 0))
        n = _number(body, "n", 1, int, 1, self.max_slots)
        waiter = {"event": threading.Event()}

        def done(completion) -> None:
            waiter["completion"] = completion
            waiter["event"].set()

        request = Request(messages=messages, n=n, sampling=sampling, max_new_tokens=max_tokens, stop=self.stops,
                          on_done=done)
        with self._lock:
            try:
                rid = self.engine.submit(request)
            except ValueError as e:  # the engine's check: an unusable image, a prompt too long, ...
                raise BadRequest("messages", re.sub(r"^request \d+: ", "", str(e))) from None
            self._pending[rid] = waiter
        self._work.set()
        answered = waiter["event"].wait(self.request_timeout_s)
        with self._lock:
            self._pending.pop(rid, None)
        if not answered:
            self.engine.abort([rid])
            raise TimeoutError(f"no answer in {self.request_timeout_s:g} s")
        if "error" in waiter:
            raise RuntimeError(waiter["error"])
        return self._response(waiter["completion"], body.get("model") or self.name)

    def _response(self, completion, model: str) -> dict[str, Any]:
        stops = set(self.stops)
        choices = [{"index": i, "message": {"role": "assistant",
                                           "content": self.tokenizer.decode([t for t in s.tokens if t not in stops])},
                    "finish_reason": FINISH.get(s.finish, s.finish), "logprobs": None}
                   for i, s in enumerate(completion.samples)]
        new = sum(len(s.tokens) for s in completion.samples)
        return {"id": f"chatcmpl-{completion.id}", "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": choices,
                "usage": {"prompt_tokens": completion.prompt_length, "completion_tokens": new,
                          "total_tokens": completion.prompt_length + new}}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "glm5v_jax"}]}

    def health(self) -> dict[str, Any]:
        m = self.engine.metrics()
        return {"status": "ok", "model": self.name, "queued": m["queued"], "running_slots": m["running_slots"],
                "requests": m.get("requests", 0)}


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> tuple:
    return status, {"error": {"message": message, "type": kind, "param": param, "code": None}}


class _Handler(JSONHandler):
    server: "JudgeHTTPServer"

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self) -> None:
        service = self.server.service
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            return self.send_json(200, service.health())
        if path in ("/v1/models", "/models"):
            return self.send_json(200, service.models())
        self.send_json(*_error(404, f"no route GET {self.path}", kind="not_found"))

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            return self.send_json(*_error(411, "Content-Length is required"))
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return self.send_json(*_error(413, f"the body is over {MAX_BODY_BYTES >> 20} MiB", "body"))
        raw = self.rfile.read(length)
        if self.path.split("?")[0].rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self.send_json(*_error(404, f"no route POST {self.path}", kind="not_found"))
        try:
            body = json.loads(raw)
        except ValueError as e:
            return self.send_json(*_error(400, f"the body is not JSON: {e}", "body"))
        try:
            return self.send_json(200, self.server.service.chat(body))
        except BadRequest as e:
            return self.send_json(*_error(400, str(e), e.param))
        except TimeoutError as e:
            return self.send_json(*_error(504, str(e), kind="timeout"))
        except Exception as e:  # noqa: BLE001 - a failed generation is a 500 reply, never a dead server
            log.exception("chat completion failed")
            return self.send_json(*_error(500, f"{type(e).__name__}: {e}", kind="server_error"))


class JudgeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, service: JudgeService, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _Handler)
        self.service = service

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def start_server(workdir: str | None = None, *, model=None, tokenizer=None, step: int | None = None,
                 host: str = "127.0.0.1", port: int = 0, **service_kwargs) -> tuple[str, Callable[[], None]]:
    """Serve a run (`workdir`, or a loaded `model` and `tokenizer`) from a thread: (its URL, stop())."""
    if model is None:
        from glm5v_jax.generate.run_loader import load_run
        model, tokenizer, _ = load_run(workdir, step)
    service = JudgeService(model, tokenizer, **service_kwargs)
    server = JudgeHTTPServer(service, host, port)
    thread = threading.Thread(target=server.serve_forever, name="judge-http", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        service.close()
        thread.join(timeout=30)

    return server.url, stop


def _define_flags() -> None:
    """The command line's flags (defined only when run as a program: `generate` defines a `workdir` too)."""
    flags.DEFINE_string("workdir", None, "Run directory of a VLM stage (pre-training or SFT).", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that reads).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
    flags.DEFINE_integer("port", 0, "Port (0: any free one; the bound address is printed).")
    flags.DEFINE_integer("max_slots", 8, "Engine decode slots (concurrent samples).")
    flags.DEFINE_integer("max_seq_len", 1024, "Most tokens a conversation may hold (prompt and answer).")
    flags.DEFINE_string("model_name", "judge", "The model id /v1/models reports.")


def main(argv) -> None:
    del argv
    from glm5v_jax.generate.run_loader import load_run

    f = flags.FLAGS
    model, tokenizer, _ = load_run(f.workdir, f.step)
    service = JudgeService(model, tokenizer, max_slots=f.max_slots, max_seq_len=f.max_seq_len, name=f.model_name)
    server = JudgeHTTPServer(service, f.host, f.port)
    print(f"serving on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        service.close()


if __name__ == "__main__":
    from glm5v_jax.errors import run_cli

    _define_flags()
    run_cli(main)
