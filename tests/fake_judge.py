"""A fake OpenAI-compatible judge for the reward tests (stdlib only, so a subprocess of it starts fast).

The request's last message scripts the reply: `SLEEP=<s>` sleeps first; `STATUS=<code>` answers that HTTP
status; `FAIL=<k>` answers HTTP 500 to the first k requests carrying that same text; `REPLY=<text>` (to the
end of its line) is the answer (default "7"). `python tests/fake_judge.py [--die_after=K]` serves until its
K-th request, which it does not answer: the process exits at once (a judge server killed mid-evaluation).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import threading
import time
from http.server import ThreadingHTTPServer

from glm5v_jax.rl.http_json import JSONHandler


class FakeJudge(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, port: int = 0, die_after: int = 0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.die_after = die_after
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # every request body, in arrival order
        self.headers: list[dict] = []
        self.seen: collections.Counter = collections.Counter()
        self.in_flight = self.peak = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "FakeJudge":
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _text(body: dict) -> str:
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")


class _Handler(JSONHandler):
    server: FakeJudge

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        s = self.server
        text = _text(body)
        with s.lock:
            s.requests.append(body)
            s.headers.append(dict(self.headers))
            s.seen[text] += 1
            count, total = s.seen[text], len(s.requests)
            s.in_flight += 1
            s.peak = max(s.peak, s.in_flight)
        try:
            if s.die_after and total >= s.die_after:
                os._exit(1)
            if m := re.search(r"SLEEP=([\d.]+)", text):
                time.sleep(float(m.group(1)))
            if m := re.search(r"STATUS=(\d+)", text):
                return self.send_json(int(m.group(1)), {"error": {"message": "scripted status"}})
            if (m := re.search(r"FAIL=(\d+)", text)) and count <= int(m.group(1)):
                return self.send_json(500, {"error": {"message": "scripted failure"}})
            m = re.search(r"REPLY=([^\n]*)", text)
            reply = m.group(1) if m else "7"
            self.send_json(200, {"id": "fake", "object": "chat.completion", "model": body.get("model"),
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        finally:
            with s.lock:
                s.in_flight -= 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--die_after", type=int, default=0)
    args = ap.parse_args()
    server = FakeJudge(args.port, args.die_after)
    print(f"serving on {server.url}", flush=True)
    sys.stdout.flush()
    server.serve_forever()
