"""TensorRT backend: a serialized engine built from the prepared ONNX graph, run with
the name-based API (set_input_shape / set_tensor_address / execute_async_v3).

Precision is in the graph (``splitserve build`` put the casts and Q/DQ pairs there), so
the network is created *strongly typed* wherever TensorRT offers it (10 and later; the
only mode of 11): TensorRT then keeps every tensor in the type the graph gives it and
cannot quietly pick fp32. Only a TensorRT without strong typing gets the old builder
flags (FP16 / INT8 / BF16), and a precision the platform or version lacks is an error.

Needs the ``tensorrt`` package, a CUDA GPU, and PyTorch with CUDA (device buffers and
the stream come from torch, which a GPU deployment of this project has anyway).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from splitserve.engines.base import Engine, TensorSpec
from splitserve.errors import BadRequest
from splitserve.spec import ModelSpec

log = logging.getLogger("splitserve.engine.tensorrt")

WORKSPACE_BYTES = 4 << 30
# Builder flag per precision, for TensorRT versions without strongly typed networks.
_PRECISION_FLAGS = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8"}


class TensorRTUnavailable(RuntimeError):
    """TensorRT, CUDA or a GPU is missing: says which, and what to install."""


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            "the tensorrt backend needs NVIDIA TensorRT (pip install 'splitserve[tensorrt]') "
            "and a CUDA GPU; on this machine use backend='onnxruntime'"
        ) from None
    return trt


def import_cuda_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise TensorRTUnavailable(
            "the tensorrt backend allocates GPU buffers with PyTorch: pip install torch "
            "(a CUDA build)"
        ) from None
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("the tensorrt backend needs a CUDA GPU; none is visible")
    return torch


def profile_shapes(
    inputs: Sequence[TensorSpec],
    max_batch_size: int,
    dynamic: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes of every input for one optimisation profile.

    Axis 0 is the batch: 1 .. ``max_batch_size``, tuned for the full batch (the batcher
    fills batches under load), or the model's own size when it fixes it. Other dynamic
    axes need their range from ``dynamic``: ``{input: (min_shape, opt_shape, max_shape)}``
    without the batch axis.
    """
    dynamic = dynamic or {}
    shapes = {}
    for spec in inputs:
        fixed_batch = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else None
        rest = list(spec.shape[1:])
        if spec.name in dynamic:
            low, opt, high = (tuple(int(d) for d in s) for s in dynamic[spec.name])
            if not (len(low) == len(opt) == len(high) == len(rest)):
                raise ValueError(
                    f"tensorrt shapes for {spec.name!r} need {len(rest)} axes after the batch"
                )
            for axis, fixed in enumerate(rest):
                if fixed is not None and not (low[axis] == opt[axis] == high[axis] == fixed):
                    raise ValueError(f"{spec.name!r} axis {axis + 1} is fixed at {fixed}")
        elif any(d is None for d in rest):
            raise ValueError(
                f"input {spec.name!r} has dynamic axes {spec.shape}: give their range as "
                f"Model(options={{'shapes': {{{spec.name!r}: (min, opt, max)}}}})"
            )
        else:
            low = opt = high = tuple(int(d) for d in rest)  # type: ignore[arg-type]
        if fixed_batch is not None:
            shapes[spec.name] = ((fixed_batch, *low), (fixed_batch, *opt), (fixed_batch, *high))
        else:
            shapes[spec.name] = ((1, *low), (max_batch_size, *opt), (max_batch_size, *high))
    return shapes


def onnx_inputs(path: Path) -> list[TensorSpec]:
    """The graph inputs of an ONNX file (``None`` for symbolic or unknown axes)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims
        )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        specs.append(TensorSpec(value.name, str(np.dtype(dtype)), shape))
    return specs


def strongly_typed_flag(trt: Any) -> int:
    """The network-creation flag for strong typing, or 0 when this TensorRT lacks it."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    precision: str,
    profile: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    timing_cache: Path | None = None,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> None:
    """Parse ``onnx_path``, build for ``profile`` (from ``profile_shapes``), write the
    serialized engine."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    typed = strongly_typed_flag(trt)
    network = builder.create_network(typed)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if not typed and precision != "fp32":
        _set_precision_flag(trt, builder, config, precision)
    optimisation_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimisation_profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimisation_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    if cache is None:  # a damaged file: start a fresh cache rather than fail the build
        cache = config.create_timing_cache(b"")
    # ignore_mismatch: a cache from another GPU or version is discarded, not trusted
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path.name} (see its log above)")
    _write_atomically(plan_path, bytes(serialized))
    updated = config.get_timing_cache()
    if timing_cache is not None and updated is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(timing_cache, bytes(updated.serialize()))
    log.info("built TensorRT engine %s (%s, strongly typed: %s)", plan_path, precision, bool(typed))


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def timing_cache_path() -> Path:
    """One timing cache per GPU model and TensorRT version (they are not portable)."""
    import re

    from splitserve.engines.device import cache_root, device_name

    trt = import_tensorrt()
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", f"{device_name('tensorrt', {})}-{trt.__version__}")
    return cache_root() / "tensorrt" / f"timing-{tag}.cache"


def _set_precision_flag(trt: Any, builder: Any, config: Any, precision: str) -> None:
    """TensorRT before strong typing: ask with a flag, and fail when it cannot be had."""
    flag = getattr(trt.BuilderFlag, _PRECISION_FLAGS[precision], None)
    if flag is None:
        raise RuntimeError(f"this TensorRT ({trt.__version__}) has no {precision} builder flag")
    fast = {"fp16": "platform_has_fast_fp16", "int8": "platform_has_fast_int8"}.get(precision)
    if fast and not getattr(builder, fast, True):
        raise RuntimeError(f"this GPU has no fast {precision}: refusing a silent fp32 engine")
    config.set_flag(flag)


class TensorRTEngine(Engine):
    """A deserialized engine with one execution context and its own CUDA stream.

    The plan is built next to the ONNX file on first use (the engine cache's entry
    holds both) with the timing cache shared by all builds.
    """

    @classmethod
    def from_spec(cls, spec: ModelSpec, run_dir: Path | None) -> TensorRTEngine:
        """``spec.source``: the prepared ONNX graph; the plan is built beside it."""
        return cls(
            Path(spec.source),
            precision=spec.precision,
            max_batch_size=spec.max_batch_size,
            options=spec.options,
        )

    def __init__(
        self,
        onnx_path: Path,
        *,
        precision: str = "fp32",
        max_batch_size: int = 8,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        trt = import_tensorrt()
        self.torch = torch = import_cuda_torch()
        options = dict(options or {})
        plan = onnx_path.with_suffix(".plan")
        profile = profile_shapes(onnx_inputs(onnx_path), max_batch_size, options.get("shapes"))
        if not plan.exists():
            build_engine(
                onnx_path,
                plan,
                precision=precision,
                profile=profile,
                timing_cache=timing_cache_path(),
            )
        # warm-up at the tuned shape: generic sizes may lie outside the profile
        self._opt_shapes = {name: shapes[1] for name, shapes in profile.items()}
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"cannot load {plan} (built by another TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        # One execution context: threaded mode's request threads take turns on it.
        self._lock = threading.Lock()
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            shape = tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(name))
            spec = TensorSpec(name, str(dtype), shape)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(spec)

    def warmup_batch(self, batch_size: int = 1) -> dict[str, np.ndarray]:
        return {
            spec.name: np.zeros((batch_size, *self._opt_shapes[spec.name][1:]), spec.dtype)
            for spec in self.inputs
        }

    def run_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            return self._infer(batch)

    def _infer(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        keep_alive = []
        with torch.cuda.stream(self.stream):
            for spec in self.inputs:
                host = torch.from_numpy(np.ascontiguousarray(batch[spec.name])).pin_memory()
                device = host.to("cuda", non_blocking=True)
                keep_alive.append((host, device))
                if not self.context.set_input_shape(spec.name, tuple(device.shape)):
                    raise BadRequest(
                        f"input {spec.name!r} of shape {tuple(device.shape)} is outside the "
                        "engine's optimisation profile (its batch and options['shapes'])"
                    )
                self.context.set_tensor_address(spec.name, device.data_ptr())
            outputs = {}
            for spec in self.outputs:
                shape = tuple(self.context.get_tensor_shape(spec.name))
                dtype = getattr(torch, np.dtype(spec.dtype).name)
                outputs[spec.name] = torch.empty(shape, dtype=dtype, device="cuda")
                self.context.set_tensor_address(spec.name, outputs[spec.name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            host_out = {}
            for name, device in outputs.items():
                host = torch.empty(device.shape, dtype=device.dtype, pin_memory=True)
                host_out[name] = host.copy_(device, non_blocking=True)
        self.stream.synchronize()
        return {k: v.numpy() for k, v in host_out.items()}
