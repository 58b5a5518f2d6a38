"""How rbee-hive documents look in text mode, keyed by their schema name.

The keeper imports this too: `rbee pool … --host NAME` shows a remote document exactly as
the hive itself would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rbee_common.estimate import human_bytes
from rbee_common.names import WorkerState
from rbee_common.output import console
from rbee_common.textsafe import cell, clean, safe
from rbee_hive import schemas

Doc = dict[str, Any]


def table(*columns: str) -> Any:
    from rich.table import Table

    t = Table(box=None, pad_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def _print(*things: Any) -> None:
    con = console()
    for t in things:
        con.print(t)


def human_params(n: int | None) -> str:
    if not n:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _mem(d: Doc) -> str:
    return f"{human_bytes(d.get('memory_free'))} free / {human_bytes(d.get('memory_total'))}"


def devices_table(doc: Doc) -> Any:
    t = table("DEVICE", "NAME", "MEMORY")
    for d in doc["devices"]:
        t.add_row(cell(f"{d['backend']}:{d['index']}"), cell(d.get("name")), cell(_mem(d)))
    return t


def backends_line(doc: Doc) -> str:
    parts = []
    for b in doc["backends"]:
        parts.append(safe(b["name"]) if b["available"]
                     else f"[dim]{safe(b['name'])} ({safe(b['reason'])})[/]")
    return "backends: " + ", ".join(parts)


def models_table(models: list[Doc]) -> Any:
    t = table("ID", "SIZE", "QUANT", "PARAMS", "CTX", "SOURCE")
    for m in models:
        g = m.get("gguf", m)
        files = len(m.get("shards") or ())
        size = human_bytes(m.get("size")) + (f" in {files} files" if files > 1 else "")
        t.add_row(cell(m["id"]), cell(size), cell(g.get("file_type")),
                  cell(human_params(g.get("parameters"))), cell(g.get("context_length")),
                  cell(m.get("source", "")))
    return t


def workers_table(workers: list[Doc]) -> Any:
    t = table("ID", "STATE", "MODEL", "DEVICE", "URL", "PID")
    for w in workers:
        state = w["state"]
        style = {WorkerState.ready: "green", WorkerState.busy: "yellow",
                 WorkerState.loading: "cyan"}.get(state, "red")
        lenders = len(w.get("rpc") or [])
        device = f"{w['backend']}:{w['device']}" + (
            f" + {lenders} lender{'s' if lenders > 1 else ''}" if lenders else "")
        t.add_row(cell(w["id"]), cell(state, style), cell(w["model"]), cell(device),
                  cell(w["url"]), cell(w["pid"]))
    return t


def lenders_table(lenders: list[Doc]) -> Any:
    t = table("ID", "STATE", "DEVICE", "ENDPOINT", "HELD", "FREE", "PID")
    for r in lenders:
        state = r["state"]
        style = {WorkerState.ready: "green", WorkerState.busy: "yellow",
                 WorkerState.loading: "cyan"}.get(state, "red")
        t.add_row(cell(r["id"]), cell(state, style), cell(r["device"]), cell(r["endpoint"]),
                  cell(human_bytes(r.get("memory_bytes"))), cell(human_bytes(r.get("free_bytes"))),
                  cell(r["pid"]))
    return t


def split_line(doc: Doc) -> str | None:
    """A split worker's devices and shares, one line ("rpc:HOST:PORT 50% · cpu:0 50%")."""
    split = doc.get("split") or []
    if not doc.get("rpc") and len(split) < 2:
        return None
    parts = [f"{safe(d['device'])} {d['share'] * 100:.0f}%"
             + (f" ({human_bytes(d['bytes'])})" if d.get("bytes") else "") for d in split]
    return "split: " + " · ".join(parts)


def _worker_problems(workers: list[Doc]) -> list[str]:
    out = []
    for w in workers:
        if w["state"] in (WorkerState.dead, WorkerState.error):
            out.append(f"[red]{safe(w['id'])}[/]: {safe(w.get('message') or w['state'])}")
            out += [f"  [dim]│ {safe(line)}[/]" for line in (w.get("log_tail") or [])[-5:]]
    return out


def render_status(doc: Doc) -> None:
    h = doc["host"]
    _print(f"[bold]{safe(h['hostname'])}[/] ({safe(h['platform'])} {safe(h['machine'])}, "
           f"rbee {safe(h['rbee_version'])})",
           backends_line(doc), devices_table(doc))
    _print(f"\n[bold]models[/] ({len(doc['models'])})")
    if doc["models"]:
        _print(models_table(doc["models"]))
    _print(f"\n[bold]workers[/] ({len(doc['workers'])})")
    if doc["workers"]:
        _print(workers_table(doc["workers"]), *_worker_problems(doc["workers"]))
    if doc.get("lenders"):
        _print(f"\n[bold]RPC lenders[/] ({len(doc['lenders'])})", lenders_table(doc["lenders"]),
               *_worker_problems(doc["lenders"]))


def render_detect(doc: Doc) -> None:
    _print(backends_line(doc), devices_table(doc))


def render_catalog(doc: Doc) -> None:
    t = table("ID", "NAME", "SIZE", "HERE", "SOURCE")
    for m in doc["models"]:
        t.add_row(cell(m["id"]), cell(m["name"]),
                  cell(human_bytes(m.get("size")) if m.get("size") else ""),
                  cell("yes" if m.get("downloaded") else ""), cell(m["source"]))
    _print(t)


def render_models(doc: Doc) -> None:
    if not doc["models"]:
        _print("[dim]No models yet: `rbee-hive models download tinyllama`[/]")
        return
    _print(models_table(doc["models"]))


def render_model(doc: Doc) -> None:
    g = doc.get("gguf") or {}
    lines = [f"[bold]{safe(doc['id'])}[/]  {safe(doc.get('name', ''))}",
             f"source: {safe(doc.get('source'))}"]
    if doc.get("path"):
        lines.append(f"path: {safe(doc['path'])}")
    if doc.get("size"):
        lines.append(f"size: {human_bytes(doc['size'])} ({doc['size']} bytes)")
    shards = doc.get("shards") or []
    if len(shards) > 1:
        lines.append(f"files: {len(shards)}, loaded from the first (llama.cpp finds the "
                     "others by name)")
    if doc.get("sha256"):
        lines.append(f"sha256: {safe(doc['sha256'])}")
    if g:
        lines.append(f"architecture: {safe(g.get('architecture'))}  parameters: "
                     f"{human_params(g.get('parameters'))}  quantisation: "
                     f"{safe(g.get('file_type'))}")
        lines.append(f"layers: {g.get('block_count')}  context: {g.get('context_length')}  "
                     f"heads: {g.get('head_count')}  KV heads: {g.get('head_count_kv')}")
    est = doc.get("estimate")
    if est:
        lines.append(f"memory at ctx {est['ctx']}: {human_bytes(est['total_bytes'])} "
                     f"({human_bytes(est['weights_bytes'])} weights + "
                     f"{human_bytes(est['kv_bytes'])} KV cache + "
                     f"{human_bytes(est['overhead_bytes'])} overhead)")
    if "downloaded" in doc and not doc["downloaded"]:
        lines.append(f"[dim]not on this host: `rbee-hive models download {safe(doc['id'])}`[/]")
    if doc.get("already_present"):
        lines.append("[dim]already on this host[/]")
    elif doc.get("transferred_bytes") is not None and doc.get("resumed_from"):
        lines.append(f"resumed from byte {doc['resumed_from']}, "
                     f"transferred {human_bytes(doc['transferred_bytes'])}")
    _print(*lines)


def render_verify(doc: Doc) -> None:
    _print(f"{safe(doc['id'])}: [green]ok[/] (sha256 {safe(doc['sha256'])})")


def render_removed(doc: Doc) -> None:
    freed = doc.get("freed_bytes")
    _print(f"removed {safe(doc['id'])} ({human_bytes(freed)} freed)" if freed else
           f"removed {safe(doc['id'])} (no space freed: its bytes have another name, such as "
           "the file it was imported from or the Hugging Face cache)")


def render_worker(doc: Doc) -> None:
    _print(f"[bold]{safe(doc['id'])}[/] {safe(doc['state'])}  {safe(doc['model'])} on "
           f"{safe(doc['backend'])}:{safe(doc['device'])}  {safe(doc['url'])}  "
           f"pid {safe(doc['pid'])}")
    line = split_line(doc)
    if line:
        _print(line)


def render_lender(doc: Doc) -> None:
    _print(f"[bold]{safe(doc['id'])}[/] {safe(doc['state'])}  lends {safe(doc['device'])} at "
           f"{safe(doc['endpoint'])}  pid {safe(doc['pid'])}  "
           f"{human_bytes(doc.get('free_bytes'))} free of {human_bytes(doc.get('total_bytes'))}")
    if doc.get("insecure"):
        _print(f"[yellow]listening on {safe(doc['host'])} with no authentication or "
               "encryption (--insecure)[/]")


def render_lenders(doc: Doc) -> None:
    if not doc["lenders"]:
        _print("[dim]No lenders: `rbee-hive rpc start --device cpu:0`[/]")
        return
    _print(lenders_table(doc["lenders"]), *_worker_problems(doc["lenders"]))


def render_workers(doc: Doc) -> None:
    if not doc["workers"]:
        _print("[dim]No workers: `rbee-hive worker spawn cpu --model MODEL`[/]")
        return
    _print(workers_table(doc["workers"]), *_worker_problems(doc["workers"]))


def render_health(doc: Doc) -> None:
    _print(f"{safe(doc['worker_id'])}: {safe(doc['status'])}  {safe(doc['model'])} on "
           f"{safe(doc['backend'])}:{safe(doc['device'])}  ctx {safe(doc['ctx'])}  "
           f"up {doc['uptime_s']:.0f}s")
    line = split_line(doc)
    if line:
        _print(line)


def render_stopped(doc: Doc) -> None:
    stopped = doc.get("stopped", [doc])
    if not stopped:
        _print("[dim]Nothing to stop.[/]")
    for s in stopped:
        how = f" ({s['signal']})" if s.get("signal") else " (was not running)"
        _print(f"stopped {safe(s['id'])}{how}")


def render_token(doc: Doc) -> None:
    console().print(clean(doc["token"]), markup=False)


def render_git(doc: Doc) -> None:
    lines = [f"{safe(doc['path'])}: {safe(doc['branch'])} @ {safe(doc['commit'][:12])}"
             + (" [yellow](uncommitted changes)[/]" if doc["dirty"] else "")]
    if doc.get("upstream"):
        lines.append(f"upstream {safe(doc['upstream'])}: {doc['ahead']} ahead, "
                     f"{doc['behind']} behind")
    if "updated" in doc:
        lines.append(f"updated {safe(doc['before'][:12])} → {safe(doc['after'][:12])}"
                     if doc["updated"]
                     else "already up to date")
        if doc.get("reinstall_needed"):
            lines.append("[yellow]dependencies changed: run `pip install -e .` in the checkout[/]")
    _print(*lines)


def render_daemon(doc: Doc) -> None:
    if not doc["running"]:
        stopped = f" (stopped pid {doc['pid']}, {doc['signal']})" if doc.get("signal") else ""
        _print(f"pool daemon: [dim]not running[/]{stopped}")
        return
    _print(f"pool daemon: [green]running[/] on {safe(doc['url'])} (pid {doc['pid']}, "
           f"since {safe(doc['started_at'])})")
    health = doc.get("health") or {}
    queen = health.get("queen")
    if queen:
        said = ("[green]ok[/]" if queen.get("last_error") is None and queen.get("sent")
                else f"[red]{safe(queen.get('last_error') or 'none sent yet')}[/]")
        _print(f"heartbeats to {safe(queen['url'])} as {safe(queen['host'])}: "
               f"{said} ({queen['sent']} sent, {queen['failed']} failed)")
    elif doc.get("queen_url"):
        _print(f"heartbeats to {safe(doc['queen_url'])}")
    if doc.get("controller_url"):
        reach = "" if doc.get("reachable") else " [red](it does not answer there yet)[/]"
        _print(f"this controller reaches it at {safe(doc['controller_url'])}{reach}")
    _print(f"[dim]log: {safe(doc['log'])}; token: `rbee-hive daemon token`[/]")


def render_logs(doc: Doc) -> None:
    import sys

    from rbee_common.textsafe import for_terminal

    for line in doc["lines"]:  # exact when piped, neutralised on a terminal
        sys.stdout.write(for_terminal(line, sys.stdout) + "\n")


RENDERERS: dict[str, Callable[[Doc], None]] = {
    schemas.STATUS: render_status,
    schemas.DETECT: render_detect,
    schemas.CATALOG: render_catalog,
    schemas.MODELS: render_models,
    schemas.MODEL: render_model,
    schemas.VERIFY: render_verify,
    schemas.REMOVED: render_removed,
    schemas.WORKER: render_worker,
    schemas.WORKERS: render_workers,
    schemas.WORKER_HEALTH: render_health,
    schemas.LENDER: render_lender,
    schemas.LENDERS: render_lenders,
    schemas.STOPPED: render_stopped,
    schemas.TOKEN: render_token,
    schemas.GIT: render_git,
    schemas.LOGS: render_logs,
    schemas.DAEMON: render_daemon,
    schemas.DAEMON_TOKEN: render_token,
}


def render(doc: Doc) -> None:
    """Render any hive document by its schema name (JSON as a fallback)."""
    fn = RENDERERS.get(str(doc.get("schema")))
    if fn is None:
        import json

        console().print(json.dumps(doc, indent=2), markup=False)
        return
    fn(doc)
