"""Model-based judges: any OpenAI-compatible chat endpoint, called asynchronously over HTTP.

    judge = JudgeClient("http://127.0.0.1:8000", concurrency=8, timeout_s=30, retries=3)
    r = await judge.judge("caption", task, response)    # JudgeResult(value in [0, 1], flag, seconds, attempts)
    await judge.aclose()

The endpoint is `python -m glm5v_jax.rl.judge_server --workdir=RUN` (a run served by the generation engine)
or any other OpenAI-compatible server (vLLM, SGLang, a hosted API with `api_key`). Requests wait on a
semaphore of `concurrency`; each attempt has a `timeout_s` limit; connection errors, timeouts, 5xx, 408 and
429 are retried `retries` times with exponential backoff and jitter (`backoff_s` * 2^i * U[0.5, 1.5]; the
semaphore is released while waiting). When the last attempt fails, or a reply is another 4xx, malformed, or
unparseable by the rubric, the result is `fallback` with flag "fallback" (logged once per rubric and reason),
so an evaluation never stops for a judge.

A rubric (`RUBRICS`) is a judge prompt and the parser of its reply: `template` is formatted with the task's
`{prompt}`, `{reference}` (its caption / answer / text, else its reference as JSON) and the policy's
`{response}` (cut to `max_response_chars`); `parse(reply) -> float in [0, 1] | None` (None: unparseable).
With `images=True` the task's images go first, as `image_url` parts with `data:image/png;base64,...` URLs.
A session and semaphore belong to one event loop; a client used from a new loop makes new ones.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import json
import logging
import random
import re
import time
from typing import Any, Callable, Mapping

import aiohttp

from glm5v_jax.rl.types import Task

log = logging.getLogger(__name__)
RETRY_STATUS = (408, 429)  # and every 5xx


@dataclasses.dataclass(frozen=True)
class Rubric:
    """A judge prompt (`system`, a `template` of {prompt}, {reference}, {response}) and its reply's parser."""

    system: str
    template: str
    parse: Callable[[str], float | None]
    max_tokens: int = 8


_NUMBER = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)")


def parse_score_10(reply: str) -> float | None:
    """The first number of the reply ("7", "Score: 7/10", "8.5") on a 0-10 scale, as [0, 1]; None if none."""
    m = _NUMBER.search(reply)
    if m is None:
        return None
    value = float(m.group(1))
    return value / 10.0 if 0.0 <= value <= 10.0 else None


def parse_yes_no(reply: str) -> float | None:
    """1 for a reply that starts with yes (true, correct), 0 for no (false, incorrect); None otherwise."""
    words = re.findall(r"[a-z]+", reply.lower())
    if not words:
        return None
    return {"yes": 1.0, "true": 1.0, "correct": 1.0, "no": 0.0, "false": 0.0, "incorrect": 0.0}.get(words[0])


RUBRICS: dict[str, Rubric] = {
    "caption": Rubric(
        system="You grade image descriptions. Reply with one integer from 0 to 10 and nothing else.",
        template=("Reference description of the image: {reference}\n"
                  "Description to grade: {response}\n"
                  "How correct and complete is the description to grade, compared with the reference and the "
                  "image? 0: wrong or empty, 10: fully correct and complete. Reply with one integer from 0 to 10."),
        parse=parse_score_10),
    "answer_match": Rubric(
        system="You check answers. Reply with yes or no and nothing else.",
        template=("Question: {prompt}\nReference answer: {reference}\nGiven answer: {response}\n"
                  "Does the given answer mean the same as the reference answer? Reply with yes or no."),
        parse=parse_yes_no, max_tokens=4),
}


@dataclasses.dataclass(frozen=True)
class JudgeResult:
    """A judge's verdict in [0, 1] (or the fallback), its flag ("fallback" or None), wall seconds (retries
    and backoff included), attempts made, and the reply's text (or why it failed)."""

    value: float
    flag: str | None
    seconds: float
    attempts: int
    detail: str = ""


class JudgeError(Exception):
    """No usable reply; `reason` says which kind of failure (for the once-per-kind log)."""

    def __init__(self, reason: str, message: str, attempts: int):
        super().__init__(message)
        self.reason, self.attempts = reason, attempts


class _Retryable(Exception):
    pass


def chat_endpoint(url: str) -> str:
    """The chat-completions URL of a server: `http://h:p`, `http://h:p/v1` or the full URL."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def data_url(image: bytes) -> str:
    """An encoded image as a `data:` URL (PNG unless its bytes say JPEG)."""
    kind = "jpeg" if image[:2] == b"\xff\xd8" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(image).decode("ascii")


def reference_text(reference: Mapping[str, Any]) -> str:
    for key in ("caption", "answer", "text"):
        if key in reference:
            return str(reference[key])
    return json.dumps(dict(reference), sort_keys=True, default=str)


class JudgeClient:
    """Calls one OpenAI-compatible chat endpoint; see the module docstring."""

    def __init__(self, url: str, model: str = "judge", concurrency: int = 8, timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.5, fallback: float = 0.0, api_key: str | None = None,
                 images: bool = False, rubrics: Mapping[str, Rubric] | None = None, temperature: float = 0.0,
                 max_response_chars: int = 4000):
        for name, value, low in (("concurrency", concurrency, 1), ("retries", retries, 0)):
            if value < low:
                raise ValueError(f"JudgeClient: {name} must be >= {low}, got {value}")
        if not timeout_s > 0:
            raise ValueError(f"JudgeClient: timeout_s must be > 0, got {timeout_s}")
        self.endpoint, self.model = chat_endpoint(url), model
        self.concurrency, self.timeout_s, self.retries, self.backoff_s = concurrency, timeout_s, retries, backoff_s
        self.fallback, self.images, self.temperature = float(fallback), images, temperature
        self.max_response_chars = max_response_chars
        self.rubrics = dict(RUBRICS if rubrics is None else rubrics)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.counts: collections.Counter = collections.Counter()  # requests, attempts, retries, fallbacks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._logged: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ the judge
    def messages(self, rubric: str, task: Task, response: str) -> list[dict[str, Any]]:
        """The chat messages that ask `rubric` about `response` to `task`."""
        r = self.rubrics[rubric]
        text = r.template.format(prompt=task.prompt, reference=reference_text(task.reference),
                                 response=str(response)[:self.max_response_chars])
        content: Any = text
        if self.images and task.images:
            content = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in task.images]
            content.append({"type": "text", "text": text})
        return [{"role": "system", "content": r.system}, {"role": "user", "content": content}]

    async def judge(self, rubric: str, task: Task, response: str) -> JudgeResult:
        """The rubric's verdict on `response`, or the fallback with flag "fallback"; never raises for a
        judge's failure (KeyError for an unknown rubric)."""
        if rubric not in self.rubrics:
            raise KeyError(f"judge rubric {rubric!r} is not one of {sorted(self.rubrics)}")
        t0 = time.perf_counter()
        self.counts["requests"] += 1
        try:
            reply, attempts = await self.chat(self.messages(rubric, task, response),
                                              max_tokens=self.rubrics[rubric].max_tokens)
        except JudgeError as e:
            return self._fallback(rubric, e.reason, str(e), e.attempts, t0)
        value = self.rubrics[rubric].parse(reply)
        if value is None or not 0.0 <= value <= 1.0:
            return self._fallback(rubric, "unparseable", f"unparseable reply {reply[:200]!r}", attempts, t0)
        return JudgeResult(float(value), None, time.perf_counter() - t0, attempts, reply)

    def _fallback(self, rubric: str, reason: str, message: str, attempts: int, t0: float) -> JudgeResult:
        self.counts["fallbacks"] += 1
        if (rubric, reason) not in self._logged:
            self._logged.add((rubric, reason))
            log.warning("judge %r at %s: %s; scored %g with flag 'fallback' (logged once per rubric and reason)",
                        rubric, self.endpoint, message, self.fallback)
        return JudgeResult(self.fallback, "fallback", time.perf_counter() - t0, attempts, message)

    # ------------------------------------------------------------------ the transport
    async def chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 16) -> tuple[str, int]:
        """(the first choice's text, attempts made); JudgeError after the last retry or a non-retryable reply."""
        session, semaphore = self._state()
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": self.temperature, "n": 1}
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.counts["retries"] += 1
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            async with semaphore:
                self.counts["attempts"] += 1
                try:
                    return await self._post(session, body), attempt + 1
                except _Retryable as e:
                    error = str(e)
                except JudgeError as e:
                    e.attempts = attempt + 1
                    raise
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    error = f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} after {self.timeout_s:g} s"
        raise JudgeError("unreachable", f"no reply after {self.retries + 1} attempts (last: {error})",
                         self.retries + 1)

    async def _post(self, session: aiohttp.ClientSession, body: dict) -> str:
        async with session.post(self.endpoint, json=body, headers=self.headers) as resp:
            text = await resp.text()
            if resp.status >= 500 or resp.status in RETRY_STATUS:
                raise _Retryable(f"HTTP {resp.status}: {text[:200]}")
            if resp.status != 200:
                raise JudgeError(f"http_{resp.status}", f"HTTP {resp.status}: {text[:300]}", 1)
        try:
            content = json.loads(text)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError("malformed", f"malformed reply {text[:200]!r}", 1) from None
        return content if isinstance(content, str) else ""

    def _state(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._session = loop, None
            self._semaphore = asyncio.Semaphore(self.concurrency)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.concurrency))
        return self._session, self._semaphore

    async def aclose(self) -> None:
        """Close this loop's HTTP session (a later call opens a new one)."""
        if self._session is not None and not self._session.closed and self._loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = None
