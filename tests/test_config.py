"""Settings: one definition in ServerConfig, flags made from it, a TOML file under them."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitserve import config
from splitserve.config import ServerConfig
from splitserve.layout import Services
from tests.conftest import ROOT, Server, children_of, free_port, process_name


def parse(*argv: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path)
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    return config.from_arguments(args, args.config)


def test_every_setting_has_a_flag_and_one_default() -> None:
    cfg = parse("tests.services:Echo")
    assert cfg == ServerConfig(services=["tests.services:Echo"])
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    flags = {a.dest for a in parser._actions}
    settings = {f.name for f in dataclasses.fields(ServerConfig)} - {"models"}
    assert settings <= flags


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "splitserve.toml"
    path.write_text(
        'services = ["tests.services:Echo"]\n'
        "cpu_workers = 3\nqueue_size = 9\nrequest_timeout_s = 4\n"
        '[models."echo/model"]\nmax_batch_size = 2\n'
    )
    cfg = parse("--config", str(path), "--cpu-workers", "5")
    assert (cfg.cpu_workers, cfg.queue_size, cfg.request_timeout_s) == (5, 9, 4)
    assert cfg.worker_concurrency == ServerConfig.worker_concurrency
    assert cfg.services == ["tests.services:Echo"]
    assert parse("tests.services:Pipeline", "--config", str(path)).services == [
        "tests.services:Pipeline"
    ]
    echo = Services.load(cfg.services, cfg.models).models["echo/model"]
    assert echo.model.max_batch_size == 2 and echo.model.max_delay_ms == 20  # the rest stays


def test_fronts_is_a_number_or_auto_and_at_most_a_workers_slots(tmp_path: Path) -> None:
    assert parse("tests.services:Echo").fronts == "auto"
    assert parse("tests.services:Echo", "--fronts", "3").fronts == 3
    path = tmp_path / "splitserve.toml"
    path.write_text('services = ["tests.services:Echo"]\nfronts = 2\n')
    assert parse("--config", str(path)).fronts == 2
    assert parse("--config", str(path), "--fronts", "auto").fronts == "auto"
    assert ServerConfig(fronts="auto").front_count == 1  # unresolved: the cautious one
    for bad, message in (("0", ">= 1"), ("two", "number or 'auto'")):
        with pytest.raises(ValueError, match=message):
            parse("tests.services:Echo", "--fronts", bad)
    with pytest.raises(ValueError, match="<= worker_conc"):
        parse("tests.services:Echo", "--fronts", "5", "--worker-concurrency", "4")
    assert parse("tests.services:Echo", "--fronts", "5", "--worker-concurrency", "8").fronts == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cpu_wokers = 2\n", "unknown settings \\['cpu_wokers'\\]"),
        ('cpu_workers = "2"\n', "cpu_workers must be int"),
        ("cpu_workers = 0\n", "cpu_workers must be >= 1"),
        ("fronts = 1.5\n", "fronts must be int or str"),
        ('[models."echo/model"]\nmax_batch = 2\n', "unknown settings \\['max_batch'\\]"),
        ('[models."echo/model"]\nmax_batch_size = 0\n', "max_batch_size must be >= 1"),
        ('[models."echo/other"]\nreplicas = 2\n', "sets models \\['echo/other'\\]"),
        ("services = [\n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "splitserve.toml"
    path.write_text('services = ["tests.services:Echo"]\n' * ("services" not in text) + text)
    with pytest.raises(ValueError, match=message):
        cfg = parse("--config", str(path))
        Services.load(cfg.services, cfg.models)


@pytest.mark.parametrize(
    ("text", "code", "message"),
    [
        ("mode = 3\n", 2, "mode must be str, got 3"),
        ('[models."echo/nope"]\nreplicas = 2\n', 1, "the config sets models ['echo/nope']"),
        ('services = ["tests.nowhere:Echo"]\n', 1, "No module named 'tests.nowhere'"),
    ],
)
def test_the_command_line_reports_a_bad_file_in_one_line(
    tmp_path: Path, text: str, code: int, message: str
) -> None:
    path = tmp_path / "splitserve.toml"
    path.write_text('services = ["tests.services:Echo"]\n' * ("services" not in text) + text)
    port = str(free_port())
    done = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "serve", "--config", str(path), "--port", port],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == code and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_server_runs_from_a_config_file(tmp_path: Path) -> None:
    """Layout and per-model batching come from the file; the engine batches by it."""
    path = tmp_path / "splitserve.toml"
    path.write_text(
        'services = ["tests.services:Echo", "tests.services:Pipeline"]\n'
        "cpu_workers = 1\n"
        "engine_replicas = 1\n"
        '[models."echo/model"]\nmax_batch_size = 3\n'
        '[models."pipeline/second"]\nreplicas = 1\n'  # declared 2: the file wins
    )
    server = Server([], "--config", str(path))
    try:
        models = server.client.get("/v1/services").json()["services"]["echo"]["models"]
        assert models["model"]["max_batch_size"] == 3
        names = [process_name(pid) for pid in children_of(server.pid)]
        kinds = [n.removeprefix("splitserve-")[:3] for n in names]  # names are cut at 15
        assert (kinds.count("eng"), kinds.count("cpu"), kinds.count("fro")) == (1, 1, 1), names
        r = server.post("echo", json={"values": [1, 2], "rows": 7})
        assert r.status_code == 200 and r.json()["shape"] == [7, 2]
        deadline = time.monotonic() + 10
        sizes: dict[str, int] = {}
        while time.monotonic() < deadline and sum(sizes.values()) < 3:  # 3 + 3 + 1 rows
            time.sleep(0.3)
            models = server.client.get("/v1/stats").json()["models"]  # reported each second
            sizes = models.get("echo/model", {}).get("batch_sizes", {})
        assert max(int(s) for s in sizes) == 3, sizes
    finally:
        server.stop()
