"""Reading a splitserve server's ``GET /v1/stats`` and turning two snapshots into a level's
numbers.

The endpoint's counters are cumulative since the server started, so what a level did is
the difference of a snapshot at each edge of its measured window: per-stage mean times,
mean batch size per model (Δrows / Δbatches), engine busy fraction (Δbusy_s / Δuptime_s
of that engine, both from the same engine report, so the engines' once-a-second report
period cancels out), and each model's busy fraction (its Δbusy_s over the engines'
clock). An engine's busy time is the sum of its models' compute times: models of one
engine run in batch threads of their own and may overlap, so it can exceed 100%; a
model's sums its replicas. A server that does not answer the endpoint with JSON is not
splitserve, and the bench reports without these columns.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

STATS_PATH = "/v1/stats"
STAGES = ("front_queue", "worker", "infer_wait", "engine_queue", "engine_compute")


def stats_url(url: str) -> str:
    """The statistics endpoint of the server that serves ``url``."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, STATS_PATH, "", ""))


def fetch(url: str, timeout_s: float = 5.0) -> dict[str, Any] | None:
    """The JSON of ``url`` (a /v1/stats endpoint), or None when it is not there."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status != 200:
                return None
            doc = json.loads(resp.read())
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "uptime_s" in doc else None


def simulated_models(snapshot: dict[str, Any] | None) -> list[str]:
    """Models that run on a simulated accelerator: their times are not real hardware's."""
    if not snapshot:
        return []
    return sorted(
        name
        for name, m in (snapshot.get("models") or {}).items()
        if isinstance(m, dict) and (m.get("simulated") or m.get("backend") == "simulated")
    )


def _num(doc: Any, *keys: str) -> float:
    for key in keys:
        if not isinstance(doc, dict):
            return 0.0
        doc = doc.get(key)
    return float(doc) if isinstance(doc, int | float) else 0.0


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the server did between two snapshots (None when either is missing).

    ``restarted`` is set when the server's uptime went backwards (a new server answered):
    then the deltas mean nothing and are left out.
    """
    if not before or not after:
        return None
    wall = _num(after, "uptime_s") - _num(before, "uptime_s")
    out: dict[str, Any] = {
        "mode": after.get("mode"),
        "wall_s": wall,
        "simulated": simulated_models(after),
        "restarted": wall < 0,
    }
    if wall < 0:
        return out
    by_status_after = (after.get("requests") or {}).get("by_status") or {}
    out["requests"] = {
        "total": int(_num(after, "requests", "total") - _num(before, "requests", "total")),
        "by_status": {
            s: int(_num(by_status_after, s) - _num(before, "requests", "by_status", s))
            for s in sorted(by_status_after)
        },
    }
    stages: dict[str, float | None] = {}
    for name in after.get("stages_ms") or {}:
        count = _num(after, "stages_ms", name, "count") - _num(before, "stages_ms", name, "count")
        total = _num(after, "stages_ms", name, "sum") - _num(before, "stages_ms", name, "sum")
        stages[name] = _ratio(total, count)
    order = {name: i for i, name in enumerate(STAGES)}
    out["stages_ms_mean"] = dict(sorted(stages.items(), key=lambda kv: order.get(kv[0], 99)))
    models: dict[str, Any] = {}
    for name, m in sorted((after.get("models") or {}).items()):
        if not isinstance(m, dict):
            continue
        batches = _num(m, "batches") - _num(before, "models", name, "batches")
        rows = _num(m, "rows") - _num(before, "models", name, "rows")
        sizes_before = ((before.get("models") or {}).get(name) or {}).get("batch_sizes") or {}
        sizes = {
            size: int(_num(m, "batch_sizes", size) - _num(sizes_before, size))
            for size in sorted(m.get("batch_sizes") or {}, key=lambda s: int(s))
        }
        models[name] = {
            "backend": m.get("backend"),
            "simulated": bool(m.get("simulated") or m.get("backend") == "simulated"),
            "batches": int(batches),
            "rows": int(rows),
            "mean_batch": _ratio(rows, batches),
            "busy_s": _num(m, "busy_s") - _num(before, "models", name, "busy_s"),
            "batch_sizes": {s: n for s, n in sizes.items() if n},
        }
    out["models"] = models
    engines: dict[str, Any] = {}
    for index, e in sorted((after.get("engines") or {}).items()):
        busy = _num(e, "busy_s") - _num(before, "engines", index, "busy_s")
        up = _num(e, "uptime_s") - _num(before, "engines", index, "uptime_s")
        # An engine restarted in the window has a smaller uptime now: no fraction then.
        fraction = busy / up if up > 0 and busy >= 0 else None
        engines[index] = {"busy_s": busy, "uptime_s": up, "busy_fraction": fraction}
    out["engines"] = engines
    # A model's busy fraction: its compute seconds (summed over the engines that run it)
    # per second of the engines' own clock, as the engine fraction is measured.
    clocks = sorted(e["uptime_s"] for e in engines.values() if e["uptime_s"] > 0)
    clock = clocks[len(clocks) // 2] if clocks else wall
    for m in models.values():
        m["busy_fraction"] = _ratio(m["busy_s"], clock)
    return out
