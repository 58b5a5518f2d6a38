"""How the controller's own documents look in text mode."""

from __future__ import annotations

import time
from typing import Any

from rich.markup import escape

from rbee_common.estimate import human_bytes
from rbee_common.output import console
from rbee_hive.render import table

Doc = dict[str, Any]


def _error_line(err: Doc) -> str:
    return f"[red]{err['code']}[/]: {escape(err['message'])}"


def render_hosts(doc: Doc) -> None:
    con = console()
    t = table("NAME", "TRANSPORT", "SSH", "WORKERS AT", "HIVE", "ENV")
    for h in doc["hosts"]:
        t.add_row(h["name"], h["transport"], h.get("ssh") or "", h["address"], h["hive"],
                  ", ".join(h["env_keys"]))
    con.print(t)
    if not doc["exists"]:
        con.print(f"[dim](no {escape(doc['file'])}: the controller itself is the pool; "
                  "add hosts with `rbee hosts add NAME --ssh USER@HOST`)[/]")


def render_host_changed(doc: Doc) -> None:
    verb = "added" if doc["action"] == "add" else "removed"
    console().print(f"{verb} {doc['name']} ({escape(doc['file'])})")
    if doc["action"] == "add":
        console().print(f"[dim]check it with `rbee hosts check {doc['name']}`[/]")


def _devices(status: Doc) -> str:
    available = {b["name"] for b in status["backends"] if b["available"]}
    return ", ".join(f"{d['backend']}:{d['index']} {human_bytes(d.get('memory_free'))} free"
                     for d in status["devices"] if d["backend"] in available)


def render_pool_status(doc: Doc) -> None:
    con = console()
    t = table("HOST", "STATE", "DEVICES", "MODELS", "WORKERS", "TIME")
    problems = []
    for h in doc["hosts"]:
        took = f"{h['elapsed_ms'] / 1000:.1f}s"
        if not h["ok"]:
            t.add_row(h["name"], "[red]error[/]", "", "", "", took)
            problems.append(f"{h['name']}: {_error_line(h['error'])}")
            continue
        st = h["status"]
        workers = st["workers"]
        summary = ", ".join(f"{w['id']} {w['state']} ({w['model']})" for w in workers) or "-"
        t.add_row(h["name"], "[green]ok[/]", _devices(st),
                  ", ".join(m["id"] for m in st["models"]) or "-", summary, took)
    con.print(t)
    for p in problems:
        console(stderr=True).print(p)


def render_check(doc: Doc) -> None:
    con = console()
    for h in doc["hosts"]:
        steps = " ".join(f"{c['check']}:{'[green]ok[/]' if c['ok'] else '[red]fail[/]'}"
                         if c["ok"] is not None else f"[dim]{c['check']}:-[/]"
                         for c in h["checks"])
        con.print(f"[bold]{h['name']}[/]  {steps}")
        if h["ok"]:
            st = h["status"]
            con.print(f"  rbee {st['host']['rbee_version']} on {st['host']['hostname']}; "
                      f"{_devices(st)}")
        else:
            con.print(f"  {_error_line(h['error'])}")
            if h["error"].get("hint"):
                con.print(f"  [dim]Hint: {escape(h['error']['hint'])}[/]")


def _steps(checks: list[Doc]) -> str:
    return " ".join(f"{c['check']}:{'[green]ok[/]' if c['ok'] else '[red]fail[/]'}"
                    if c["ok"] is not None else f"[dim]{c['check']}:-[/]" for c in checks)


INSTALL_VERBS = {"installed": "installed", "upgraded": "upgraded to",
                 "rebuilt": "rebuilt llama-cpp-python for", "none": "already has"}


def render_install(doc: Doc) -> None:
    con = console()
    for h in doc["hosts"]:
        took = f"{h['elapsed_ms'] / 1000:.1f}s"
        if not h["ok"]:
            err = h["error"]
            con.print(f"[bold]{h['name']}[/]  [red]failed[/] ({took})")
            missing = err.get("details", {}).get("missing")
            if missing:
                for p in missing:
                    con.print(f"  missing {escape(p['piece'])}: {escape(p['message'])}")
                    con.print(f"    fix: {escape(p['fix'])}")
                con.print("  [dim]Nothing was changed.[/]")
            else:
                con.print(f"  {_error_line(err)}")
                if err.get("hint"):
                    con.print(f"  [dim]Hint: {escape(err['hint'])}[/]")
            continue
        i = h["install"]
        after = i["after"] or {}
        llama = after.get("llama_cpp") or {}
        build = f"llama-cpp-python {llama.get('version')}" + (" +rpc" if llama.get("rpc") else "")
        con.print(f"[bold]{h['name']}[/]  {INSTALL_VERBS[i['action']]} rbee "
                  f"{escape(str(after.get('version')))} ({i['backend']}; {build}) in {took}")
        con.print(f"  hive = {escape(i['hive'])} (hosts.toml {i['hosts_toml']})")
        con.print(f"  {_steps(i['check']['checks'])}")
        if i.get("hint"):
            con.print(f"  [dim]Hint: {escape(i['hint'])}[/]")


def render_workers(doc: Doc) -> None:
    con = console()
    t = table("HOST", "ID", "STATE", "MODEL", "DEVICE", "URL")
    for w in doc["workers"]:
        t.add_row(w["host"], w["id"], w["state"], w["model"], f"{w['backend']}:{w['device']}",
                  w["url"])
    if doc["workers"]:
        con.print(t)
    else:
        con.print("[dim]No workers.[/]")
    for h in doc["hosts"]:
        if not h["ok"]:
            console(stderr=True).print(f"{h['name']}: {_error_line(h['error'])}")


def infer_summary(doc: Doc) -> str:
    t = doc["timings"]
    w = doc["worker"]
    tps = t.get("tokens_per_sec")
    rate = f"{tps:.1f} tok/s · " if tps else ""
    return (f"[dim]{doc['tokens']} tokens · {rate}first token {t['ttft_ms']:.0f} ms · "
            f"{doc['host']} {w['backend']}:{w['device']} {w['id']} ({doc['placement']['path']})"
            f" · {t['total_ms'] / 1000:.2f}s[/]")


def render_stopped_all(doc: Doc) -> None:
    con = console()
    if not doc["stopped"]:
        con.print("[dim]No workers to stop.[/]")
    for s in doc["stopped"]:
        how = f" ({s['signal']})" if s.get("signal") else " (was not running)"
        con.print(f"stopped {escape(s['id'])} on {escape(s['host'])}{how}")
    for h in doc["hosts"]:
        if not h["ok"]:
            console(stderr=True).print(f"{h['name']}: {_error_line(h['error'])}")


def render_queen(doc: Doc) -> None:
    con = console()
    if not doc["running"]:
        con.print("queen: [dim]not running[/]" + (f" (stopped pid {doc['pid']})"
                                                 if doc.get("pid") else ""))
        return
    con.print(f"queen: [green]running[/] on {escape(str(doc['url']))} (pid {doc['pid']}, "
              f"since {doc.get('started_at')})")
    s = doc.get("summary")
    if s:
        con.print(f"  hosts {s['hosts_up']}/{s['hosts']} up · workers {s['workers']} · "
                  f"queued {s['queued']} · running {s['running']}")
    if doc.get("log"):
        con.print(f"[dim]log: {escape(doc['log'])}; token: `rbee queen token`[/]")


def render_token_doc(doc: Doc) -> None:
    console().print(doc["token"], markup=False)


def render_job(doc: Doc) -> None:
    con = console()
    con.print(f"[bold]{escape(doc['id'])}[/] {doc['state']}  {escape(doc['model'])}"
              + (f"  on {escape(str(doc['host']))} {escape(str(doc.get('worker') or ''))}"
                 if doc.get("host") else "")
              + (f"  (position {doc['position']})" if doc.get("position") else ""))
    if doc.get("error"):
        con.print(f"  {_error_line(doc['error'])}")
    if doc.get("text"):
        con.print(escape(doc["text"]))


def render_jobs(doc: Doc) -> None:
    con = console()
    if not doc["tasks"]:
        con.print("[dim]No jobs.[/]")
        return
    t = table("ID", "STATE", "MODEL", "HOST", "TOKENS", "CREATED")
    for j in doc["tasks"]:
        created = time.strftime("%H:%M:%S", time.localtime(j["created"]))
        t.add_row(escape(j["id"]), j["state"], escape(j["model"]), escape(str(j.get("host") or "")),
                  str(j.get("tokens") or 0), created)
    con.print(t)


def render_submitted(doc: Doc) -> None:
    console().print(doc["id"], markup=False)
