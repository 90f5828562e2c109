"""The machine's ceiling for the OCR demo: the pipeline run by plain processes, no server.

``--processes`` processes (each count given is measured; default: one per core, and
one more, which fills the cores while another reads or decodes) each load the OCR
service in-process with single-threaded ONNX Runtime (``InProcessService(OCRService,
engine_threads=1)``) and run it on the benchmark images (the peers' documents) back to
back, with no HTTP, no batching and no queue: what the cores can do with this code.
Every process warms up first, then all start measuring together for ``--duration``
seconds; the ceiling is the images they finished per second in total, the best of the
counts. A server's requests/s divided by this is how much of the machine it turns into
answers.

    python benchmarks/ocr_ceiling.py [--processes N [N ...]] [--duration S] [--documents N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def _worker(images: list[bytes], duration_s: float, ready, go, start_at, done) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from examples.ocr.service import OCRService
    from splitserve.runtime.inprocess import InProcessService

    service = InProcessService(OCRService, engine_threads=1)
    for body in images[:2]:  # warm-up
        service.call(body, "image/jpeg")
    ready.put(os.getpid())
    go.wait()
    count, i = 0, 0
    end = start_at.value + duration_s
    while time.time() < end:
        reply = service.call(images[i % len(images)], "image/jpeg")
        if reply.status != 200:
            raise RuntimeError(f"OCR answered {reply.status}: {reply.body[:200]!r}")
        if time.time() <= end:
            count += 1
        i += 1
    done.put(count)


def measure_ceiling(images: list[bytes], processes: int, duration_s: float) -> float:
    """Images per second that ``processes`` plain processes finish together."""
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    go, start_at = ctx.Event(), ctx.Value("d", 0.0)
    procs = [
        ctx.Process(
            target=_worker, args=(images, duration_s, ready, go, start_at, done), daemon=True
        )
        for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:  # every process has loaded its models and warmed up
        ready.get(timeout=600)
    start_at.value = time.time()
    go.set()
    counts = [done.get(timeout=duration_s + 120) for _ in procs]
    for proc in procs:
        proc.join(10)
    return sum(counts) / duration_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = os.cpu_count() or 1
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[cores, cores + 1], help="each measured"
    )
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--seed", type=int, default=11, help="of the documents (peers': 11)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from examples.ocr.make_images import generate_documents

    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_documents(Path(tmp), args.documents, seed=args.seed, truth=False)
        images = [p.read_bytes() for p in paths]
    rates = {}
    for processes in args.processes:
        rates[processes] = rate = measure_ceiling(images, processes, args.duration)
        print(
            f"{processes} processes x 1 thread: {rate:.2f} images/s "
            f"({args.duration:.0f} s, {len(images)} documents, seed {args.seed})",
            flush=True,
        )
    best = max(rates, key=rates.__getitem__)
    print(f"OCR ceiling: {rates[best]:.2f} images/s ({best} processes x 1 thread)")
    if args.json:
        args.json.write_text(json.dumps({"images_per_s": rates[best], "by_processes": rates}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
