"""Patch-based inference: run a CNN's first stage on spatial patches, one at a time.

The rewrite works on the converted (quantized) flatbuffer, so every tensor of
a patch carries the quantization parameters of the unpatched tensor it is a
piece of, and shares its weights and biases: one calibration, no duplicated
weights, the same int8 arithmetic per output pixel. For a stage ending at
tensor T (a cut of the graph: the model input feeds only the stage, and
nothing after the stage reads a tensor inside it but T), each patch is:

1. `STRIDED_SLICE` of the model input: the region the patch's receptive field
   needs (its halo, from kernel sizes, strides, dilations and paddings);
2. the stage's ops on that region, with `padding="valid"` and explicit `PAD`
   ops (zeros, the zero point in int8) only where the region meets the
   image border, where the unpatched op padded; inputs a consumer needs less
   of are cropped with `STRIDED_SLICE`;
3. the patch's piece of T; pieces are joined by `CONCATENATION` (per grid
   row along the width, then the rows along the height) into T.

Patches run one after another in op order, so TFLite Micro's planner reuses
one patch's buffers for the next. `rewrite` builds the patched model,
`stages` lists where a model can be split, `macs` counts multiply-adds;
`patch_inference` chooses the split and grid and reports.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import numpy as np

from keras_microtune.export import _tflite

WINDOW_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D")
ELEMENTWISE_OPS = ("ADD", "SUB", "MUL", "RELU", "RELU6", "RELU_N1_TO_1")
SUPPORTED_OPS = (*WINDOW_OPS, "PAD", *ELEMENTWISE_OPS)


class PatchError(ValueError):
    """The model cannot be patched as asked (unsupported op, not a cut...)."""


@dataclasses.dataclass
class Stage:
    """Ops from the model input to `split` (a tensor index), in op order."""

    split: int
    ops: list
    input: int


def macs(info: _tflite.ModelInfo) -> int:
    """Multiply-accumulates of the convolutions and fully connected layers."""
    total = 0
    for name, ins, outs in info.op_sequence:
        out = math.prod(info.tensors[outs[0]].shape)
        if name == "CONV_2D":
            total += out * math.prod(info.tensors[ins[1]].shape[1:])
        elif name == "DEPTHWISE_CONV_2D":
            total += out * math.prod(info.tensors[ins[1]].shape[1:3])
        elif name in ("FULLY_CONNECTED", "BATCH_MATMUL"):
            total += out * info.tensors[ins[1]].shape[-1]
    return total


def _consumers(info):
    readers = {}
    for k, (_, ins, _) in enumerate(info.op_sequence):
        for t in ins:
            readers.setdefault(t, set()).add(k)
    return readers


def _producers(info):
    return {t: k for k, (_, _, outs) in enumerate(info.op_sequence) for t in outs}


def stage(info: _tflite.ModelInfo, split: int, describe=str) -> Stage:
    """The stage ending at tensor `split`, checked; PatchError when it cannot
    run per patch. `describe(op_index)` names an op's layer in messages."""
    if info.num_subgraphs != 1 or len(info.inputs) != 1:
        raise PatchError(
            "patch_inference needs a model with one input and one subgraph; "
            f"this one has {len(info.inputs)} inputs, {info.num_subgraphs} subgraphs."
        )
    x = info.inputs[0]
    producers, readers = _producers(info), _consumers(info)
    todo, ops = [split], set()
    while todo:
        t = todo.pop()
        if t == x or t < 0 or info.tensors[t].constant:
            continue
        if t not in producers:
            raise PatchError(f"Tensor {t} has no producer; the model is malformed.")
        k = producers[t]
        if k not in ops:
            ops.add(k)
            todo.extend(info.op_sequence[k][1])
    ops = sorted(ops)
    for k in ops:
        name, ins, outs = info.op_sequence[k]
        if name not in SUPPORTED_OPS:
            raise PatchError(
                f"{describe(k)} lowers to {name}, which patch-based inference "
                f"does not support inside the patched stage (supported: "
                f"Conv2D, DepthwiseConv2D, BatchNormalization folded into them, "
                f"ReLU/ReLU6, Add, pooling, ZeroPadding2D; TFLite ops "
                f"{list(SUPPORTED_OPS)}). End the stage before this layer "
                f"(`until`) or use patch_inference='auto'."
            )
        for t in [*ins, *outs]:
            if (
                t >= 0
                and not info.tensors[t].constant
                and len(info.tensors[t].shape) != 4
            ):
                raise PatchError(
                    f"{describe(k)} works on a tensor of shape "
                    f"{list(info.tensors[t].shape)}; patches need (1, H, W, C) feature "
                    "maps. End the stage before this layer (`until`)."
                )
        for t in ins if name in ELEMENTWISE_OPS else ():
            shape = info.tensors[t].shape
            if info.tensors[t].constant and len(shape) == 4 and max(shape[1:3]) > 1:
                raise PatchError(
                    f"{describe(k)} combines the feature map with a constant that "
                    "varies over the image axes; patches cannot split it. End the "
                    "stage before this layer (`until`)."
                )
        for t in outs:
            outside = readers.get(t, set()) - set(ops)
            if t != split and (outside or t in info.outputs):
                raise PatchError(
                    f"The output of {describe(k)} is also read after the split "
                    f"point (by {describe(min(outside))} ...): a skip connection "
                    "crosses the end of the stage. Choose an `until` layer after "
                    "the connection joins, or before it starts."
                )
    if readers.get(x, set()) - set(ops) or x in info.outputs:
        raise PatchError(
            "The model input is also read after the split point; patching needs "
            "the stage to be the only reader of the input."
        )
    if not ops:
        raise PatchError("The split point is the model input; nothing to patch.")
    if info.tensors[split].shape[0] != 1:
        raise PatchError("patch_inference needs batch size 1.")
    return Stage(split, ops, x)


def stages(info: _tflite.ModelInfo) -> list[Stage]:
    """Every tensor the model can be split at (a valid, supported stage end)."""
    found = []
    for _, _, outs in info.op_sequence:
        for t in outs:
            try:
                s = stage(info, t)
            except PatchError:
                continue
            if min(info.tensors[t].shape[1:3]) >= 2:
                found.append(s)
    return found


# --- geometry ------------------------------------------------------------


def _window(schema, model, sub, op, name):
    """(kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, same)."""
    opts = op.builtinOptions
    if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        w = sub.tensors[op.inputs[1]].shape
        kh, kw = int(w[1]), int(w[2])
        dh, dw = opts.dilationHFactor, opts.dilationWFactor
    else:
        kh, kw, dh, dw = opts.filterHeight, opts.filterWidth, 1, 1
    same = opts.padding == schema.Padding.SAME
    return kh, kw, opts.strideH, opts.strideW, dh, dw, same


def _pad_values(model, sub, tensor_index):
    t = sub.tensors[tensor_index]
    data = np.asarray(model.buffers[t.buffer].data, np.uint8).tobytes()
    dtype = "<i8" if t.type == 4 else "<i4"
    return np.frombuffer(data, dtype).reshape(-1, 2).astype(int)


def _requirement(geom, out_shape, in_shape, region):
    """Region of the input an op needs (unclipped) for `region` of its output,
    per axis: [(lo, hi) for H, (lo, hi) for W]."""
    kind, params = geom
    req = []
    for axis, (lo, hi) in enumerate(region):
        if kind == "window":
            k, s, d, same = params[axis]
            keff = (k - 1) * d + 1
            n_in, n_out = in_shape[1 + axis], out_shape[1 + axis]
            before = max((n_out - 1) * s + keff - n_in, 0) // 2 if same else 0
            req.append((lo * s - before, (hi - 1) * s + keff - before))
        elif kind == "pad":
            before = params[axis]
            req.append((lo - before, hi - before))
        else:
            req.append((lo, hi))
    return req


def _clip(req, shape):
    return [(max(lo, 0), min(hi, shape[1 + a])) for a, (lo, hi) in enumerate(req)]


def _cells(n, parts):
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts)]


def check_grid(grid, shape):
    """`grid` as (rows, cols) of positive ints no larger than the split's H, W."""
    ok = (
        isinstance(grid, (tuple, list))
        and len(grid) == 2
        and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
    )
    if not ok or grid[0] > shape[1] or grid[1] > shape[2] or tuple(grid) == (1, 1):
        raise PatchError(
            "Received an invalid value for `patch_inference['grid']`, expected "
            "(rows, cols) of positive integers, not (1, 1), at most the split "
            f"tensor's height and width {tuple(shape[1:3])}. Received: grid={grid!r}"
        )
    return tuple(int(g) for g in grid)


# --- the rewrite -----------------------------------------------------------


def rewrite(data: bytes, st: Stage, grid, describe=str) -> bytes:
    """The model with stage `st` computed on a `grid` of patches.

    Args:
        data: bytes. The converted model (names may be kept or stripped).
        st: Stage. From `stage(info, split)` on `data`.
        grid: (rows, cols). Patches of the split tensor, row-major.
        describe: op index -> a name for error messages.

    Returns:
        The patched flatbuffer (unused tensors of the unpatched stage dropped).
    """
    schema = _tflite._schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(bytes(data), 0))
    sub = model.subgraphs[0]
    shapes = {i: tuple(int(d) for d in t.shape) for i, t in enumerate(sub.tensors)}
    codes = _tflite.op_names()
    names = {}
    geoms = {}
    for k in st.ops:
        op = sub.operators[k]
        code = model.operatorCodes[op.opcodeIndex]
        name = codes[max(code.builtinCode, code.deprecatedBuiltinCode)]
        names[k] = name
        if name in WINDOW_OPS:
            kh, kw, sh, sw, dh, dw, same = _window(schema, model, sub, op, name)
            geoms[k] = ("window", [(kh, sh, dh, same), (kw, sw, dw, same)])
        elif name == "PAD":
            pads = _pad_values(model, sub, op.inputs[1])
            if pads[0].any() or pads[3].any():
                raise PatchError(f"{describe(k)} pads the batch or channel axis.")
            geoms[k] = ("pad", [int(pads[1][0]), int(pads[2][0])])
        else:
            geoms[k] = ("elementwise", None)

    def spatial_inputs(k):
        return [
            t for t in sub.operators[k].inputs if t >= 0 and not _const(sub, t, model)
        ]

    # Backward: the region of every stage tensor each patch needs.
    rows = _cells(shapes[st.split][1], grid[0])
    cols = _cells(shapes[st.split][2], grid[1])
    patches = [[r, c] for r in rows for c in cols]
    needed = [{st.split: list(cell)} for cell in patches]
    reqs = [{} for _ in patches]
    for k in reversed(st.ops):
        op = sub.operators[k]
        out = op.outputs[0]
        for p, need in enumerate(needed):
            for t in spatial_inputs(k):
                if geoms[k][0] == "elementwise":
                    if shapes[t][1:3] != shapes[out][1:3]:
                        raise PatchError(
                            f"{describe(k)} broadcasts over the image axes; "
                            "patches need elementwise ops on equal shapes."
                        )
                req = _requirement(geoms[k], shapes[out], shapes[t], need[out])
                reqs[p][k, t] = req
                clipped = _clip(req, shapes[t])
                old = need.get(t)
                need[t] = (
                    clipped
                    if old is None
                    else [
                        (min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(old, clipped)
                    ]
                )

    new_ops = []
    opcode = _Opcodes(model, schema, codes)

    def tensor_like(t, region, name):
        src = sub.tensors[t]
        new = schema.TensorT()
        new.type, new.quantization, new.buffer = src.type, src.quantization, 0
        new.shape = [
            1,
            region[0][1] - region[0][0],
            region[1][1] - region[1][0],
            shapes[t][3],
        ]
        base = src.name.decode() if isinstance(src.name, bytes) else src.name
        new.name = f"{base or 'tensor'}/{name}"
        sub.tensors.append(new)
        shapes[len(sub.tensors) - 1] = tuple(new.shape)
        return len(sub.tensors) - 1

    constants = {}

    def const(values, name):
        key = (np.shape(values), tuple(np.ravel(values)))
        if key in constants:  # One tensor per distinct constant.
            return constants[key]
        buf = schema.BufferT()
        buf.data = np.frombuffer(np.asarray(values, "<i4").tobytes(), np.uint8)
        model.buffers.append(buf)
        new = schema.TensorT()
        new.type, new.buffer = schema.TensorType.INT32, len(model.buffers) - 1
        new.shape, new.name = list(np.shape(values)), name
        sub.tensors.append(new)
        constants[key] = len(sub.tensors) - 1
        return constants[key]

    def emit(name, ins, outs, options_type, options):
        op = schema.OperatorT()
        op.opcodeIndex = opcode(name, sub.tensors[outs[0]].type)
        op.inputs, op.outputs = list(ins), list(outs)
        op.builtinOptionsType, op.builtinOptions = options_type, options
        new_ops.append(op)

    def crop(t, have, want, tag):
        """Slice `want` (absolute region) out of tensor t holding `have`."""
        if have == want:
            return t
        begin = [0, want[0][0] - have[0][0], want[1][0] - have[1][0], 0]
        end = [1, want[0][1] - have[0][0], want[1][1] - have[1][0], shapes[t][3]]
        out = tensor_like(t, want, tag)
        emit(
            "STRIDED_SLICE",
            [
                t,
                const(begin, tag + "/begin"),
                const(end, tag + "/end"),
                const([1, 1, 1, 1], tag + "/strides"),
            ],
            [out],
            schema.BuiltinOptions.StridedSliceOptions,
            schema.StridedSliceOptionsT(),
        )
        return out

    def pad(t, req, clipped, tag):
        amounts = [
            [0, 0],
            [clipped[0][0] - req[0][0], req[0][1] - clipped[0][1]],
            [clipped[1][0] - req[1][0], req[1][1] - clipped[1][1]],
            [0, 0],
        ]
        if not any(any(a) for a in amounts):
            return t
        out = tensor_like(t, req, tag)
        emit(
            "PAD",
            [t, const(amounts, tag + "/paddings")],
            [out],
            schema.BuiltinOptions.PadOptions,
            schema.PadOptionsT(),
        )
        return out

    pieces, row_outputs = [], []
    for p, need in enumerate(needed):
        local = {
            st.input: (st.input, [(0, shapes[st.input][1]), (0, shapes[st.input][2])])
        }
        for k in st.ops:
            op = sub.operators[k]
            tag = f"patch{p}/op{k}"
            ins = list(op.inputs)
            out = op.outputs[0]
            region = need[out]
            padding = None  # Windowed ops: the padding the patch's copy uses.
            for i, t in enumerate(op.inputs):
                if t < 0 or _const(sub, t, model):
                    continue
                req = reqs[p][k, t]
                clipped = _clip(req, shapes[t])
                have_t, have = local[t]
                piece = crop(have_t, have, clipped, f"{tag}/in{i}/crop")
                if geoms[k][0] == "window":
                    padding = _padding(geoms[k][1], req, clipped, region, schema)
                    if padding is None and names[k].endswith("POOL_2D"):
                        raise PatchError(
                            f"{describe(k)} pools with padding='same' at the image "
                            "border in a way patches cannot reproduce. Use "
                            "padding='valid' in the stage or end it before this "
                            "layer (`until`)."
                        )
                    if padding is not None:
                        ins[i] = piece
                        continue
                    padding = schema.Padding.VALID
                ins[i] = pad(piece, req, clipped, f"{tag}/in{i}/pad")
            if names[k] == "PAD":  # Its padding is now explicit where needed.
                local[out] = (ins[0], region)
                continue
            new_out = tensor_like(out, region, tag)
            twin = schema.OperatorT()
            twin.opcodeIndex = op.opcodeIndex
            twin.inputs, twin.outputs = ins, [new_out]
            twin.builtinOptionsType = op.builtinOptionsType
            twin.builtinOptions = _with_padding(op.builtinOptions, padding)
            new_ops.append(twin)
            local[out] = (new_out, region)
        pieces.append(local[st.split][0])
        if len(pieces) == grid[1]:  # A grid row is done: join it along the width.
            r = len(row_outputs)
            row = [(rows[r][0], rows[r][1]), (0, shapes[st.split][2])]
            out = st.split if grid[0] == 1 else tensor_like(st.split, row, f"row{r}")
            row_outputs.append(_join(pieces, out, emit, schema))
            pieces = []
    if len(row_outputs) > 1:
        emit(
            "CONCATENATION",
            row_outputs,
            [st.split],
            schema.BuiltinOptions.ConcatenationOptions,
            _concat_options(schema, 1),
        )
    elif row_outputs[0] != st.split:
        raise PatchError("Internal: the patched stage does not end at its split.")

    stage_ops = set(st.ops)
    first = st.ops[0]
    sub.operators = [
        *[op for k, op in enumerate(sub.operators) if k < first and k not in stage_ops],
        *new_ops,
        *[op for k, op in enumerate(sub.operators) if k > first and k not in stage_ops],
    ]
    _drop_unused(sub)
    return _tflite.pack(model, len(data))


def _join(pieces, out, emit, schema):
    """CONCATENATION of one grid row's pieces along the width into `out`."""
    if len(pieces) == 1:
        return pieces[0]
    emit(
        "CONCATENATION",
        pieces,
        [out],
        schema.BuiltinOptions.ConcatenationOptions,
        _concat_options(schema, 2),
    )
    return out


def _concat_options(schema, axis):
    opts = schema.ConcatenationOptionsT()
    opts.axis = axis
    return opts


def _with_padding(options, padding):
    """A copy of a windowed op's options with `padding` (None: unchanged)."""
    if padding is None:
        return options
    new = copy.copy(options)
    new.padding = padding
    return new


def _padding(params, req, clipped, region, schema):
    """VALID or SAME when the op's own padding on the cropped input gives
    exactly the zeros the patch needs (so no PAD copy); None otherwise."""
    wanted, same = [], []
    for (k, s, d, _), (r0, r1), (c0, c1), (o0, o1) in zip(params, req, clipped, region):
        wanted.append((c0 - r0, r1 - c1))
        total = max((o1 - o0 - 1) * s + (k - 1) * d + 1 - (c1 - c0), 0)
        same.append((total // 2, total - total // 2))
        if -(-(c1 - c0) // s) != o1 - o0:  # SAME's own output size differs.
            same[-1] = None
    if not any(any(w) for w in wanted):
        return schema.Padding.VALID
    return schema.Padding.SAME if wanted == same else None


def _const(sub, t, model):
    buf = model.buffers[sub.tensors[t].buffer]
    return buf.data is not None and len(buf.data) > 0


class _Opcodes:
    """Operator code index of a builtin op, added to the model when missing."""

    _VERSIONS = {"STRIDED_SLICE": 2, "PAD": 2, "CONCATENATION": 2}

    def __init__(self, model, schema, codes):
        self.model, self.schema = model, schema
        self.by_name = {
            codes[max(c.builtinCode, c.deprecatedBuiltinCode)]: i
            for i, c in enumerate(model.operatorCodes)
        }

    def __call__(self, name, dtype):
        if name not in self.by_name:
            code = self.schema.OperatorCodeT()
            builtin = getattr(self.schema.BuiltinOperator, name)
            code.builtinCode = builtin
            code.deprecatedBuiltinCode = min(builtin, 127)
            code.version = (
                self._VERSIONS[name] if dtype == self.schema.TensorType.INT8 else 1
            )
            self.model.operatorCodes.append(code)
            self.by_name[name] = len(self.model.operatorCodes) - 1
        return self.by_name[name]


def _drop_unused(sub):
    """Remove tensors no op, input or output refers to; renumber the rest."""
    used = set(sub.inputs) | set(sub.outputs)
    for op in sub.operators:
        used |= {t for t in [*op.inputs, *op.outputs] if t >= 0}
    keep = sorted(used)
    index = {t: i for i, t in enumerate(keep)}
    sub.tensors = [sub.tensors[t] for t in keep]
    sub.inputs = [index[t] for t in sub.inputs]
    sub.outputs = [index[t] for t in sub.outputs]
    for op in sub.operators:
        op.inputs = [index[t] if t >= 0 else t for t in op.inputs]
        op.outputs = [index[t] for t in op.outputs]


def scopes(tensor_name: str) -> list[str]:
    """The name scopes in a converter tensor name, innermost first per fused
    piece ("model/inner/layer_1/Op;..." -> layer_1, inner, model, ...); the
    last component of a piece is a TensorFlow op name and is left out."""
    out = []
    for piece in tensor_name.split(";"):
        parts = piece.split("/")
        out.extend(reversed(parts[:-1] if len(parts) > 1 else parts))
    return out


def layer_of(info: _tflite.ModelInfo, k: int, layer_names=()) -> str:
    """A readable name for op `k`: its Keras layer when the tensor names say
    (the innermost layer of the op TFLite fused last)."""
    name, _, outs = info.op_sequence[k]
    for part in scopes(info.tensors[outs[0]].name):
        for candidate in (part, re.sub(r"_\d+$", "", part)):
            if candidate in layer_names:
                return f"layer {candidate!r} (op {k}, {name})"
    return f"op {k} ({name})"
