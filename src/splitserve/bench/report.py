"""What ``splitserve bench`` shows and writes: a progress bar, the tables, JSON, a plot."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from splitserve.bench.loadgen import ERROR_WARN_FRACTION, Result

STAGE_LABELS = {
    "front_queue": "front q",
    "worker": "worker",
    "infer_wait": "infer wait",
    "engine_queue": "engine q",
    "engine_compute": "compute",
}


class BarProgress:
    """A tqdm bar per level (elapsed seconds of warm-up + window), with successful
    answers, their rate and the errors. tqdm because it is small, well kept and draws on
    stderr only when it is a terminal; the bar is updated a few times a second, never per
    request."""

    def __init__(self, label: str, total_s: float, enabled: bool | None = None) -> None:
        from tqdm import tqdm

        self.total_s = total_s
        self.last = (0.0, 0)
        self.bar = tqdm(
            total=round(total_s, 2),
            desc=f"{label:>9}",
            unit="s",
            leave=True,
            file=sys.stderr,
            disable=None if enabled is None else not enabled,  # None: only on a terminal
            bar_format="{desc} |{bar}| {n:.1f}/{total:.1f}s {postfix}",
        )

    def update(self, elapsed_s: float, answered: int, errors: int) -> None:
        t0, n0 = self.last
        ok = max(answered - errors, 0)
        rps = (ok - n0) / (elapsed_s - t0) if elapsed_s > t0 else 0.0
        self.last = (elapsed_s, ok)
        self.bar.n = round(min(elapsed_s, self.total_s), 2)
        self.bar.set_postfix_str(f"{ok} ok, {rps:.0f} ok/s, {errors} errors")

    def close(self) -> None:
        self.bar.close()


# --- tables ------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:.0f}"


def _errors(errors: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "-"


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Columns padded to their widest cell; the first ``left`` columns left-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])


def simulated_banner(models: list[str]) -> str:
    names = ", ".join(models)
    line = "!" * 78
    return (
        f"{line}\n!!! SIMULATED ACCELERATOR: {names}\n"
        "!!! these models run on a simulated backend: their compute times are modelled,\n"
        f"!!! not measured on real hardware. Do not quote them as hardware numbers.\n{line}"
    )


def simulated_models(results: list[Result]) -> list[str]:
    return sorted({m for r in results if r.server for m in r.server.get("simulated") or []})


def load_table(results: list[Result]) -> str:
    """One row per level: successful req/s and the errors beside it, the successes'
    latency percentiles, the failures' own latency, the client's CPU."""
    open_loop = any(r.mode == "open" for r in results)
    header = ["level", "ok req/s", "err %", "p50 ms", "p90 ms", "p99 ms", "max ms", "ok"]
    header += ["failed", "failed p50 ms"]
    if open_loop:
        header += ["offered/s", "dropped", "lag p99 ms"]
    header += ["client cpu ms/req", "errors"]
    rows = []
    for r in results:
        row = [
            r.label + (" !" if r.too_many_errors else ""),
            f"{r.rps:.1f}",
            f"{r.error_fraction * 100:.1f}",
            _ms(r.p50_ms),
            _ms(r.p90_ms),
            _ms(r.p99_ms),
            _ms(r.max_ms),
            str(r.ok),
            str(r.failed),
            _ms(r.error_p50_ms),
        ]
        if open_loop:
            offered = f"{r.offered_rps:.1f}" if r.offered_rps is not None else "-"
            row += [offered, str(r.dropped), _ms(r.lag_p99_ms)]
        cpu = r.client_cpu_ms_per_req
        row += ["-" if math.isnan(cpu) else f"{cpu:.3f}", _errors(r.errors)]
        rows.append(row)
    return _table(header, rows)


def errors_banner(results: list[Result]) -> str | None:
    """A loud warning for the levels where more than ``ERROR_WARN_FRACTION`` failed: their
    req/s and latency describe the few successes only (None when no level did)."""
    bad = [r for r in results if r.too_many_errors]
    if not bad:
        return None
    line = "!" * 78
    rows = [
        f"!!! {r.label}: {r.failed} of {r.ok + r.failed} requests failed "
        f"({r.error_fraction:.1%}; {_errors(r.errors)}); {r.ok} succeeded"
        for r in bad
    ]
    return "\n".join(
        [
            line,
            f"!!! ERRORS: more than {ERROR_WARN_FRACTION:.0%} of the requests failed at",
            *rows,
            "!!! req/s and latency count the successful answers only. Check the URL and",
            "!!! the bodies (a 4xx: the server refused them; --body-dir sends images only",
            "!!! unless --body-glob names other files).",
            line,
        ]
    )


def _percent(fraction: float | None) -> str:
    return f"{fraction * 100:.0f}%" if fraction is not None else "-"


def server_table(results: list[Result]) -> str | None:
    """One row per level from the /v1/stats deltas (None when the server is not
    splitserve): engine busy %, each model's busy % and mean batch, mean ms per stage;
    a note says what a busy above 100% means when there is one."""
    snapshots = [r.server for r in results if r.server]
    if not snapshots:
        return None
    engines = sorted(
        {e for s in snapshots for e in s.get("engines", {})}, key=lambda e: (len(e), e)
    )
    models = sorted({m for s in snapshots for m in s.get("models", {})})
    stages = [
        st for st in STAGE_LABELS if any(st in s.get("stages_ms_mean", {}) for s in snapshots)
    ]
    simulated = set(simulated_models(results))
    header = ["level", "answers"]
    header += [f"engine {e} busy" for e in engines]
    header += [f"{m} busy" for m in models]
    header += [f"batch {m}" + (" [SIMULATED]" if m in simulated else "") for m in models]
    header += [f"{STAGE_LABELS[s]} ms" for s in stages]
    rows = []
    engine_over = model_over = False
    for r in results:
        s = r.server
        if not s:
            rows.append([r.label, "-"] + ["-"] * (len(header) - 2))
            continue
        if s.get("restarted"):
            rows.append([r.label, "server restarted"] + [""] * (len(header) - 2))
            continue
        row = [r.label, str(s.get("requests", {}).get("total", "-"))]
        for e in engines:
            frac = s.get("engines", {}).get(e, {}).get("busy_fraction")
            engine_over |= frac is not None and frac > 1.0
            row.append(_percent(frac))
        for m in models:
            frac = s.get("models", {}).get(m, {}).get("busy_fraction")
            model_over |= frac is not None and frac > 1.0
            row.append(_percent(frac))
        for m in models:
            mean = s.get("models", {}).get(m, {}).get("mean_batch")
            row.append(f"{mean:.2f}" if mean is not None else "-")
        for st in stages:
            row.append(_ms(s.get("stages_ms_mean", {}).get(st)))
        rows.append(row)
    mode = snapshots[0].get("mode")
    title = f"server: splitserve (mode {mode}), /v1/stats deltas over each measured window"
    notes = []
    if engine_over:
        notes.append(
            "engine busy: the compute time of the models it runs, per second, summed over\n"
            "  them; above 100% its models' batches overlapped (each model has a batch\n"
            "  thread of its own): each model's busy column shows its share"
        )
    if model_over:
        notes.append("model busy: summed over the model's engines; above 100% they overlapped")
    return "\n".join([title, _table(header, rows), *notes])


def render(results: list[Result], url: str) -> str:
    """The whole report printed at the end: load table, server table, and the loud
    warnings above and below them, where they cannot be missed."""
    parts = [f"{url}  ({results[0].client} client)" if results else url, load_table(results)]
    server = server_table(results)
    if server:
        parts.append(server)
    elif results:
        parts.append("server: no /v1/stats (not splitserve, or stats disabled)")
    simulated = simulated_models(results)
    banners = [errors_banner(results), simulated_banner(simulated) if simulated else None]
    shown = [b for b in banners if b]
    return "\n\n".join([*shown, *parts, *shown])


def print_report(results: list[Result], url: str, out: TextIO | None = None) -> None:
    print(render(results, url), file=out or sys.stdout, flush=True)


# --- JSON and plot -----------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """NaN and infinities as null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def document(results: list[Result], url: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Everything one run measured, with the machine and the settings it ran with."""
    return _finite(
        {
            "url": url,
            "splitserve": any(r.server for r in results),
            "simulated": simulated_models(results),
            "settings": settings,
            "machine": machine(),
            "levels": [{"label": r.label, **r.to_dict()} for r in results],
        }
    )


def write_json(path: Path, doc: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def plot(path: Path, results: list[Result], title: str) -> None:
    """Successful (and failed) req/s and the successes' latency percentiles against
    concurrency (or rate), as a PNG; levels with many errors are named in red.

    matplotlib is imported here only: it is an optional extra (``splitserve[bench]``).
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'splitserve[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    open_loop = results[0].mode == "open"
    xs = [r.rate if open_loop else r.concurrency for r in results]
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.plot(xs, [r.rps for r in results], "o-", label="successful (2xx) req/s")
    if any(r.failed for r in results):
        failed_rps = [r.answered_rps - r.rps for r in results]
        ax_t.plot(xs, failed_rps, "x--", color="red", label="failed req/s")
    if open_loop:
        ax_t.plot(xs, xs, ":", color="grey", label="offered")
    ax_t.set_ylabel("requests/s")
    ax_t.set_ylim(bottom=0)
    for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax_l.plot(xs, [getattr(r, f"{q}_ms") for r in results], style, label=q)
    ax_l.set_ylabel("latency (ms)")
    ax_l.set_ylim(bottom=0)
    for ax in (ax_t, ax_l):
        ax.set_xlabel("offered rate (req/s)" if open_loop else "concurrency (clients)")
        if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend()
    simulated = simulated_models(results)
    if simulated:
        title += "\nSIMULATED ACCELERATOR: " + ", ".join(simulated)
    bad = [r for r in results if r.too_many_errors]
    if bad:
        title += "\nERRORS: " + ", ".join(f"{r.label} {r.error_fraction:.0%} failed" for r in bad)
        title += " (req/s and latency: the successes only)"
    fig.suptitle(title, fontsize=10, color="red" if simulated or bad else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the machine ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The machine a number was measured on (it goes with every number)."""
    model = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln), ""
        )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "loadavg_1_5_15": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": _numpy_version(),
    }


def _numpy_version() -> str:
    try:
        import numpy
    except ImportError:
        return ""
    return numpy.__version__
