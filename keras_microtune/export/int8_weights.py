"""Frozen float32 weights of a LiteRT model stored as int8, dequantized in-graph.

For the `mobile-trainable-int8` target: every constant float32 tensor of at
least `MIN_ELEMENTS` values (TFLite's dynamic-range threshold) becomes an
int8 tensor with one symmetric scale, and a DEQUANTIZE op at the start of its
subgraph gives the float tensor the ops read, so every kernel (forward and
the train step's backward) computes in float32 as before, on weights rounded
to 255 levels. Trainable variables are untouched: their initial values (the
constants ASSIGN_VARIABLE reads) stay float32, and so does everything that
trains. TFLite's own dynamic-range quantization leaves a model with resource
variables as it is, hence this rewrite.
"""

from __future__ import annotations

import numpy as np

MIN_ELEMENTS = 1024


def apply(data: bytes, min_elements: int = MIN_ELEMENTS) -> tuple[bytes, dict]:
    """Return `(flatbuffer, summary)` with the large frozen weights in int8.

    Returns:
        The new flatbuffer and a dict: `tensors` (int8 weights written),
        `float_bytes` and `int8_bytes` of their data.
    """
    from keras_microtune.export import _tflite

    schema = _tflite._schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(bytes(data), 0))
    if model.buffers[0].data is not None and len(model.buffers[0].data):
        raise ValueError("Buffer 0 of the model is not the empty buffer.")
    builtin = schema.BuiltinOperator
    codes = model.operatorCodes

    def code(op):
        return max(op.builtinCode, op.deprecatedBuiltinCode)

    assign = {i for i, c in enumerate(codes) if code(c) == builtin.ASSIGN_VARIABLE}
    dequantize = None
    done = {}  # float32 buffer index -> (int8 buffer index, scale)
    summary = {"tensors": 0, "float_bytes": 0, "int8_bytes": 0}
    for sub in model.subgraphs:
        initial_values = {
            int(t)
            for op in sub.operators
            if op.opcodeIndex in assign
            for t in op.inputs
        }
        added = []
        for index, tensor in enumerate(list(sub.tensors)):
            raw = model.buffers[tensor.buffer].data if tensor.buffer else None
            if (
                index in initial_values
                or tensor.type != schema.TensorType.FLOAT32
                or raw is None
                or len(raw) < 4 * min_elements
            ):
                continue
            if tensor.buffer not in done:
                w = np.frombuffer(np.asarray(raw, np.uint8).tobytes(), np.float32)
                scale = float(np.max(np.abs(w))) / 127 or 1.0
                q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
                buffer = schema.BufferT()
                buffer.data = np.frombuffer(q.tobytes(), np.uint8)
                model.buffers.append(buffer)
                done[tensor.buffer] = (len(model.buffers) - 1, scale)
                summary["float_bytes"] += len(raw)
                summary["int8_bytes"] += len(q)
            if dequantize is None:
                dequantize = _opcode(schema, codes, builtin.DEQUANTIZE, code)
            int8 = schema.TensorT()
            int8.shape, int8.type = tensor.shape, schema.TensorType.INT8
            int8.buffer, scale = done[tensor.buffer]
            int8.quantization = schema.QuantizationParametersT()
            int8.quantization.scale, int8.quantization.zeroPoint = [scale], [0]
            sub.tensors.append(int8)
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = (
                dequantize,
                [len(sub.tensors) - 1],
                [index],
            )
            added.append(op)
            tensor.buffer = 0  # Now computed by the DEQUANTIZE op.
            summary["tensors"] += 1
        sub.operators = added + list(sub.operators or [])
    still_used = {t.buffer for sub in model.subgraphs for t in sub.tensors}
    for index in done:
        if index not in still_used:
            model.buffers[index].data = None
    return _tflite.pack(model, len(data)), summary


def _opcode(schema, codes, op, code):
    for i, c in enumerate(codes):
        if code(c) == op:
            return i
    entry = schema.OperatorCodeT()
    entry.builtinCode, entry.deprecatedBuiltinCode = op, min(op, 127)
    entry.version = 2  # DEQUANTIZE from int8.
    codes.append(entry)
    return len(codes) - 1
