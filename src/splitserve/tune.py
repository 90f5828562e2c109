"""``splitserve tune``: search the process layout and batching settings that serve a
service fastest on this machine, on the user's own sample requests.

Each candidate is a complete set of settings (CPU workers, engine replicas and threads,
worker concurrency, fronts, each model's ``max_batch_size`` and ``max_delay_ms``). It is served
for real (``splitserve serve --config`` on a free 127.0.0.1 port) and measured under the
same closed-loop load: requests/s of successful answers, and their p99. A candidate
qualifies when its p99 is under the target and under 1% of its answers failed; the
best is the qualifying one with the most requests/s (without a qualifying one: the
lowest p99).

The search is a coordinate descent from the default layout (``splitserve.layout``):
it tries the values of one setting at a time around the best so far, keeps a change
that helps by more than the measurement's noise (``MIN_GAIN``), and goes over the
settings again until a pass changes nothing or the time budget runs out. Layout
settings come first (they matter most on CPU engines, where the compute threads must
match the cores), then each model's batching. Threaded mode is measured once as the
reference. The result is written as a config file that ``splitserve serve --config``
reads, and every trial is printed in a table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from splitserve.bench import bodies as body_sources
from splitserve.bench.loadgen import Result, run_closed_loop
from splitserve.bench.servers import free_port, start_server, stop_server
from splitserve.config import ServerConfig
from splitserve.layout import Services, default_fronts, default_layout

# A change must beat the best so far by this share of its requests/s to be kept: the
# machine's noise between two runs of the same layout is a few percent.
MIN_GAIN = 0.03
# Share of failed requests above which a candidate does not qualify.
MAX_ERROR_FRACTION = 0.01
# The layout settings searched, in order (ServerConfig field names).
LAYOUT_SETTINGS = (
    "engine_replicas",
    "engine_threads",
    "cpu_workers",
    "worker_concurrency",
    "fronts",
)
# Fronts tried at most (each takes a core's worth of HTTP work at high request rates).
MAX_TUNED_FRONTS = 4

HELP = "search the fastest layout and batching for services, write it as a config file"
DESCRIPTION = __doc__
EPILOG = """examples:
  splitserve tune examples.ocr.service:OCRService --body-dir pages/ --p99-ms 8000
  splitserve tune app:Detect --body-dir samples/ --concurrency 32 --budget 300 \\
      --output splitserve.toml
then: splitserve serve --config splitserve.toml"""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """Settings of one trial: layout settings, and per-model overrides by key."""

    mode: str = "split"
    settings: tuple[tuple[str, int], ...] = ()
    models: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()

    def get(self, name: str) -> int | None:
        return dict(self.settings).get(name)

    def model_setting(self, key: str, name: str) -> float | None:
        return dict(dict(self.models).get(key, ())).get(name)

    def with_setting(self, name: str, value: int) -> Candidate:
        settings = dict(self.settings)
        settings[name] = value
        return dataclasses.replace(self, settings=tuple(sorted(settings.items())))

    def with_model_setting(self, key: str, name: str, value: float) -> Candidate:
        models = {k: dict(v) for k, v in self.models}
        models.setdefault(key, {})[name] = value
        frozen = tuple(sorted((k, tuple(sorted(v.items()))) for k, v in models.items()))
        return dataclasses.replace(self, models=frozen)

    def config(self, services: Sequence[str]) -> dict[str, Any]:
        """The config file's content (``splitserve serve --config``)."""
        doc: dict[str, Any] = {"services": list(services), "mode": self.mode}
        doc.update(dict(self.settings))
        if self.models:
            doc["models"] = {
                key: {n: int(v) if n == "max_batch_size" else float(v) for n, v in values}
                for key, values in self.models
            }
        return doc

    def label(self) -> str:
        if self.mode == "threaded":
            return "threaded mode (reference)"
        short = {
            "engine_replicas": "replicas",
            "engine_threads": "threads",
            "cpu_workers": "workers",
            "worker_concurrency": "conc",
            "fronts": "fronts",
        }
        parts = [f"{short.get(k, k)}={v}" for k, v in self.settings]
        for key, values in self.models:
            model = key.partition("/")[2]
            parts += [
                f"{model}.{'batch' if n == 'max_batch_size' else 'delay'}={v:g}" for n, v in values
            ]
        return " ".join(parts)


@dataclasses.dataclass
class Trial:
    candidate: Candidate
    rps: float = 0.0
    p99_ms: float = math.nan
    error_fraction: float = 1.0
    failure: str = ""  # the server did not start, or the load failed

    def qualifies(self, p99_target_ms: float | None) -> bool:
        if self.failure or self.error_fraction > MAX_ERROR_FRACTION or not self.rps:
            return False
        return p99_target_ms is None or self.p99_ms <= p99_target_ms


def better(trial: Trial, best: Trial | None, p99_target_ms: float | None) -> bool:
    """Whether ``trial`` beats ``best`` by more than the noise."""
    if best is None:
        return not trial.failure
    if trial.qualifies(p99_target_ms) != best.qualifies(p99_target_ms):
        return trial.qualifies(p99_target_ms)
    if not trial.qualifies(p99_target_ms):  # neither meets the target: lower p99 wins
        return trial.p99_ms < best.p99_ms * (1 - MIN_GAIN)
    return trial.rps > best.rps * (1 + MIN_GAIN)


def _doubling(low: int, high: int) -> list[int]:
    values, v = [], low
    while v <= high:
        values.append(v)
        v *= 2
    return values


def setting_values(name: str, current: Candidate, cores: int) -> list[int]:
    """The values tried for a layout setting (around what the machine allows)."""
    if name == "engine_replicas":
        return sorted(set(_doubling(1, 2 * cores)) | {cores})
    if name == "engine_threads":
        replicas = current.get("engine_replicas") or 1
        return sorted({1, 2, max(1, cores // replicas)} & set(range(1, cores + 1)))
    if name == "cpu_workers":
        return sorted(set(_doubling(1, cores)) | {cores})
    if name == "worker_concurrency":
        return [2, 4, 8, 16, 32]
    if name == "fronts":  # a front per 2 cores at most, and never more than a worker's slots
        most = min(MAX_TUNED_FRONTS, max(1, cores // 2), current.get("worker_concurrency") or 1)
        return _doubling(1, most)
    raise ValueError(f"unknown setting {name!r}")


def model_values(name: str, declared: float) -> list[float]:
    if name == "max_batch_size":
        return sorted({1, max(1, int(declared) // 2), int(declared) * 2})
    return sorted({0.0, declared * 2 if declared else 2.0, declared * 4 if declared else 8.0})


def _valid(candidate: Candidate) -> bool:
    """Whether serve accepts the layout (ServerConfig's own checks: e.g. each front
    gets a share of a worker's slots)."""
    try:
        ServerConfig(**dict(candidate.settings))
    except ValueError:
        return False
    return True


def neighbours(
    best: Candidate, cores: int, declared: dict[str, dict[str, float]]
) -> Iterator[Candidate]:
    """Every candidate that changes one setting of ``best``, most telling first."""
    for name in LAYOUT_SETTINGS:
        for value in setting_values(name, best, cores):
            candidate = best.with_setting(name, value)
            if value != best.get(name) and _valid(candidate):
                yield candidate
    for key, settings in declared.items():
        for name, value in settings.items():
            now = best.model_setting(key, name)
            now = value if now is None else now
            for candidate in model_values(name, now):
                if candidate != now:
                    yield best.with_model_setting(key, name, candidate)


def starting_point(services: Services, cores: int) -> Candidate:
    """The default layout (what ``serve`` picks), with every setting made explicit."""
    models = {key: d.model for key, d in services.models.items()}
    layout = default_layout(models, cores)
    replicas = layout.engine_replicas or max(m.replicas for m in models.values())
    candidate = Candidate()
    for name, value in (
        ("engine_replicas", replicas),
        ("engine_threads", max(1, cores // replicas)),
        ("cpu_workers", layout.cpu_workers),
        ("worker_concurrency", layout.worker_concurrency),
        ("fronts", default_fronts(models, cores, layout.worker_concurrency)),
    ):
        candidate = candidate.with_setting(name, value)
    return candidate


class Runner:
    """Serves candidates one at a time and measures each under the same load."""

    def __init__(self, args: argparse.Namespace, payloads: list[body_sources.Payload]) -> None:
        self.args = args
        self.payloads = payloads
        self.workdir = Path(tempfile.mkdtemp(prefix="splitserve-tune-"))
        self.count = 0

    def measure(self, candidate: Candidate) -> Trial:
        import tomli_w

        self.count += 1
        config_path = self.workdir / f"trial-{self.count}.toml"
        config_path.write_bytes(tomli_w.dumps(candidate.config(self.args.services)).encode())
        port = free_port()
        try:
            proc = start_server(
                ["--config", str(config_path), "--log-level", "WARNING"],
                port,
                ready_timeout_s=self.args.ready_timeout,
                log_path=self.workdir / f"trial-{self.count}.log",
                cwd=Path.cwd(),
            )
        except RuntimeError as exc:
            return Trial(candidate, failure=f"did not start: {exc}")
        try:
            result: Result = run_closed_loop(
                f"http://127.0.0.1:{port}/v1/services/{self.args.route}",
                self.payloads,
                "application/octet-stream",
                self.args.concurrency,
                self.args.duration,
                self.args.warmup,
                1_000_000,
            )
        except Exception as exc:  # the load client failed: report it, go on
            return Trial(candidate, failure=f"load failed: {type(exc).__name__}: {exc}")
        finally:
            stop_server(proc)
        return Trial(candidate, result.rps, result.p99_ms, result.error_fraction)


def tune(args: argparse.Namespace, runner: Runner, services: Services) -> list[Trial]:
    """The search; returns every trial in the order run (the best is marked by the CLI)."""
    from tqdm import tqdm

    cores = args.cores or os.cpu_count() or 1
    declared = {
        key: {"max_batch_size": float(d.model.max_batch_size), "max_delay_ms": d.model.max_delay_ms}
        for key, d in services.models.items()
        if d.model.max_batch_size > 1 or args.search_fixed_batches
    }
    trials: list[Trial] = []
    started = time.monotonic()
    per_trial = args.duration + args.warmup + 10.0  # start-up and stop, roughly
    bar = tqdm(total=int(args.budget), unit="s", desc="tune", file=sys.stderr, leave=False)

    def run(candidate: Candidate) -> Trial:
        trial = runner.measure(candidate)
        trials.append(trial)
        bar.n = min(int(args.budget), int(time.monotonic() - started))
        bar.set_postfix_str(f"{len(trials)} trials, {trial.rps:.2f} req/s {candidate.label()}")
        return trial

    def time_left() -> bool:
        return time.monotonic() - started + per_trial <= args.budget

    try:
        if args.reference:
            run(Candidate(mode="threaded"))
        best = run(starting_point(services, cores))
        tried = {best.candidate}
        changed = True
        while changed and time_left():
            changed = False
            for candidate in neighbours(best.candidate, cores, declared):
                if candidate in tried:
                    continue
                if not time_left():
                    break
                tried.add(candidate)
                trial = run(candidate)
                if better(trial, best, args.p99_ms):
                    best, changed = trial, True
                    break  # the next pass starts around the new best
    finally:
        bar.close()
    return trials


def best_trial(trials: list[Trial], p99_target_ms: float | None) -> Trial | None:
    best = None
    for trial in trials:
        if trial.candidate.mode == "split" and better(trial, best, p99_target_ms):
            best = trial
    return best


def table(trials: list[Trial], best: Trial | None, p99_target_ms: float | None) -> str:
    rows = ["  #  req/s   p99 ms  errors  settings"]
    for i, trial in enumerate(trials, 1):
        mark = "*" if trial is best else " "
        if trial.failure:
            rows.append(
                f"{mark}{i:2d}      -        -       -  {trial.candidate.label()}: {trial.failure}"
            )
            continue
        late = "" if trial.qualifies(p99_target_ms) else "  (does not qualify)"
        rows.append(
            f"{mark}{i:2d} {trial.rps:6.2f} {trial.p99_ms:8.0f} {trial.error_fraction:6.1%}  "
            f"{trial.candidate.label()}{late}"
        )
    return "\n".join(rows)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("services", nargs="+", help="service classes as module:Class")
    bodies = p.add_mutually_exclusive_group(required=True)
    bodies.add_argument("--body-dir", type=Path, help="a folder of sample request bodies")
    bodies.add_argument("--body-file", type=Path, help="one sample request body")
    p.add_argument("--content-type", default=None, help="of the bodies (default: guessed)")
    p.add_argument("--route", default=None, help="service to load (default: the first one)")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients (default 8)")
    p.add_argument("--p99-ms", type=float, default=None, help="p99 target (default: none)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per trial")
    p.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds per trial")
    p.add_argument("--budget", type=float, default=600.0, help="seconds for the whole search")
    p.add_argument("--cores", type=int, default=None, help="cores to plan for (default: all)")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds per start-up")
    p.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the threaded-mode reference run",
    )
    p.add_argument(
        "--search-fixed-batches",
        action="store_true",
        help="also vary the batching of models declared with max_batch_size=1",
    )
    p.add_argument("--output", type=Path, default=Path("splitserve.toml"), help="config file")


def run(args: argparse.Namespace) -> int:
    import tomli_w

    try:
        services = Services.load(args.services)
        if args.body_dir is not None:
            payloads = body_sources.from_dir(args.body_dir, args.content_type)
        else:
            payloads = body_sources.from_data(f"@{args.body_file}", args.content_type)
    except (ValueError, ImportError, OSError) as exc:
        print(f"splitserve tune: {exc}", file=sys.stderr)
        return 2
    args.route = args.route or next(iter(services.classes))
    if args.route not in services.classes:
        print(f"splitserve tune: no service named {args.route!r}", file=sys.stderr)
        return 2
    runner = Runner(args, payloads)
    trials = tune(args, runner, services)
    best = best_trial(trials, args.p99_ms)
    print(table(trials, best, args.p99_ms))
    reference = next((t for t in trials if t.candidate.mode == "threaded"), None)
    if best is None:
        print(
            f"splitserve tune: no candidate could be measured; see the logs in {runner.workdir}",
            file=sys.stderr,
        )
        return 1
    if not best.qualifies(args.p99_ms):
        print(f"warning: no candidate met p99 <= {args.p99_ms:g} ms; writing the lowest p99")
    if reference is not None and reference.rps:
        print(f"best split layout: {best.rps / reference.rps:.2f}x threaded mode's requests/s")
    args.output.write_bytes(tomli_w.dumps(best.candidate.config(args.services)).encode())
    print(
        f"wrote {args.output} ({best.rps:.2f} req/s, p99 {best.p99_ms:.0f} ms); "
        f"serve it with: splitserve serve --config {args.output}"
    )
    with contextlib.suppress(OSError):
        for path in runner.workdir.iterdir():
            path.unlink()
        runner.workdir.rmdir()
    return 0
