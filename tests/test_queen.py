"""The queen with real processes on loopback: a queen, a local hive, real workers on the tiny
model, the official openai SDK. (After "Hello" the tiny model spells "pqrstuvwxyz abc…";
after a "!" it says "KO" and stops.)"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Env
from tests.helpers import run
from tests.queenproc import QueenProc

MiB = 1024 * 1024


def _hosts(env: Env, **host_env: str) -> None:
    pairs = ", ".join(f'{k} = "{v}"' for k, v in host_env.items())
    (env.config / "hosts.toml").write_text(
        f'[hosts.localhost]\ntransport = "local"\nenv = {{ {pairs} }}\n' if pairs
        else '[hosts.localhost]\ntransport = "local"\n')


@pytest.fixture
def models(rbee_env: Env, tiny_model: Path) -> list[str]:
    """The tiny model registered twice, as two models: "tiny" and "tiny2"."""
    for mid in ("tiny", "tiny2"):
        r = run("rbee-hive", "models", "import", str(tiny_model), "--id", mid, "--copy")
        assert r.returncode == 0, r
    return ["tiny", "tiny2"]


@pytest.fixture
def queen(rbee_env: Env, models: list[str]) -> Iterator[QueenProc]:
    _hosts(rbee_env, RBEE_WORKER_THREADS="1")
    q = QueenProc(rbee_env.config, "--poll-interval", "0.5").start()
    yield q
    q.stop()


def _estimate(model: str) -> int:
    r = run("rbee-hive", "models", "info", model, "--format", "json")
    return int(r.json()["estimate"]["total_bytes"])


def test_openai_sdk_against_the_queen(queen: QueenProc) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{queen.url}/v1", api_key=queen.token, max_retries=0)
    ids = [m.id for m in client.models.list().data]
    assert "tiny" in ids and "tiny2" in ids
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0)
    assert r.choices[0].text == "pqrst" and r.usage.completion_tokens == 5
    chunks = client.completions.create(model="tiny", prompt="Hello", max_tokens=4,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == "pqrs"
    chat = client.chat.completions.create(model="tiny", temperature=0, max_tokens=3,
                                          messages=[{"role": "user", "content": "Hello"}])
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 3
    stream = client.chat.completions.create(model="tiny", temperature=0, max_tokens=3,
                                            messages=[{"role": "user", "content": "Hello"}],
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x")
    assert e.value.code == "model_not_found"
    jobs = queen.get("/v2/tasks").json()["tasks"]
    assert all(j["source"] == "openai" for j in jobs)
    states = sorted((j["state"], (j["error"] or {}).get("code")) for j in jobs)
    assert states == [("done", None)] * 4 + [("failed", "MODEL_NOT_FOUND")]


def test_a_stream_that_cannot_start_is_an_http_error_as_openai_answers_it(
        queen: QueenProc) -> None:
    """OpenAI answers a streamed request for a model it lacks with a 404 before any chunk:
    clients tell "no such model" from a failure mid-answer by the status."""
    import openai

    client = openai.OpenAI(base_url=f"{queen.url}/v1", api_key=queen.token, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", stream=True)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", stream=True,
                                       messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    body = e.value.body
    assert isinstance(body, dict) and body["rbee_code"] == "MODEL_NOT_FOUND" and body["hint"]
    # a stream that can start still does
    stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=4,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == "pqrs"
    # a prompt longer than the worker's context: a 400 as OpenAI sends it, not a chunk
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Hello " * 600, max_tokens=4,
                                  stream=True)
    assert e.value.code == "context_length_exceeded"


def test_openai_sdk_errors_and_model_lookup_have_openais_shape(queen: QueenProc) -> None:
    """What an OpenAI client does besides completing: look a model up, meet a wrong key or a
    route the queen lacks; each answer is in OpenAI's shape, rbee's code and hint beside."""
    import openai

    client = openai.OpenAI(base_url=f"{queen.url}/v1", api_key=queen.token, max_retries=0)
    model = client.models.retrieve("tiny")
    assert model.id == "tiny" and model.object == "model" and model.owned_by == "rbee"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.code == "model_not_found"
    bad = openai.OpenAI(base_url=f"{queen.url}/v1", api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.code == "invalid_api_key" and e.value.type == "authentication_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="tiny", input="x")
    assert e.value.type == "invalid_request_error"
    body = e.value.body
    assert isinstance(body, dict) and body["rbee_code"] == "INVALID_REQUEST" and body["hint"]
    r = httpx.get(f"{queen.url}/v1/completions", headers=queen.headers, timeout=10)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{queen.url}/v2/nope", headers=queen.headers, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "INVALID_REQUEST"


def test_queen_logs_prints_its_history_and_returns_unless_asked_to_follow(
        rbee_env: Env) -> None:
    from tests.queenproc import free_port

    _hosts(rbee_env)
    started = run("rbee", "queen", "start", "--port", str(free_port()), "--format", "json")
    assert started.returncode == 0, started
    try:
        log = Path(started.json()["log"])
        log.write_text(log.read_text() + "".join(f"line {i}\n" for i in range(5)))
        r = run("rbee", "queen", "logs", "-n", "3", timeout=20)  # it used to follow forever
        assert r.returncode == 0, r
        assert r.stdout.splitlines() == ["line 2", "line 3", "line 4"]
    finally:
        assert run("rbee", "queen", "stop").returncode == 0


def test_the_jobs_api_streams_events_and_resumes_with_last_event_id(queen: QueenProc) -> None:
    job = queen.submit(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
    events = list(queen.events(job))
    names = [e for e, _ in events]
    assert names[:2] == ["queued", "placed"]
    assert "loading" in names and "started" in names and names[-1] == "end"
    placed = dict(events[1][1])
    assert placed["host"] == "localhost" and placed["reason"] and "rejected" in placed
    assert "".join(d["t"] for e, d in events if e == "token") == "pqrstu"
    # a client that reconnects after event 3 gets only what follows it
    later = list(queen.events(job, after=3))
    assert [e for e, _ in later] == names[4:]
    doc = queen.wait(job)
    assert doc["state"] == "done" and doc["text"] == "pqrstu" and doc["tokens"] == 6
    assert doc["placement"]["path"] == "cold" and doc["timings"]["ttft_ms"] > 0
    # the next job finds the worker idle: no placement round, no spawn
    again = queen.submit(model="tiny", prompt="Hello", max_tokens=2, temperature=0)
    placed2 = next(d for e, d in queen.events(again) if e == "placed")
    assert placed2["path"] == "warm" and placed2["worker"] == doc["worker"]


def test_wrong_token_is_401_on_every_route_but_health(queen: QueenProc) -> None:
    bad = {"Authorization": "Bearer not-the-token"}
    routes = [("GET", "/v2/tasks"), ("POST", "/v2/tasks"), ("GET", "/v2/tasks/job-1"),
              ("GET", "/v2/tasks/job-1/events"), ("POST", "/v2/tasks/job-1/cancel"),
              ("GET", "/v2/state"), ("POST", "/v2/heartbeat"), ("GET", "/v2/models"),
              ("PUT", "/v2/models/tiny/ttl"), ("POST", "/v2/workers/stop"),
              ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
              ("POST", "/v1/chat/completions"), ("GET", "/nope")]
    for method, path in routes:
        for headers in (bad, {}):
            r = httpx.request(method, queen.url + path, headers=headers, json={}, timeout=10)
            assert r.status_code == 401, (method, path, r.text)
            err = r.json()["error"]
            if path.startswith("/v1/"):  # OpenAI clients read OpenAI's shape
                assert err["code"] == "invalid_api_key", (path, err)
                assert err["type"] == "authentication_error" and err["rbee_code"] == "UNAUTHORIZED"
            else:
                assert err["code"] == "UNAUTHORIZED"
    assert httpx.get(queen.url + "/health", timeout=10).status_code == 200


def test_a_full_queue_answers_429_and_loses_nothing(rbee_env: Env, models: list[str]) -> None:
    _hosts(rbee_env, RBEE_WORKER_THREADS="1", RBEE_MAX_RAM_MIB=str(
        int(_estimate("tiny") * 1.5 / MiB)))  # room for one worker only
    q = QueenProc(rbee_env.config, "--queue-size", "5").start()
    try:
        def ask(i: int) -> httpx.Response:
            return httpx.post(f"{q.url}/v1/completions", headers=q.headers, timeout=300,
                              json={"model": "tiny", "prompt": "Hello", "max_tokens": 40,
                                    "temperature": 0, "user": str(i)})

        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(ask, range(20)))
        ok = [a for a in answers if a.status_code == 200]
        busy = [a for a in answers if a.status_code == 429]
        assert len(ok) + len(busy) == 20, [(a.status_code, a.text[:300]) for a in answers
                                           if a.status_code not in (200, 429)]
        assert busy and all(a.headers.get("retry-after") for a in busy)
        assert all(a.json()["error"]["type"] == "rate_limit_error" for a in busy)
        assert len(ok) >= 6  # one running and five queued at least
        assert all(a.json()["choices"][0]["text"].startswith("pqrstuvwxyz") for a in ok)
        ids = [a.json()["id"] for a in ok]
        assert len(set(ids)) == len(ids)
        jobs = q.get("/v2/tasks?limit=1000").json()["tasks"]
        assert len(jobs) == len(ok) and all(j["state"] == "done" for j in jobs)
    finally:
        q.stop()


def test_a_second_model_evicts_the_idle_first_and_says_so(rbee_env: Env,
                                                          models: list[str]) -> None:
    _hosts(rbee_env, RBEE_WORKER_THREADS="1", RBEE_MAX_RAM_MIB=str(
        int(_estimate("tiny") * 1.5 / MiB)))
    q = QueenProc(rbee_env.config).start()
    try:
        first = q.wait(q.submit(model="tiny", prompt="Hello", max_tokens=3, temperature=0))
        assert first["state"] == "done"
        second = q.submit(model="tiny2", prompt="Hello", max_tokens=3, temperature=0)
        events = list(q.events(second))
        evicting = [d for e, d in events if e == "evicting"]
        assert [d["worker"] for d in evicting] == [first["worker"]], events
        assert evicting[0]["model"] == "tiny" and "idle" in evicting[0]["reason"]
        assert events[-1][0] == "end"
        workers = q.state()["workers"]
        assert [w["model"] for w in workers] == ["tiny2"]
        listed = run("rbee-hive", "worker", "list", "--format", "json").json()["workers"]
        assert [w["model"] for w in listed] == ["tiny2"]
        metrics = q.get("/metrics").text
        assert "rbee_queen_evictions_total 1" in metrics
    finally:
        q.stop()


def test_an_idle_worker_stops_after_its_ttl(rbee_env: Env, models: list[str]) -> None:
    _hosts(rbee_env, RBEE_WORKER_THREADS="1")
    q = QueenProc(rbee_env.config, "--ttl", "1.5").start()
    try:
        doc = q.wait(q.submit(model="tiny", prompt="Hello", max_tokens=2))
        assert doc["state"] == "done"
        deadline = time.monotonic() + 15
        while run("rbee-hive", "worker", "list", "--format", "json").json()["workers"]:
            assert time.monotonic() < deadline, "the idle worker outlived its TTL"
            time.sleep(0.3)
        assert q.state()["workers"] == []
        assert "rbee_queen_ttl_stops_total 1" in q.get("/metrics").text
        # a per-model TTL of 0 keeps it for ever
        assert q.post("/v2/models/tiny/ttl", None).status_code == 405
        r = httpx.put(f"{q.url}/v2/models/tiny/ttl", json={"ttl": 0}, headers=q.headers)
        assert r.status_code == 200
        assert q.wait(q.submit(model="tiny", prompt="Hello", max_tokens=2))["state"] == "done"
        time.sleep(3)
        assert len(q.state()["workers"]) == 1
    finally:
        q.stop()


def _worker_pid(worker_id: str) -> int:
    for w in run("rbee-hive", "worker", "list", "--format", "json").json()["workers"]:
        if w["id"] == worker_id:
            return int(w["pid"])
    raise AssertionError(f"no worker {worker_id}")


def test_a_worker_killed_mid_stream_fails_its_job_and_the_next_gets_a_new_one(
        queen: QueenProc) -> None:
    job = queen.submit(model="tiny", prompt="Hello", max_tokens=30000, temperature=0)
    worker = None
    for event, data in queen.events(job):
        if event == "started":
            worker = data["worker"]
        if event == "token" and data["i"] == 5:
            assert worker is not None
            os.kill(_worker_pid(worker), signal.SIGKILL)
    doc = queen.wait(job)
    assert doc["state"] == "failed" and doc["error"]["code"] == "WORKER_CRASHED"
    assert doc["tokens"] >= 6 and doc["text"].startswith("pqrstu")
    nxt = queen.wait(queen.submit(model="tiny", prompt="Hello", max_tokens=3, temperature=0))
    assert nxt["state"] == "done" and nxt["text"] == "pqr"
    assert nxt["worker"] != worker


def test_a_queen_killed_and_restarted_keeps_finished_fails_running_runs_queued(
        rbee_env: Env, models: list[str]) -> None:
    _hosts(rbee_env, RBEE_WORKER_THREADS="1", RBEE_MAX_RAM_MIB=str(
        int(_estimate("tiny") * 1.5 / MiB)))  # one worker: a second job must queue
    q = QueenProc(rbee_env.config).start()
    finished = q.wait(q.submit(model="tiny", prompt="Hello", max_tokens=2))
    running = q.submit(model="tiny", prompt="Hello", max_tokens=30000)
    for event, _ in q.events(running):
        if event == "token":
            break
    queued = q.submit(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    time.sleep(1.0)
    assert q.get(f"/v2/tasks/{queued}").json()["state"] == "queued"
    q.kill()
    q2 = QueenProc(rbee_env.config)
    q2.port = q.port
    q2.start()
    try:
        assert q2.get(f"/v2/tasks/{finished['id']}").json()["state"] == "done"
        failed = q2.get(f"/v2/tasks/{running}").json()
        assert failed["state"] == "failed" and failed["error"]["code"] == "QUEEN_RESTARTED"
        # what it had streamed (a second's worth at least) is still on record
        assert failed["tokens"] > 100 and failed["text"].startswith("pqrstuvwxyz abc")
        assert len(failed["text"]) == failed["tokens"]  # one letter a token
        assert q2.wait(queued)["text"] == "pqr"
        events = list(q2.events(running))
        assert [e for e, _ in events][-1] == "error"
        tokens = [d for e, d in events if e == "token"]
        assert "".join(d["t"] for d in tokens) == failed["text"]
        assert [d["i"] for d in tokens] == list(range(len(tokens)))
    finally:
        q2.stop()


def test_a_client_that_goes_away_cancels_its_job_on_the_worker(queen: QueenProc) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 30000, "stream": True}
    with httpx.stream("POST", f"{queen.url}/v1/completions", json=body, headers=queen.headers,
                      timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 10:
                break  # leave mid-stream
    jobs = queen.get("/v2/tasks").json()["tasks"]
    job = queen.wait(jobs[0]["id"], timeout=30)
    assert job["state"] == "cancelled"
    worker = queen.state()["workers"][0]
    health = httpx.get(f"{worker['url']}/health", timeout=5).json()
    assert health["status"] == "ready"  # the worker is free again, not generating to the end
    # a non-streaming client that leaves cancels too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{queen.url}/v1/completions", headers=queen.headers, timeout=1.5,
                   json={"model": "tiny", "prompt": "Hello", "max_tokens": 30000})
    deadline = time.monotonic() + 20
    while True:
        latest = queen.get("/v2/tasks").json()["tasks"][0]
        if latest["state"] == "cancelled":
            break
        assert time.monotonic() < deadline, json.dumps(latest)[:300]
        time.sleep(0.2)


def test_cli_jobs_and_infer_through_the_queen(queen: QueenProc, rbee_env: Env) -> None:
    env = {"RBEE_QUEEN_URL": queen.url}
    r = run("rbee", "infer", "-m", "tiny", "-p", "Hello", "--max-tokens", "5",
            "--temperature", "0", "--format", "json", env=env)
    assert r.returncode == 0, r
    doc = r.json()
    assert doc["schema"] == "rbee.infer/v1" and doc["text"] == "pqrst"
    assert doc["placement"]["chosen"]["host"] == "localhost"
    text = run("rbee", "infer", "-m", "tiny", "-p", "Hello", "--max-tokens", "3",
               "--temperature", "0", env=env)
    assert text.returncode == 0 and text.stdout == "pqr\n"
    sub = run("rbee", "jobs", "submit", "-m", "tiny", "-p", "Hello", "--max-tokens", "2",
              "--format", "json", env=env)
    assert sub.returncode == 0, sub
    job = sub.json()["id"]
    follow = run("rbee", "jobs", "follow", job, env=env)
    assert follow.returncode == 0 and follow.stdout.startswith("pq")
    status = run("rbee", "jobs", "status", job, "--format", "json", env=env).json()
    assert status["state"] == "done" and status["text"] == "pq"
    listed = run("rbee", "jobs", "list", "--format", "json", env=env).json()
    assert {t["id"] for t in listed["tasks"]} >= {job}
    late = run("rbee", "jobs", "cancel", job, env=env)  # says there was nothing to cancel
    assert late.returncode == 0 and "already ended (done): nothing to cancel" in late.stderr, late
    missing = run("rbee", "infer", "-m", "nope", "-p", "x", "--format", "json", env=env)
    assert missing.returncode == 1 and missing.json()["error"]["code"] == "MODEL_NOT_FOUND"


def test_openai_parameters_pass_through_the_queen_or_are_refused_by_name(
        queen: QueenProc) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{queen.url}/v1", api_key=queen.token, max_retries=0)
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0,
                                  presence_penalty=0.5, frequency_penalty=0.5,
                                  logit_bias={"3": -1.0})
    assert len(r.choices[0].text) == 4
    job = queen.get("/v2/tasks").json()["tasks"][0]
    sent = queen.get(f"/v2/tasks/{job['id']}").json()["request"]["extra"]
    assert sent["presence_penalty"] == 0.5 and sent["logit_bias"] == {"3": -1.0}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Hello", max_tokens=2, logprobs=2)
    assert e.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:  # a prompt longer than the context
        client.completions.create(model="tiny", prompt="Hello " * 6000, max_tokens=2)
    assert e.value.code == "context_length_exceeded"


def test_a_heartbeat_is_taken_only_for_a_known_host_with_a_hive_status(
        rbee_env: Env, models: list[str]) -> None:
    """A heartbeat's status is what placement reads: one without workers killed the
    scheduler (every later job stayed queued, across restarts too), and one for a host not
    in hosts.toml made a host nothing can reach."""
    _hosts(rbee_env, RBEE_WORKER_THREADS="1")
    q = QueenProc(rbee_env.config, "--poll-interval", "60").start()  # the heartbeat stays
    try:
        status = run("rbee-hive", "status", "--format", "json").json()
        refused = [q.post("/v2/heartbeat", {"host": "localhost", "status": {}}),
                   q.post("/v2/heartbeat", {"host": "localhost",
                                            "status": {"schema": status["schema"]}}),
                   q.post("/v2/heartbeat", {"host": "localhost", "status": {
                       **status, "workers": [{}], "devices": [{}]}}),
                   q.post("/v2/heartbeat", {"host": "localhost", "status": {
                       **status, "devices": [{**status["devices"][0], "memory_free": "9"}]}}),
                   q.post("/v2/heartbeat", {"host": "stranger", "status": status})]
        assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [
            (409, "SCHEMA_MISMATCH"), (400, "INVALID_REQUEST"), (400, "INVALID_REQUEST"),
            (400, "INVALID_REQUEST"), (404, "UNKNOWN_HOST")]
        assert "stranger" not in {h["name"] for h in q.state()["hosts"]}
        assert q.post("/v2/heartbeat", {"host": "localhost", "status": status}).status_code \
            == 200
        job = q.submit(model="tiny", prompt="Hello", max_tokens=3)
        assert q.wait(job, timeout=30)["state"] == "done"
    finally:
        q.stop()


def test_a_hosts_heartbeat_token_is_good_for_its_heartbeats_alone(queen: QueenProc) -> None:
    """Pool daemons hold a per-host heartbeat token, not the queen's own: a host broken into
    must not read every job's prompt nor steer the other hosts."""
    from rbee_keeper.queen.tokens import heartbeat_token

    status = run("rbee-hive", "status", "--format", "json").json()
    beat = {"host": "localhost", "status": status}

    def post(path: str, token: str, body: object) -> httpx.Response:
        return httpx.post(queen.url + path, json=body, timeout=30,
                          headers={"Authorization": f"Bearer {token}"})

    mine = heartbeat_token(queen.token, "localhost")
    assert post("/v2/heartbeat", mine, beat).status_code == 200
    assert post("/v2/heartbeat", queen.token, beat).status_code == 200  # a hand-started daemon
    for token, body in ((heartbeat_token(queen.token, "other"), beat),
                        (heartbeat_token("not-the-queens-token", "localhost"), beat),
                        ("localhost.", beat), (mine, {**beat, "host": "other"})):
        r = post("/v2/heartbeat", token, body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED", r.text
    for method, path in (("GET", "/v2/tasks"), ("GET", "/v2/state"), ("POST", "/v2/tasks"),
                         ("POST", "/v2/workers/stop"), ("GET", "/v1/models")):
        r = httpx.request(method, queen.url + path, json={}, timeout=30,
                          headers={"Authorization": f"Bearer {mine}"})
        assert r.status_code == 401, (method, path, r.text)

