"""PyTorch backend: an ``nn.Module`` from a factory, eager or compiled, with CUDA graphs.

    Model("package.module:factory", backend="torch", max_batch_size=32, options={
        "inputs": {"x": {"shape": [None, 3, 224, 224], "dtype": "float32"}},
        "outputs": {"logits": {"shape": [None, 1000], "dtype": "float32"}},
        "device": "cuda",          # the default when CUDA is there; "cpu" must be asked for
        "dtype": "float16",        # the module's compute dtype: float32, float16, bfloat16
        "cuda_graphs": True,       # one graph per batch bucket (1, 2, 4, ... max_batch_size)
        "compile": False,          # torch.compile the module (True, or a backend name)
        "channels_last": False,    # NHWC weights and 4-d inputs (tensor cores prefer it)
    })

A factory has no signature to read, so the inputs and outputs are declared, as for the
simulated backend: requests are checked against the input specs before they are batched,
and the module is called with the inputs in declaration order. It may return a tensor, a
sequence of tensors (in the order of ``outputs``) or a dict keyed by output name.

Floating-point inputs arrive in their declared (host) dtype and are cast to ``dtype`` on
the device; outputs are cast back to their declared dtype there too, so the host moves
only what the service sends and reads.

On CUDA each batch is staged in pinned host buffers, copied with ``non_blocking=True`` on
the engine's own stream, run, copied back into pinned buffers, and waited for with one
stream synchronise. One batch runs at a time (a lock): the batcher, not concurrent small
calls, is what fills the GPU, and the CUDA graphs share their static buffers and memory
pool. In threaded mode the request threads queue at that lock, one request per call, as
in a classic one-process service.

torch is imported here only: this module is loaded by ``create_engine`` in engine
processes (and threaded mode), never in CPU workers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitserve.engines.base import Engine, TensorSpec
from splitserve.importing import import_user_module
from splitserve.spec import ModelSpec

log = logging.getLogger("splitserve.engine")

OPTIONS = frozenset(
    {"inputs", "outputs", "device", "dtype", "cuda_graphs", "compile", "channels_last"}
)
COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Warm-up runs per graph before its capture: cuDNN's autotuner (benchmark mode) and lazy
# initialisations must happen before capture, where allocations and syncs are forbidden.
_WARMUP_RUNS = 3


def _specs(declared: Any, what: str) -> list[TensorSpec]:
    """Parse ``{name: {shape, dtype}}``; the batch axis (first) must be ``None``."""
    if not isinstance(declared, Mapping) or not declared:
        raise ValueError(
            f"a torch model needs options[{what!r}] = {{name: {{'shape': [None, ...], "
            f"'dtype': ...}}}}: a factory has no signature to read them from"
        )
    specs = []
    for name, spec in declared.items():
        shape = tuple(None if d is None else int(d) for d in spec["shape"])
        if not shape or shape[0] is not None:
            raise ValueError(f"{what} {name!r}: the first (batch) axis must be None")
        specs.append(TensorSpec(str(name), str(np.dtype(spec.get("dtype", "float32"))), shape))
    return specs


def resolve_device(requested: str | None) -> torch.device:
    """The device asked for; never a silent fall-back from CUDA to the CPU."""
    if requested is None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "torch engine: CUDA is not available here "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                "install a CUDA build of torch on a machine with an NVIDIA GPU, or set "
                "options['device'] = 'cpu' to run on the CPU on purpose"
            )
        return resolve_device("cuda")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"torch engine: device must be 'cuda', 'cuda:N' or 'cpu', got {requested!r}"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"torch engine: device {requested!r} was asked for but CUDA is not available "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
                f"{torch.cuda.device_count()} device(s) visible); install a CUDA build of "
                "torch on a machine with an NVIDIA GPU, or set options['device'] = 'cpu'"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(
                f"torch engine: device {requested!r} does not exist "
                f"({torch.cuda.device_count()} CUDA device(s) visible)"
            )
        return torch.device("cuda", index)
    return device


def load_factory(target: str) -> Callable[[], Any]:
    """Import ``package.module:factory`` (modules of the working directory too)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr or module_name.endswith(".py"):
        raise ValueError(
            f"a torch model's path names a factory as 'package.module:function', got {target!r}"
        )
    factory = getattr(import_user_module(module_name), attr, None)
    if not callable(factory):
        raise ValueError(f"{target!r}: {module_name} has no callable {attr!r}")
    return factory


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two below ``max_batch_size``, then itself: a batch pads up to the next."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size]


def _torch_dtype(name: str) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=name)).dtype


class _Pinned:
    """Growable page-locked host buffers, one per tensor name, viewed at any shape.

    Copies between pinned memory and the GPU run asynchronously (and at full bus speed);
    from pageable memory the driver stages them through a pinned buffer of its own and
    the host waits.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def view(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < nbytes:
            capacity = 1 << max(12, (nbytes - 1).bit_length())
            buf = self._buffers[name] = torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
        return buf[:nbytes].view(dtype).view(tuple(shape))


def load_module(target: str) -> Any:
    """The module ``target`` names: a ``.pt2`` file (``torch.export.save``), or a factory.

    An exported program carries its own graph and weights, so no Python code of the model
    needs to be importable where it is served; its batch axis must have been exported as
    dynamic (``torch.export.Dim``) for batches of several sizes.
    """
    if target.endswith(".pt2"):
        path = Path(target)
        if not path.exists():
            raise FileNotFoundError(f"torch engine: no exported program at {path}")
        return torch.export.load(str(path)).module()
    return load_factory(target)()


class TorchEngine(Engine):
    """A PyTorch module from a factory or an exported program, in inference mode.

    ``target`` is ``package.module:factory`` (the factory takes no argument and returns
    an ``nn.Module``) or a ``.pt2`` exported program; ``max_batch_size`` sets the
    CUDA-graph buckets; ``threads`` the intra-op threads on the CPU.
    """

    @classmethod
    def from_spec(cls, spec: ModelSpec, run_dir: Path | None) -> TorchEngine:
        """``spec.source``: the factory as declared, or the resolved ``.pt2`` file."""
        return cls(
            spec.source, spec.options, max_batch_size=spec.max_batch_size, threads=spec.threads
        )

    def __init__(
        self,
        target: str,
        options: Mapping[str, Any] | None = None,
        *,
        max_batch_size: int = 8,
        threads: int | None = None,
    ) -> None:
        options = dict(options or {})
        unknown = set(options) - OPTIONS
        if unknown:
            raise ValueError(
                f"torch engine: unknown options {sorted(unknown)}; known: {sorted(OPTIONS)}"
            )
        self.inputs = _specs(options.get("inputs"), "inputs")
        self.outputs = _specs(options.get("outputs"), "outputs")
        dtype_name = str(options.get("dtype", "float32"))
        if dtype_name not in COMPUTE_DTYPES:
            raise ValueError(
                f"torch engine: dtype must be one of {sorted(COMPUTE_DTYPES)}, got {dtype_name!r}"
            )
        self.dtype = COMPUTE_DTYPES[dtype_name]
        self.device = resolve_device(options.get("device"))
        self.cuda = self.device.type == "cuda"
        self.on_host_cores = not self.cuda
        use_graphs = bool(options.get("cuda_graphs", False))
        if use_graphs and not self.cuda:
            raise ValueError(
                "torch engine: cuda_graphs needs device 'cuda'; CUDA graphs do not exist on "
                f"the {self.device.type.upper()} (drop cuda_graphs, or run on a GPU)"
            )
        if use_graphs:
            dynamic = [s.name for s in self.inputs if any(d is None for d in s.shape[1:])]
            if dynamic:
                raise ValueError(
                    f"torch engine: cuda_graphs needs static shapes besides the batch axis; "
                    f"inputs {dynamic} have other dynamic axes"
                )
        self.channels_last = bool(options.get("channels_last", False))
        self._in_dtypes = [_torch_dtype(s.dtype) for s in self.inputs]
        self._out_dtypes = [_torch_dtype(s.dtype) for s in self.outputs]
        if threads and not self.cuda:
            torch.set_num_threads(int(threads))

        module = load_module(target)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"{target!r} returned {type(module).__name__}, not a torch.nn.Module")
        if not target.endswith(".pt2"):  # an exported program is fixed in its export mode
            module = module.eval()
        module = module.requires_grad_(False).to(device=self.device, dtype=self.dtype)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        compile_opt = options.get("compile", False)
        if not isinstance(compile_opt, bool | str):
            raise ValueError(
                f"torch engine: compile is a bool or a backend name, got {compile_opt!r}"
            )
        self._call: Callable[..., Any] = module
        if compile_opt:
            backend = compile_opt if isinstance(compile_opt, str) else "inductor"
            self._call = torch.compile(module, backend=backend)
        self.compiled = bool(compile_opt)

        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pinned_in = _Pinned() if self.cuda else None
        self._pinned_out = _Pinned() if self.cuda else None
        if use_graphs:  # fixed shapes: cuDNN autotunes each convolution once, before capture
            torch.backends.cudnn.benchmark = True
        self.buckets: list[int] = batch_buckets(max_batch_size) if use_graphs else []
        self._graphs: dict[int, tuple[Any, list[torch.Tensor]]] = {}
        self._static_in: list[torch.Tensor] = []
        self._check_outputs()
        if use_graphs:
            self._capture_graphs()
        log.info(
            "torch engine: %s on %s, %s%s%s",
            target,
            self.device,
            dtype_name,
            f", CUDA graphs for batches {self.buckets}" if self.buckets else "",
            ", compiled" if self.compiled else "",
        )

    # --- the computation ---------------------------------------------------------------

    def _forward(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Device tensors in their host dtypes -> outputs in their declared dtypes."""
        args = []
        for t in tensors:
            if t.is_floating_point():
                t = t.to(self.dtype)
            if self.channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            args.append(t)
        result = self._call(*args)
        named = self._name_outputs(result)
        return [o.to(d) for o, d in zip(named, self._out_dtypes, strict=True)]

    def _name_outputs(self, result: Any) -> list[torch.Tensor]:
        names = [s.name for s in self.outputs]
        if isinstance(result, torch.Tensor):
            result = [result]
        if isinstance(result, Mapping):
            missing = [n for n in names if n not in result]
            if missing:
                raise RuntimeError(f"the module's outputs {sorted(result)} lack {missing}")
            return [result[n] for n in names]
        if isinstance(result, Sequence) and len(result) == len(names):
            return list(result)
        got = len(result) if isinstance(result, Sequence) else type(result).__name__
        raise RuntimeError(f"the module returned {got} outputs; {len(names)} are declared: {names}")

    def _check_outputs(self) -> None:
        """One batch of 1 at load: a wrong output declaration fails now, not per request."""
        batch = self.warmup_batch(1)
        outputs = self._run_eager(batch) if self.cuda else self._run_cpu(batch)
        for spec in self.outputs:
            shape = outputs[spec.name].shape
            want = (1, *spec.shape[1:])
            if len(shape) != len(want) or any(
                w is not None and w != g for w, g in zip(want, shape, strict=True)
            ):
                raise ValueError(
                    f"output {spec.name!r} is declared with shape {list(spec.shape)}, "
                    f"but the module gave {list(shape)} for a batch of 1"
                )

    # --- CPU ------------------------------------------------------------------------------

    def _run_cpu(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = []
        for spec in self.inputs:
            arr = np.ascontiguousarray(batch[spec.name])
            if not arr.flags.writeable:  # shared-memory inputs are read-only; torch warns
                arr = arr.copy()
            tensors.append(torch.from_numpy(arr))
        with torch.inference_mode():
            outs = self._forward(tensors)
        return {s.name: o.numpy() for s, o in zip(self.outputs, outs, strict=True)}

    # --- CUDA -------------------------------------------------------------------------------

    def _stage_inputs(self, batch: Mapping[str, np.ndarray], rows: int) -> list[torch.Tensor]:
        """Copy the batch into pinned buffers (one host copy, needed anyway to pin)."""
        assert self._pinned_in is not None
        staged = []
        for spec, dtype in zip(self.inputs, self._in_dtypes, strict=True):
            arr = batch[spec.name]
            host = self._pinned_in.view(spec.name, (rows, *arr.shape[1:]), dtype)
            np.copyto(host.numpy(), arr, casting="no")
            staged.append(host)
        return staged

    def _fetch_outputs(self, outs: Sequence[torch.Tensor], rows: int) -> dict[str, np.ndarray]:
        """Queue the copies back into pinned buffers, wait once, hand out owned arrays."""
        assert self._pinned_out is not None and self._stream is not None
        hosts = []
        for spec, out in zip(self.outputs, outs, strict=True):
            out = out[:rows]
            host = self._pinned_out.view(spec.name, tuple(out.shape), out.dtype)
            host.copy_(out, non_blocking=True)
            hosts.append(host)
        self._stream.synchronize()  # the one wait of the batch
        # Copies: the pinned buffers are refilled by the next batch.
        return {s.name: h.numpy().copy() for s, h in zip(self.outputs, hosts, strict=True)}

    def _run_eager(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = next(iter(batch.values())).shape[0]
        with self._lock, torch.cuda.stream(self._stream), torch.inference_mode():
            staged = self._stage_inputs(batch, rows)
            tensors = [h.to(self.device, non_blocking=True) for h in staged]
            return self._fetch_outputs(self._forward(tensors), rows)

    def _capture_graphs(self) -> None:
        """One graph per bucket, largest first, all in one memory pool (as vLLM does).

        A later (smaller) capture reuses the memory the earlier ones freed; replays never
        overlap (the lock), and each graph's outputs stay referenced, so sharing is safe.
        The static inputs are one buffer per input at the largest bucket; each graph reads
        the first ``bucket`` rows of it.
        """
        assert self._stream is not None
        largest = self.buckets[-1]
        self._static_in = [
            torch.zeros((largest, *spec.shape[1:]), dtype=dtype, device=self.device)
            for spec, dtype in zip(self.inputs, self._in_dtypes, strict=True)
        ]
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for bucket in reversed(self.buckets):
                views = [t[:bucket] for t in self._static_in]
                with torch.cuda.stream(self._stream):  # warm up on the capture stream
                    for _ in range(_WARMUP_RUNS):
                        self._forward(views)
                self._stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(
                    graph, pool=pool, stream=self._stream, capture_error_mode="thread_local"
                ):
                    outs = self._forward(views)
                self._graphs[bucket] = (graph, outs)
        torch.cuda.synchronize(self.device)

    def _run_graph(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = next(iter(batch.values())).shape[0]
        bucket = next((b for b in self.buckets if b >= rows), None)
        if bucket is None:
            raise ValueError(
                f"a batch of {rows} is above the largest CUDA graph ({self.buckets[-1]} rows); "
                "the engine's max_batch_size caps batches"
            )
        graph, outs = self._graphs[bucket]
        with self._lock, torch.cuda.stream(self._stream), torch.inference_mode():
            staged = self._stage_inputs(batch, rows)
            for static, host in zip(self._static_in, staged, strict=True):
                static[:rows].copy_(host, non_blocking=True)
                if rows < bucket:
                    static[rows:bucket].zero_()  # padding rows: defined values, not stale
            graph.replay()
            return self._fetch_outputs(outs, rows)

    # --- the Engine interface --------------------------------------------------------------

    def run_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.cuda:
            return self._run_cpu(batch)
        if self._graphs:
            return self._run_graph(batch)
        return self._run_eager(batch)

    @property
    def max_batch_size(self) -> int | None:
        """With CUDA graphs, the largest captured batch; otherwise no limit of its own."""
        return self.buckets[-1] if self.buckets else None

    def metadata(self) -> dict[str, Any]:
        return {
            "torch": torch.__version__,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "cuda_graphs": ",".join(map(str, self.buckets)),
            "compiled": str(self.compiled).lower(),
        }
