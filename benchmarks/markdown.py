"""Markdown pieces shared by every generated table: the table itself and the footer that names
where and when the figures were measured."""
from __future__ import annotations

from typing import Any


def md(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def footer(payload: dict[str, Any]) -> str:
    dev = payload["device"]
    where = dev.get("cuda") or f"{dev['cpu']} CPU, {dev['threads']} threads"
    # a file filled over several runs (re-runs skip measured rows) says so: the machine line is the last run's
    runs = len(payload.get("git_shas", [])) > 1
    head = "Last rows measured" if runs else "Measured"
    tail = f"; rows from {len(payload['git_shas'])} commits" if runs else ""
    return f"\n\n_{head} {payload['date']} on {where}, torch {dev['torch']}, git {payload['git_sha'][:10]}{tail}._"
