"""The worker's OpenAI routes against real clients (the openai SDK, LiteLLM) and a real worker
on the tiny model (DESIGN.md §4): errors in OpenAI's shape, every parameter honoured or
refused by name, waiting for the one slot, a client that leaves, and HTTP edges that must
stay JSON and counted."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import sse_events
from tests.test_worker_api import Worker, start_worker, wait_idle
from tests.tinymodel import byte_token, write_tiny_model

HI = [{"role": "user", "content": "hi"}]  # the tiny model answers "abcd…" to it


@pytest.fixture(scope="module")
def worker(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    # the tiny model's whole context: a job of 30000 tokens outlasts any test's patience
    w = start_worker(tiny_model, tmp_path_factory.mktemp("oa") / "worker.log", ctx=32768)
    yield w
    w.proc.terminate()
    w.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def impatient(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A worker whose OpenAI requests wait one second for its slot."""
    w = start_worker(tiny_model, tmp_path_factory.mktemp("oa-impatient") / "worker.log",
                     ctx=32768, env={"RBEE_WORKER_QUEUE_WAIT": "1"})
    yield w
    w.proc.terminate()
    w.proc.wait(timeout=10)


TOO_LONG = "x" * 40_000  # 40000 tokens: more than the tiny model's whole context (32768)


def client(w: Worker, **kw: Any) -> openai.OpenAI:
    """The openai SDK on the worker, without its own retries (they would hide a 503)."""
    return openai.OpenAI(base_url=f"{w.url}/v1", api_key=w.token, max_retries=0, **kw)


def counted(w: Worker, route: str, outcome: str) -> int:
    """rbee_worker_requests_total for one route and outcome."""
    text = httpx.get(f"{w.url}/metrics", headers=w.auth).text
    want = f'route="{route}",outcome="{outcome}"'
    for line in text.splitlines():
        if line.startswith("rbee_worker_requests_total") and want in line:
            return int(line.rsplit(" ", 1)[1])
    return 0


def gauge(w: Worker, name: str) -> float:
    text = httpx.get(f"{w.url}/metrics", headers=w.auth).text
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@contextlib.contextmanager
def slot_held(w: Worker, job_id: str = "holder") -> Iterator[None]:
    """Hold the worker's one slot with a long /execute job until the block ends (then
    cancel it and wait for the slot to pass on)."""
    wait_idle(w)
    with httpx.stream("POST", f"{w.url}/execute", headers=w.auth, timeout=60, json={
            "prompt": "Hello", "max_tokens": 30000, "job_id": job_id}) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
        assert next(events)[0] == "started" and next(events)[0] == "token"
        try:
            yield
        finally:
            with contextlib.suppress(httpx.HTTPError):  # a worker told to stop is gone
                httpx.post(f"{w.url}/cancel", json={"job_id": job_id}, headers=w.auth)


class Call(threading.Thread):
    """One OpenAI request in a thread: its answer (or error) and when it came."""

    def __init__(self, w: Worker, **body: Any) -> None:
        super().__init__(daemon=True)
        self.w, self.body = w, body
        self.answer: Any = None
        self.error: Exception | None = None
        self.done_at = 0.0
        self.start()

    def run(self) -> None:
        try:
            self.answer = client(self.w, timeout=60).completions.create(model="tiny",
                                                                        **self.body)
        except Exception as e:
            self.error = e
        self.done_at = time.monotonic()


# ---- a client that leaves ------------------------------------------------------------------

@pytest.mark.parametrize("route", ["v1_completions", "v1_chat"])
def test_a_client_that_leaves_a_non_streaming_request_cancels_its_job(worker: Worker,
                                                                      route: str) -> None:
    wait_idle(worker)
    cancelled, completed = counted(worker, route, "cancelled"), counted(worker, route, "completed")
    impatient = client(worker, timeout=2.0)
    with pytest.raises(openai.APITimeoutError):
        if route == "v1_chat":
            impatient.chat.completions.create(model="tiny", messages=HI, max_tokens=30000)
        else:
            impatient.completions.create(model="tiny", prompt="Hello", max_tokens=30000)
    # the worker notices the closed connection and stops within a token, not at 30000
    wait_idle(worker)
    assert counted(worker, route, "cancelled") == cancelled + 1
    assert counted(worker, route, "completed") == completed


# ---- waiting for the slot ------------------------------------------------------------------

def test_a_second_openai_client_waits_for_the_slot_instead_of_503(worker: Worker) -> None:
    with slot_held(worker):
        second = Call(worker, prompt="Hello", max_tokens=3, temperature=0)
        until(lambda: gauge(worker, "rbee_worker_waiting") == 1)
        time.sleep(0.3)
        assert second.is_alive(), second.error  # still waiting, not turned away
        busy = httpx.post(f"{worker.url}/execute", headers=worker.auth,
                          json={"prompt": "x", "max_tokens": 1})
        # /execute stays the scheduler's signal: 503 at once, never queued
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    second.join(30)
    assert second.error is None and second.answer.choices[0].text == "pqr"


class Stream(threading.Thread):
    """A long streaming OpenAI request in a thread: `started` when its answer begins (it
    holds the slot then), closed when the test sets `leave`."""

    def __init__(self, w: Worker) -> None:
        super().__init__(daemon=True)
        self.w = w
        self.started, self.leave = threading.Event(), threading.Event()
        self.start()

    def run(self) -> None:
        with httpx.stream("POST", f"{self.w.url}/v1/completions", headers=self.w.auth,
                          timeout=60, json={"prompt": "Hello", "max_tokens": 30000,
                                            "stream": True}) as r:
            assert r.status_code == 200
            self.started.set()
            self.leave.wait(30)


def test_waiting_requests_are_served_in_arrival_order(worker: Worker) -> None:
    streams: list[Stream] = []
    with slot_held(worker):
        for n in range(3):
            streams.append(Stream(worker))
            until(lambda n=n: gauge(worker, "rbee_worker_waiting") == n + 1)
    for n, s in enumerate(streams):
        assert s.started.wait(10)
        # the others still wait: the slot went to the earliest, not to whoever asked last
        assert not any(t.started.is_set() for t in streams[n + 1:])
        assert gauge(worker, "rbee_worker_waiting") == 2 - n
        s.leave.set()
        s.join(10)


def test_a_request_sent_the_moment_a_stream_closes_is_served(worker: Worker) -> None:
    c = client(worker, timeout=60)
    for _ in range(5):
        wait_idle(worker)
        stream = c.completions.create(model="tiny", prompt="Hello", max_tokens=30000,
                                      stream=True)
        next(iter(stream))
        stream.close()  # the job stops at its next token; the next request comes now
        done = c.completions.create(model="tiny", prompt="Hello", max_tokens=2,
                                    temperature=0)
        assert done.choices[0].text == "pq"


def test_the_wait_for_the_slot_is_bounded(impatient: Worker) -> None:
    with slot_held(impatient):
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            client(impatient, timeout=30).completions.create(model="tiny", prompt="x",
                                                             max_tokens=1)
        waited = time.monotonic() - t0
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
    assert e.value.code == "all_slots_busy" and e.value.type == "server_error"
    assert 0.9 <= waited < 10  # RBEE_WORKER_QUEUE_WAIT=1


def test_a_bad_queue_wait_setting_stops_the_worker_at_start(tiny_model: Path,
                                                            tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="RBEE_WORKER_QUEUE_WAIT"):
        start_worker(tiny_model, tmp_path / "w.log", ctx=256,
                     env={"RBEE_WORKER_QUEUE_WAIT": "soon"})


# ---- errors in OpenAI's shape --------------------------------------------------------------

def test_errors_carry_openai_type_param_and_code(worker: Worker) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(worker).chat.completions.create(model="tiny", messages=HI, temperature=9)
    assert (e.value.type, e.value.param) == ("invalid_request_error", "temperature")
    body = e.value.body
    assert isinstance(body, dict) and body["rbee_code"] == "INVALID_REQUEST" and body["hint"]


@pytest.mark.parametrize("chat", [False, True])
def test_a_context_overflow_is_openai_context_length_exceeded(worker: Worker,
                                                              chat: bool) -> None:
    c = client(worker)
    with pytest.raises(openai.BadRequestError) as e:
        if chat:
            c.chat.completions.create(model="tiny", max_tokens=1,
                                      messages=[{"role": "user", "content": TOO_LONG}])
        else:
            c.completions.create(model="tiny", prompt=TOO_LONG, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    assert e.value.param == ("messages" if chat else "prompt")
    assert "maximum context length is 32768 tokens" in e.value.message


def test_an_execute_context_overflow_says_so_for_the_queen(worker: Worker) -> None:
    r = httpx.post(f"{worker.url}/execute", headers=worker.auth,
                   json={"prompt": TOO_LONG, "max_tokens": 1})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "INVALID_REQUEST"
    assert err["details"] == {"field": "prompt", "openai_code": "context_length_exceeded"}


def test_model_by_id(worker: Worker) -> None:
    c = client(worker)
    assert c.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("other")
    assert (e.value.code, e.value.param) == ("model_not_found", "model")


# ---- parameters: honoured ------------------------------------------------------------------

def _text(w: Worker, **body: Any) -> str:
    r = httpx.post(f"{w.url}/v1/completions", headers=w.auth, timeout=60,
                   json={"prompt": "Hello", "max_tokens": 40, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


@pytest.mark.parametrize("penalty", [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                                     {"repeat_penalty": 1.5}])
def test_penalties_are_honoured(worker: Worker, penalty: dict[str, float]) -> None:
    # The tiny model's next token leads every other by ~31.9 logits; a bias of 31 on "#"
    # (never in its "pqrstuvwxyz abc…" cycle) leaves it ~0.9 behind. A penalty on the cycle's
    # first repeat (the second "p", token 27) tips the choice to "#"; without it, nothing.
    near = {"logit_bias": {str(byte_token("#")): 31}}
    plain = _text(worker, **near)
    assert plain == "pqrstuvwxyz abcdefghijklmnopqrstuvwxyz a"
    penalised = _text(worker, **near, **penalty)
    assert penalised[:27] == plain[:27] and penalised != plain and "#" in penalised


def test_logit_bias_is_honoured(worker: Worker) -> None:
    r = client(worker).completions.create(model="tiny", prompt="Hello", max_tokens=5,
                                          temperature=0,
                                          logit_bias={str(byte_token("p")): -100})
    assert not r.choices[0].text.startswith("p")
    with pytest.raises(openai.BadRequestError) as e:
        client(worker).completions.create(model="tiny", prompt="Hello", max_tokens=1,
                                          logit_bias={"999999": 5})
    assert e.value.param == "logit_bias"


def test_completion_logprobs_and_echo(worker: Worker) -> None:
    c = client(worker)
    r = c.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0,
                             logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens == ["p", "q", "r"] and lp.text_offset == [0, 1, 2]
    assert lp.token_logprobs is not None and all(-0.01 < x <= 0 for x in lp.token_logprobs)
    assert lp.top_logprobs is not None and [len(t) for t in lp.top_logprobs] == [2, 2, 2]
    assert [max(t, key=t.__getitem__) for t in lp.top_logprobs] == ["p", "q", "r"]
    streamed = [ch.choices[0].logprobs for ch in c.completions.create(
        model="tiny", prompt="Hello", max_tokens=3, temperature=0, logprobs=0, stream=True)]
    assert [t for x in streamed if x and x.tokens for t in x.tokens] == ["p", "q", "r"]

    echoed = c.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0,
                                  echo=True)
    assert echoed.choices[0].text == "Hellopqr"
    parts = [ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="Hello", max_tokens=3, temperature=0, echo=True, stream=True)]
    assert "".join(parts) == "Hellopqr"


def test_chat_logprobs(worker: Worker) -> None:
    c = client(worker)
    r = c.chat.completions.create(model="tiny", messages=HI, max_tokens=3, temperature=0,
                                  logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and [t.token for t in content] == ["a", "b", "c"]
    assert all(t.logprob <= 0 and t.bytes == [ord(t.token)] for t in content)
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
               for t in content)
    tokens = []
    for ch in c.chat.completions.create(model="tiny", messages=HI, max_tokens=3,
                                        temperature=0, logprobs=True, stream=True):
        if ch.choices and ch.choices[0].logprobs and ch.choices[0].logprobs.content:
            tokens += [t.token for t in ch.choices[0].logprobs.content]
    assert tokens == ["a", "b", "c"]


def test_json_mode_holds_the_output_to_json(worker: Worker) -> None:
    c = client(worker)
    free = c.chat.completions.create(model="tiny", messages=HI, max_tokens=20, temperature=0)
    assert free.choices[0].message.content == "abcdefghijklmnopqrst"
    obj = c.chat.completions.create(model="tiny", messages=HI, max_tokens=20, temperature=0,
                                    response_format={"type": "json_object"})
    assert (obj.choices[0].message.content or "").startswith("{")
    schema = {"type": "object", "properties": {"n": {"type": "integer"},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    held = c.chat.completions.create(
        model="tiny", messages=HI, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    doc = json.loads(held.choices[0].message.content or "")
    assert set(doc) == {"n", "ok"} and isinstance(doc["n"], int) and isinstance(doc["ok"], bool)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=HI, max_tokens=1, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "florp"}}})
    assert e.value.param == "response_format"


def test_execute_takes_the_same_sampling_extras(worker: Worker) -> None:
    wait_idle(worker)
    r = httpx.post(f"{worker.url}/execute", headers=worker.auth, timeout=60, json={
        "prompt": "Hello", "max_tokens": 5, "temperature": 0, "presence_penalty": 0.5,
        "frequency_penalty": 0.5, "repeat_penalty": 1.1,
        "logit_bias": {str(byte_token("p")): -100}, "response_format": {"type": "text"}})
    text = "".join(d["t"] for e, d in sse_events(r.iter_lines()) if e == "token")
    assert r.status_code == 200 and text and not text.startswith("p")


def test_one_prompt_in_a_list_is_answered(worker: Worker) -> None:
    r = client(worker).completions.create(model="tiny", prompt=["Hello"], max_tokens=2,
                                          temperature=0)
    assert r.choices[0].text == "pq"


# ---- parameters: refused by name -----------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("functions", [{"name": "f"}]),
    ("n", 2),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "high"),
    ("messages", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]),
])
def test_chat_parameters_the_worker_cannot_honour_are_400_naming_them(
        worker: Worker, field: str, value: Any) -> None:
    body: dict[str, Any] = {"model": "tiny", "messages": HI, "max_tokens": 1, field: value}
    with pytest.raises(openai.BadRequestError) as e:
        client(worker).chat.completions.create(**body)
    assert e.value.param is not None and e.value.param.startswith(field)
    assert e.value.code == "unsupported_parameter"


@pytest.mark.parametrize("field, value", [
    ("prompt", ["one", "two"]), ("best_of", 3), ("suffix", "end"), ("n", 2)])
def test_completion_parameters_the_worker_cannot_honour_are_400_naming_them(
        worker: Worker, field: str, value: Any) -> None:
    body: dict[str, Any] = {"model": "tiny", "prompt": "Hello", "max_tokens": 1, field: value}
    with pytest.raises(openai.BadRequestError) as e:
        client(worker).completions.create(**body)
    assert (e.value.param, e.value.code) == (field, "unsupported_parameter")


def test_an_unknown_parameter_is_400_naming_it(worker: Worker) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(worker).chat.completions.create(model="tiny", messages=HI, max_tokens=1,
                                               extra_body={"mirostat": 2})
    assert (e.value.param, e.value.code) == ("mirostat", "unknown_parameter")


def test_parameters_that_change_nothing_are_accepted(worker: Worker) -> None:
    r = client(worker).chat.completions.create(
        model="tiny", messages=HI, max_tokens=2, temperature=0, user="u1", store=False,
        metadata={"k": "v"}, stream_options=None, tool_choice="none", n=1)
    assert r.choices[0].message.content == "ab"


# ---- HTTP edges: JSON answers, counted under one label -------------------------------------

def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("path, body, field, says", [
    # a text part whose text is an object: it used to reach "".join and a plain-text 500
    ("/v1/chat/completions", '{"max_tokens": 1, "messages": [{"role": "user", "content": '
                             '[{"type": "text", "text": {"a": {"b": {"c": 1}}}}]}]}',
     "messages.0.content", "text as a string"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "metadata": '
                             + _deep(65) + "}", "body", "nests deeper than 64"),
    ("/v1/completions", '{"prompt": "x", "user": ' + _deep(200) + "}", "body",
     "nests deeper than 64"),
    ("/execute", '{"prompt": "x", "stop": ' + _deep(100_000) + "}", "body",
     "nests deeper than 64"),
    ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 1}', "body", "not valid Unicode"),
])
def test_hostile_json_gets_a_json_400_counted_in_metrics(worker: Worker, path: str, body: str,
                                                         field: str, says: str) -> None:
    route = {"/v1/chat/completions": "v1_chat", "/v1/completions": "v1_completions",
             "/execute": "execute"}[path]
    before = counted(worker, route, "invalid")
    r = httpx.post(f"{worker.url}{path}", content=body, headers=worker.auth)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err.get("param", err.get("details", {}).get("field")) == field
    assert says in err["message"]
    assert counted(worker, route, "invalid") == before + 1


def test_a_chat_template_that_raises_is_a_json_400(tiny_model: Path, tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "strict.gguf", chat_template=(
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "[{{ m.role }}] {{ m.content }}\n{% endfor %}"))
    w = start_worker(model, tmp_path / "w.log", ctx=512)
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client(w).chat.completions.create(model="tiny", max_tokens=2, messages=[
                {"role": "system", "content": "be brief"}, *HI])
        assert e.value.param == "messages" and "System role not supported" in e.value.message
        r = httpx.post(f"{w.url}/execute", headers=w.auth, json={
            "messages": [{"role": "system", "content": "x"}], "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "messages"
        assert counted(w, "v1_chat", "invalid") == 1 and counted(w, "execute", "invalid") == 1
        ok = client(w).chat.completions.create(model="tiny", max_tokens=2, messages=HI)
        assert ok.choices[0].finish_reason is not None  # the template works for the rest
    finally:
        w.proc.terminate()
        w.proc.wait(timeout=10)


def test_a_chat_template_that_does_not_compile_does_not_stop_the_model(
        tmp_path: Path) -> None:
    """llama-cpp-python compiles the GGUF's template while it builds the model: a broken
    one used to fail the whole load (MODEL_LOAD_FAILED, with a hint about memory)."""
    model = write_tiny_model(tmp_path / "broken.gguf",
                             chat_template="{% for m in messages %}{{ m.content }")
    w = start_worker(model, tmp_path / "w.log", ctx=512)
    try:
        ok = client(w).chat.completions.create(model="tiny", max_tokens=2, messages=HI)
        assert ok.choices[0].finish_reason is not None and ok.usage.prompt_tokens > 0
        done = client(w).completions.create(model="tiny", prompt="Hello", max_tokens=2)
        assert done.choices[0].finish_reason is not None
        log = (tmp_path / "w.log").read_text()
        assert "chat template does not compile (TemplateSyntaxError" in log
        assert "User: … Assistant:" in log
    finally:
        w.proc.terminate()
        w.proc.wait(timeout=10)


def test_unknown_paths_and_methods_answer_json(worker: Worker) -> None:
    plain = httpx.get(f"{worker.url}/nope", headers=worker.auth)
    assert plain.status_code == 404 and plain.json()["error"]["code"] == "INVALID_REQUEST"
    with pytest.raises(openai.NotFoundError) as e:
        client(worker).get("/nope", cast_to=object)
    assert e.value.type == "invalid_request_error" and e.value.code == "unknown_url"
    wrong = httpx.get(f"{worker.url}/execute", headers=worker.auth)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["code"] == "INVALID_REQUEST"
    v1_wrong = httpx.delete(f"{worker.url}/v1/chat/completions", headers=worker.auth)
    assert v1_wrong.status_code == 405 and v1_wrong.json()["error"]["rbee_code"]


def test_each_route_counts_under_one_label(worker: Worker) -> None:
    before = counted(worker, "v1_chat", "unauthorized")
    assert httpx.post(f"{worker.url}/v1/chat/completions", json={}).status_code == 401
    assert counted(worker, "v1_chat", "unauthorized") == before + 1
    for n in range(3):  # made-up paths share one label: a client cannot grow /metrics
        httpx.get(f"{worker.url}/v1/made-up-{n}")
        httpx.get(f"{worker.url}/made-up-{n}", headers=worker.auth)
    text = httpx.get(f"{worker.url}/metrics", headers=worker.auth).text
    routes = {line.split('route="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("rbee_worker_requests_total")}
    assert routes <= {"execute", "cancel", "metrics", "shutdown", "v1_models", "v1_model",
                      "v1_completions", "v1_chat", "other"}, routes
    assert counted(worker, "other", "unauthorized") >= 3
    assert counted(worker, "other", "not_found") >= 3


# ---- LiteLLM -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price map download
    return pytest.importorskip("litellm")


@pytest.mark.filterwarnings("ignore::UserWarning")  # LiteLLM's own pydantic types warn
def test_litellm_against_the_worker(litellm: Any, worker: Worker) -> None:
    def ask(w: Worker, content: str, **kw: Any) -> Any:
        return litellm.completion(model="openai/tiny", api_base=f"{w.url}/v1",
                                  api_key=w.token, messages=[{"role": "user",
                                                              "content": content}],
                                  max_tokens=2, temperature=0, num_retries=0, **kw)

    assert ask(worker, "hi").choices[0].message.content == "ab"
    with pytest.raises(litellm.ContextWindowExceededError):
        ask(worker, TOO_LONG)
    with pytest.raises(litellm.BadRequestError):
        ask(worker, "hi", tools=[{"type": "function",
                                  "function": {"name": "f", "parameters": {}}}])
    # two clients at once: the second waits for the slot, as from a llama.cpp server
    with slot_held(worker):
        answers: list[Any] = []
        t = threading.Thread(target=lambda: answers.append(ask(worker, "hi")))
        t.start()
        until(lambda: gauge(worker, "rbee_worker_waiting") == 1)
    t.join(30)
    assert answers and answers[0].choices[0].message.content == "ab"
