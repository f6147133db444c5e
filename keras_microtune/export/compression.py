"""TFLite Micro weight compression: int8 weights stored as LUT indices.

TFLite Micro can store a constant tensor as 1-7-bit indices into small value
tables and decode it at run time with a `TFLM_DECODE` operator that its
compression library inserts. A weight tensor fits when each table needs at
most `2**bits` values: clustered models (`kmt.optimize.cluster_weights`) are
built for this. A tensor whose int8 values number at most `2**bits` over the
whole tensor gets one table (per tensor: `2**bits` bytes); else, if it is
quantized per channel, one table per output channel (axis 0, or the quantized
dimension, as for depthwise filters), when each channel fits. The DECODE
kernel counts tables by the decoded tensor's quantization scales, so a kernel
quantized per tensor (`convert(weight_quantization="per_tensor")`) takes one
table or none: per-channel tables there decode wrongly.

Per-tensor tables and the runtime: the TFLite Micro DECODE kernel shipped in
the `tflite_micro` package (`DecodeStateLut::Setup`) ignores the table-axis
field of the ancillary data (`0xF` = one table) that the compression library
writes; it takes the number of tables from the decoded tensor's quantization
(one per output-channel scale) and steps through them by the stride in byte 6.
The library writes the table length there, so on a per-channel quantized
kernel every channel after the first reads past the one table: wrong weights
(measured: up to 255 int8 steps of output error on a tiny conv model). This
module writes stride 0 for per-tensor tables, so every channel reads the same
table: bit-exact with the uncompressed model, and as read by a runtime that
honours the axis field (one table, no stride).

`apply(tflite, compression)` finds the CONV_2D, DEPTHWISE_CONV_2D,
FULLY_CONNECTED and TRANSPOSE_CONV filters that fit and shrink (a tensor whose
indices and table, plus the DECODE operator and tensors they add, are not
smaller than its int8 data stays int8), compresses them with `tflite_micro`'s
compression library, checks in TFLite Micro that the outputs equal the
uncompressed model's bit for bit, and measures the arena (decoded weights live
in it) and the invoke time of both models.

Only TFLite Micro built with compression support (`USE_TFLM_COMPRESSION=1`)
loads the result; LiteRT cannot.
"""

from __future__ import annotations

import numpy as np

from keras_microtune.export import _tflite, runtimes

CHOICES = tuple(f"lut{b}" for b in range(1, 8)) + ("auto",)
RUNTIME_NOTE = (
    "TFLite Micro built with compression support (USE_TFLM_COMPRESSION=1) "
    "only; LiteRT and TFLite Micro without it cannot load this file"
)
WEIGHT_OPS = {
    "CONV_2D": 1,
    "DEPTHWISE_CONV_2D": 1,
    "FULLY_CONNECTED": 1,
    "TRANSPOSE_CONV": 1,
}
_DCM_BYTES = 16  # Decode common metadata at the head of the ancillary data.
_OVERHEAD_BYTES = 160  # Extra tensor, buffer and DECODE operator (measured).
_NOT_SMALLER = "no smaller when compressed"


class CompressionError(RuntimeError):
    """The compressed model does not reproduce the uncompressed one."""


def check(compression, target) -> int | str | None:
    """Validate `compression` for `target`; return bits, `"auto"` or None."""
    if compression is None:
        return None
    if compression not in CHOICES:
        raise ValueError(
            "Received an invalid value for `compression`, expected None or one "
            f"of {CHOICES}. Received: compression={compression!r}"
        )
    if not target.is_mcu:
        raise ValueError(
            f"Target {target.name!r} runs on LiteRT, which cannot load models "
            f"with TFLite Micro's LUT weight compression "
            f"(compression={compression!r}). Use compression=None for mobile "
            "targets, or a TFLite Micro target such as 'mcu' or 'cortex-m4'."
        )
    return "auto" if compression == "auto" else int(compression[3:])


def _bits(values: int) -> int:
    return max(1, int(values - 1).bit_length())


def _tables(array, axis):
    """Value tables of `array`: one per slice along `axis`, or one (None)."""
    if axis is None:
        return [np.unique(array)]
    return [np.unique(s) for s in np.moveaxis(array, axis, 0)]


def _estimate(array, axis, bits):
    tables = _tables(array, axis)
    stride = max(len(t) for t in tables)
    indices = (array.size * bits + 7) // 8
    return indices + _DCM_BYTES + stride * len(tables) * array.itemsize


def plan(tflite: bytes, bits) -> tuple[list[dict], list[dict]]:
    """Weight tensors to compress, and the ones that do not fit or shrink.

    Args:
        tflite: bytes. An int8 TFLite Micro model.
        bits: int (index bits) or `"auto"` (the fewest bits that fit, 1-7).

    Returns:
        (chosen, skipped): dicts with `tensor`, `op`, `shape`, `bytes_before`,
        and for chosen ones `index_bits`, `axis` (the table axis) and
        `estimated_bytes_after`; skipped ones give a `reason`.
    """
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    model = model_editor.read(bytes(tflite))
    subgraph = model.subgraphs[0]
    chosen, skipped, seen = [], [], set()
    for op in subgraph.operators:
        position = WEIGHT_OPS.get(op.opcode_name)
        if position is None or len(op.inputs) <= position:
            continue
        tensor = op.inputs[position]
        if tensor is None or id(tensor) in seen or tensor.buffer is None:
            continue
        if not len(tensor.buffer.data):
            continue
        seen.add(id(tensor))
        array = tensor.array
        if array.dtype != np.int8:
            continue
        entry = {
            "tensor": subgraph.tensors.index(tensor),
            "op": op.opcode_name,
            "shape": [int(d) for d in array.shape],
            "bytes_before": int(array.nbytes),
        }
        best = None
        quant = tensor.quantization
        per_channel = quant is not None and np.size(quant.scales) > 1
        # One table for the whole tensor (None) where its values fit, else one
        # per output channel. Per-tensor tables are written with stride 0
        # (`_fix_decode_inputs`), which this runtime needs. The DECODE kernel
        # counts tables by the quantization scales, so a per-tensor quantized
        # kernel can only have one table.
        axes = [None] + ([int(quant.axis or 0)] if per_channel else [])
        for axis in axes:
            needed = _bits(max(len(t) for t in _tables(array, axis)))
            use = needed if bits == "auto" else bits
            if needed > use or use > 7:
                continue
            size = _estimate(array, axis, use) + _OVERHEAD_BYTES
            if best is None or size < best[0]:
                best = (size, axis, use)
        if best is None:
            values = max(len(t) for t in _tables(array, axes[-1]))
            entry["reason"] = (
                f"{values} values per table, more than 2**{bits}"
                if per_channel
                else f"{values} values in the tensor, more than 2**{bits} "
                "(per-tensor quantized: one table for the whole tensor)"
            )
            skipped.append(entry)
        elif best[0] >= entry["bytes_before"]:
            entry["reason"] = _NOT_SMALLER
            skipped.append(entry)
        else:
            entry.update(
                index_bits=best[2], axis=best[1], estimated_bytes_after=best[0]
            )
            chosen.append(entry)
    return chosen, skipped


def compress(tflite: bytes, chosen: list[dict]) -> bytes:
    """The model with the `chosen` tensors LUT-compressed (DECODE ops inserted)."""
    from tflite_micro.tensorflow.lite.micro.compression import compress as lib
    from tflite_micro.tensorflow.lite.micro.compression import spec

    specs = [
        spec.Tensor(
            subgraph=0,
            tensor=entry["tensor"],
            compression=[
                spec.LookUpTableCompression(
                    index_bitwidth=entry["index_bits"],
                    mode=spec.PerTensor()
                    if entry["axis"] is None
                    else spec.PerChannel(axis=entry["axis"]),
                )
            ],
        )
        for entry in chosen
    ]
    return _fix_decode_inputs(bytes(lib(bytes(tflite), specs)))


_DCM_PARAMS, _DCM_STRIDE = 5, 6  # Ancillary data bytes (see module doc).
_PER_TENSOR_AXIS = 0xF


def _fix_decode_inputs(data: bytes) -> bytes:
    """Rewrite what the compression library leaves on DECODE's inputs.

    1. Quantization left on the encoded inputs: the library rewrites each
       compressed tensor as raw UINT8 indices and sets its quantization to
       None, but its flatbuffer writer keeps the tensor's original parameters
       when the new value is None. So every encoded tensor still carries the
       per-channel scales and int64 zero points that its decoded copy carries
       again: 12 bytes per output channel (768 B for a 64-channel kernel),
       enough to cancel lut4's savings on ds_cnn. DECODE reads its inputs as
       raw bytes; the decoded tensor keeps the parameters the kernel uses.
    2. Per-tensor tables: value-table stride 0 (see the module docstring:
       the runtime steps through one table per quantization channel).
    """
    schema = _tflite._schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    decode = {
        i
        for i, code in enumerate(model.operatorCodes or [])
        if code.customCode in (b"TFLM_DECODE", "TFLM_DECODE")
    }
    changed = False
    for sub in model.subgraphs:
        for op in sub.operators or []:
            if op.opcodeIndex not in decode:
                continue
            for t in op.inputs:
                if t >= 0 and sub.tensors[t].quantization is not None:
                    sub.tensors[t].quantization = None
                    changed = True
            for t in op.inputs[1::2]:  # (encoded, ancillary) pairs.
                buffer = model.buffers[sub.tensors[t].buffer]
                table = np.asarray(buffer.data, np.uint8)
                if (
                    table.size > _DCM_BYTES
                    and table[_DCM_PARAMS] >> 4 == _PER_TENSOR_AXIS
                    and table[_DCM_STRIDE] != 0
                ):
                    table = table.copy()
                    table[_DCM_STRIDE] = 0
                    buffer.data = table
                    changed = True
    return _tflite.pack(model, len(data)) if changed else data


def _stored_bytes(data: bytes) -> dict[int, int]:
    """{original tensor index: bytes of its indices + ancillary data} in the
    compressed model (the library keeps the indices in the original tensor)."""
    schema = _tflite._schema()
    model = schema.Model.GetRootAs(data, 0)
    sub = model.Subgraphs(0)
    decode = {
        i
        for i in range(model.OperatorCodesLength())
        if model.OperatorCodes(i).CustomCode() == b"TFLM_DECODE"
    }
    out = {}
    for k in range(sub.OperatorsLength()):
        op = sub.Operators(k)
        if op.OpcodeIndex() not in decode:
            continue
        inputs = op.InputsAsNumpy()
        for encoded, ancillary in zip(inputs[::2], inputs[1::2]):
            out[int(encoded)] = sum(
                model.Buffers(sub.Tensors(int(t)).Buffer()).DataLength()
                for t in (encoded, ancillary)
            )
    return out


def _check_inputs(tflite, info, x_check, samples=8):
    rng = np.random.default_rng(0)
    out = []
    for k, t in enumerate(info.inputs):
        spec = info.tensors[t]
        dtype = np.dtype(spec.dtype)
        shape = (samples, *spec.shape[1:])
        if np.issubdtype(dtype, np.integer):
            lim = np.iinfo(dtype)
            x = rng.integers(lim.min, lim.max, shape, endpoint=True).astype(dtype)
        else:
            x = rng.normal(size=shape).astype(dtype)
        if x_check is not None:
            details, _ = runtimes.io_details(tflite, info=info)
            real = runtimes.quantize(np.asarray(x_check[k][:32]), details[k])
            x = np.concatenate([real, x]).astype(dtype)
        out.append(x)
    return out


def apply(
    tflite: bytes, compression, x_check=None, timing_repeats: int = 30, info=None
) -> tuple[bytes, _tflite.ModelInfo, dict]:
    """Compress `tflite` as `compression` asks, verify it, and measure it.

    Args:
        tflite: bytes. A stripped int8 model for TFLite Micro (no offline
            memory plan yet: compression adds tensors).
        compression: int (index bits) or `"auto"`, from `check`.
        x_check: list of float arrays or None. Real inputs for the
            bit-exactness check, besides seeded random int8 inputs.
        timing_repeats: int. Invokes of each model for the median time.
        info: `tflite` parsed (`_tflite.parse`), when the caller has it.

    Returns:
        (model, model_info, report): the compressed model (or `tflite` when
        nothing fits and `compression="auto"`), it parsed, and the
        `report["compression"]` dict.

    Raises:
        ValueError: an explicit `lutN` and no weight tensor fits.
        CompressionError: TFLite Micro outputs differ from the uncompressed
            model's.
    """
    requested = "auto" if compression == "auto" else f"lut{compression}"
    chosen, skipped = plan(tflite, compression)
    report = {
        "method": "lut",
        "requested": requested,
        "tensors": [],
        "skipped": [
            {k: e[k] for k in ("tensor", "op", "shape", "bytes_before", "reason")}
            for e in skipped
        ],
        "size_bytes_before": len(tflite),
        "size_bytes_after": len(tflite),
        "loads_in": "LiteRT and TFLite Micro",
    }
    if not chosen:
        if compression != "auto":
            worst = ", ".join(f"{e['op']} {e['shape']}: {e['reason']}" for e in skipped)
            if skipped and all(e["reason"] == _NOT_SMALLER for e in skipped):
                raise ValueError(
                    f"compression={requested!r}: every weight tensor fits "
                    f"{requested} but none would shrink ({worst}): a table per "
                    "output channel costs more than the indices save on "
                    "tensors this small. Use compression=None (or 'auto', "
                    "which leaves such models alone)."
                )
            raise ValueError(
                f"compression={requested!r}: no weight tensor fits {requested} "
                f"({worst or 'no int8 weights'}). Cluster the model first: "
                f"kmt.optimize.cluster_weights(model, number_of_clusters="
                f"{2**compression}), fine-tune, strip_clustering, then convert."
            )
        return tflite, info or _tflite.parse(tflite), report
    compressed = compress(tflite, chosen)
    if len(compressed) >= len(tflite):  # Tables and DECODE ops cost more.
        report["not_applied"] = (
            f"compressed model not smaller ({len(compressed):,} B vs {len(tflite):,} B)"
        )
        return tflite, info or _tflite.parse(tflite), report
    stored = _stored_bytes(compressed)
    for entry in chosen:
        after = stored.get(entry["tensor"], entry["estimated_bytes_after"])
        report["tensors"].append(
            {
                "tensor": entry["tensor"],
                "op": entry["op"],
                "shape": entry["shape"],
                "index_bits": entry["index_bits"],
                "tables": "per tensor" if entry["axis"] is None else "per channel",
                "table_axis": entry["axis"],
                "bytes_before": entry["bytes_before"],
                "bytes_after": after,
                # Net of the DECODE operator and tensors it adds (estimated).
                "bytes_saved": entry["bytes_before"] - after - _OVERHEAD_BYTES,
            }
        )
    info = info or _tflite.parse(tflite)
    compressed_info = _tflite.parse(compressed)
    lower = _tflite.activation_lower_bound(info)
    plain_arena = runtimes.measure_arena(tflite, lower, info=info)["arena_bytes"]
    measured = runtimes.measure_arena(compressed, lower, info=compressed_info)
    arena = measured["arena_bytes"]
    xs = _check_inputs(tflite, info, x_check)
    a = runtimes.tflm_run(tflite, xs, plain_arena, info=info)
    b = runtimes.tflm_run(compressed, xs, arena, info=compressed_info)
    if not all(np.array_equal(u, v) for u, v in zip(a, b)):
        raise CompressionError(
            "TFLite Micro outputs of the compressed model differ from the "
            "uncompressed int8 model's; the model was not compressed."
        )
    plain_s, compressed_s = runtimes.tflm_invoke_times(
        tflite, plain_arena, compressed, arena, [x[:1] for x in xs], timing_repeats
    )
    report.update(
        size_bytes_after=len(compressed),
        bytes_saved=len(tflite) - len(compressed),
        size_ratio=round(len(compressed) / len(tflite), 4),
        arena_bytes_without_compression=plain_arena,
        arena_bytes_with_compression=arena,
        bit_exact=True,
        samples_checked=int(len(xs[0])),
        invoke_us_without_compression=round(plain_s * 1e6, 1),
        invoke_us_with_compression=round(compressed_s * 1e6, 1),
        invoke_time_ratio=round(compressed_s / plain_s, 3) if plain_s else None,
        loads_in=RUNTIME_NOTE,
    )
    return compressed, compressed_info, report


def rows(report: dict) -> list[tuple[str, str]]:
    """(label, value) rows for the conversion report's summary table."""
    c = report.get("compression")
    if not c:
        return []
    per_tensor = sum(t.get("tables") == "per tensor" for t in c["tensors"])
    out = [
        (
            "weight compression",
            f"{c['requested']}: {len(c['tensors'])} tensors "
            f"({per_tensor} with one table per tensor)",
        )
    ]
    if c["tensors"]:
        before = sum(t["bytes_before"] for t in c["tensors"])
        after = sum(t["bytes_after"] for t in c["tensors"])
        out += [
            ("compressed weights", f"{before:,} B -> {after:,} B"),
            (
                "model size with/without compression",
                f"{c['size_bytes_after']:,} B / {c['size_bytes_before']:,} B "
                f"({c['bytes_saved']:,} B saved)",
            ),
            (
                "arena with/without compression",
                f"{c['arena_bytes_with_compression']:,} B / "
                f"{c['arena_bytes_without_compression']:,} B",
            ),
            ("invoke time compressed / plain", str(c["invoke_time_ratio"])),
        ]
    out.append(("runs in", c["loads_in"]))
    return out
