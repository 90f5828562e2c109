"""OCR demo: the Ray Serve path (splitserve.ray) against plain split mode, one run.

Both serve the same service with the same layout: one CPU stage (a CPU worker / a CPU
replica) interleaving up to 16 jobs, two single-threaded engine replicas (the best
split layout on this machine, docs/benchmarks.md). Both are started and checked (the
answers, one request at a time, must equal RapidOCR's, and Ray's must equal split
mode's), then loaded in a closed loop in alternating rounds, so that both see the same
(shared, noisy) machine; medians over the rounds. While one is loaded the other idles
(the idle Ray server still takes some CPU from split mode's rounds), so each round also
records the server's CPU time per answered request, which competition for the cores
does not change much: compare the paths by that.

    python benchmarks/deploy_paths.py [--rounds 3] [--duration 45] [--concurrency 8]

Run it with an interpreter that has Ray (pip install -e '.[ray]').
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.loadgen import (
    REPO_ROOT,
    free_port,
    machine,
    run_closed_loop,
    start_server,
    stop_server,
)
from benchmarks.peers.run_peers import cores_used, cpu_seconds, process_group
from examples.ocr.compare import compare_ocr
from examples.ocr.make_images import generate_documents

OCR = "examples.ocr.service:OCRService"
SPLIT_ARGS = ["--cpu-workers", "1", "--worker-concurrency", "16"]
ENGINE_ARGS = ["--engine-replicas", "2", "--engine-threads", "1"]
RAY_ARGS = ["--cpu-replicas", "1", "--cpu-concurrency", "16"]


def post(url: str, body: bytes) -> Any:
    # urllib's default content type is a form's, which the servers refuse (415)
    headers = {"Content-Type": "application/octet-stream"}
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def answers(url: str, images: list[bytes], references: list[Any]) -> list[Any]:
    """Each image's answer, one at a time, checked equal to RapidOCR's."""
    found = []
    for body, ref in zip(images, references, strict=True):
        answer = post(url, body)
        diff = compare_ocr(answer, ref)
        if not diff["equivalent"]:
            raise AssertionError(f"{url}: answer differs from RapidOCR: {diff}")
        found.append(answer)
    return found


def start_ray(
    port: int, log_path: Path, temp: Path, ready_timeout_s: float = 300
) -> subprocess.Popen:
    """``python -m splitserve.ray`` on 127.0.0.1:PORT, returned once it answers."""
    cmd = [sys.executable, "-m", "splitserve.ray", OCR, "--port", str(port), *RAY_ARGS]
    cmd += ["--engine-replicas", "2", "--engine-threads", "1"]
    env = {**os.environ, "RAY_TMPDIR": str(temp)}  # Ray's session folder, removed after
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"ray path exited ({proc.returncode}); see {log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2):
                    return proc
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"ray path not ready after {ready_timeout_s}s; see {log_path}")
    except BaseException:
        stop_ray(proc)
        raise


def stop_ray(proc: subprocess.Popen) -> None:
    """SIGINT (the module shuts Serve and its Ray down), SIGKILL of its group if stuck."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def measure(url: str, root_pid: int, images: list[bytes], args: argparse.Namespace) -> dict:
    """One closed-loop round, with the CPU time the server's processes spent on it.

    Requests/s on a shared machine depends on what else runs; CPU seconds per answered
    request (every process of the server: Ray's own included) does much less.
    """
    pids = process_group(root_pid)
    before, started = cpu_seconds(pids, set()), time.monotonic()
    result = run_closed_loop(
        url, images, "image/jpeg", args.concurrency, args.duration, args.warmup, 100_000
    )
    after, wall = cpu_seconds(pids, set()), time.monotonic() - started
    row = result.to_dict()
    out = {k: row[k] for k in ("rps", "requests", "ok", "errors", "p50_ms", "p99_ms")}
    server_cpu_s = sum(after[1].values()) - sum(before[1].values())
    answered = max(row["warmup_requests"] + row["requests"], 1)
    out["server_cpu_ms_per_request"] = 1000 * server_cpu_s / answered
    out["cores"] = cores_used(before, after, wall)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=45.0, help="measured seconds a round")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from rapidocr_onnxruntime import RapidOCR

    # A SIGTERM ends the run through the clean-up below, as a Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
    paths = generate_documents(work / "images", args.images, seed=11)
    images = [p.read_bytes() for p in paths]
    reference_engine = RapidOCR()
    references = [reference_engine(body) for body in images]
    del reference_engine
    out: dict[str, Any] = {"machine": machine(), "images": len(images), "paths": {}}
    logs = work / "logs"
    logs.mkdir()

    split_port, ray_port = free_port(), free_port()
    split_url = f"http://127.0.0.1:{split_port}/v1/services/ocr"
    ray_url = f"http://127.0.0.1:{ray_port}/v1/services/ocr"
    split = start_server([OCR, *SPLIT_ARGS, *ENGINE_ARGS], split_port, log_path=logs / "split.log")
    ray = None
    try:
        split_answers = answers(split_url, images, references)
        ray = start_ray(ray_port, logs / "ray.log", work / "ray")
        out["ray_equals_split"] = answers(ray_url, images, references) == split_answers
        rounds: dict[str, list[dict[str, Any]]] = {"split": [], "ray": []}
        for i in range(args.rounds):  # alternate, so both see the same machine
            for name, url in (("split", split_url), ("ray", ray_url)):
                root = split.pid if name == "split" else ray.pid
                rounds[name].append(measure(url, root, images, args))
                print(f"round {i + 1} {name}: {rounds[name][-1]}", flush=True)
    finally:
        if ray is not None:
            stop_ray(ray)
        stop_server(split)
        shutil.rmtree(work / "ray", ignore_errors=True)
    out["loadavg_at_end"] = os.getloadavg()
    for name, rows in rounds.items():
        out["paths"][name] = {
            "rps_median": statistics.median(r["rps"] for r in rows),
            "cpu_ms_median": statistics.median(r["server_cpu_ms_per_request"] for r in rows),
            "rounds": rows,
        }
    split_path, ray_path = out["paths"]["split"], out["paths"]["ray"]
    out["ray_over_split"] = ratio = ray_path["rps_median"] / split_path["rps_median"]
    # Requests per CPU-second, Ray's over split's: the throughput ratio on a machine
    # whose cores were theirs alone (both are CPU-bound here).
    out["ray_over_split_per_cpu"] = efficiency = (
        split_path["cpu_ms_median"] / ray_path["cpu_ms_median"]
    )
    print(
        f"median requests/s: split {split_path['rps_median']:.2f}, "
        f"ray {ray_path['rps_median']:.2f} (ray / split {ratio:.2f}); median server CPU "
        f"ms/request: split {split_path['cpu_ms_median']:.0f}, ray "
        f"{ray_path['cpu_ms_median']:.0f} (ray / split per CPU-second {efficiency:.2f}; "
        f"floor 0.80); answers equal: {out['ray_equals_split']}; logs in {logs}"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if out["ray_equals_split"] else 1


if __name__ == "__main__":
    sys.exit(main())
