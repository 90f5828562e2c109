"""`splitserve tune` measured against what it claims: the layout it finds, side by side.

1. Sample requests in a folder (OCR: generated documents, their ground-truth ``.json``
   beside them as the README makes them; simulated: photos), the way a user has them.
2. ``splitserve tune SERVICE --body-dir DIR --budget B`` as a user runs it; its wall
   time and its table are recorded.
3. The config it wrote is served (``splitserve serve --config``) beside the reference
   layouts (OCR: the best hand-found layout and the README's default; simulated: threaded
   mode), one at a time, rounds interleaved, same closed-loop load (``modes.run_configs``).

Floors (issue "Performance"): on OCR the tuned layout within 5% of the best hand-found
one, found in <= 10 minutes; on the simulated accelerator split >= 1.8x threaded.

    python benchmarks/tune_floors.py ocr [--budget 600] [--rounds 3] [--duration 40]
    python benchmarks/tune_floors.py simulated [--budget 300]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadgen import machine
from modes import print_summary, run_configs, summarise

REPO_ROOT = Path(__file__).resolve().parent.parent

# target -> (service, route, content type, reference layouts: name -> serve arguments)
TARGETS: dict[str, tuple[str, str, str, dict[str, list[str]]]] = {
    "ocr": (
        "examples.ocr.service:OCRService",
        "ocr",
        "image/jpeg",
        {
            "best hand-found: 1 CPU worker x 16, 2 engines x 1 thread": [
                *("--cpu-workers", "1", "--worker-concurrency", "16"),
                *("--engine-replicas", "2", "--engine-threads", "1"),
            ],
            "README's default (no layout flags)": [],
        },
    ),
    "simulated": (
        "examples.simulated.service:SimulatedDetector",
        "simdet",
        "image/jpeg",
        {"threaded, 8 threads": ["--mode", "threaded", "--threads", "8"]},
    ),
}
TUNED = "tuned (splitserve tune's config)"


def sample_bodies(target: str, folder: Path) -> list[bytes]:
    """Write the sample requests into ``folder``; the bodies the comparison sends."""
    if target == "ocr":
        from examples.ocr.make_images import generate_documents

        return [p.read_bytes() for p in generate_documents(folder, 8, seed=11)]
    from examples.simulated.service import photo

    bodies = [photo(seed) for seed in range(16)]
    for i, body in enumerate(bodies):
        (folder / f"photo-{i:02d}.jpg").write_bytes(body)
    return bodies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=list(TARGETS))
    parser.add_argument("--budget", type=float, default=600.0, help="tune's --budget (s)")
    parser.add_argument("--concurrency", type=int, default=None, help="default: ocr 8, sim 16")
    parser.add_argument("--tune-duration", type=float, default=None, help="s per trial")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=None, help="s per comparison run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    service, route, content_type, references = TARGETS[args.target]
    ocr = args.target == "ocr"
    concurrency = args.concurrency or (8 if ocr else 16)
    tune_duration = args.tune_duration or (20.0 if ocr else 8.0)
    duration = args.duration or (40.0 if ocr else 15.0)

    work = Path(tempfile.mkdtemp(prefix="tune-floors-"))
    samples = work / "samples"
    samples.mkdir()
    bodies = sample_bodies(args.target, samples)
    config = work / "splitserve.toml"
    command = [
        *(sys.executable, "-m", "splitserve.cli", "tune", service),
        *("--body-dir", str(samples), "--concurrency", str(concurrency)),
        *("--duration", str(tune_duration), "--budget", str(args.budget)),
        *("--output", str(config)),
    ]
    print("$", " ".join(command[2:]), flush=True)
    began = time.monotonic()
    tuned = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    tune_s = time.monotonic() - began
    print(tuned.stdout, flush=True)
    if tuned.returncode != 0:
        print(tuned.stderr[-4000:], file=sys.stderr)
        return 1
    print(f"tune took {tune_s:.0f} s (budget {args.budget:.0f} s)", flush=True)
    written = tomllib.loads(config.read_text())
    print("it wrote:", written, flush=True)

    configs = {TUNED: ["--config", str(config)]}
    configs.update({name: [service, *extra] for name, extra in references.items()})
    rows = run_configs(
        None,
        route,
        configs,
        bodies,
        content_type,
        [concurrency],
        rounds=args.rounds,
        duration_s=duration,
        warmup_s=5.0,
    )
    summary = summarise(rows)
    print(f"\nmedians over {args.rounds} round(s), {duration:.0f} s measured each")
    print_summary(summary)
    rps = {r["config"]: r["rps"] for r in summary}
    floors = {}
    if ocr:
        hand = next(iter(references))
        floors["tuned / best hand-found (>= 0.95)"] = rps[TUNED] / rps[hand]
        floors["tune minutes (<= 10)"] = tune_s / 60
    else:
        floors["tuned split / threaded (>= 1.8)"] = rps[TUNED] / rps["threaded, 8 threads"]
    for name, value in floors.items():
        print(f"{name}: {value:.2f}")
    if args.json:
        out = {
            "machine": machine(),
            "target": args.target,
            "tune_command": command[2:],
            "tune_s": round(tune_s, 1),
            "tune_table": tuned.stdout,
            "tuned_config": written,
            "summary": summary,
            "rows": rows,
            "floors": floors,
        }
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
