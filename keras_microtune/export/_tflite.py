"""Read, check and strip TFLite flatbuffers without running them.

Parsing is bounded: every index, offset and vector length is checked against the
file before it is used, so a hostile file fails with `InvalidModelError` (a
ValueError) instead of crashing or allocating what its header claims.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

# TensorType enum value -> (name, bytes per element; 0.5 for int4).
_TYPES = {
    0: ("float32", 4),
    1: ("float16", 2),
    2: ("int32", 4),
    3: ("uint8", 1),
    4: ("int64", 8),
    5: ("string", 1),
    6: ("bool", 1),
    7: ("int16", 2),
    8: ("complex64", 8),
    9: ("int8", 1),
    10: ("float64", 8),
    11: ("complex128", 16),
    12: ("uint64", 8),
    13: ("resource", 0),
    14: ("variant", 0),
    15: ("uint32", 4),
    16: ("uint16", 2),
    17: ("int4", 0.5),
    18: ("bfloat16", 2),
}
# Metadata entries `strip` keeps: TFLite Micro's offline memory plan and
# keras_microtune's description of the raw input (`input_metadata`) and of a
# streaming model (`stream_metadata`).
_KEEP_METADATA = (
    "OfflineMemoryAllocation",
    "keras_microtune.input",
    "keras_microtune.streaming",
)
# No tensor of a model keras_microtune handles may declare more bytes than this:
# a hostile file's shapes cannot make anything allocate gigabytes.
MAX_TENSOR_BYTES = 1 << 30
# BuiltinOptions holding subgraph indices (control flow): option -> fields.
_SUBGRAPH_FIELDS = {
    "WhileOptions": ("CondSubgraphIndex", "BodySubgraphIndex"),
    "IfOptions": ("ThenSubgraphIndex", "ElseSubgraphIndex"),
    "CallOnceOptions": ("InitSubgraphIndex",),
    "CallOptions": ("Subgraph",),
}


class InvalidModelError(ValueError):
    """The bytes are not a valid TFLite model (empty, truncated, corrupted)."""


@dataclasses.dataclass
class TensorInfo:
    index: int
    name: str
    dtype: str
    shape: tuple
    constant: bool

    @property
    def nbytes(self) -> int:
        # Python integers: a hostile shape cannot overflow into a small size.
        return math.ceil(math.prod(int(d) for d in self.shape) * _itemsize(self.dtype))


@dataclasses.dataclass
class ModelInfo:
    """What a .tflite holds: ops in execution order and tensors (subgraph 0)."""

    size_bytes: int
    op_sequence: list  # [(op name, input tensor ids, output tensor ids)]
    tensors: list
    inputs: list
    outputs: list
    num_subgraphs: int
    has_signatures: bool
    metadata: list

    @property
    def ops(self) -> list[str]:
        return sorted({name for name, _, _ in self.op_sequence})


def _itemsize(dtype):
    return next(size for name, size in _TYPES.values() if name == dtype)


def _schema():
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def op_names() -> dict[int, str]:
    ops = _schema().BuiltinOperator
    return {v: k for k, v in vars(ops).items() if not k.startswith("_")}


def _vec(length, n, limit, what):
    if n < 0 or n * 4 > limit:
        raise InvalidModelError(f"{what} claims {n} entries, more than the file holds.")
    return n


class _Budget:
    """Counts the vector entries read; a valid file holds each one once.

    Flatbuffers let a hostile file point many tables at one long vector, which
    would make parsing quadratic. Entries read beyond a few per 4 file bytes
    mean such sharing: the file is refused instead of read for minutes.
    """

    def __init__(self, size):
        self.left = size + 1024

    def take(self, n, what):
        self.left -= n
        if self.left < 0:
            raise InvalidModelError(
                f"{what}: the file's tables point at more entries than it holds "
                "(shared or overlapping vectors); not a valid TFLite model."
            )
        return n


def parse(data: bytes) -> ModelInfo:
    """Parse and check `data`; raise `InvalidModelError` when it is not a model.

    Checked before anything is sized from the file: vector lengths against the
    file size, buffer offsets against its end, each tensor's declared bytes
    against `MAX_TENSOR_BYTES` and (constants) against its buffer, and subgraph
    indices of control-flow ops (in range, no call cycles).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"Expected bytes, received {type(data).__name__}.")
    data = bytes(data)
    if len(data) == 0:
        raise InvalidModelError("The model is empty (0 bytes).")
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise InvalidModelError(
            "Not a TFLite model: the file identifier 'TFL3' is missing "
            f"(size {len(data)} bytes)."
        )
    try:
        return _parse(data)
    except InvalidModelError:
        raise
    except Exception as e:  # struct.error, IndexError, ValueError from numpy...
        raise InvalidModelError(
            f"Corrupted or truncated TFLite model ({len(data)} bytes): "
            f"{type(e).__name__}: {e}"
        ) from None


def _parse(data):
    schema = _schema()
    size = len(data)
    budget = _Budget(size)
    model = schema.Model.GetRootAs(data, 0)
    names = op_names()
    n_buffers = budget.take(_vec(0, model.BuffersLength(), size, "buffers"), "buffers")
    n_codes = _vec(0, model.OperatorCodesLength(), size, "operator codes")
    codes = []
    for i in range(budget.take(n_codes, "operator codes")):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = names.get(builtin, f"UNKNOWN_{builtin}")
        if name == "CUSTOM":
            custom = code.CustomCode()
            name = "CUSTOM:" + (custom.decode("utf-8", "replace") if custom else "?")
        codes.append(name)
    buffer_sizes = []
    for i in range(n_buffers):
        buf = model.Buffers(i)
        offset, length = buf.Offset(), buf.Size()
        if offset > 1 and offset + length > size:
            raise InvalidModelError(f"Buffer {i} points past the end of the file.")
        buffer_sizes.append(length if offset > 1 else buf.DataLength())
    n_sub = model.SubgraphsLength()
    if n_sub < 1 or n_sub * 4 > size:
        raise InvalidModelError(f"The model declares {n_sub} subgraphs.")
    budget.take(n_sub, "subgraphs")
    _check_subgraph_calls(model, n_sub, size, budget)
    sub = model.Subgraphs(0)
    n_tensors = _vec(0, sub.TensorsLength(), size, "tensors")
    tensors = []
    for j in range(budget.take(n_tensors, "tensors")):
        t = sub.Tensors(j)
        if t.Type() not in _TYPES:
            raise InvalidModelError(f"Tensor {j} has unknown type {t.Type()}.")
        budget.take(t.ShapeLength(), f"Tensor {j} shape")
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        if any(d < 0 for d in shape):
            raise InvalidModelError(f"Tensor {j} has a negative dimension {shape}.")
        if t.Buffer() >= max(n_buffers, 1):
            raise InvalidModelError(f"Tensor {j} refers to missing buffer.")
        name = (t.Name() or b"").decode("utf-8", "replace")
        held = buffer_sizes[t.Buffer()] if n_buffers else 0
        info = TensorInfo(j, name, _TYPES[t.Type()][0], shape, held > 0)
        _check_tensor_size(info, held)
        tensors.append(info)

    def ids(v, what):
        out = [int(i) for i in v] if not isinstance(v, int) else []
        budget.take(len(out), what)
        if any(i < -1 or i >= n_tensors for i in out):
            raise InvalidModelError(f"{what} refers to a tensor that does not exist.")
        return out

    ops = []
    for k in range(_vec(0, sub.OperatorsLength(), size, "operators")):
        op = sub.Operators(k)
        if op.OpcodeIndex() >= n_codes:
            raise InvalidModelError(f"Operator {k} has an unknown opcode index.")
        ins = ids(op.InputsAsNumpy(), f"Operator {k}")
        outs = ids(op.OutputsAsNumpy(), f"Operator {k}")
        ops.append((codes[op.OpcodeIndex()], ins, outs))
    metadata = []
    n_metadata = _vec(0, model.MetadataLength(), size, "metadata")
    for i in range(budget.take(n_metadata, "metadata")):
        metadata.append((model.Metadata(i).Name() or b"").decode("utf-8", "replace"))
    return ModelInfo(
        size_bytes=size,
        op_sequence=ops,
        tensors=tensors,
        inputs=ids(sub.InputsAsNumpy(), "Subgraph inputs"),
        outputs=ids(sub.OutputsAsNumpy(), "Subgraph outputs"),
        num_subgraphs=n_sub,
        has_signatures=model.SignatureDefsLength() > 0,
        metadata=metadata,
    )


def _check_tensor_size(tensor: TensorInfo, buffer_bytes: int) -> None:
    """A tensor's declared size must be allocatable and, for a constant, held."""
    if tensor.dtype in ("resource", "variant"):
        return
    declared = tensor.nbytes
    if declared > MAX_TENSOR_BYTES:
        raise InvalidModelError(
            f"Tensor {tensor.index} declares shape {list(tensor.shape)} "
            f"({declared:,} bytes of {tensor.dtype}), more than the "
            f"{MAX_TENSOR_BYTES:,} bytes keras_microtune accepts for one tensor."
        )
    if buffer_bytes and tensor.dtype != "string" and declared > buffer_bytes:
        raise InvalidModelError(
            f"Tensor {tensor.index} declares {declared:,} bytes of constant data "
            f"but its buffer holds {buffer_bytes:,}."
        )


def _check_subgraph_calls(model, n_sub: int, size: int, budget: _Budget) -> None:
    """Control-flow ops must name existing subgraphs, with no call cycle."""
    schema = _schema()
    kinds = {
        getattr(schema.BuiltinOptions, name): (getattr(schema, name), fields)
        for name, fields in _SUBGRAPH_FIELDS.items()
    }
    calls = {}
    for s in range(n_sub):
        sub = model.Subgraphs(s)
        n_ops = _vec(0, sub.OperatorsLength(), size, f"Subgraph {s} operators")
        targets = set()
        for k in range(budget.take(n_ops, f"Subgraph {s} operators")):
            op = sub.Operators(k)
            kind = kinds.get(op.BuiltinOptionsType())
            table = op.BuiltinOptions() if kind else None
            if table is None:
                continue
            options = kind[0]()
            options.Init(table.Bytes, table.Pos)
            for field in kind[1]:
                index = int(getattr(options, field)())
                if not 0 <= index < n_sub:
                    raise InvalidModelError(
                        f"Operator {k} of subgraph {s} calls subgraph {index}; the "
                        f"model has {n_sub}."
                    )
                targets.add(index)
        calls[s] = targets
    state = {}  # 1: on the current path, 2: done.
    for root in range(n_sub):
        stack = [(root, iter(sorted(calls[root])))]
        if state.get(root):
            continue
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state.get(child) == 1:
                raise InvalidModelError(
                    f"Subgraph {node} calls subgraph {child}, which is already "
                    "being called: a cycle would recurse forever."
                )
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(calls[child]))))


def live_bytes_per_op(info: ModelInfo) -> list[int]:
    """Bytes of the non-constant tensors live at each op, in execution order.

    A tensor is live from the op that produces it (0 for model inputs) to the
    last op that reads it (the end for model outputs). Linear time: a hostile
    file with many ops and tensors cannot make this quadratic.
    """
    n = len(info.op_sequence)
    first, last = {}, {}
    for t in info.inputs:
        first[t] = 0
    for i, (_, ins, outs) in enumerate(info.op_sequence):
        for t in outs:
            first.setdefault(t, i)
        for t in ins:
            if t >= 0:
                last[t] = i
    for t in info.outputs:
        last[t] = n
    steps = max(n, 1)
    delta = [0] * (steps + 1)
    for t, start in first.items():
        end = min(last.get(t, start), steps - 1)
        if info.tensors[t].constant or start > end:
            continue
        delta[start] += info.tensors[t].nbytes
        delta[end + 1] -= info.tensors[t].nbytes
    live, total = [], 0
    for i in range(steps):
        total += delta[i]
        live.append(total)
    return live


def activation_lower_bound(info: ModelInfo) -> int:
    """Max over ops of the bytes of non-constant tensors live at that op."""
    return max(live_bytes_per_op(info))


class _AlignedBuffer:
    """Packs a buffer's data 16-byte aligned, as TFLite Micro expects."""

    def __init__(self, data):
        self.data = data

    def Pack(self, builder):  # noqa: N802 - flatbuffers object API name
        schema = _schema()
        data = None
        if self.data is not None and len(self.data):
            raw = np.asarray(self.data, dtype=np.uint8).tobytes()
            builder.StartVector(1, len(raw), 16)
            builder.head = builder.head - len(raw)
            builder.Bytes[builder.head : builder.head + len(raw)] = raw
            builder.vectorNumElems = len(raw)
            data = builder.EndVector()
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        return schema.BufferEnd(builder)


def pack(model, size_hint: int = 0) -> bytes:
    """Serialize a `ModelT` (flatbuffers object API), buffers 16-byte aligned."""
    import flatbuffers

    model.buffers = [_AlignedBuffer(b.data) for b in model.buffers]
    builder = flatbuffers.Builder(size_hint + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def strip(
    data: bytes, keep_signatures: bool = False, share_buffers: bool = False
) -> bytes:
    """Remove tensor/subgraph names, signatures, description and metadata.

    The metadata TFLite Micro reads (`OfflineMemoryAllocation`) and
    keras_microtune's `keras_microtune.input` entry are kept. Weights,
    graph and quantization are untouched, so outputs stay bit-identical.

    Args:
        data: the flatbuffer.
        keep_signatures: keep the signature defs and subgraph names (a
            multi-signature LiteRT model is run through them).
        share_buffers: point tensors whose constant data are byte-identical
            (e.g. a frozen kernel in both the `infer` and the `train`
            subgraph) at one buffer; the copies are emptied.
    """
    import flatbuffers

    schema = _schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(bytes(data), 0))
    if any(b.offset > 1 for b in model.buffers or []):
        return bytes(data)  # >2 GB layout: leave as is.
    model.description = None
    if not keep_signatures:
        model.signatureDefs = None
    for sub in model.subgraphs:
        if not keep_signatures:
            sub.name = None
        for t in sub.tensors:
            t.name = None
    shared = _share_buffers(model) if share_buffers else set()
    kept, dropped = [], set()
    for m in model.metadata or []:
        name = m.name.decode() if isinstance(m.name, bytes) else m.name
        (kept.append(m) if name in _KEEP_METADATA else dropped.add(m.buffer))
    dropped -= {m.buffer for m in kept}
    model.metadata = kept or None
    model.metadataBuffer = None
    model.buffers = [
        _AlignedBuffer(None if i in dropped or i in shared else b.data)
        for i, b in enumerate(model.buffers)
    ]
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _share_buffers(model) -> set[int]:
    """Re-point tensors at the first buffer holding the same bytes; return
    the indices of the buffers no tensor uses any more."""
    first, moved = {}, set()
    for sub in model.subgraphs:
        for t in sub.tensors:
            data = model.buffers[t.buffer].data if t.buffer else None
            if data is None or len(data) == 0:
                continue
            key = bytes(data)
            if first.setdefault(key, t.buffer) != t.buffer:
                moved.add(t.buffer)
                t.buffer = first[key]
    return moved - set(first.values())


def _metadata_name(entry) -> str:
    name = entry.name
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else name


def with_metadata(data: bytes, name: str, payload: bytes) -> bytes:
    """Return `data` with metadata entry `name` holding `payload` (a new buffer).

    A previous entry of that name is replaced (its buffer emptied); every
    other entry, weight and tensor is kept as it is.

    Raises:
        ValueError: the model is over 2 GB (external buffers).
    """
    import flatbuffers

    schema = _schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(bytes(data), 0))
    if any(b.offset > 1 for b in model.buffers or []):
        raise ValueError("Models over 2 GB (external buffers) cannot take metadata.")
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(bytes(payload), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    old = [m for m in model.metadata or [] if _metadata_name(m) == name]
    kept = [m for m in model.metadata or [] if _metadata_name(m) != name]
    for m in old:  # Drop the previous entry's data.
        if all(k.buffer != m.buffer for k in kept):
            model.buffers[m.buffer].data = None
    model.metadata = [*kept, entry]
    model.buffers = [_AlignedBuffer(b.data) for b in model.buffers]
    builder = flatbuffers.Builder(len(data) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def metadata(data: bytes, name: str, max_bytes: int = 1 << 20) -> bytes | None:
    """The bytes of metadata entry `name` in `data`, or None without one.

    Bounded like `parse`: the entry count, buffer index and data length are
    checked against the file before anything is read.

    Raises:
        InvalidModelError: the entry points at a missing buffer, past the end
            of the file, or holds more than `max_bytes`.
    """
    data = bytes(data)
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise InvalidModelError("Not a TFLite model: 'TFL3' is missing.")
    try:
        model = _schema().Model.GetRootAs(data, 0)
        n = _vec(0, model.MetadataLength(), len(data), "metadata")
        for i in range(n):
            entry = model.Metadata(i)
            if (entry.Name() or b"").decode("utf-8", "replace") != name:
                continue
            index = entry.Buffer()
            if index >= model.BuffersLength():
                raise InvalidModelError(
                    f"Metadata {name!r} refers to buffer {index}, which does not exist."
                )
            buf = model.Buffers(index)
            offset, length = buf.Offset(), buf.Size()
            if offset <= 1:
                length = buf.DataLength()
            if length > max_bytes or length > len(data):
                raise InvalidModelError(
                    f"Metadata {name!r} holds {length:,} bytes, more than the "
                    f"{max_bytes:,} expected (or than the file holds)."
                )
            if offset > 1:
                if offset + length > len(data):
                    raise InvalidModelError(f"Metadata {name!r} points past the end.")
                return data[offset : offset + length]
            raw = buf.DataAsNumpy()
            return b"" if isinstance(raw, int) else raw.tobytes()
    except InvalidModelError:
        raise
    except Exception as e:  # struct.error, IndexError from a corrupted table.
        raise InvalidModelError(
            f"Corrupted metadata in the TFLite model: {type(e).__name__}: {e}"
        ) from None
    return None


def json_metadata(data: bytes, name: str, max_bytes: int = 1 << 20):
    """`(value, bytes)`: metadata entry `name` parsed as UTF-8 JSON and its
    size, or None without one.

    Raises:
        InvalidModelError: as `metadata`, or the entry is not JSON.
    """
    raw = metadata(data, name, max_bytes)
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8")), len(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidModelError(f"The {name!r} metadata is not JSON: {e}") from None
