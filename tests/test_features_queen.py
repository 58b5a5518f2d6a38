"""Steps for tests/features/queen.feature: a real queen over real sshd hosts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

import tests.test_features as common
from tests.conftest import Env
from tests.helpers import run
from tests.queenproc import QueenProc

# the steps of test_features.py (a pool over SSH, the catalog on the hub): pytest-bdd keeps
# each step as a fixture of the module that defines it, so they are brought here as such
globals().update({name: value for name, value in vars(common).items()
                  if name.startswith("pytestbdd_stepdef_")})

scenarios("queen.feature")


class QueenWorld:
    def __init__(self) -> None:
        self.answer = ""
        self.jobs: list[str] = []
        self.first_worker: str | None = None


@pytest.fixture
def qworld() -> QueenWorld:
    return QueenWorld()


@pytest.fixture
def queen_proc(rbee_env: Env) -> Iterator[QueenProc]:
    q = QueenProc(rbee_env.config, "--poll-interval", "1")
    yield q
    q.stop()


@given("the queen is running", target_fixture="queen")
def queen_running(queen_proc: QueenProc) -> QueenProc:
    return queen_proc.start()


def _complete(queen: QueenProc, prompt: str, model: str, n: int) -> Any:
    import openai

    client = openai.OpenAI(base_url=f"{queen.url}/v1", api_key=queen.token, max_retries=0)
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)


@when(parsers.parse('an OpenAI client asks the queen to complete "{prompt}" with "{model}" '
                    'in {n:d} tokens'))
def ask(queen: QueenProc, qworld: QueenWorld, prompt: str, model: str, n: int) -> None:
    r = _complete(queen, prompt, model, n)
    qworld.answer = r.choices[0].text
    qworld.jobs = [j["id"] for j in queen.get("/v2/tasks").json()["tasks"]]


@then(parsers.parse('the answer is "{text}"'))
def answer_is(qworld: QueenWorld, text: str) -> None:
    assert qworld.answer == text


@then("the job's events say it was placed, downloaded, loaded and started")
def events_say(queen: QueenProc, qworld: QueenWorld) -> None:
    names = [e for e, _ in queen.events(qworld.jobs[0])]
    for name in ("queued", "placed", "downloading", "loading", "started", "end"):
        assert name in names, names
    doc = queen.get(f"/v2/tasks/{qworld.jobs[0]}").json()
    qworld.first_worker = doc["worker"]


@then("`rbee jobs list` shows the job done on the host it was placed on")
def jobs_list(queen: QueenProc, qworld: QueenWorld) -> None:
    r = run("rbee", "jobs", "list", "--format", "json", env={"RBEE_QUEEN_URL": queen.url})
    assert r.returncode == 0, r
    (job,) = [j for j in r.json()["tasks"] if j["id"] == qworld.jobs[0]]
    assert job["state"] == "done" and job["host"] in ("h1", "h2")
    assert job["placement"]["host"] == job["host"]


@then("that job ran on the worker that was already warm")
def warm(queen: QueenProc, qworld: QueenWorld) -> None:
    doc = queen.get(f"/v2/tasks/{qworld.jobs[0]}").json()
    assert doc["worker"] == qworld.first_worker
    assert doc["placement"]["path"] == "warm"


@given("the queen has answered a job")
def answered(queen: QueenProc, qworld: QueenWorld) -> None:
    assert _complete(queen, "Hello", "tiny", 2).choices[0].text == "pq"
    qworld.jobs = [j["id"] for j in queen.get("/v2/tasks").json()["tasks"]]


@when("the queen is killed and started again")
def restart(queen: QueenProc) -> None:
    queen.kill()
    queen.start()


@then("`rbee jobs list` still shows that job done")
def still_done(queen: QueenProc, qworld: QueenWorld) -> None:
    r = run("rbee", "jobs", "list", "--format", "json", env={"RBEE_QUEEN_URL": queen.url})
    states = {j["id"]: j["state"] for j in r.json()["tasks"]}
    assert states[qworld.jobs[0]] == "done"


@then(parsers.parse('`rbee infer` through the queen still answers "{prompt}" with "{text}"'))
def infer_through(queen: QueenProc, prompt: str, text: str) -> None:
    r = run("rbee", "infer", "-m", "tiny", "-p", prompt, "--max-tokens", str(len(text)),
            "--temperature", "0", env={"RBEE_QUEEN_URL": queen.url})
    assert r.returncode == 0 and r.stdout == text + "\n", r
