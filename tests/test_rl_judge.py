"""Judges. The client against a fake OpenAI server: answers parsed by rubric, 5xx retried until it succeeds,
timeouts and 4xx and unparseable replies as flagged fallbacks, at most `concurrency` requests in flight,
images as data URLs. The real server (`rl.judge_server`) serving a tiny trained run: an OpenAI-shaped reply
to a chat request with an image (the same answer as offline generation), 400 naming the field for bad
requests while it keeps serving, its command line, and a RewardSystem judging through it end to end."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fake_judge import FakeJudge
from glm5v_jax.rl.judge import JudgeClient, Rubric, chat_endpoint, parse_score_10, parse_yes_no
from glm5v_jax.rl.rewards import RewardSystem
from glm5v_jax.rl.types import Component, RewardSpec, Task
from helpers import build_vlm_run

ROOT = Path(__file__).parents[1]


def _png(seed: int, size=(48, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _task(prompt="Describe the image.", **kw) -> Task:
    return Task(uid="t", data_source="caption", prompt=prompt, reference={"caption": "a red circle"}, **kw)


def _judge(client: JudgeClient, rubric: str, response: str, task: Task | None = None):
    async def go():
        try:
            return await client.judge(rubric, task or _task(), response)
        finally:
            await client.aclose()
    return asyncio.run(go())


# --------------------------------------------------------------------------------- the client
def test_rubric_parsers_and_endpoints():
    assert [parse_score_10(r) for r in ("7", "Score: 8/10", " 10.", "9.5 out of 10", "0")] == [.7, .8, 1., .95, 0.]
    assert [parse_score_10(r) for r in ("", "eleven", "11", "-3", "x2")] == [None] * 5
    assert [parse_yes_no(r) for r in ("Yes.", "no", "  YES, because", "Correct", "maybe", "", "not sure")] == \
        [1.0, 0.0, 1.0, 1.0, None, None, None]
    assert chat_endpoint("http://h:1") == chat_endpoint("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_endpoint("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


@pytest.fixture
def fake():
    server = FakeJudge().start()
    yield server
    server.stop()


def test_client_answers_retries_and_falls_back(fake):
    client = JudgeClient(fake.url, timeout_s=0.5, retries=2, backoff_s=0.01, fallback=0.1, api_key="k")
    r = _judge(client, "caption", "REPLY=7")
    assert (r.value, r.flag, r.attempts) == (0.7, None, 1)
    assert fake.requests[-1]["model"] == "judge" and fake.requests[-1]["temperature"] == 0.0
    assert fake.headers[-1]["Authorization"] == "Bearer k"
    assert "a red circle" in fake.requests[-1]["messages"][-1]["content"]
    assert _judge(client, "answer_match", "REPLY=Yes.").value == 1.0
    r = _judge(client, "caption", "FAIL=2 REPLY=9")  # 500, 500, then the answer
    assert (r.value, r.flag, r.attempts) == (0.9, None, 3)
    r = _judge(client, "caption", "FAIL=3")  # one failure more than the retries
    assert (r.value, r.flag, r.attempts) == (0.1, "fallback", 3) and "HTTP 500" in r.detail
    r = _judge(client, "caption", "SLEEP=2")  # every attempt times out
    assert (r.value, r.flag, r.attempts) == (0.1, "fallback", 3) and 1.5 <= r.seconds < 1.5 * 3
    r = _judge(client, "caption", "STATUS=400")  # a client error is not retried
    assert (r.flag, r.attempts) == ("fallback", 1) and "HTTP 400" in r.detail
    r = _judge(client, "caption", "REPLY=a lovely picture")
    assert (r.value, r.flag) == (0.1, "fallback") and "unparseable" in r.detail
    assert client.counts["fallbacks"] == 4
    with pytest.raises(KeyError, match="rubric 'nope'"):
        _judge(client, "nope", "x")


def test_client_respects_its_concurrency_limit(fake):
    client = JudgeClient(fake.url, concurrency=3, timeout_s=5.0)

    async def many():
        try:
            return await asyncio.gather(*(client.judge("caption", _task(), f"SLEEP=0.1 REPLY={i % 11}")
                                          for i in range(12)))
        finally:
            await client.aclose()
    results = asyncio.run(many())
    assert [r.value for r in results] == [(i % 11) / 10 for i in range(12)]
    assert fake.peak == 3


def test_client_sends_images_as_data_urls(fake):
    png = _png(0)
    client = JudgeClient(fake.url, images=True)
    assert _judge(client, "caption", "REPLY=5", _task(images=(png,))).value == 0.5
    parts = fake.requests[-1]["messages"][-1]["content"]
    assert parts[0]["type"] == "image_url" and parts[-1]["type"] == "text"
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == png


# --------------------------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from glm5v_jax.rl.judge_server import start_server

    workdir = tmp_path_factory.mktemp("judge_run")
    build_vlm_run(workdir)
    url, stop = start_server(str(workdir), max_slots=4, max_seq_len=512)
    yield workdir, url
    stop()


def _post(url: str, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def _image_message(png: bytes, text: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
        {"type": "text", "text": text}]}]


def test_server_answers_a_chat_request_with_an_image(served):
    from glm5v_jax.generate.__main__ import answer

    workdir, url = served
    png = _png(0)
    status, reply = _post(url, {"model": "judge", "messages": _image_message(png, "Describe the image."),
                                "max_tokens": 6, "temperature": 0})
    assert status == 200, reply
    assert reply["object"] == "chat.completion" and reply["model"] == "judge" and len(reply["choices"]) == 1
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = reply["usage"]
    assert usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["message"]["content"] == answer(str(workdir), "Describe the image.", image=png, max_new_tokens=6)
    status, two = _post(url, {"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Name a colour."}],
                              "n": 2, "temperature": 1.0, "top_p": 0.9, "seed": 1, "max_tokens": 4})
    assert status == 200 and [c["index"] for c in two["choices"]] == [0, 1]
    assert _get(url + "/health")["status"] == "ok"
    assert _get(url + "/v1/models")["data"][0]["id"] == "judge"


@pytest.mark.parametrize("body, param, text", [
    ({}, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "messages[0].content[0].image_url.url", "data URL"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0]", "must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature", "a number"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 100}, "n", "must be in"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens", "must be in"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, "stream", "not supported"),
    ({"messages": _image_message(b"not an image", "hi")}, "messages", "image cannot be used"),
    (None, "body", "not JSON"),
])
def test_server_refuses_bad_requests_by_field_and_keeps_serving(served, body, param, text):
    _, url = served
    status, reply = _post(url, body, raw=b"{nope" if body is None else None)
    assert status == 400 and reply["error"]["param"] == param and text in reply["error"]["message"], reply
    status, ok = _post(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200 and ok["choices"][0]["message"]["role"] == "assistant"


def _length_score(reply: str) -> float:
    return min(len(reply), 10) / 10


def test_reward_system_judges_through_the_real_server(served):
    _, url = served
    rubric = Rubric(system="Grade the answer.", template="{prompt}\n{reference}\n{response}", parse=_length_score,
                    max_tokens=5)
    judge = JudgeClient(url, rubrics={"length": rubric}, images=True, timeout_s=300)
    specs = {"caption": RewardSpec((Component("judge", judge="length"),))}
    tasks = [_task(images=(_png(i),)) for i in range(3)]
    with RewardSystem(specs, verifiers={}, judge=judge) as rewards:
        out = rewards.score_many_detailed([(t, f"answer {i}") for i, t in enumerate(tasks)])
    for task, (i, d) in zip(tasks, enumerate(out)):
        assert d.score.flags == () and d.seconds["judge"] > 0
        status, direct = _post(url, {"messages": judge.messages("length", task, f"answer {i}"), "max_tokens": 5,
                                     "temperature": 0})
        assert status == 200 and d.score.value == _length_score(direct["choices"][0]["message"]["content"])
    assert rewards.stats()["judge/length"]["calls"] == 3


def test_command_line_serves_and_refuses_a_bad_workdir(served, tmp_path):
    workdir, _ = served
    proc = subprocess.Popen([sys.executable, "-m", "glm5v_jax.rl.judge_server", f"--workdir={workdir}", "--port=0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), proc.stderr.read()[-3000:] if not line else line
        assert _get(line.split()[-1] + "/health")["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    bad = subprocess.run([sys.executable, "-m", "glm5v_jax.rl.judge_server", f"--workdir={tmp_path / 'none'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "workdir: " in bad.stderr and "config.json not found" in bad.stderr
