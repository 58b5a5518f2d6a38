"""How the controller's own documents look in text mode."""

from __future__ import annotations

import time
from typing import Any

from rbee_common.estimate import human_bytes
from rbee_common.output import console
from rbee_common.textsafe import cell, clean, safe
from rbee_hive.render import table

Doc = dict[str, Any]


def _error_line(err: Doc) -> str:
    return f"[red]{safe(err['code'])}[/]: {safe(err['message'])}"


def render_hosts(doc: Doc) -> None:
    con = console()
    t = table("NAME", "TRANSPORT", "SSH", "WORKERS AT", "HIVE", "ENV")
    for h in doc["hosts"]:
        t.add_row(cell(h["name"]), cell(h["transport"]), cell(h.get("ssh")), cell(h["address"]),
                  cell(h["hive"]), cell(", ".join(h["env_keys"])))
    con.print(t)
    if not doc["exists"]:
        con.print(f"[dim](no {safe(doc['file'])}: the controller itself is the pool; "
                  "add hosts with `rbee hosts add NAME --ssh USER@HOST`)[/]")


def render_host_changed(doc: Doc) -> None:
    verb = "added" if doc["action"] == "add" else "removed"
    console().print(f"{verb} {safe(doc['name'])} ({safe(doc['file'])})")
    if doc["action"] == "add":
        console().print(f"[dim]check it with `rbee hosts check {safe(doc['name'])}`[/]")


def _devices(status: Doc) -> str:
    available = {b["name"] for b in status["backends"] if b["available"]}
    return ", ".join(f"{d['backend']}:{d['index']} {human_bytes(d.get('memory_free'))} free"
                     for d in status["devices"] if d["backend"] in available)  # numbers only


def render_pool_status(doc: Doc) -> None:
    con = console()
    t = table("HOST", "STATE", "DEVICES", "MODELS", "WORKERS", "TIME")
    problems = []
    for h in doc["hosts"]:
        took = f"{h['elapsed_ms'] / 1000:.1f}s"
        if not h["ok"]:
            t.add_row(cell(h["name"]), cell("error", "red"), "", "", "", took)
            problems.append(f"{safe(h['name'])}: {_error_line(h['error'])}")
            continue
        st = h["status"]
        workers = st["workers"]
        summary = ", ".join([*(f"{w['id']} {w['state']} ({w['model']})" for w in workers),
                             *(f"{r['id']} {r['state']} (lends {r['device']})"
                               for r in st.get("lenders", []))]) or "-"
        t.add_row(cell(h["name"]), cell("ok", "green"), cell(_devices(st)),
                  cell(", ".join(m["id"] for m in st["models"]) or "-"), cell(summary), took)
    con.print(t)
    for p in problems:
        console(stderr=True).print(p)


def render_check(doc: Doc) -> None:
    con = console()
    for h in doc["hosts"]:
        steps = " ".join(f"{c['check']}:{'[green]ok[/]' if c['ok'] else '[red]fail[/]'}"
                         if c["ok"] is not None else f"[dim]{c['check']}:-[/]"
                         for c in h["checks"])
        con.print(f"[bold]{safe(h['name'])}[/]  {steps}")
        if h["ok"]:
            st = h["status"]
            con.print(f"  rbee {safe(st['host']['rbee_version'])} on "
                      f"{safe(st['host']['hostname'])}; {safe(_devices(st))}")
        else:
            con.print(f"  {_error_line(h['error'])}")
            if h["error"].get("hint"):
                con.print(f"  [dim]Hint: {safe(h['error']['hint'])}[/]")


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
            con.print(f"[bold]{safe(h['name'])}[/]  [red]failed[/] ({took})")
            missing = err.get("details", {}).get("missing")
            if missing:
                for p in missing:
                    con.print(f"  missing {safe(p['piece'])}: {safe(p['message'])}")
                    con.print(f"    fix: {safe(p['fix'])}")
                con.print("  [dim]Nothing was changed.[/]")
            else:
                con.print(f"  {_error_line(err)}")
                if err.get("hint"):
                    con.print(f"  [dim]Hint: {safe(err['hint'])}[/]")
            continue
        i = h["install"]
        after = i["after"] or {}
        llama = after.get("llama_cpp") or {}
        build = f"llama-cpp-python {llama.get('version')}" + (" +rpc" if llama.get("rpc") else "")
        con.print(f"[bold]{safe(h['name'])}[/]  {INSTALL_VERBS[i['action']]} rbee "
                  f"{safe(after.get('version'))} ({safe(i['backend'])}; {safe(build)}) in {took}")
        con.print(f"  hive = {safe(i['hive'])} (hosts.toml {i['hosts_toml']})")
        con.print(f"  {_steps(i['check']['checks'])}")
        if i.get("hint"):
            con.print(f"  [dim]Hint: {safe(i['hint'])}[/]")


def render_workers(doc: Doc) -> None:
    con = console()
    t = table("HOST", "ID", "STATE", "MODEL", "DEVICE", "URL")
    for w in doc["workers"]:
        t.add_row(cell(w["host"]), cell(w["id"]), cell(w["state"]), cell(w["model"]),
                  cell(f"{w['backend']}:{w['device']}"), cell(w["url"]))
    if doc["workers"]:
        con.print(t)
    else:
        con.print("[dim]No workers.[/]")
    for h in doc["hosts"]:
        if not h["ok"]:
            console(stderr=True).print(f"{safe(h['name'])}: {_error_line(h['error'])}")


def infer_summary(doc: Doc) -> str:
    t = doc["timings"]
    w = doc["worker"]
    tps = t.get("tokens_per_sec")
    rate = f"{tps:.1f} tok/s · " if tps else ""
    return (f"[dim]{doc['tokens']} tokens · {rate}first token {t['ttft_ms']:.0f} ms · "
            f"{safe(doc['host'])} {safe(w['backend'])}:{safe(w['device'])} {safe(w['id'])} "
            f"({safe(doc['placement']['path'])})"
            f" · {t['total_ms'] / 1000:.2f}s[/]" + _split_line(doc))


def _split_line(doc: Doc) -> str:
    split = (doc["placement"].get("chosen") or {}).get("split")
    if not split:
        return ""
    parts = " + ".join(f"{safe(d['host'])} {safe(d['backend'])}:{safe(d['device'])} "
                       f"{d['fraction']:.0%}" for d in split["devices"])
    return f"\n[dim]split across {len(split['hosts'])} hosts: {parts}[/]"


def render_stopped_all(doc: Doc) -> None:
    con = console()
    if not doc["stopped"]:
        con.print("[dim]No workers to stop.[/]")
    for s in doc["stopped"]:
        how = f" ({s['signal']})" if s.get("signal") else " (was not running)"
        con.print(f"stopped {safe(s['id'])} on {safe(s['host'])}{how}")
    for h in doc["hosts"]:
        if not h["ok"]:
            console(stderr=True).print(f"{safe(h['name'])}: {_error_line(h['error'])}")


def render_queen(doc: Doc) -> None:
    con = console()
    if not doc["running"]:
        con.print("queen: [dim]not running[/]" + (f" (stopped pid {doc['pid']})"
                                                 if doc.get("pid") else ""))
        return
    con.print(f"queen: [green]running[/] on {safe(doc['url'])} (pid {doc['pid']}, "
              f"since {safe(doc.get('started_at'))})")
    s = doc.get("summary")
    if s:
        con.print(f"  hosts {s['hosts_up']}/{s['hosts']} up · workers {s['workers']} · "
                  f"queued {s['queued']} · running {s['running']}")
    if doc.get("log"):
        con.print(f"[dim]log: {safe(doc['log'])}; token: `rbee queen token`[/]")


def render_token_doc(doc: Doc) -> None:
    console().print(clean(doc["token"]), markup=False)


def render_job(doc: Doc) -> None:
    con = console()
    con.print(f"[bold]{safe(doc['id'])}[/] {safe(doc['state'])}  {safe(doc['model'])}"
              + (f"  on {safe(doc['host'])} {safe(doc.get('worker') or '')}"
                 if doc.get("host") else "")
              + (f"  (position {doc['position']})" if doc.get("position") else ""))
    if doc.get("error"):
        con.print(f"  {_error_line(doc['error'])}")
    if doc.get("text"):
        con.print(clean(doc["text"]), markup=False)


def render_jobs(doc: Doc) -> None:
    con = console()
    if not doc["tasks"]:
        con.print("[dim]No jobs.[/]")
        return
    t = table("ID", "STATE", "MODEL", "HOST", "TOKENS", "CREATED")
    for j in doc["tasks"]:
        created = time.strftime("%H:%M:%S", time.localtime(j["created"]))
        t.add_row(cell(j["id"]), cell(j["state"]), cell(j["model"]), cell(j.get("host")),
                  cell(j.get("tokens") or 0), created)
    con.print(t)


def render_submitted(doc: Doc) -> None:
    console().print(clean(doc["id"]), markup=False)
