"""Join two quantizations of one model: int16x8 ops into an int8 flatbuffer.

`splice(q8, q16, wide)` takes TFLite's int8 and 16x8 quantizations of the
same calibrated graph (the same ops in the same order, apart from the
QUANTIZE/DEQUANTIZE ops each adds at its borders), replaces the chosen ops
of the int8 model with their 16x8 versions (int16 activations, int8
weights, int64 biases, the 16x8 opcode versions), and joins them with
QUANTIZE ops, which TFLite and TFLite Micro use to requantize int8 <-> int16.
Tensors no op uses any more (the replaced int8 weights) are dropped.
"""

from __future__ import annotations

import copy

from keras_microtune.export import _tflite

_BORDER = {"QUANTIZE", "DEQUANTIZE"}


def _body(model, names):
    """Indices of a quantized subgraph's ops that are not border conversions."""
    ops = model.subgraphs[0].operators
    return [
        k
        for k, op in enumerate(ops)
        if names[model.operatorCodes[op.opcodeIndex].builtinCode] not in _BORDER
    ]


def splice(q8: bytes, q16: bytes, wide: list[int]) -> bytes:
    """`q8` with its `wide`-th ops (counted without QUANTIZE/DEQUANTIZE, as in
    the calibrated model) taken from the 16x8 model `q16`, joined by
    QUANTIZE ops that requantize int8 <-> int16 at their borders."""
    import flatbuffers

    schema = _tflite._schema()
    names = _tflite.op_names()
    m8 = schema.ModelT.InitFromObj(schema.Model.GetRootAs(bytes(q8), 0))
    m16 = schema.ModelT.InitFromObj(schema.Model.GetRootAs(bytes(q16), 0))
    s8, s16 = m8.subgraphs[0], m16.subgraphs[0]
    body8, body16 = _body(m8, names), _body(m16, names)
    codes8 = [names[c.builtinCode] for c in m8.operatorCodes]
    codes16 = [names[c.builtinCode] for c in m16.operatorCodes]
    if [codes8[s8.operators[k].opcodeIndex] for k in body8] != [
        codes16[s16.operators[k].opcodeIndex] for k in body16
    ]:
        raise ValueError(
            "int16 layers: the int8 and 16x8 quantizations of the model differ in "
            "their ops, so they cannot be joined. Use 'float32' for these layers."
        )

    def opcode(name, version):
        for i, code in enumerate(m8.operatorCodes):
            if names[code.builtinCode] == name:
                code.version = max(code.version, version)
                return i
        code = schema.OperatorCodeT()
        code.builtinCode = getattr(schema.BuiltinOperator, name)
        code.deprecatedBuiltinCode = min(code.builtinCode, 127)
        code.version = version
        m8.operatorCodes.append(code)
        return len(m8.operatorCodes) - 1

    def add_tensor(tensor, buffer_data=None):
        tensor = copy.copy(tensor)
        buffer = schema.BufferT()
        buffer.data = buffer_data
        m8.buffers.append(buffer)
        tensor.buffer = len(m8.buffers) - 1
        s8.tensors.append(tensor)
        return len(s8.tensors) - 1

    quantize_code = opcode("QUANTIZE", 3)  # Version 3: int16 in or out.
    wide_ops = {body8[k]: body16[k] for k in wide}
    produced_wide = {}  # int8 tensor index -> its int16 twin
    for k8, k16 in wide_ops.items():
        for t8, t16 in zip(s8.operators[k8].outputs, s16.operators[k16].outputs):
            produced_wide[t8] = add_tensor(s16.tensors[t16])
    widened_inputs = {}
    operators = []
    for k, op in enumerate(s8.operators):
        if k not in wide_ops:
            operators.append(op)
            continue
        op16 = s16.operators[wide_ops[k]]
        inputs = []
        for t8, t16 in zip(op.inputs, op16.inputs):
            if t8 < 0:
                inputs.append(t8)
            elif t8 in produced_wide:
                inputs.append(produced_wide[t8])
            elif m8.buffers[s8.tensors[t8].buffer].data is not None and len(
                m8.buffers[s8.tensors[t8].buffer].data
            ):
                data = m16.buffers[s16.tensors[t16].buffer].data
                inputs.append(add_tensor(s16.tensors[t16], data))
            else:  # An int8 activation entering the int16 layer.
                if t8 not in widened_inputs:
                    widened_inputs[t8] = add_tensor(s16.tensors[t16])
                    operators.append(
                        _quantize_op(schema, quantize_code, t8, widened_inputs[t8])
                    )
                inputs.append(widened_inputs[t8])
        op_wide = copy.copy(op16)
        op_wide.inputs = inputs
        op_wide.outputs = [produced_wide[t] for t in op.outputs]
        op_wide.opcodeIndex = opcode(
            codes16[op16.opcodeIndex], m16.operatorCodes[op16.opcodeIndex].version
        )
        operators.append(op_wide)
        for t8 in op.outputs:  # Back to int8 for int8 readers and graph outputs.
            operators.append(_quantize_op(schema, quantize_code, produced_wide[t8], t8))
    s8.operators = _drop_unused_narrowing(operators, produced_wide, s8, names, m8)
    _drop_unused_tensors(s8, m8)
    m8.buffers = [_tflite._AlignedBuffer(b.data) for b in m8.buffers]
    builder = flatbuffers.Builder(len(q8) + len(q16) + 1024)
    builder.Finish(m8.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _drop_unused_tensors(sub, model):
    """Remove the tensors no op reads or writes (the int8 weights the int16
    ops replaced) and empty their buffers; renumber the rest."""
    used = {int(t) for op in sub.operators for t in [*op.inputs, *op.outputs]}
    used |= {int(t) for t in [*sub.inputs, *sub.outputs]}
    used.discard(-1)
    keep = sorted(used)
    index = {old: new for new, old in enumerate(keep)}
    kept_buffers = {sub.tensors[t].buffer for t in keep}
    for tensor in sub.tensors:
        if tensor.buffer not in kept_buffers:
            model.buffers[tensor.buffer].data = None
    sub.tensors = [sub.tensors[t] for t in keep]
    for op in sub.operators:
        op.inputs = [index.get(int(t), -1) for t in op.inputs]
        op.outputs = [index[int(t)] for t in op.outputs]
        if op.intermediates is not None and len(op.intermediates):
            op.intermediates = [index.get(int(t), -1) for t in op.intermediates]
    sub.inputs = [index[int(t)] for t in sub.inputs]
    sub.outputs = [index[int(t)] for t in sub.outputs]


def _quantize_op(schema, code, source, dest):
    op = schema.OperatorT()
    op.opcodeIndex = code
    op.inputs = [source]
    op.outputs = [dest]
    return op


def _drop_unused_narrowing(operators, produced_wide, sub, names, model):
    """Drop the int16 -> int8 QUANTIZE ops whose int8 result nobody reads."""
    narrowed = {v: k for k, v in produced_wide.items()}
    read = {t for op in operators for t in op.inputs} | set(sub.outputs)
    out = []
    for op in operators:
        is_narrowing = (
            len(op.inputs) == 1
            and op.inputs[0] in narrowed
            and op.outputs[0] == narrowed[op.inputs[0]]
        )
        if is_narrowing and op.outputs[0] not in read:
            continue
        out.append(op)
    return out
