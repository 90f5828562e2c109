"""The default layout chosen from the machine and the models (runtime/layout.py)."""

from __future__ import annotations

import pytest

import splitserve
from splitserve.config import ServerConfig
from splitserve.layout import (
    ACCELERATOR_WORKER_CONCURRENCY,
    CPU_MODELS_WORKER_CONCURRENCY,
    MAX_ACCELERATOR_WORKER_CONCURRENCY,
    MAX_CPU_REPLICAS,
    MAX_FRONTS,
    Services,
    default_fronts,
    default_layout,
    on_accelerator,
    with_default_layout,
)

CPU_MODEL = splitserve.Model("m.onnx")
SIMULATED = splitserve.Model(backend="simulated", options={"latency_ms": [1, 1]})


def test_cpu_models_get_one_engine_per_core_and_a_worker_per_four_cores() -> None:
    # each worker holds many jobs: they mostly await the engines
    assert default_layout({"s/m": CPU_MODEL}, cores=2) == (1, 2, CPU_MODELS_WORKER_CONCURRENCY)
    assert default_layout({"s/m": CPU_MODEL}, cores=8) == (2, 8, CPU_MODELS_WORKER_CONCURRENCY)
    assert default_layout({"s/m": CPU_MODEL}, cores=32).engine_replicas == MAX_CPU_REPLICAS


def test_accelerator_models_get_one_engine_and_a_worker_per_core_but_one() -> None:
    assert on_accelerator(SIMULATED)
    assert default_layout({"s/m": SIMULATED}, cores=16) == (
        15,
        None,
        ACCELERATOR_WORKER_CONCURRENCY,
    )
    # the workers hold at least a full batch of the largest model between them
    big = splitserve.Model(backend="simulated", max_batch_size=32, options=SIMULATED.options)
    assert default_layout({"s/m": big}, cores=2).worker_concurrency == 32  # one worker
    assert default_layout({"s/m": big}, cores=5).worker_concurrency == 8  # four workers
    assert default_layout({"s/m": big}, cores=16).worker_concurrency == (
        ACCELERATOR_WORKER_CONCURRENCY
    )
    huge = splitserve.Model(backend="simulated", max_batch_size=512, options=SIMULATED.options)
    assert default_layout({"s/m": huge}, cores=2).worker_concurrency == (
        MAX_ACCELERATOR_WORKER_CONCURRENCY
    )
    cuda = splitserve.Model("m.onnx", options={"providers": ["CUDAExecutionProvider"]})
    assert on_accelerator(cuda)
    assert not on_accelerator(splitserve.Model("pkg:make", backend="torch"))


def test_declared_replicas_and_flags_win() -> None:
    two = splitserve.Model("m.onnx", replicas=2)
    assert default_layout({"s/a": CPU_MODEL, "s/b": two}, cores=4).engine_replicas is None
    assert default_layout({"s/m": CPU_MODEL}, cores=4, cpu_workers=3).cpu_workers == 3


def test_more_fronts_only_for_accelerator_models_on_many_cores() -> None:
    assert default_fronts({"s/m": CPU_MODEL}, cores=64) == 1  # the engines take the cores
    assert default_fronts({"s/m": SIMULATED}, cores=2) == 1
    assert default_fronts({"s/m": SIMULATED}, cores=8) == 1
    assert default_fronts({"s/m": SIMULATED}, cores=16) == 2
    assert default_fronts({"s/m": SIMULATED, "s/n": CPU_MODEL}, cores=16) == 1
    assert default_fronts({"s/m": SIMULATED}, cores=128) == MAX_FRONTS
    assert default_fronts({"s/m": SIMULATED}, cores=128, worker_concurrency=1) == 1
    assert default_fronts({}, cores=32) == MAX_FRONTS  # no model: the work is the workers'


def test_fronts_above_the_default_worker_slots_are_refused() -> None:
    services = Services.load(["tests.services:SlowEngine"])  # a simulated accelerator
    cfg = with_default_layout(ServerConfig(fronts=2, cpu_workers=2), services)
    # two workers x 4 slots hold SlowEngine's batches of 8
    assert (cfg.worker_concurrency, cfg.fronts) == (ACCELERATOR_WORKER_CONCURRENCY, 2)
    with pytest.raises(ValueError, match=r"<= worker_concurrency \(4\)"):
        with_default_layout(ServerConfig(fronts=5, cpu_workers=2), services)
