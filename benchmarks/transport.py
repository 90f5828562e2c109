"""Tensor transport between processes: inline socket frames vs shared memory vs memcpy.

A "CPU worker" (this process) sends uint8 tensors to an "engine" (a spawned process)
with the project's own code: ``pack_tensors`` with a ``ShmPool``, an ``InferRequest``
header, a ``channel.Channel`` over a Unix socket (uvloop on both sides),
``unpack_tensors`` with ``ShmAttachments`` on the receiver, which then copies the
tensor into an array of its own (the copy the batcher makes when it assembles a batch)
and answers with a small ``InferReply``; the sender then releases its segment, as
``CpuWorker._on_reply`` does.

Timing (one way): ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process
of the host) is stamped by the sender just before ``pack_tensors`` and by the receiver
once its own copy of the data is complete; the one-way time is the difference. The
receiver also stamps when ``Channel.recv`` returned, which splits the one-way time
into pack (sender), socket (send -> message read) and unpack+copy (receiver). The
round trip (sender's clock only) is reported too.

Modes: ``default`` (the project's rule: inline at or under
``transport.INLINE_MAX_BYTES``, shared memory above), ``inline`` (no pool),
``shm`` (threshold forced to 0) and ``memcpy`` (``np.copyto`` of the same bytes into a
preallocated array, in one process: the floor).

Run: ``python benchmarks/transport.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

from splitserve.runtime import channel as chan
from splitserve.runtime import messages as msg
from splitserve.runtime import transport
from splitserve.runtime.shm import ShmAttachments, ShmPool, remove_segments

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import finish_report, machine

KB = 1024
MB = 1024 * 1024
# Named sizes: a tiny tensor, a 224x224 RGB image, a 1080p RGB frame.
MAIN_SIZES: list[tuple[str, tuple[int, ...]]] = [
    ("1 KB", (1024,)),
    ("150 KB (224x224x3)", (224, 224, 3)),
    ("6 MB (1080x1920x3)", (1080, 1920, 3)),
]
SWEEP_SIZES = [4 * KB << i for i in range(13)]  # 4 KB .. 16 MB
QUICK_SWEEP_SIZES = [16 * KB, 64 * KB, 256 * KB, 1 * MB]
MODES = ("default", "inline", "shm")
FLOOR_GBPS = 2.0  # a 6 MB tensor must reach the engine at >= 2 GB/s (1 GB = 1e9 bytes)
_STAMPS = struct.Struct("<dd")


# --- the receiver ("engine") ----------------------------------------------------------


def _receiver_main(path: str) -> None:
    uvloop.run(_receive(path))


async def _receive(path: str) -> None:
    done = asyncio.get_running_loop().create_future()
    attachments = ShmAttachments()

    async def on_channel(ch: chan.Channel) -> None:
        try:
            while True:
                frames = await ch.recv()
                t_read = time.monotonic()
                request = msg.engine_decoder.decode(frames[0])
                if not isinstance(request, msg.InferRequest):
                    continue
                views = transport.unpack_tensors(request.tensors, frames[1:], attachments)
                own = {name: view.copy() for name, view in views.items()}
                t_have = time.monotonic()
                del views, frames
                ch.send([msg.encode(msg.InferReply(request.id)), _STAMPS.pack(t_read, t_have)])
                del own
        finally:
            if not done.done():
                done.set_result(None)

    server = await chan.listen(path, on_channel)
    try:
        await done  # one connection: the benchmark's; it ends when the sender closes it
    finally:
        server.close()


# --- the sender ("CPU worker") --------------------------------------------------------


@dataclass
class Sample:
    one_way_s: float
    rtt_s: float
    pack_s: float
    socket_s: float
    copy_s: float


@contextlib.contextmanager
def _mode(mode: str) -> Iterator[None]:
    """Set the transport rule for ``mode`` (the pool choice is made by the caller)."""
    saved = transport.INLINE_MAX_BYTES
    if mode == "shm":
        transport.INLINE_MAX_BYTES = 0
    try:
        yield
    finally:
        transport.INLINE_MAX_BYTES = saved


class Sender:
    def __init__(self, ch: chan.Channel, pool: ShmPool) -> None:
        self.ch = ch
        self.pool = pool
        self.ids = 0

    async def send_many(self, arr: np.ndarray, mode: str, count: int) -> list[Sample]:
        pool = None if mode == "inline" else self.pool
        samples: list[Sample] = []
        with _mode(mode):
            for _ in range(count):
                self.ids += 1
                t0 = time.monotonic()
                frames: list = []
                refs, segments = transport.pack_tensors({"x": arr}, frames, pool)
                t_packed = time.monotonic()
                header = msg.encode(msg.InferRequest(self.ids, "bench", t0 + 60.0, refs))
                self.ch.send([header, *frames])
                reply, stamps = await self.ch.recv()
                t_back = time.monotonic()
                for segment in segments:
                    self.pool.release(segment)
                answer = msg.engine_decoder.decode(reply)
                if not isinstance(answer, msg.InferReply) or answer.id != self.ids:
                    raise RuntimeError(f"unexpected answer {answer!r}")
                if (mode == "shm" and not segments) or (mode == "inline" and segments):
                    raise RuntimeError(f"mode {mode} did not take its path")
                t_read, t_have = _STAMPS.unpack(stamps)
                samples.append(
                    Sample(
                        one_way_s=t_have - t0,
                        rtt_s=t_back - t0,
                        pack_s=t_packed - t0,
                        socket_s=t_read - t_packed,
                        copy_s=t_have - t_read,
                    )
                )
        return samples


def memcpy_samples(arr: np.ndarray, count: int) -> list[float]:
    dst = np.empty_like(arr)
    np.copyto(dst, arr)  # fault the pages in
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        np.copyto(dst, arr)
        out.append(time.perf_counter() - t0)
    return out


def iterations_for(nbytes: int, quick: bool) -> int:
    """Transfers per (size, mode) per round: ~20 MB moved, between 5 and 200."""
    n = max(5, min(200, (20 * MB) // max(nbytes, 1)))
    return max(3, n // 5) if quick else n


def _label(nbytes: int) -> str:
    return f"{nbytes // KB} KB" if nbytes < MB else f"{nbytes // MB} MB"


def _make_tensor(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _summary(nbytes: int, samples: list[Sample], memcpy_s: float) -> dict[str, Any]:
    one_way = statistics.median(s.one_way_s for s in samples)
    ordered = sorted(s.one_way_s for s in samples)
    return {
        "n": len(samples),
        "one_way_us": one_way * 1e6,
        "one_way_p90_us": ordered[int(0.9 * (len(ordered) - 1))] * 1e6,
        "rtt_us": statistics.median(s.rtt_s for s in samples) * 1e6,
        "pack_us": statistics.median(s.pack_s for s in samples) * 1e6,
        "socket_us": statistics.median(s.socket_s for s in samples) * 1e6,
        "unpack_copy_us": statistics.median(s.copy_s for s in samples) * 1e6,
        "gbps": nbytes / one_way / 1e9,
        "x_memcpy": one_way / memcpy_s,
    }


async def run_benchmark(quick: bool, rounds: int) -> dict[str, Any]:
    run_dir = tempfile.mkdtemp(prefix="splitserve-transport-")
    path = os.path.join(run_dir, "engine.sock")
    ctx = multiprocessing.get_context("spawn")
    receiver = ctx.Process(target=_receiver_main, args=(path,), name="bench-receiver")
    receiver.start()
    pool = ShmPool(os.getpid(), max_bytes=1 << 30)
    ch: chan.Channel | None = None
    try:
        ch = await chan.connect(path, timeout=60.0)
        sender = Sender(ch, pool)
        named = [(label, _make_tensor(shape)) for label, shape in MAIN_SIZES]
        sweep_sizes = QUICK_SWEEP_SIZES if quick else SWEEP_SIZES
        swept = [(_label(n), _make_tensor((n,))) for n in sweep_sizes]
        cases: list[tuple[str, str, np.ndarray, tuple[str, ...]]] = [
            ("main", label, arr, MODES) for label, arr in named
        ] + [("sweep", label, arr, ("inline", "shm")) for label, arr in swept]

        # Warm-up: every (size, mode) once, so segments exist, are paged in and attached.
        for _, _, arr, modes in cases:
            for mode in modes:
                await sender.send_many(arr, mode, 3)
        collected: dict[tuple[str, str, str], list[Sample]] = {}
        copies: dict[tuple[str, str], list[float]] = {}
        for r in range(rounds):
            for group, label, arr, modes in cases:
                count = iterations_for(arr.nbytes, quick)
                # Rotate the order each round so no mode always runs first (side by side).
                order = modes[r % len(modes) :] + modes[: r % len(modes)]
                for mode in order:
                    collected.setdefault((group, label, mode), []).extend(
                        await sender.send_many(arr, mode, count)
                    )
                copies.setdefault((group, label), []).extend(memcpy_samples(arr, count))
    finally:
        if ch is not None:
            ch.close()  # the receiver exits when its connection closes
        await asyncio.to_thread(receiver.join, 10.0)
        if receiver.is_alive():
            receiver.terminate()
            receiver.join(5.0)
        pool.close()
        remove_segments(os.getpid())
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(run_dir)

    results: dict[str, Any] = {"main": [], "sweep": []}
    for group, label, arr, modes in cases:
        memcpy_s = statistics.median(copies[(group, label)])
        row: dict[str, Any] = {
            "size": label,
            "bytes": arr.nbytes,
            "memcpy_us": memcpy_s * 1e6,
            "memcpy_gbps": arr.nbytes / memcpy_s / 1e9,
        }
        for mode in modes:
            row[mode] = _summary(arr.nbytes, collected[(group, label, mode)], memcpy_s)
        results[group].append(row)
    sweep = results["sweep"]
    results["crossover"] = _crossover(sweep)
    big = results["main"][-1]
    results["floor"] = {
        "size": big["size"],
        "bytes": big["bytes"],
        "required_gbps": FLOOR_GBPS,
        "default_gbps": big["default"]["gbps"],
        "pass": big["default"]["gbps"] >= FLOOR_GBPS,
        "margin_x": big["default"]["gbps"] / FLOOR_GBPS,
    }
    return results


TIE = 0.03  # one-way medians within 3% of each other are a tie (the machine is noisy)


def _crossover(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """Where shared memory overtakes inline frames in the sweep.

    Each size is ``shm`` (shared memory faster by more than ``TIE``), ``inline`` or
    ``tie``; the crossover is the smallest size from which shared memory wins at every
    larger size.
    """
    verdicts = []
    for row in sweep:
        shm, inline = row["shm"]["one_way_us"], row["inline"]["one_way_us"]
        if shm < inline * (1 - TIE):
            verdicts.append("shm")
        elif inline < shm * (1 - TIE):
            verdicts.append("inline")
        else:
            verdicts.append("tie")
    first = next((i for i in range(len(sweep)) if all(v == "shm" for v in verdicts[i:])), None)
    ties = [row["bytes"] for row, v in zip(sweep, verdicts, strict=True) if v == "tie"]
    return {
        "shm_faster_from_bytes": sweep[first]["bytes"] if first is not None else None,
        "below_that": verdicts[first - 1] if first else None,
        "below_that_bytes": sweep[first - 1]["bytes"] if first else None,
        "tie_bytes": ties,
        "tie_threshold": TIE,
        "inline_max_bytes": transport.INLINE_MAX_BYTES,
        "verdicts": {
            row["size"]: {
                "winner": v,
                "shm_minus_inline_us": row["shm"]["one_way_us"] - row["inline"]["one_way_us"],
            }
            for row, v in zip(sweep, verdicts, strict=True)
        },
    }


# --- report ---------------------------------------------------------------------------


def print_report(results: dict[str, Any]) -> None:
    print("\nOne-way time per transfer (median; pack -> receiver holds its own copy)")
    head = f"{'size':<20} {'mode':<8} {'one-way us':>11} {'p90 us':>9} {'GB/s':>7} "
    head += f"{'x memcpy':>9} {'pack':>8} {'socket':>8} {'copy':>8} {'rtt us':>9}"
    for group in ("main", "sweep"):
        if group == "sweep":
            print("\nSweep: inline vs shared memory (one-way, median)")
        print(head)
        for row in results[group]:
            print(
                f"{row['size']:<20} {'memcpy':<8} {row['memcpy_us']:>11.1f} {'':>9} "
                f"{row['memcpy_gbps']:>7.2f} {1.0:>9.2f}"
            )
            for mode in MODES:
                if mode not in row:
                    continue
                s = row[mode]
                print(
                    f"{'':<20} {mode:<8} {s['one_way_us']:>11.1f} {s['one_way_p90_us']:>9.1f} "
                    f"{s['gbps']:>7.2f} {s['x_memcpy']:>9.1f} {s['pack_us']:>8.1f} "
                    f"{s['socket_us']:>8.1f} {s['unpack_copy_us']:>8.1f} {s['rtt_us']:>9.1f}"
                )
    cross = results["crossover"]
    if cross["shm_faster_from_bytes"] is None:
        where = "shared memory does not win at the largest swept sizes"
    elif cross["below_that"] is None:
        where = "shared memory is faster at every swept size"
    else:
        where = (
            f"shared memory faster (by > {cross['tie_threshold']:.0%}) from "
            f"{cross['shm_faster_from_bytes']} bytes on; {cross['below_that']} at "
            f"{cross['below_that_bytes']}"
        )
    per_size = ", ".join(
        f"{size} {v['winner']} ({v['shm_minus_inline_us']:+.1f} us)"
        for size, v in cross["verdicts"].items()
    )
    print(f"\nCrossover: {where}; INLINE_MAX_BYTES = {cross['inline_max_bytes']}")
    print(f"  shm - inline per size: {per_size}")
    floor = results["floor"]
    verdict = "PASS" if floor["pass"] else "FAIL"
    print(
        f"Floor: {floor['size']} at {floor['default_gbps']:.2f} GB/s (default path) vs "
        f">= {floor['required_gbps']} GB/s: {verdict} ({floor['margin_x']:.2f}x)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for a smoke test")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 15)
    started = time.monotonic()
    load_before = os.getloadavg()
    results = uvloop.run(run_benchmark(args.quick, rounds))
    results["machine"] = machine()
    results["settings"] = {
        "quick": args.quick,
        "rounds": rounds,
        "clock": "time.monotonic() stamps in both processes (CLOCK_MONOTONIC)",
        "loadavg_at_start": load_before,
        "wall_s": time.monotonic() - started,
    }
    print_report(results)
    finish_report(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
