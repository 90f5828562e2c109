"""Precision as a graph edit: the ONNX model every backend then loads.

TensorRT 11 dropped builder precision flags, so precision is decided here, in the graph,
for every backend alike: fp16/bf16 insert casts around the layers that stay fp32 (model
inputs and outputs keep their fp32 type), int8 inserts QuantizeLinear/DequantizeLinear
pairs whose scales come from calibration. ``keep_fp32`` names nodes or op types that
keep full precision.

The tools are the ones made for the job: onnxconverter-common's float16 converter and
onnxruntime.quantization's static QDQ quantiser.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# Per-channel weight scales need DequantizeLinear's ``axis`` (opset 13).
MIN_QDQ_OPSET = 13
# Conv, MatMul and most other ops accept bfloat16 only from opset 22.
MIN_BF16_OPSET = 22
# int8 coverage. "compute": the layers int8 makes faster by itself (integer dot
# products), everything between them stays fp32 behind Q/DQ pairs. "all": also the
# layers ONNX Runtime can run on int8 tensors (element-wise, pooling, resize, concat...),
# so tensors stay int8 from one convolution to the next: fewer conversions, more speed,
# more rounding.
INT8_OP_TYPES = {
    "compute": ("Conv", "ConvTranspose", "MatMul", "Gemm"),
    "all": None,  # the quantiser's own list of every op it can quantise
}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the converters' per-tensor warnings (hundreds per model); the accuracy
    gate measures what they warn about."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


class PrecisionError(ValueError):
    """A precision that cannot be prepared as asked (never silently replaced)."""


@dataclass(frozen=True)
class KeepList:
    """``--keep-fp32`` resolved against a graph: node names and op types."""

    nodes: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()

    def node_names(self, model: onnx.ModelProto) -> list[str]:
        """Every node kept: the named ones and all nodes of the kept op types."""
        kept = set(self.nodes)
        return [n.name for n in model.graph.node if n.name in kept or n.op_type in self.op_types]


def resolve_keep(model: onnx.ModelProto, names: Iterable[str]) -> KeepList:
    """Sort ``names`` into op types and node names; an unknown name is an error."""
    op_types = {n.op_type for n in model.graph.node}
    node_names = {n.name for n in model.graph.node}
    nodes, types = [], []
    for name in names:
        if name in op_types:
            types.append(name)
        elif name in node_names:
            nodes.append(name)
        else:
            raise PrecisionError(f"--keep-fp32 {name!r} is neither a node name nor an op type")
    return KeepList(tuple(sorted(set(nodes))), tuple(sorted(set(types))))


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name: keep lists and reports refer to nodes by it."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return model


def required_opset(precision: str) -> int:
    """The default-domain opset a precision's graph needs (0: any)."""
    return {"int8": MIN_QDQ_OPSET, "bf16": MIN_BF16_OPSET}.get(precision, 0)


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """The model at ``version`` of the default opset when it is older (QDQ needs 13)."""
    if default_opset(model) >= version:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, version)


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's basic graph optimisations (constant folding, Constant nodes turned
    into initializers, redundant nodes removed), the graph every precision starts from.

    Exporters often emit weights as Constant nodes; quantisers only recognise
    initializers as weights, and would otherwise quantise them like activations.
    """
    import tempfile

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory(prefix="splitserve-fold-") as tmp:
        so.optimized_model_filepath = str(Path(tmp, "folded.onnx"))
        ort.InferenceSession(
            model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"]
        )
        return onnx.load(so.optimized_model_filepath)


def to_fp16(model: onnx.ModelProto, keep: KeepList) -> onnx.ModelProto:
    """fp16 everywhere except ``keep``; inputs and outputs stay fp32."""
    try:
        from onnxconverter_common.float16 import convert_float_to_float16
    except ModuleNotFoundError as exc:  # installed without the `build` extra
        from splitserve.compile import missing_build_extra

        raise missing_build_extra(exc) from None

    with _quiet():
        converted = convert_float_to_float16(
            model,
            keep_io_types=True,
            node_block_list=list(keep.nodes),
            op_block_list=_fp16_op_blocks(keep),
        )
    return unify_typed_inputs(_restore_output_types(model, converted))


def _restore_output_types(original: onnx.ModelProto, converted: onnx.ModelProto) -> onnx.ModelProto:
    """Keep fp32 graph outputs fp32 even when a kept layer produces them.

    The converter casts a kept (fp32) layer's result to fp16 on the way to the graph
    output, despite ``keep_io_types``, so large values overflow there; that last cast is
    turned back into an fp32 one here.
    """
    wanted = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    producers = {out: node for node in converted.graph.node for out in node.output}
    for output in converted.graph.output:
        want = wanted.get(output.name)
        if want != TensorProto.FLOAT or output.type.tensor_type.elem_type == want:
            continue
        node = producers.get(output.name)
        if node is None or node.op_type != "Cast":
            raise PrecisionError(f"cannot keep graph output {output.name!r} in fp32")
        for attr in node.attribute:
            if attr.name == "to":
                attr.i = TensorProto.FLOAT
        output.type.tensor_type.elem_type = TensorProto.FLOAT
    return converted


FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def unify_typed_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every input that an op's schema binds to one type parameter the same float
    type, so the graph loads.

    The converter casts the data input of a layer kept in fp32 but not its other typed
    inputs: ``Clip``'s min and max, or a constant shared by a kept and a converted layer
    (an initializer both use stays fp32 for both), and ONNX Runtime then refuses the
    graph ("Type parameter (T) of Optype (Clip) bound to different types"). Here each
    such input follows the node's first non-initializer input of that type parameter
    (the data path, which the converter got right): initializers get a converted copy,
    other tensors a Cast in front of the node.
    """
    types = _tensor_types(model)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    opset = default_opset(model)
    copies: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        for index, target in _retyped_inputs(node, types, initializers, opset):
            name = node.input[index]
            key = (name, target)
            if key not in copies:
                copies[key] = f"{name}_as_{TensorProto.DataType.Name(target).lower()}"
                if name in initializers:
                    values = onnx.numpy_helper.to_array(initializers[name]).astype(
                        onnx.helper.tensor_dtype_to_np_dtype(target)
                    )
                    graph.initializer.append(onnx.numpy_helper.from_array(values, copies[key]))
                else:
                    nodes.append(
                        onnx.helper.make_node(
                            "Cast", [name], [copies[key]], name=copies[key], to=target
                        )
                    )
                types[copies[key]] = target
            node.input[index] = copies[key]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _retyped_inputs(
    node: onnx.NodeProto,
    types: Mapping[str, int],
    initializers: Mapping[str, TensorProto],
    opset: int,
) -> list[tuple[int, int]]:
    """(input index, float type it must have) for the inputs of ``node`` whose float type
    differs from their type parameter's data path."""
    if node.domain not in ("", "ai.onnx"):
        return []
    try:
        schema = onnx.defs.get_schema(node.op_type, opset)
    except onnx.defs.SchemaError:
        return []
    groups: dict[str, list[int]] = {}
    for index in range(len(node.input)):
        if not node.input[index]:
            continue  # an omitted optional input
        formal = schema.inputs[min(index, len(schema.inputs) - 1)]
        if index >= len(schema.inputs) and formal.option != formal.option.Variadic:
            continue
        groups.setdefault(formal.type_str, []).append(index)
    out = []
    for type_str, indices in groups.items():
        if type_str.startswith("tensor("):
            continue  # a fixed type, not a parameter shared by several inputs
        floats = [i for i in indices if types.get(node.input[i]) in FLOAT_TYPES]
        data = [i for i in floats if node.input[i] not in initializers]
        if len(floats) < 2 or not data:
            continue
        target = types[node.input[data[0]]]
        out += [(i, target) for i in floats if types[node.input[i]] != target]
    return out


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor of the main graph that shape inference knows."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        info.name: info.type.tensor_type.elem_type
        for info in _value_infos(inferred.graph)
        if info.type.tensor_type.elem_type
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in model.graph.node:  # what inference may miss: casts and constants
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to":
                types[node.output[0]] = attr.i
            elif node.op_type == "Constant" and attr.name == "value":
                types[node.output[0]] = attr.t.data_type
    return types


def _fp16_op_blocks(keep: KeepList) -> list[str]:
    from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST

    return sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep.op_types))


def to_bf16(model: onnx.ModelProto, keep: KeepList) -> onnx.ModelProto:
    """bf16 with the same cast placement as fp16 (the converter decides where casts go).

    The fp16 graph is retyped: casts to fp16 become casts to bf16 and the weights are
    converted from their original fp32 values (bf16 has fp32's range, so nothing needs
    the clamping fp16 does).
    """
    import ml_dtypes

    originals = {t.name: t for t in model.graph.initializer}
    converted = to_fp16(model, keep)
    for init in converted.graph.initializer:
        if init.data_type != TensorProto.FLOAT16:
            continue
        source = originals.get(init.name)
        values = onnx.numpy_helper.to_array(source if source is not None else init)
        bf16 = np.asarray(values, dtype=np.float32).astype(ml_dtypes.bfloat16)
        init.CopyFrom(onnx.numpy_helper.from_array(bf16, init.name))
    for node in _all_nodes(converted.graph):
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.BFLOAT16
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                values = onnx.numpy_helper.to_array(attr.t).astype(np.float32)
                attr.t.CopyFrom(onnx.numpy_helper.from_array(values.astype(ml_dtypes.bfloat16)))
    for info in _value_infos(converted.graph):
        if info.type.tensor_type.elem_type == TensorProto.FLOAT16:
            info.type.tensor_type.elem_type = TensorProto.BFLOAT16
    return converted


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)


def _value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    yield from graph.input
    yield from graph.output
    yield from graph.value_info


def to_int8(
    model: onnx.ModelProto,
    keep: KeepList,
    calibration: Sequence[Mapping[str, np.ndarray]],
    calibration_cache: Path | None = None,
    ops: str = "compute",
    symmetric: bool = False,
) -> onnx.ModelProto:
    """Static int8 QDQ: per-channel int8 weights, min-max calibration.

    For ONNX Runtime: uint8 activations with zero points fitted to each range and int8
    weights (U8S8), the fast combination of x86's VNNI dot-product instructions that its
    CPU kernels are built around. ``symmetric`` (TensorRT, which accepts nothing else):
    int8 activations with zero points of 0, and biases left in fp32.
    ``calibration_cache`` (a JSON file) keeps the measured ranges between builds of one
    model, so the fp32 search's probes skip calibration: keeping more layers in fp32
    only ever needs a subset of the ranges the first build measured.
    """
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not calibration:
        raise PrecisionError("int8 needs calibration inputs (--calibration DIR)")
    model = upgrade_opset(model, MIN_QDQ_OPSET)

    class Reader(CalibrationDataReader):
        """The quantiser's calibration reader over the batches (one pass is all it takes)."""

        def __init__(self, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
            self._iter = iter(batches)

        def get_next(self) -> Mapping[str, np.ndarray] | None:
            return next(self._iter, None)

    with tempfile.TemporaryDirectory(prefix="splitserve-int8-") as tmp:
        source, target = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
        onnx.save(model, source)
        # ONNX Runtime's symbolic shape inference writes a scratch file
        # (sym_shape_infer_temp.onnx) into the working directory when it gives up on a
        # graph: run the quantiser from the temporary folder so nothing lands elsewhere.
        # Builds run before any serving thread starts, so changing the directory is safe.
        with _quiet(), contextlib.chdir(tmp):
            quantize_static(
                source,
                target,
                Reader(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=int8_op_types(ops),
                nodes_to_exclude=keep.node_names(model),
                calibrate_method=CalibrationMethod.MinMax,
                extra_options=(
                    {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
                    if symmetric
                    else {"CalibTensorRangeSymmetric": False}
                ),
                calibration_cache_path=calibration_cache,
            )
        return onnx.load(target)


def int8_op_types(ops: str) -> list[str] | None:
    if ops not in INT8_OP_TYPES:
        raise PrecisionError(f"int8 ops must be one of {sorted(INT8_OP_TYPES)}, got {ops!r}")
    chosen = INT8_OP_TYPES[ops]
    return None if chosen is None else list(chosen)


def apply_precision(
    model: onnx.ModelProto,
    precision: str,
    keep: KeepList,
    calibration: Sequence[Mapping[str, np.ndarray]] = (),
    calibration_cache: Path | None = None,
    int8_ops: str = "compute",
    backend: str = "onnxruntime",
) -> onnx.ModelProto:
    """``model`` (named nodes, fp32) with ``precision`` applied outside ``keep``, in the
    form ``backend`` accepts."""
    if precision == "fp32":
        return model
    if precision == "fp16":
        return to_fp16(model, keep)
    if precision == "bf16":
        return to_bf16(model, keep)
    if precision == "int8":
        return to_int8(
            model, keep, calibration, calibration_cache, int8_ops, symmetric=backend == "tensorrt"
        )
    raise PrecisionError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def changed_nodes(model: onnx.ModelProto, precision: str, int8_ops: str = "compute") -> list[str]:
    """The nodes a precision change can touch: the candidates ``--keep-fp32 auto`` weighs."""
    if precision == "int8":
        chosen = int8_op_types(int8_ops)
        if chosen is None:
            from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

            chosen = sorted(set(QDQRegistry) | set(QLinearOpsRegistry))
        return [n.name for n in model.graph.node if n.op_type in chosen]
    return [n.name for n in model.graph.node if n.op_type not in ("Constant", "Shape")]
