"""The worker's counters and their Prometheus text (GET /metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.engine import GenResult


@dataclass
class Metrics:
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    tokens_generated: int = 0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0
    last_tokens_per_sec: float = 0.0

    def count(self, route: str, outcome: str) -> None:
        self.requests[(route, outcome)] = self.requests.get((route, outcome), 0) + 1

    def record(self, result: GenResult) -> None:
        self.tokens_generated += result.tokens_out
        if result.tokens_out:
            self.ttft_sum_s += result.ttft_ms / 1000
            self.ttft_count += 1
        if result.tokens_per_sec:
            self.last_tokens_per_sec = result.tokens_per_sec


def prometheus_text(m: Metrics, wid: str, busy: bool, uptime_s: float, waiting: int = 0) -> str:
    """The metrics in Prometheus' text exposition format, labelled with the worker id."""
    lines = [
        "# HELP rbee_worker_requests_total Requests by route and outcome.",
        "# TYPE rbee_worker_requests_total counter",
    ]
    for (route, outcome), n in sorted(m.requests.items()):
        lines.append(f'rbee_worker_requests_total{{worker="{wid}",route="{route}",'
                     f'outcome="{outcome}"}} {n}')
    lines += [
        "# HELP rbee_worker_tokens_generated_total Tokens generated.",
        "# TYPE rbee_worker_tokens_generated_total counter",
        f'rbee_worker_tokens_generated_total{{worker="{wid}"}} {m.tokens_generated}',
        "# HELP rbee_worker_time_to_first_token_seconds Time to first token.",
        "# TYPE rbee_worker_time_to_first_token_seconds summary",
        f'rbee_worker_time_to_first_token_seconds_sum{{worker="{wid}"}} {m.ttft_sum_s:.6f}',
        f'rbee_worker_time_to_first_token_seconds_count{{worker="{wid}"}} {m.ttft_count}',
        "# HELP rbee_worker_decode_tokens_per_second Decode rate of the last job.",
        "# TYPE rbee_worker_decode_tokens_per_second gauge",
        f'rbee_worker_decode_tokens_per_second{{worker="{wid}"}} {m.last_tokens_per_sec:.3f}',
        "# HELP rbee_worker_busy 1 while a job runs.",
        "# TYPE rbee_worker_busy gauge",
        f'rbee_worker_busy{{worker="{wid}"}} {1 if busy else 0}',
        "# HELP rbee_worker_waiting OpenAI requests waiting for the slot.",
        "# TYPE rbee_worker_waiting gauge",
        f'rbee_worker_waiting{{worker="{wid}"}} {waiting}',
        "# HELP rbee_worker_uptime_seconds Seconds since the worker started.",
        "# TYPE rbee_worker_uptime_seconds gauge",
        f'rbee_worker_uptime_seconds{{worker="{wid}"}} {uptime_s:.3f}',
    ]
    return "\n".join(lines) + "\n"
