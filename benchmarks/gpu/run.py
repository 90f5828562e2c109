"""The published experiment on one GPU: a vision service, threaded against split.

A production case (quoted in the design brief) measured 4.5 requests/s at 2%
GPU utilisation for a one-process vision service, and 27.4 requests/s at 12% after moving
pre/post-processing into 6 CPU processes and inference into one GPU process. This script
reproduces that set-up with splitserve on one machine:

1. engine only: the CNN (examples/vision, ResNet-50-like, fp16, CUDA graphs) at several
   batch sizes, in a child process: the GPU limit in images/s, and the latency model
   ``t(batch) = a + b * batch`` fitted by least squares, printed as the simulated
   backend's ``latency_ms`` option;
2. the service (1080p JPEG decode, resize, normalise; the CNN; top-5) served in
   threaded mode (16 and 48 threads) and in split mode with 6 and 12 CPU workers (the
   CNN in one engine process on the GPU), each loaded in a closed loop
   (benchmarks/loadgen.py) while NVML samples the GPU's utilisation;
3. one table: requests/s, p50/p99, GPU utilisation, split/threaded, share of the GPU
   limit; JSON (and the table) written to ``--out DIR`` or ``$OUT``.

It needs one NVIDIA GPU, PyTorch with CUDA and nvidia-ml-py (see README.md here) and
finishes within ``--budget`` seconds (450 by default; configurations that would not fit
are skipped, and listed). ``--dry-run`` runs the same steps on the CPU with splitserve's
SIMULATED accelerator instead (no GPU, no torch; small sizes, about a minute): every
number it prints is labelled SIMULATED.

    python benchmarks/gpu/run.py [--dry-run] [--out DIR] [--rounds N] [--budget S]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # loadgen, modes
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # examples

from loadgen import free_port, machine, run_closed_loop, start_server, stop_server
from modes import summarise

REPO = Path(__file__).resolve().parent.parent.parent

SERVICE = "examples.vision.service:Classify"
ROUTE = "vision"
BACKEND_ENV = "SPLITSERVE_VISION_BACKEND"
PUBLISHED = {"threaded_rps": 4.5, "threaded_gpu_pct": 2, "split_rps": 27.4, "split_gpu_pct": 12}
JSON_NAME = "gpu_bench.json"
TABLE_NAME = "gpu_bench.md"


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how long each part may take."""

    label: str  # "GPU" or "SIMULATED"
    backend: str  # the vision service's backend
    configs: dict[str, list[str]]  # name -> extra `splitserve serve` arguments
    concurrency: int  # closed-loop clients
    warmup_s: float
    duration_s: float
    photos: int  # distinct 1080p JPEG bodies
    batch_sizes: list[int]  # engine-only
    engine_seconds: float  # per batch size
    engine_timeout_s: float  # the engine-only child, start-up included
    ready_timeout_s: float  # a server's start-up (model load, graph capture)
    start_cost_s: float  # a server's start and stop, for the budget
    budget_s: float

    @property
    def simulated(self) -> bool:
        return self.label == "SIMULATED"


GPU_PLAN = Plan(
    label="GPU",
    backend="torch",
    configs={
        "threaded, 16 threads": ["--mode", "threaded", "--threads", "16"],
        "threaded, 48 threads": ["--mode", "threaded", "--threads", "48"],
        "split, 6 CPU workers": ["--cpu-workers", "6", "--worker-concurrency", "8"],
        "split, 12 CPU workers": ["--cpu-workers", "12", "--worker-concurrency", "4"],
    },
    concurrency=48,
    warmup_s=3.0,
    duration_s=12.0,
    photos=16,
    batch_sizes=[1, 2, 4, 8, 16, 32, 64],
    engine_seconds=2.0,
    engine_timeout_s=150.0,
    ready_timeout_s=150.0,
    start_cost_s=35.0,
    budget_s=450.0,
)
DRY_PLAN = Plan(
    label="SIMULATED",
    backend="simulated",
    configs={
        "threaded, 4 threads": ["--mode", "threaded", "--threads", "4"],
        "split, 2 CPU workers": ["--cpu-workers", "2", "--worker-concurrency", "4"],
    },
    concurrency=8,
    warmup_s=1.0,
    duration_s=3.0,
    photos=4,
    batch_sizes=[1, 2, 4, 8, 16, 32],
    engine_seconds=0.3,
    engine_timeout_s=40.0,
    ready_timeout_s=40.0,
    start_cost_s=10.0,
    budget_s=85.0,
)


# --- GPU utilisation --------------------------------------------------------------------


class GpuSampler:
    """NVML utilisation samples (time, % of time a kernel ran, memory used) in a thread.

    The same counter ``nvidia-smi`` shows, as the published case reported; a window's
    figure is the mean of the samples taken in it.
    """

    def __init__(self, index: int = 0, interval_s: float = 0.05) -> None:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(self._handle)
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        driver = pynvml.nvmlSystemGetDriverVersion()
        self.driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            self.samples.append((time.monotonic(), float(util.gpu), mem.used / 2**20))

    def window(self, t0: float, t1: float) -> dict[str, float | None]:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not inside:
            return {"gpu_util_pct": None, "gpu_util_max_pct": None, "gpu_mem_mib": None}
        return {
            "gpu_util_pct": statistics.fmean(s[1] for s in inside),
            "gpu_util_max_pct": max(s[1] for s in inside),
            "gpu_mem_mib": max(s[2] for s in inside),
        }

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


# --- engine only ------------------------------------------------------------------------


def time_calls(call: Any, seconds: float, max_calls: int) -> list[float]:
    """Seconds per call of ``call()``, after 3 untimed ones: at least 5 calls, then until
    ``seconds`` have passed (at most ``max_calls``)."""
    for _ in range(3):
        call()
    times: list[float] = []
    t0 = time.monotonic()
    while (len(times) < 5 or time.monotonic() - t0 < seconds) and len(times) < max_calls:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def engine_only_child(backend: str, batch_sizes: list[int], seconds: float, out: Path) -> None:
    """In a child process (its CUDA context goes away with it): time the engine alone."""
    import numpy as np

    os.environ[BACKEND_ENV] = backend
    from examples.vision import service as vision
    from splitserve.engines.base import create_engine
    from splitserve.layout import Declaration, resolve
    from splitserve.spec import ModelKey

    declared = vision.Classify.model
    assert declared is not None
    model = dataclasses.replace(declared, max_batch_size=max(batch_sizes))
    info: dict[str, Any] = {"backend": backend, "options": _jsonable(dict(model.options))}
    with tempfile.TemporaryDirectory(prefix="splitserve-gpu-bench-") as run_dir:
        began = time.monotonic()
        declaration = Declaration(ModelKey("vision", "model"), vision.Classify, model)
        engine = create_engine(resolve(declaration, None, None), run_dir=Path(run_dir))
        info["load_s"] = time.monotonic() - began
        info["metadata"] = engine.metadata()
        if backend == "torch":
            import torch

            info["torch"] = torch.__version__
            info["cuda"] = torch.version.cuda
            if torch.cuda.is_available():
                info["device_name"] = torch.cuda.get_device_name(0)
        rng = np.random.default_rng(0)
        if backend == "torch":
            info["correctness"] = check_against_cpu(engine, rng)
        results = []
        for size in batch_sizes:
            batch = {"images": rng.standard_normal((size, 3, 224, 224), dtype=np.float32)}
            t0 = time.monotonic()
            times = time_calls(lambda b=batch: engine.run_batch(b), seconds, 20_000)
            t1 = time.monotonic()
            ordered = sorted(times)
            results.append(
                {
                    "batch": size,
                    "iterations": len(times),
                    "median_ms": statistics.median(ordered) * 1000,
                    "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
                    "images_per_s": size * len(times) / sum(times),
                    "t0": t0,
                    "t1": t1,
                }
            )
    out.write_text(json.dumps({"info": info, "results": results}, indent=2))


def check_against_cpu(engine: Any, rng: Any) -> dict[str, Any]:
    """The GPU engine (fp16, CUDA graphs, a padded bucket) against the CPU in fp32.

    The CUDA path cannot be tested on the CPU-only CI; this is its check, on every run.
    """
    import numpy as np
    import torch

    from examples.vision.model import resnet50

    reference = resnet50().eval()
    out: dict[str, Any] = {}
    for rows in (1, 3):  # 3 rows run in the 4-row graph: padding must not leak
        x = rng.standard_normal((rows, 3, 224, 224), dtype=np.float32)
        got = engine.run_batch({"images": x})["logits"]
        with torch.inference_mode():
            want = reference(torch.from_numpy(x)).numpy()
        scale = float(np.abs(want).max())
        out[f"rows_{rows}"] = {
            "max_abs_diff_over_max_abs": float(np.abs(got - want).max()) / scale,
            "top1_agree": int((got.argmax(1) == want.argmax(1)).sum()),
            "rows": rows,
        }
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_engine_only(plan: Plan, work: Path) -> dict[str, Any]:
    out = work / "engine_only.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--engine-only-child",
        plan.backend,
        "--engine-seconds",
        str(plan.engine_seconds),
        "--batch-sizes",
        *map(str, plan.batch_sizes),
        "--child-out",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=plan.engine_timeout_s
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"engine-only measurement failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            + (
                ""
                if plan.simulated
                else "\nThis needs an NVIDIA GPU with a CUDA build of "
                "PyTorch; on a machine without one, run with --dry-run."
            )
        )
    return json.loads(out.read_text())


def fit_latency(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Least squares of the median batch time: t(batch) = a + b * batch (ms)."""
    xs = [float(r["batch"]) for r in results]
    ys = [float(r["median_ms"]) for r in results]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    residuals = [y - (a + b * x) for x, y in zip(xs, ys, strict=True)]
    rms = (sum(r * r for r in residuals) / n) ** 0.5
    a_r, b_r = round(max(a, 0.0), 4), round(max(b, 0.0), 4)
    return {"a_ms": a, "b_ms": b, "rms_residual_ms": rms, "latency_ms": [a_r, b_r]}


# --- the servers ------------------------------------------------------------------------


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def check(url: str, body: bytes, simulated: bool) -> None:
    """One request before the load: a top-5 answer, from the backend the plan says."""
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", "image/jpeg")
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = json.loads(resp.read())
        timings = resp.headers.get("X-Splitserve-Timings", "")
    if len(answer.get("top5", [])) != 5:
        raise AssertionError(f"the service gave no top-5: {answer}")
    if answer["simulated_accelerator"] != simulated:
        raise AssertionError(f"expected simulated={simulated}, the service says {answer}")
    if simulated and "simulated_accelerator=1" not in timings:
        raise AssertionError("the timings header does not say the accelerator was simulated")


def batch_histogram(stats: dict[str, Any]) -> dict[int, int]:
    model = stats.get("models", {}).get(f"{ROUTE}/model", {})
    return {int(k): int(v) for k, v in model.get("batch_sizes", {}).items()}


def measure_config(
    name: str,
    args: list[str],
    plan: Plan,
    bodies: list[bytes],
    sampler: GpuSampler | None,
    latency_ms: tuple[float, float] | None,
    round_no: int,
    log_path: Path,
) -> dict[str, Any]:
    """Start the server, check it, load it, read the counters and the GPU; stop it."""
    port = free_port()
    started = time.monotonic()
    proc = start_server(
        [SERVICE, *args], port, ready_timeout_s=plan.ready_timeout_s, log_path=log_path
    )
    base = f"http://127.0.0.1:{port}"
    try:
        start_s = time.monotonic() - started
        check(f"{base}/v1/services/{ROUTE}", bodies[0], plan.simulated)
        before = batch_histogram(_get_json(f"{base}/v1/stats"))
        t0 = time.monotonic()
        result = run_closed_loop(
            f"{base}/v1/services/{ROUTE}",
            bodies,
            "image/jpeg",
            plan.concurrency,
            plan.duration_s,
            plan.warmup_s,
            1_000_000,
            client="raw",
        )
        t1 = time.monotonic()
        time.sleep(1.2)  # engines report their counters to the front once a second
        after = batch_histogram(_get_json(f"{base}/v1/stats"))
    finally:
        stop_server(proc)
    sizes = {s: after.get(s, 0) - before.get(s, 0) for s in after}
    batches = sum(sizes.values())
    rows = sum(s * n for s, n in sizes.items())
    loaded = result.to_dict()
    loaded["load"] = loaded.pop("mode", "closed")  # the loop's kind; "mode" is the server's
    row: dict[str, Any] = {
        **loaded,
        "config": name,
        "mode": "threaded" if "threaded" in args else "split",
        "round": round_no,
        "start_s": start_s,
        "batches": batches,
        "mean_batch": rows / batches if batches else None,
        "batch_sizes": {str(k): v for k, v in sorted(sizes.items()) if v},
        "gpu_util_pct": None,
        "device_busy_pct": None,
    }
    if sampler is not None:
        row.update(sampler.window(t0 + plan.warmup_s, t1))
    if latency_ms is not None:  # the simulated device: busy = sum over batches of a + b*n
        busy_ms = sum(n * (latency_ms[0] + latency_ms[1] * s) for s, n in sizes.items())
        row["device_busy_pct"] = 100.0 * busy_ms / 1000.0 / max(t1 - t0, 1e-9)
    print(
        f"round {round_no} {name:24s} c={plan.concurrency:<3d} {result.rps:8.2f} req/s  "
        f"p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms  "
        f"mean batch {row['mean_batch'] or 0:5.2f}  errors {sum(result.errors.values())}"
        + ("  [SIMULATED]" if plan.simulated else ""),
        flush=True,
    )
    return row


# --- the report ---------------------------------------------------------------------------


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def build_table(rows: list[dict[str, Any]], gpu_limit: float | None) -> list[dict[str, Any]]:
    """modes.summarise's medians, plus GPU utilisation, batch size and the two ratios."""
    table = summarise(rows)
    best_threaded = max((r["rps"] for r in table if r["config"].startswith("threaded")), default=0)
    for entry in table:
        mine = [r for r in rows if r["config"] == entry["config"]]
        entry["mode"] = mine[0]["mode"]
        for key in ("gpu_util_pct", "device_busy_pct", "mean_batch"):
            entry[key] = _median([r[key] for r in mine])
        entry["ratio_split_threaded"] = entry["rps"] / best_threaded if best_threaded else None
        entry["ratio_gpu_limit"] = entry["rps"] / gpu_limit if gpu_limit else None
    return table


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render(report: dict[str, Any]) -> str:
    simulated = report["simulated"]
    tag = "SIMULATED " if simulated else ""
    lines = []
    if simulated:
        lines.append(
            "SIMULATED accelerator (dry run): no GPU and no torch were used; the 'GPU' is "
            "splitserve's simulated device, t(batch) = a + b*batch, and its busy share stands "
            "in for NVML's utilisation. Only the CPU side (decode, resize, top-5, transport, "
            "batching) is real."
        )
    else:
        gpu = report["gpu"]
        lines.append(
            f"GPU: {gpu.get('name')} (driver {gpu.get('driver')}), torch {gpu.get('torch')} "
            f"CUDA {gpu.get('cuda')}; CPU: {report['machine']['nproc']} cores"
        )
    lines.append("")
    lines.append(f"{tag}engine only (ResNet-50-like, {report['engine_dtype']}):")
    lines.append(f"| batch | median ms | p90 ms | images/s | {tag}GPU util % |")
    lines.append("| --- | --- | --- | --- | --- |")
    for r in report["engine_only"]:
        lines.append(
            f"| {r['batch']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
            f"{r['images_per_s']:.1f} | {_fmt(r.get('gpu_util_pct'), '.0f')} |"
        )
    lines.append(
        f"{tag}GPU limit: {report['gpu_limit_rps']:.1f} images/s "
        f"(best batch <= the service's max_batch_size {report['max_batch_size']})"
    )
    fit = report["latency_model"]
    lines.append(
        f"{tag}latency model (least squares over {len(report['engine_only'])} batch sizes): "
        f"t(batch) = {fit['a_ms']:.4f} ms + {fit['b_ms']:.4f} ms * batch "
        f"(rms residual {fit['rms_residual_ms']:.4f} ms)"
    )
    lines.append(f'as the simulated backend\'s option:  "latency_ms": {fit["latency_ms"]}')
    for name, c in report["engine_info"].get("correctness", {}).items():
        lines.append(
            f"check {name}: GPU {report['engine_dtype']} vs CPU float32, max |diff| / max |ref| "
            f"= {c['max_abs_diff_over_max_abs']:.4f}, top-1 agrees {c['top1_agree']}/{c['rows']}"
        )
    lines.append("")
    util_head = "simulated device busy %" if simulated else "GPU util % (NVML)"
    lines.append(
        f"{tag}service (1080p JPEG -> 224 -> CNN -> top-5), {report['concurrency']} clients, "
        f"{report['duration_s']:.0f} s per run, medians over {report['rounds']} round(s):"
    )
    lines.append(
        f"| configuration | requests/s | p50 ms | p99 ms | {util_head} | mean batch "
        "| split/threaded | of GPU limit | errors |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in report["table"]:
        util = r["device_busy_pct"] if simulated else r["gpu_util_pct"]
        lines.append(
            f"| {tag}{r['config']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{_fmt(util, '.1f')} | {_fmt(r['mean_batch'], '.2f')} | "
            f"{_fmt(r['ratio_split_threaded'], '.2f')} | {_fmt(r['ratio_gpu_limit'], '.3f')} | "
            f"{r['errors']} |"
        )
    p = PUBLISHED
    lines.append(
        f"published case: threaded {p['threaded_rps']} req/s at {p['threaded_gpu_pct']}% GPU, "
        f"split (6 CPU processes) {p['split_rps']} req/s at {p['split_gpu_pct']}% GPU "
        f"(x{p['split_rps'] / p['threaded_rps']:.1f})"
    )
    if report["skipped"]:
        lines.append(f"skipped for the time budget: {report['skipped']}")
    if report["failed"]:
        lines.append(f"FAILED (see the server logs beside the JSON): {report['failed']}")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------


def run(plan: Plan, out_dir: Path, rounds: int) -> dict[str, Any]:
    began = time.monotonic()
    os.environ[BACKEND_ENV] = plan.backend  # the servers inherit it
    from examples.vision.service import MAX_BATCH, photo

    sampler = None if plan.simulated else GpuSampler()
    try:
        with tempfile.TemporaryDirectory(prefix="splitserve-gpu-bench-") as work:
            print(f"[{plan.label}] engine only: batch sizes {plan.batch_sizes}", flush=True)
            engine = run_engine_only(plan, Path(work))
        results = engine["results"]
        for r in results:
            r.update(sampler.window(r["t0"], r["t1"]) if sampler else {"gpu_util_pct": None})
        served = [r for r in results if r["batch"] <= MAX_BATCH] or results
        gpu_limit = max(r["images_per_s"] for r in served)
        fit = fit_latency(results)
        options = engine["info"]["options"]
        simulated_latency = tuple(options["latency_ms"]) if plan.simulated else None

        bodies = [photo(seed) for seed in range(plan.photos)]
        rows: list[dict[str, Any]] = []
        skipped: list[str] = []
        failed: list[str] = []
        per_config = plan.start_cost_s + plan.warmup_s + plan.duration_s
        out_dir.mkdir(parents=True, exist_ok=True)
        for round_no in range(rounds):
            for index, (name, args) in enumerate(plan.configs.items()):
                if time.monotonic() - began + per_config > plan.budget_s:
                    skipped.append(f"round {round_no}: {name}")
                    continue
                log_path = out_dir / f"server-{round_no}-{index}.log"
                try:
                    rows.append(
                        measure_config(
                            name, args, plan, bodies, sampler, simulated_latency, round_no, log_path
                        )
                    )
                except (RuntimeError, AssertionError, OSError) as exc:
                    # one broken configuration must not cost the others' (GPU) time
                    failed.append(f"round {round_no}: {name}: {type(exc).__name__}: {exc}")
                    print(f"FAILED {name}: {exc} (server log: {log_path})", flush=True)
    finally:
        if sampler is not None:
            sampler.close()
    info = engine["info"]
    report: dict[str, Any] = {
        "kind": "splitserve-gpu-benchmark",
        "label": plan.label,
        "simulated": plan.simulated,
        "machine": machine(),
        "gpu": {
            "name": sampler.name if sampler else "SIMULATED",
            "driver": sampler.driver if sampler else None,
            "torch": info.get("torch"),
            "cuda": info.get("cuda"),
        },
        "service": SERVICE,
        "engine_dtype": options.get("dtype", "simulated"),
        "engine_info": info,
        "max_batch_size": MAX_BATCH,
        "concurrency": plan.concurrency,
        "duration_s": plan.duration_s,
        "warmup_s": plan.warmup_s,
        "rounds": rounds,
        "engine_only": results,
        "gpu_limit_rps": gpu_limit,
        "latency_model": fit,
        "table": build_table(rows, gpu_limit) if rows else [],
        "rows": rows,
        "published": PUBLISHED,
        "skipped": skipped,
        "failed": failed,
        "elapsed_s": time.monotonic() - began,
    }
    text = render(report)
    print("\n" + text, flush=True)
    (out_dir / JSON_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / TABLE_NAME).write_text(text + "\n")
    print(
        f"\nwrote {out_dir / JSON_NAME} and {out_dir / TABLE_NAME} ({report['elapsed_s']:.0f} s)",
        flush=True,
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU only, SIMULATED accelerator")
    parser.add_argument("--out", type=Path, help="where the JSON goes (default: $OUT)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--budget", type=float, help="seconds for the whole run")
    parser.add_argument(
        "--engine-only-child", choices=["torch", "simulated"], help=argparse.SUPPRESS
    )
    parser.add_argument("--engine-seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine_only_child:
        engine_only_child(
            args.engine_only_child, args.batch_sizes, args.engine_seconds, args.child_out
        )
        return 0
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.budget:
        plan = dataclasses.replace(plan, budget_s=args.budget)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="splitserve-gpu-bench-"))
    if not plan.simulated:
        try:
            import pynvml  # noqa: F401
        except ImportError:
            print(
                "this needs nvidia-ml-py (import pynvml) and a GPU; or use --dry-run",
                file=sys.stderr,
            )
            return 2
    run(plan, out, max(1, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
