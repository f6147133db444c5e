"""Generate the C/C++ files a TFLite Micro application compiles in.

Nothing from the model or the user lands in the sources unescaped: identifiers
are reduced to `[A-Za-z0-9_]`, strings are emitted as escaped C literals, and
comments hold only text written here.
"""

from __future__ import annotations

import re

ARENA_MARGIN = 0.20  # Fraction added to the measured arena in kTensorArenaSize.
ARENA_EXTRA = 1024  # Bytes added on top, for optimized-kernel scratch buffers.

# TFLite Micro resolver methods whose names do not follow the CamelCase rule.
_RESOLVER_EXCEPTIONS = {
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "LSTM": "AddLSTM",
    "RELU_N1_TO_1": "AddReluN1To1",
    "RELU_0_TO_1": "AddRelu0To1",
    # MicroMutableOpResolver spells these against the CamelCase rule.
    "BATCH_MATMUL": "AddBatchMatMul",
    "CUMSUM": "AddCumSum",
    "PADV2": "AddPadV2",
}


def c_identifier(text: str, default: str = "model") -> str:
    """Reduce `text` to a valid C identifier (ASCII letters, digits, `_`)."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", str(text)).strip("_") or default
    if ident[0].isdigit():
        ident = "_" + ident
    return ident[:64]


def c_string(text: str) -> str:
    """`text` as a C string literal: every non-printable or non-ASCII byte,
    quote, backslash and `?` (trigraphs) is escaped."""
    out = []
    for byte in str(text).encode("utf-8"):
        ch = chr(byte)
        if (ch.isascii() and ch.isalnum()) or ch in " _-.,:;()[]{}<>=+!#%&|^~@$'":
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def arena_size(arena_bytes: int) -> int:
    """`kTensorArenaSize`: the measured arena plus the stated margin, 16-aligned."""
    size = int(arena_bytes * (1 + ARENA_MARGIN)) + ARENA_EXTRA
    return (size + 15) // 16 * 16


# Custom ops TFLite Micro registers itself: the DECODE op of compressed
# models (needs TFLite Micro built with USE_TFLM_COMPRESSION=1).
_CUSTOM_RESOLVERS = {"CUSTOM:TFLM_DECODE": "AddDecode"}


def resolver_method(op: str) -> str:
    """`CONV_2D` -> `AddConv2D`, `FULLY_CONNECTED` -> `AddFullyConnected`."""
    if op in _CUSTOM_RESOLVERS:
        return _CUSTOM_RESOLVERS[op]
    if op in _RESOLVER_EXCEPTIONS:
        return _RESOLVER_EXCEPTIONS[op]
    parts = []
    for part in op.split("_"):
        parts.append(part if part[:1].isdigit() else part.capitalize())
    return "Add" + "".join(parts)


_C_TYPES = {"int8": ("int8_t", -128, 127), "uint8": ("uint8_t", 0, 255)}
_C_TYPES["int16"] = ("int16_t", -32768, 32767)


def _c_float(value: float) -> str:
    text = repr(float(value))
    return text + ("f" if "e" in text or "." in text else ".0f")


def input_helper(input_report: dict | None) -> str:
    """Constants of input 0's quantization and `quantize_input()` (raw -> int)."""
    if not input_report or input_report.get("dtype") not in _C_TYPES:
        return ""
    if "scale" not in input_report:
        return ""
    ctype, low, high = _C_TYPES[input_report["dtype"]]
    prep = input_report.get("preprocessing") or {}
    per_channel = isinstance(input_report["scale"], list)
    note = "// The device feeds raw values (sensor units, pixel values).\n"
    if prep.get("folded"):
        note += (
            "// The model's leading Rescaling/Normalization is folded into this\n"
            "// scale and zero point: no op runs for it on the device. The zero\n"
            "// point may be fractional; quantize_input() keeps it exact.\n"
        )
        if per_channel:
            note += (
                "// One scale and zero point per channel of the last axis: value i\n"
                "// of the input tensor is channel i % kInputChannels.\n"
            )
    elif prep:
        note += "// The model's normalization runs as int8 ops (MUL, ADD).\n"
    clip = (
        f"  if (q < {low}.0f) q = {low}.0f;\n"
        f"  if (q > {high}.0f) q = {high}.0f;\n"
        f"  return static_cast<{ctype}>(q);\n"
        "}\n"
    )
    if per_channel:
        channels = len(input_report["scale"])

        def array(name, key):
            values = ", ".join(_c_float(v) for v in input_report[key])
            return f"constexpr float {name}[kInputChannels] = {{{values}}};\n"

        return (
            f"\n{note}"
            f"constexpr int kInputChannels = {channels};\n"
            + array("kInputScale", "scale")
            + array("kInputZeroPoint", "zero_point")
            + "// Raw values of channel c in [kInputRawMin[c], kInputRawMax[c]] are "
            "not clipped.\n"
            + array("kInputRawMin", "raw_min")
            + array("kInputRawMax", "raw_max")
            + f"typedef {ctype} InputType;\n\n"
            "// One raw value of channel `channel` -> the integer to write into "
            "the input tensor.\n"
            f"inline {ctype} quantize_input(float raw, int channel) {{\n"
            "  float q = roundf(raw / kInputScale[channel] + "
            "kInputZeroPoint[channel]);\n" + clip
        )
    return (
        f"\n{note}"
        f"constexpr float kInputScale = {_c_float(input_report['scale'])};\n"
        f"constexpr float kInputZeroPoint = {_c_float(input_report['zero_point'])};\n"
        "// Raw values in [kInputRawMin, kInputRawMax] are not clipped.\n"
        f"constexpr float kInputRawMin = {_c_float(input_report['raw_min'])};\n"
        f"constexpr float kInputRawMax = {_c_float(input_report['raw_max'])};\n"
        f"typedef {ctype} InputType;\n\n"
        "// One raw value -> the integer to write into the input tensor.\n"
        f"inline {ctype} quantize_input(float raw) {{\n"
        "  float q = roundf(raw / kInputScale + kInputZeroPoint);\n" + clip
    )


def model_data_h(
    name: str,
    size_bytes: int,
    arena_bytes: int | None,
    input_report: dict | None = None,
) -> str:
    guard = f"KMT_{c_identifier(name).upper()}_MODEL_DATA_H_"
    helper = input_helper(input_report)
    includes = "#include <math.h>\n#include <stdint.h>\n\n" if helper else ""
    arena = ""
    if arena_bytes is not None:
        arena = (
            f"// Measured in the TFLite Micro interpreter: {int(arena_bytes)} bytes;\n"
            f"// plus {int(ARENA_MARGIN * 100)}% and {ARENA_EXTRA} bytes of margin for"
            " optimized kernels'\n// scratch buffers and 32-bit vs 64-bit layout.\n"
            f"constexpr int kTensorArenaSize = {arena_size(arena_bytes)};\n"
            f"constexpr int kTensorArenaMeasuredSize = {int(arena_bytes)};\n"
        )
    return (
        "// Generated by keras_microtune. Do not edit.\n"
        f"#ifndef {guard}\n#define {guard}\n\n"
        f"{includes}"
        "extern const unsigned char g_model_data[];\n"
        "extern const unsigned int g_model_data_len;\n"
        "extern const char g_model_name[];\n"
        f"constexpr unsigned int kModelDataLen = {int(size_bytes)};\n"
        f"{arena}{helper}\n#endif  // {guard}\n"
    )


def model_data_cc(tflite: bytes, name: str) -> str:
    rows = []
    for i in range(0, len(tflite), 12):
        rows.append("  " + ", ".join(f"0x{b:02x}" for b in tflite[i : i + 12]) + ",")
    return (
        "// Generated by keras_microtune. Do not edit.\n"
        '#include "model_data.h"\n\n'
        f"const char g_model_name[] = {c_string(name)};\n\n"
        "alignas(16) const unsigned char g_model_data[] = {\n"
        + "\n".join(rows)
        + "\n};\n"
        f"const unsigned int g_model_data_len = {len(tflite)};\n"
    )


def op_resolver_h(ops: list[str]) -> str:
    """A header defining `kmt::OpResolver`: exactly the builtin ops in `ops`."""
    ops = sorted(set(ops))
    bad = [
        op
        for op in ops
        if not re.fullmatch(r"[A-Z0-9_]+", op) and op not in _CUSTOM_RESOLVERS
    ]
    if bad:
        raise ValueError(f"TFLite Micro has no builtin resolver entry for {bad}.")
    adds = "\n".join(
        f"  if (resolver.{resolver_method(op)}() != kTfLiteOk) return kTfLiteError;"
        for op in ops
    )
    return (
        "// Generated by keras_microtune. Do not edit.\n"
        "#ifndef KMT_OP_RESOLVER_H_\n#define KMT_OP_RESOLVER_H_\n\n"
        '#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"\n\n'
        "namespace kmt {\n\n"
        f"constexpr int kNumOps = {len(ops)};\n"
        "using OpResolver = tflite::MicroMutableOpResolver<kNumOps>;\n\n"
        "// Registers the model's ops: "
        + ", ".join(ops)
        + ".\ninline TfLiteStatus RegisterOps(OpResolver& resolver) {\n"
        f"{adds}\n  return kTfLiteOk;\n}}\n\n}}  // namespace kmt\n\n"
        "#endif  // KMT_OP_RESOLVER_H_\n"
    )


def files(
    tflite: bytes, name: str, ops: list[str], arena_bytes, input_report=None
) -> dict[str, str]:
    """All generated sources, by file name."""
    return {
        "model_data.h": model_data_h(name, len(tflite), arena_bytes, input_report),
        "model_data.cc": model_data_cc(tflite, name),
        "op_resolver.h": op_resolver_h(ops),
    }
