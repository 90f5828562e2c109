"""``--keep-fp32 auto``: find a small set of layers to keep in fp32 so the gate passes.

1. Rank: run fp32 and the all-low-precision model side by side with every layer's
   output exposed, and score each layer by the error it *adds* (relative L2 error of
   its output minus the worst of its inputs'): a layer that turns a small input error
   into a large one is where precision is lost, not the layers downstream that only
   carry the error along.
2. Search: keep the top layers (or op types) in rounds of 1, 2, 4... re-ranking on
   each failed build, then bisect the last round (keeping more assumed never to hurt).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from splitserve.compile.data import Batch
from splitserve.compile.gate import output_error

log = logging.getLogger("splitserve.compile")

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the float tensors ``names`` (those it has)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)
    }
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    produced = {out for node in model.graph.node for out in node.output}
    for name in names:
        if name in produced and name not in present and types.get(name) in _FLOAT_TYPES:
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
            present.add(name)
    return exposed


def _session(model: onnx.ModelProto, providers: Sequence[str]) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    # Fusions would drop the intermediate tensors being compared.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=so, providers=list(providers)
    )


def rank_layers(
    fp32: onnx.ModelProto,
    candidate: onnx.ModelProto,
    batches: Sequence[Batch],
    nodes: Sequence[str],
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> list[tuple[str, float]]:
    """``nodes`` (of ``fp32``) from most to least precision lost, with the error added.

    Both graphs run on ``providers`` (the build's device: bf16 has no CPU kernels) with
    every layer's output exposed, one batch at a time (OCR-sized layers add up to
    gigabytes); a tensor's error is its worst over the batches.
    """
    by_name = {n.name: n for n in fp32.graph.node}
    wanted = sorted({t for name in nodes for t in (*by_name[name].output, *by_name[name].input)})
    ref_session = _session(_with_outputs(fp32, wanted), providers)
    new_session = _session(_with_outputs(candidate, wanted), providers)
    ref_names = [o.name for o in ref_session.get_outputs()]
    new_names = [o.name for o in new_session.get_outputs()]
    common = sorted(set(ref_names) & set(new_names))
    error: dict[str, float] = {}
    for batch in batches:
        ref = dict(zip(ref_names, ref_session.run(ref_names, batch), strict=True))
        new = dict(zip(new_names, new_session.run(new_names, batch), strict=True))
        for name in common:
            err = output_error(ref[name], new[name]).rel_l2
            error[name] = max(error.get(name, 0.0), float(np.nan_to_num(err, posinf=1e9)))
    scores = []
    for name in nodes:
        node = by_name[name]
        out = max((error[t] for t in node.output if t in error), default=None)
        if out is None:
            continue
        came_in = max((error[t] for t in node.input if t in error), default=0.0)
        scores.append((name, out - came_in))
    scores.sort(key=lambda item: -item[1])
    return scores


def group_by_op_type(
    model: onnx.ModelProto, ranked: Sequence[tuple[str, float]]
) -> list[tuple[str, float]]:
    """Op types ranked by their worst layer's score (for ``--search op-types``)."""
    op_of = {n.name: n.op_type for n in model.graph.node}
    worst: dict[str, float] = {}
    for name, score in ranked:
        op = op_of[name]
        worst[op] = max(worst.get(op, -np.inf), score)
    return sorted(worst.items(), key=lambda item: -item[1])


@dataclass
class Probe:
    kept: int
    passed: bool
    summary: str


@dataclass
class SearchResult:
    extra: list[str]  # kept in fp32 on top of the fixed list; empty if nothing passed
    passed: bool
    probes: list[Probe] = field(default_factory=list)


def search_keep(
    attempt: Callable[[list[str]], tuple[bool, str, onnx.ModelProto]],
    rank: Callable[[onnx.ModelProto, set[str]], list[str]],
    first: onnx.ModelProto,
) -> SearchResult:
    """Grow the fp32 set in rounds of 1, 2, 4... layers, re-ranking after each failure,
    then trim the last round to its shortest passing prefix.

    ``attempt(extra)`` builds and gates with ``extra`` kept (beyond the fixed list) and
    returns the build; ``rank(build, kept)`` orders the remaining layers by precision
    lost in that build. Re-ranking matters: a layer can only show its own loss once the
    layer that overflowed before it is kept (its input then arrives finite, and is cast
    to the low precision again). ``first`` is the failed build with nothing extra.
    """
    probes: list[Probe] = []

    def probe(extra: list[str]) -> tuple[bool, onnx.ModelProto]:
        ok, summary, built = attempt(extra)
        probes.append(Probe(len(extra), ok, summary))
        log.info(
            "keep-fp32 search: %d kept -> %s (%s)", len(extra), "pass" if ok else "fail", summary
        )
        return ok, built

    kept: list[str] = []
    failed, step = first, 1
    while True:
        ranked = rank(failed, set(kept))
        if not ranked:
            return SearchResult([], False, probes)
        group = ranked[:step]
        ok, built = probe(kept + group)
        if ok:
            break
        kept, failed, step = kept + group, built, step * 2
    lo, hi = 0, len(group)  # kept + group[:lo] failed (lo = 0 is the previous round)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(kept + group[:mid])[0]:
            hi = mid
        else:
            lo = mid
    return SearchResult(kept + group[:hi], True, probes)
