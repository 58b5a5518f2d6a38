"""The web UI's live pages under the pointer, in a real browser (Debian's chromium driven by
Playwright) against a real queen with one local host and real workers on the tiny model.

The Pool, Models and Jobs pages redraw parts of themselves as the queen's pool stream says
what changed (several times a second while a job streams). A control the user is pressing,
hovering or has opened must survive those redraws: the same element, with the latest
render's handlers. A control that is replaced between a mouse press and its release gets
no click at all, and an open <select> that is replaced closes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CHROMIUM, Env
from tests.helpers import run
from tests.queenproc import QueenProc
from tests.test_ui import watched_page

pytestmark = [pytest.mark.browser]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
LONG = 30_000  # tokens: a job that streams for many seconds on the tiny model


@dataclass
class Live:
    queen: QueenProc
    browser: Any
    state: dict[str, Any]

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.queen.url + path, headers=self.queen.headers,
                             timeout=30, **kw)

    def submit(self, model: str, max_tokens: int = LONG) -> str:
        r = self.api("POST", "/v2/tasks", json={"model": model, "prompt": "Hello",
                                                "max_tokens": max_tokens, "temperature": 0})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.api("GET", f"/v2/tasks/{job_id}").json())

    def wait_tokens(self, job_id: str, at_least: int = 20) -> None:
        deadline = time.monotonic() + 60
        while self.job(job_id)["tokens"] < at_least:
            assert time.monotonic() < deadline, self.job(job_id)
            time.sleep(0.05)

    def cancel_all(self) -> None:
        for j in self.api("GET", "/v2/tasks").json()["tasks"]:
            if j["state"] not in ("done", "failed", "cancelled"):
                self.api("POST", f"/v2/tasks/{j['id']}/cancel")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Live]:
    from playwright.sync_api import sync_playwright

    root = tmp_path_factory.mktemp("ui-live")
    env = Env(root, root / "home", root / "rbee-home", root / "config")
    for d in (env.home, env.config):
        d.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"HOME": str(env.home), "RBEE_HOME": str(env.rbee_home),
                     "RBEE_CONFIG_DIR": str(env.config), "NO_COLOR": "1", "COLUMNS": "200",
                     "TERM": "dumb", "HF_HOME": str(root / "hf")}.items():
            mp.setenv(k, v)
        for k in ("SSH_AUTH_SOCK", "HF_TOKEN", "HF_ENDPOINT", "RBEE_DEBUG", "RBEE_RESERVE_MIB",
                  "RBEE_LOAD_TIMEOUT", "RBEE_WORKER_BIND", "RBEE_QUEEN_URL"):
            mp.delenv(k, raising=False)
        (env.config / "hosts.toml").write_text(
            '[hosts.localhost]\ntransport = "local"\nenv = { RBEE_WORKER_THREADS = "1" }\n')
        for mid in ("tiny", "tiny2"):
            r = run("rbee-hive", "models", "import", str(tiny_model), "--id", mid, "--copy")
            assert r.returncode == 0, r
        queen = QueenProc(env.config, "--poll-interval", "0.5").start()
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                ctx = browser.new_context(viewport={"width": 1280, "height": 900})
                page = ctx.new_page()
                page.goto(queen.url + "/signin")
                page.fill("#token", queen.token)
                page.click("button[type=submit]")
                page.wait_for_selector("h1:text('Pool')")
                state = ctx.storage_state()
                ctx.close()
                yield Live(queen, browser, state)
                browser.close()
        finally:
            queen.stop()
            from rbee_hive.workers import stop_all

            stop_all(grace=3.0)


@pytest.fixture
def page(live: Live) -> Iterator[Any]:
    """A signed-in page; it fails the test on any script error."""
    ctx = live.browser.new_context(viewport={"width": 1280, "height": 900},
                                   storage_state=live.state)
    ctx.set_default_timeout(30_000)
    try:
        yield from watched_page(ctx)
    finally:
        live.cancel_all()


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as expect_

    return expect_(locator)


def slow_click(page: Any, locator: Any, hold_ms: int) -> None:
    """Press the mouse on the control, hold it (a hesitant user, a touchpad), release it."""
    box = locator.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.wait_for_timeout(hold_ms)
    page.mouse.up()


def test_a_slow_click_on_cancel_lands_while_the_jobs_table_refreshes(live: Live,
                                                                    page: Any) -> None:
    job = live.submit("tiny")
    live.wait_tokens(job)
    page.goto(live.queen.url + "/#/jobs")
    button = page.locator(f"tr[data-job={job}]").get_by_role("button", name=f"Cancel {job}")
    expect(button).to_be_visible()
    # the table reloads at most once a second while the job streams: hold across a reload
    slow_click(page, button, 1600)
    deadline = time.monotonic() + 15
    while live.job(job)["state"] != "cancelled":
        assert time.monotonic() < deadline, f"the click was lost: {live.job(job)['state']}"
        time.sleep(0.1)
    expect(page.locator(f"tr[data-job={job}] .pill")).to_have_text("cancelled")


def test_a_hovered_button_and_a_chosen_host_stay_put_while_a_job_streams(live: Live,
                                                                        page: Any) -> None:
    # a worker for tiny2 to point at, and a worker for tiny that streams meanwhile
    for model in ("tiny2", "tiny"):
        assert live.job(live.submit(model, 3))["state"] in ("queued", "placed", "running",
                                                            "done")
    deadline = time.monotonic() + 60
    while len(live.api("GET", "/v2/state").json()["workers"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    workers = {w["model"]: w["id"] for w in live.api("GET", "/v2/state").json()["workers"]}

    page.goto(live.queen.url + "/")
    log = page.get_by_role("button", name=f"Log of {workers['tiny2']}")
    expect(log).to_be_visible()
    log.hover()
    held = log.element_handle()
    job = live.submit("tiny")
    live.wait_tokens(job, 200)
    page.wait_for_timeout(1500)  # the card's requests and tokens change several times a second
    # kept, not replaced (whether it is still under the pointer depends on the rows above
    # it, which may grow as the job streams: layout, not what this guards)
    assert held.evaluate("el => el.isConnected"), "the hovered Log button was replaced"
    held.click()  # and it still does what it says, with the latest render's handler
    expect(page.locator("#logs pre")).to_contain_text("ready on", timeout=10_000)
    page.keyboard.press("Escape")
    live.api("POST", f"/v2/tasks/{job}/cancel")

    page.goto(live.queen.url + "/#/models")
    row = page.locator("tr[data-model=tiny2]")
    select = row.locator("select")
    expect(select).to_be_visible()
    select.focus()  # as when its list is open
    held = select.element_handle()
    for _ in range(3):  # each job turns a worker busy, then idle: the table is redrawn
        live.wait_tokens(live.submit("tiny", 40), 40)
        page.wait_for_timeout(700)
    assert held.evaluate("el => el.isConnected"), "the focused host <select> was replaced"
    assert held.evaluate("el => document.activeElement === el")
    # the row's buttons read the host from the row they are in, whatever render drew them
    start = row.get_by_role("button", name="Start worker")
    start.click()
    expect(page.locator("li.op").filter(has_text="Start worker")).to_have_class(
        "op op-done", timeout=60_000)
