"""Heavy Python pre/post-processing + a fast (SIMULATED) accelerator: threaded vs split.

The service is examples/simulated (photo decode and resize, a simulated detector with
t = 3 ms + 0.3 ms x batch, box decoding and NMS in Python). All numbers this prints come
from the simulated accelerator and say so.

    python benchmarks/simulated.py [--quick] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadgen import machine
from modes import print_summary, run_configs, summarise

from examples.simulated.service import photo

SERVICE = "examples.simulated.service:SimulatedDetector"
CONFIGS: dict[str, list[str]] = {
    "threaded, 8 threads": ["--mode", "threaded", "--threads", "8"],
    "threaded, 16 threads": ["--mode", "threaded", "--threads", "16"],
    "split, 2 CPU workers": ["--cpu-workers", "2", "--worker-concurrency", "8"],
    "split, 3 CPU workers": ["--cpu-workers", "3", "--worker-concurrency", "6"],
}


def check(url: str) -> dict[str, bool]:
    req = urllib.request.Request(
        url, data=photo(0), method="POST", headers={"Content-Type": "image/jpeg"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read())
        timings = resp.headers["X-Splitserve-Timings"]
    if not answer["simulated_accelerator"] or "simulated_accelerator=1" not in timings:
        raise AssertionError("the answer does not say it came from the simulated accelerator")
    return {"simulated_accelerator": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rounds, duration, warmup = (1, 3.0, 1.0) if args.quick else (args.rounds, args.duration, 3.0)
    bodies = [photo(seed) for seed in range(16)]
    rows = run_configs(
        SERVICE,
        "simdet",
        {n: CONFIGS[n] for n in args.configs},
        bodies,
        "image/jpeg",
        args.concurrency,
        rounds=rounds,
        duration_s=duration,
        warmup_s=warmup,
        check=check,
    )
    summary = summarise(rows)
    print(f"\nSIMULATED accelerator; medians over {rounds} round(s), {duration:.0f} s each")
    print_summary(summary)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "simulated_accelerator": True,
                    "summary": summary,
                    "rows": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
