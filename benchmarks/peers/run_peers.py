"""Splitserve's OCR demo against other Python servers running the very same service code.

Every server below wraps ``InProcessService(OCRService)`` (or is splitserve itself), so
the models, the ONNX Runtime thread settings, the images and the answers are the same;
only the way requests reach the code differs. For each server, one at a time: start it
as a subprocess on a free 127.0.0.1 port, wait until every model-loading process is up,
check its answers on the benchmark images against ``rapidocr_onnxruntime.RapidOCR()``,
run the closed-loop load at each concurrency (``loadgen.run_closed_loop``), stop it by
pid and kill by pid anything it left (Ray's GCS and raylet, Triton's server and stubs,
BentoML's workers included). Rounds interleave the servers; the summary takes medians
over rounds (``modes.summarise``).

Each server gets the request it documents for an image: most take the image as the
body; Triton (triton_app.py) a KServe v2 binary-tensor request, BentoML
(bentoml_app.py) a multipart form, both built once per image before the load, like the
raw bodies. Triton runs in a virtual environment of its own (``make peers-venvs``
builds ``.venv-triton``); BentoML comes with the peers extra.

    python benchmarks/peers/run_peers.py [--quick] [--only flask gunicorn ...]
        [--rounds N] [--duration S] [--concurrency 4 16] [--engine-threads T] [--out DIR]

Writes ``peers.json`` (machine, versions, settings, every run), ``peers.md`` (the table),
``peers.png`` (requests/s per server) and ``logs/`` (each server's output) into ``--out``
(default ``artifacts/peers``). Each load run also records the cores that the server, the
load client and everything else on the machine used: a busy machine shows there.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # loadgen, modes
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # the repository

from loadgen import free_port, machine, run_closed_loop, start_server
from modes import summarise

from benchmarks.peers import triton_app
from benchmarks.peers.common import (
    HEALTH,
    INFO_DIR_ENV,
    ROUTE,
    HeaderPayload,
    Payload,
    parse_threads,
    payload_headers,
)
from examples.ocr.compare import character_errors, compare_ocr
from examples.ocr.make_images import generate_documents
from splitserve.bench.servers import interrupt_then_kill
from splitserve.runtime.process import set_parent_death_signal

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
OCR = "examples.ocr.service:OCRService"
CONTENT_TYPE = "image/jpeg"
MAX_REQUESTS = 200_000  # per measured window; the window's duration ends it first
# Triton's virtual environment (``make peers-venvs``): PyTriton wants numpy < 2 and a
# Python with a shared libpython. Its folder under the repository:
TRITON_VENV = ".venv-triton"
# What is recorded of such a venv of its own (besides its Python's version).
VENV_VERSIONED = ("nvidia-pytriton", "tritonclient", "onnxruntime", "numpy", "opencv-python")
READY_TIMEOUT_S = 240.0  # Ray on two cores takes tens of seconds
STOP_GRACE_S = 60.0  # Ray's shutdown of Serve and its processes takes a while
VERSIONED = (
    "splitserve",
    "flask",
    "werkzeug",
    "gunicorn",
    "litserve",
    "fastapi",
    "starlette",
    "uvicorn",
    "ray",
    "bentoml",
    "onnxruntime",
    "rapidocr-onnxruntime",
    "opencv-python",
    "numpy",
    "aiohttp",
)


def raw_request(image: bytes) -> Payload:
    """The request most servers take: the encoded image as the body."""
    return Payload(image, CONTENT_TYPE)


def raw_answer(body: bytes, headers: Any) -> bytes:
    """Most servers answer with the service's reply itself."""
    return body


def triton_request(image: bytes) -> Payload:
    """Triton's own request for the image: KServe v2 with a binary tensor."""
    body, headers = triton_app.kserve_request(image)
    return HeaderPayload(body, "application/octet-stream", tuple(headers.items()))


def triton_answer(body: bytes, headers: Any) -> bytes:
    length = headers.get(triton_app.HEADER_LENGTH)
    return triton_app.kserve_answer(body, int(length) if length is not None else None)


def bentoml_request(image: bytes) -> Payload:
    """BentoML's own request for a file input: a multipart form (as its client sends)."""
    from benchmarks.peers.bentoml_app import multipart_request  # needs bentoml

    body, content_type = multipart_request(image)
    return Payload(body, content_type)


@dataclass(frozen=True)
class Peer:
    """One server configuration.

    ``command(port, engine_threads, info_dir, temp_dir)`` gives a peer app's command line;
    without it the peer is ``splitserve serve OCR *splitserve_args``. ``processes``: how
    many processes load the models (each writes an info file when ready). ``request``
    makes the request for one image as the server takes it, ``answer`` takes the
    service's JSON back out of the server's answer (body, headers); ``venv``: a virtual
    environment of its own under the repository that the command runs in.
    """

    name: str
    label: str
    processes: int = 1
    health: str = HEALTH
    route: str = ROUTE
    command: Callable[[int, int | None, Path, Path], list[str]] | None = None
    splitserve_args: tuple[str, ...] = ()
    own_engine_threads: int | None = None  # a layout that fixes its threads per engine
    request: Callable[[bytes], Payload] = raw_request
    answer: Callable[[bytes, Any], bytes] = raw_answer
    venv: str | None = None
    about: str | None = None  # a GET path whose JSON says what server runs (its version)
    service: str = OCR  # the splitserve service (``splitserve serve SERVICE``)
    # None: answers must equal RapidOCR's; a share: lower-precision engines, whose page
    # texts must agree with RapidOCR's in that share of characters at least (1 - CER)
    min_character_agreement: float | None = None

    def engine_threads(self, requested: int | None) -> int | None:
        return self.own_engine_threads if self.own_engine_threads is not None else requested


def _gunicorn(workers: int, worker_class: str, threads: int) -> Callable[..., list[str]]:
    def command(port: int, engine_threads: int | None, info_dir: Path, _tmp: Path) -> list[str]:
        factory = (
            "benchmarks.peers.flask_app:create_app("
            f"engine_threads={engine_threads!r}, info_dir={str(info_dir)!r})"
        )
        return [
            *(sys.executable, "-m", "gunicorn"),
            *("--bind", f"127.0.0.1:{port}", "--workers", str(workers)),
            *("--worker-class", worker_class, "--threads", str(threads)),
            # Loading three models on a busy machine can take longer than the default 30 s.
            *("--timeout", "120", "--graceful-timeout", "5", "--log-level", "warning"),
            factory,
        ]

    return command


def venv_python(venv: str) -> Path:
    return REPO_ROOT / venv / "bin" / "python"


def _module(
    module: str, *extra: str, venv: str | None = None, temp_dir: bool = False
) -> Callable[..., list[str]]:
    """``python -m module --port P --info-dir D --engine-threads T *extra``, in ``venv``'s
    Python when given; ``temp_dir``: the app takes ``--temp-dir`` for its own files."""
    python = str(venv_python(venv)) if venv else sys.executable

    def command(port: int, engine_threads: int | None, info_dir: Path, tmp: Path) -> list[str]:
        cmd = [python, "-m", module, "--port", str(port), "--info-dir", str(info_dir)]
        cmd += ["--engine-threads", str(engine_threads or "none"), *extra]
        if temp_dir:
            cmd += ["--temp-dir", str(tmp)]
        return cmd

    return command


def _triton(instances: int) -> Callable[..., list[str]]:
    """Triton with ``instances`` model instances; its gRPC and metrics ports are free
    ports too (on 127.0.0.1, like its HTTP port)."""
    base = _module(
        "benchmarks.peers.triton_app",
        *("--instances", str(instances)),
        venv=TRITON_VENV,
        temp_dir=True,
    )

    def command(port: int, engine_threads: int | None, info_dir: Path, tmp: Path) -> list[str]:
        taken = {port}
        while len(taken) < 3:  # two more free ports, distinct from each other and PORT
            taken.add(free_port())
        grpc, metrics = sorted(taken - {port})
        ports = ("--grpc-port", str(grpc), "--metrics-port", str(metrics))
        return [*base(port, engine_threads, info_dir, tmp), *ports]

    return command


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer(
            "flask",
            "Flask + gunicorn gthread, 1 process x 8 threads",
            command=_gunicorn(1, "gthread", 8),
        ),
        Peer(
            "gunicorn",
            "Flask + gunicorn sync, 2 worker processes",
            processes=2,
            command=_gunicorn(2, "sync", 1),
        ),
        Peer(
            "litserve",
            "LitServe, 2 inference workers",
            processes=2,
            health="/health",
            command=_module("benchmarks.peers.litserve_app", "--workers", "2"),
        ),
        Peer(
            "litserve-1w",
            "LitServe, 1 inference worker",
            health="/health",
            command=_module("benchmarks.peers.litserve_app", "--workers", "1"),
        ),
        Peer(
            "ray",
            "Ray Serve, 2 replicas",
            processes=2,
            command=_module("benchmarks.peers.ray_app", "--replicas", "2", temp_dir=True),
        ),
        Peer(
            "triton",
            "Triton (PyTriton), 2 model instances",
            health=triton_app.HEALTH,
            route=triton_app.INFER_ROUTE,
            command=_triton(2),
            request=triton_request,
            answer=triton_answer,
            venv=TRITON_VENV,
            about="/v2",
        ),
        Peer(
            "triton-1i",
            "Triton (PyTriton), 1 model instance",
            health=triton_app.HEALTH,
            route=triton_app.INFER_ROUTE,
            command=_triton(1),
            request=triton_request,
            answer=triton_answer,
            venv=TRITON_VENV,
            about="/v2",
        ),
        Peer(
            "bentoml",
            "BentoML, 2 workers x 1 thread",
            processes=2,
            health="/readyz",  # BentoML's readiness probe (any one worker's)
            command=_module(
                "benchmarks.peers.bentoml_app", "--workers", "2", "--threads", "1", temp_dir=True
            ),
            request=bentoml_request,
        ),
        Peer(
            "bentoml-1w",
            "BentoML, 1 worker x 1 thread",
            health="/readyz",  # BentoML's readiness probe (any one worker's)
            command=_module(
                "benchmarks.peers.bentoml_app", "--workers", "1", "--threads", "1", temp_dir=True
            ),
            request=bentoml_request,
        ),
        Peer(
            "threaded",
            "splitserve threaded, 8 threads",
            splitserve_args=("--mode", "threaded", "--threads", "8"),
        ),
        Peer(
            "split",
            "splitserve split, the README's command (the default layout)",
            splitserve_args=(),
        ),
        Peer(
            "split-int8",
            "splitserve split, the README's command, int8 det + rec (gated: >= 98% characters)",
            route="/v1/services/ocr-int8",
            service="examples.ocr.int8:OCRInt8",
            min_character_agreement=0.98,
        ),
        Peer(
            "split-1w",
            "splitserve split, 1 CPU worker x 16, 2 engines x 1 thread",
            splitserve_args=(
                *("--cpu-workers", "1", "--worker-concurrency", "16"),
                *("--engine-replicas", "2", "--engine-threads", "1"),
            ),
            own_engine_threads=1,
        ),
        Peer(
            "split-2w",
            "splitserve split, 2 CPU workers x 8, 1 engine",
            splitserve_args=(
                *("--cpu-workers", "2", "--worker-concurrency", "8"),
                *("--engine-replicas", "1"),
            ),
        ),
    )
}


# --- processes ---------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def process_group(root: int, marker: str | None = None) -> dict[int, str]:
    """``root``, its descendants, its session's members and (when ``marker`` is given)
    every process whose command line contains it: pid -> start time (to spot pid reuse)."""
    stats = {pid: st for pid in _all_pids() if (st := _stat(pid)) is not None and st[0] != "Z"}
    found: dict[int, str] = {}
    if root in stats:
        found[root] = stats[root][19]
    grew = True
    while grew:  # descendants, to any depth
        grew = False
        for pid, st in stats.items():
            if pid not in found and int(st[1]) in found:
                found[pid] = st[19]
                grew = True
    for pid, st in stats.items():
        if int(st[3]) == root:  # started with start_new_session: session id == root pid
            found.setdefault(pid, st[19])
    if marker:
        for pid, st in stats.items():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if marker.encode() in cmdline and pid != os.getpid():
                    found.setdefault(pid, st[19])
    return found


def _alive(pid: int, started: str) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z" and st[19] == started


def _address(hex_address: str) -> str:
    """/proc/net/tcp{,6}'s ``ADDR:PORT`` (hex, little-endian words) as ``ip:port``."""
    addr, port = hex_address.split(":")
    raw = b"".join(bytes.fromhex(addr[i : i + 8])[::-1] for i in range(0, len(addr), 8))
    return f"{ipaddress.ip_address(raw)}:{int(port, 16)}"


def listening(pids: Iterable[int]) -> list[str]:
    """The TCP sockets that ``pids`` listen on, as ``ip:port pid name``."""
    inodes: dict[str, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A":  # LISTEN
                    inodes[parts[9]] = _address(parts[1])
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        found.append(f"{inodes[target[8:-1]]} {pid} {_comm(pid)}")
    return sorted(set(found))


def is_loopback(listener: str) -> bool:
    ip = ipaddress.ip_address(listener.split()[0].rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(
    pids: dict[int, str], model_pids: set[int]
) -> tuple[float, dict[str, float], float]:
    """CPU seconds so far: (the whole machine's busy time, ``pids``' by process name, this
    process's). Processes that load the models are named ``NAME (model)``."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    group: dict[str, float] = {}
    for pid, started in pids.items():
        st = _stat(pid)
        if st is not None and st[19] == started:
            name = _comm(pid) + (" (model)" if pid in model_pids else "")
            group[name] = group.get(name, 0.0) + (int(st[11]) + int(st[12])) / CLOCK_TICKS
    me = os.times()
    return busy / CLOCK_TICKS, group, me.user + me.system


def cores_used(
    before: tuple[float, dict[str, float], float],
    after: tuple[float, dict[str, float], float],
    wall_s: float,
) -> dict[str, Any]:
    """Average cores busy during a load run: the server (and by process name), the load
    client, anything else on the machine (another job sharing it shows here)."""
    wall = max(wall_s, 1e-9)
    by_name = {k: v - before[1].get(k, 0.0) for k, v in after[1].items()}
    server = sum(by_name.values())
    client = after[2] - before[2]
    other = after[0] - before[0] - server - client
    return {
        "server_cores": round(server / wall, 3),
        "client_cores": round(client / wall, 3),
        "other_cores": round(max(other, 0.0) / wall, 3),
        "server_cores_by_process": {
            k: round(v / wall, 3)
            for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])
            if v / wall >= 0.005
        },
    }


def _die_with_parent() -> None:
    """In the server's process: SIGINT when this script dies, so no server outlives it.

    SIGINT is reset to its default first: a job started in the background by a shell
    (``nohup ... &``) inherits it ignored, and Python then never raises KeyboardInterrupt,
    so a server that relies on it (LitServe) would ignore the stop signal.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    set_parent_death_signal(signal.SIGINT)


@dataclass
class Running:
    """A started peer: its process, where it answers, what it leaves behind."""

    peer: Peer
    proc: subprocess.Popen
    port: int
    log_path: Path
    info_dir: Path
    temp_dir: Path
    command: list[str]
    seen: dict[int, str] = field(default_factory=dict)  # every process it ever had

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.peer.route}"

    def snapshot(self) -> None:
        self.seen.update(process_group(self.proc.pid, str(self.temp_dir)))

    def infos(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.info_dir.glob("info-*.json")):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(path.read_text()))
        return out


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def server_about(url: str) -> Any:
    """The JSON a server answers at ``url`` (its name and version), or the error."""
    try:
        with urllib.request.urlopen(url, timeout=10.0) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5.0) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start_peer(peer: Peer, engine_threads: int | None, work: Path, logs: Path) -> Running:
    """Start ``peer`` on a free port and return once it is ready; raise (after stopping
    whatever it started) if it exits or is not ready within ``READY_TIMEOUT_S``.
    Its output goes to ``logs/NAME-PORT.log``."""
    port = free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix=f"{peer.name}-", dir=work))
    info_dir = temp_dir / "info"
    info_dir.mkdir()
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{peer.name}-{port}.log"
    threads = peer.engine_threads(engine_threads)
    if peer.command is None:
        args = [peer.service, *peer.splitserve_args]
        if threads is not None and "--engine-threads" not in args:
            args += ["--engine-threads", str(threads)]
        proc = start_server(args, port, READY_TIMEOUT_S, log_path)
        command = ["splitserve", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
        running = Running(peer, proc, port, log_path, info_dir, temp_dir, command)
        running.snapshot()
        return running

    if peer.venv and not venv_python(peer.venv).exists():
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise RuntimeError(
            f"{peer.name} runs in its own virtual environment {peer.venv}/, which is "
            "missing: build it with `make peers-venvs`"
        )
    command = peer.command(port, threads, info_dir, temp_dir)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env[INFO_DIR_ENV] = str(info_dir)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: every process it starts is findable
            preexec_fn=_die_with_parent,
        )
    running = Running(peer, proc, port, log_path, info_dir, temp_dir, command)
    deadline = time.monotonic() + READY_TIMEOUT_S
    health = f"http://127.0.0.1:{port}{peer.health}"
    try:
        while True:
            running.snapshot()
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{peer.name} exited with code {proc.returncode} before it was ready; "
                    f"{log_path}:\n{_log_tail(log_path)}"
                )
            if len(list(info_dir.glob("info-*.json"))) >= peer.processes and _http_ok(health):
                running.snapshot()
                return running
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{peer.name} not ready after {READY_TIMEOUT_S:.0f}s; "
                    f"{log_path}:\n{_log_tail(log_path)}"
                )
            time.sleep(0.25)
    except BaseException:
        stop_peer(running)
        raise


def stop_peer(running: Running) -> dict[str, Any]:
    """SIGINT to the peer's pid, then SIGKILL by pid to whatever it started that is still
    alive; returns the exit code, the seconds it took and what had to be killed or
    survived (both should be empty)."""
    began = time.monotonic()
    running.snapshot()
    proc = running.proc
    interrupt_then_kill(proc, STOP_GRACE_S)
    # Children get a moment to follow their parent before they count as left behind.
    wait_until = time.monotonic() + 10.0
    while time.monotonic() < wait_until:
        running.seen.update(process_group(proc.pid, str(running.temp_dir)))
        if not any(_alive(pid, st) for pid, st in running.seen.items() if pid != proc.pid):
            break
        time.sleep(0.2)
    killed = []
    for pid, started in running.seen.items():
        if pid != proc.pid and _alive(pid, started):
            killed.append(f"{pid} {_comm(pid)}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    time.sleep(0.5 if killed else 0.0)
    survivors = {pid for pid, st in running.seen.items() if _alive(pid, st)}
    survivors |= set(process_group(proc.pid, str(running.temp_dir))) - {proc.pid}
    shutil.rmtree(running.temp_dir, ignore_errors=True)
    return {
        "exit_code": proc.returncode,
        "stop_s": round(time.monotonic() - began, 2),
        "processes_seen": len(running.seen),
        "killed_after_stop": killed,
        "left_running": [f"{pid} {_comm(pid)}" for pid in sorted(survivors)],
    }


# --- checks and load ---------------------------------------------------------------------


def request_headers(payload: Payload) -> dict[str, str]:
    """The headers a payload is sent with (its content type and any of its own)."""
    return {"Content-Type": payload.content_type, **dict(getattr(payload, "headers", ()))}


def check_answers(
    peer: Peer, url: str, images: list[bytes], references: list[Any]
) -> dict[str, Any]:
    """Each image's answer against RapidOCR's (``compare_ocr``): all equivalent or not
    (for lower-precision engines: the page texts' character agreement, summed over the
    images, at least ``peer.min_character_agreement``). Each image is sent as
    ``peer.request`` makes it, the load's very requests."""
    worst_score = worst_box = 0.0
    failures = []
    errors = characters = 0
    for i, (data, ref) in enumerate(zip(images, references, strict=True)):
        payload = peer.request(data)
        req = urllib.request.Request(
            url, data=payload.data, method="POST", headers=request_headers(payload)
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                answer = json.loads(peer.answer(resp.read(), resp.headers))
                diff = compare_ocr(answer, ref)
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            failures.append({"image": i, "error": f"{type(exc).__name__}: {exc}"})
            continue
        wrong, total = character_errors(diff["reference_texts"], diff["texts"])
        errors, characters = errors + wrong, characters + total
        if not diff["equivalent"] and peer.min_character_agreement is None:
            failures.append({"image": i, **diff})
        worst_score = max(worst_score, diff["max_score_diff"])
        worst_box = max(worst_box, diff["max_box_diff"])
    agreement = 1 - errors / characters if characters else 1.0
    if peer.min_character_agreement is not None and agreement < peer.min_character_agreement:
        failures.append({"character_agreement": agreement})
    return {
        "equivalent": not failures,
        "character_agreement": round(agreement, 5),
        "checked_images": len(images),
        "max_score_diff": worst_score,
        "max_box_diff": worst_box,
        "failures": failures[:3],
    }


def run_rounds(
    names: list[str],
    images: list[bytes],
    references: list[Any],
    concurrencies: list[int],
    *,
    rounds: int,
    duration_s: float,
    warmup_s: float,
    engine_threads: int | None,
    work: Path,
    logs: Path,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(load rows, one record per server start): each server alone on the machine."""
    rows: list[dict[str, Any]] = []
    starts: list[dict[str, Any]] = []
    for round_no in range(rounds):
        for name in names:
            peer = PEERS[name]
            record: dict[str, Any] = {"peer": name, "config": peer.label, "round": round_no}
            starts.append(record)
            began = time.monotonic()
            try:
                running = start_peer(peer, engine_threads, work, logs)
            except RuntimeError as exc:
                record["error"] = str(exc)
                print(f"round {round_no} {name}: failed to start: {exc}", flush=True)
                continue
            record.update(
                log=str(running.log_path),
                command=running.command,
                start_s=round(time.monotonic() - began, 2),
                engine_threads=peer.engine_threads(engine_threads),
            )
            try:
                record["processes"] = running.infos()
                if peer.about:
                    record["server"] = server_about(f"http://127.0.0.1:{running.port}{peer.about}")
                sockets = listening(running.seen)
                record["listening"] = sockets
                record["listening_beyond_loopback"] = exposed = [
                    x for x in sockets if not is_loopback(x)
                ]
                if exposed:
                    print(f"  {name} listens beyond 127.0.0.1: {exposed}", flush=True)
                record["check"] = check = check_answers(peer, running.url, images, references)
                print(
                    f"round {round_no} {name}: ready in {record['start_s']:.1f} s, "
                    f"answers equal RapidOCR's: {check['equivalent']} (characters "
                    f"agreeing: {check['character_agreement']:.2%})",
                    flush=True,
                )
                if not check["equivalent"]:
                    continue  # a wrong answer is not measured
                bodies = [peer.request(data) for data in images]
                for concurrency in concurrencies:
                    running.snapshot()
                    model_pids = {int(p["pid"]) for p in record["processes"]}
                    before, t0 = cpu_seconds(running.seen, model_pids), time.monotonic()
                    with payload_headers():
                        result = run_closed_loop(
                            running.url,
                            bodies,
                            CONTENT_TYPE,
                            concurrency,
                            duration_s,
                            warmup_s,
                            MAX_REQUESTS,
                        )
                    after = cpu_seconds(running.seen, model_pids)
                    cpu = cores_used(before, after, time.monotonic() - t0)
                    rows.append(
                        {
                            "config": peer.label,
                            "peer": name,
                            "round": round_no,
                            "engine_threads": record["engine_threads"],
                            **cpu,
                            **result.to_dict(),
                        }
                    )
                    print(
                        f"round {round_no} {name:12s} c={concurrency:<3d} "
                        f"{result.rps:7.2f} req/s  p50 {result.p50_ms:8.1f} ms  "
                        f"p99 {result.p99_ms:8.1f} ms  errors {result.errors}  "
                        f"cores: server {cpu['server_cores']:.2f} client "
                        f"{cpu['client_cores']:.2f} other {cpu['other_cores']:.2f}",
                        flush=True,
                    )
            finally:
                record["stop"] = stop_peer(running)
                if record["stop"]["left_running"]:
                    print(f"  left running: {record['stop']['left_running']}", flush=True)
    return rows, starts


# --- output ------------------------------------------------------------------------------


_VERSIONS_SCRIPT = """
import json, sys
from importlib import metadata
out = {"python": sys.version.split()[0]}
for dist in sys.argv[1:]:
    try:
        out[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        out[dist] = None
print(json.dumps(out))
"""


def versions(names: Iterable[str] = ()) -> dict[str, Any]:
    """Installed versions of the packages that matter here (None: not installed), and
    those of each virtual environment of its own that the servers ``names`` run in."""
    out: dict[str, Any] = {}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    venvs = {PEERS[n].venv for n in names if PEERS[n].venv}
    for venv in sorted(venvs):
        python = venv_python(venv)
        try:
            found = subprocess.run(
                [str(python), "-c", _VERSIONS_SCRIPT, *VENV_VERSIONED],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            out[venv] = json.loads(found.stdout)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            out[venv] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``modes.summarise`` plus the median time spent inside the service per request."""
    summary = summarise(rows)
    for entry in summary:
        runs = [
            r
            for r in rows
            if r["config"] == entry["config"] and r["concurrency"] == entry["concurrency"]
        ]
        service = [r["timings_ms"]["worker_ms"] for r in runs if "worker_ms" in r["timings_ms"]]
        entry["service_ms"] = statistics.median(service) if service else None
        for key in ("server_cores", "client_cores", "other_cores"):
            entry[key] = statistics.median(r[key] for r in runs)
        entry["peer"] = runs[0]["peer"]
    return summary


def markdown_table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| server | concurrency | requests/s (median) | per round | p50 ms | p99 ms "
        "| in service ms (p50) | cores: server / client / other | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary:
        service = f"{r['service_ms']:.1f}" if r["service_ms"] is not None else "-"
        cores = f"{r['server_cores']:.2f} / {r['client_cores']:.2f} / {r['other_cores']:.2f}"
        lines.append(
            f"| {r['config']} | {r['concurrency']} | {r['rps']:.2f} | {r['rps_all']} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {service} | {cores} | {r['errors']} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Grouped bars of requests/s per server, one bar per concurrency (False: no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    configs = list(dict.fromkeys(r["config"] for r in summary))
    levels = list(dict.fromkeys(r["concurrency"] for r in summary))
    width = 0.8 / max(len(levels), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.5 * len(configs)), 6.0))
    for k, level in enumerate(levels):
        xs, ys, lows, highs = [], [], [], []
        for i, config in enumerate(configs):
            entry = next(
                (r for r in summary if r["config"] == config and r["concurrency"] == level), None
            )
            if entry is None:
                continue
            xs.append(i + (k - (len(levels) - 1) / 2) * width)
            ys.append(entry["rps"])
            # rps_all is rounded: clamp, so a bar's error never goes below zero
            lows.append(max(entry["rps"] - min(entry["rps_all"]), 0.0))
            highs.append(max(max(entry["rps_all"]) - entry["rps"], 0.0))
        bars = ax.bar(xs, ys, width, yerr=[lows, highs], capsize=3, label=f"concurrency {level}")
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([textwrap.fill(c, 18) for c in configs], fontsize=7)
    ax.set_ylabel("requests/s (median over rounds; bars: min-max)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(PEERS),
        metavar="NAME",
        help=f"servers to run, of: {' '.join(PEERS)}",
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--duration", type=float, default=30.0, help="measured s per level")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", help="default 4 16 (quick: 2)")
    parser.add_argument("--images", type=int, help="benchmark documents (default 8, quick 3)")
    parser.add_argument(
        "--engine-threads",
        default=None,
        help="ONNX Runtime intra-op threads per model-loading process, for every server\n"
        "that does not fix its own (default: ONNX Runtime's own, all cores)",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "artifacts" / "peers")
    args = parser.parse_args(argv)
    engine_threads = parse_threads(args.engine_threads)
    if args.quick:
        # One OCR request takes about a second of both cores here: long enough to see some.
        duration, warmup = 6.0, 1.0
        concurrencies = args.concurrency or [2]
        n_images = args.images or 3
    else:
        duration, warmup = args.duration, args.warmup
        concurrencies = args.concurrency or [4, 16]
        n_images = args.images or 8
    names = args.only or list(PEERS)
    began = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="peers-"))

    try:
        from rapidocr_onnxruntime import RapidOCR

        paths = generate_documents(work / "images", n_images, seed=11)
        images = [p.read_bytes() for p in paths]
        reference_engine = RapidOCR()
        references = [reference_engine(data) for data in images]
        del reference_engine
        info = {"machine": machine(), "versions": versions(names)}
        rows, starts = run_rounds(
            names,
            images,
            references,
            concurrencies,
            rounds=args.rounds,
            duration_s=duration,
            warmup_s=warmup,
            engine_threads=engine_threads,
            work=work,
            logs=args.out / "logs",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summary_rows(rows) if rows else []
    elapsed = time.monotonic() - began
    table = markdown_table(summary)
    title = (
        f"OCR, {n_images} images, {duration:.0f} s per level, median of {args.rounds} "
        f"round(s); {info['machine']['nproc']} cores ({info['machine']['cpu']})"
    )
    header = (
        f"{title}\n\nengine threads: {engine_threads or 'ONNX Runtime default (all cores)'} "
        "per model-loading process, except where the configuration fixes its own\n\n"
    )
    (args.out / "peers.md").write_text(header + table)
    out = {
        **info,
        "command": [sys.executable, *sys.argv] if argv is None else ["run_peers.py", *argv],
        "settings": {
            "servers": {name: PEERS[name].label for name in names},
            "engine_threads": engine_threads,
            "concurrencies": concurrencies,
            "rounds": args.rounds,
            "duration_s": duration,
            "warmup_s": warmup,
            "images": n_images,
            "content_type": CONTENT_TYPE,
        },
        "elapsed_s": round(elapsed, 1),
        "summary": summary,
        "starts": starts,
        "rows": rows,
    }
    (args.out / "peers.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    plotted = plot(summary, args.out / "peers.png", title) if summary else False
    print(f"\n{header}{table}")
    print(f"took {elapsed:.0f} s; wrote {args.out}/peers.json, peers.md" +
          (", peers.png" if plotted else " (no plot: matplotlib is not installed)"))  # fmt: skip
    failed = [s for s in starts if "error" in s or not s.get("check", {}).get("equivalent")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
