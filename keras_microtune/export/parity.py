"""Parity: the float source model vs LiteRT, and TFLite Micro vs LiteRT."""

from __future__ import annotations

import numpy as np

from keras_microtune.export import _model, _tflite, runtimes

MAX_SAMPLES = 256  # Samples compared between the float model and LiteRT.
MAX_TFLM_SAMPLES = 16  # Samples compared bit for bit between TFLM and LiteRT.
# TFLite Micro's int8 FULLY_CONNECTED rounds its requantization differently
# from LiteRT's reference kernel: one step per layer, which accumulates through
# a deep stack of dense layers (a 10-layer autoencoder ends 4 steps apart).
# Verification passes within 5 steps (2% of the int8 range); the exact
# difference is always reported (`tflm_max_abs_diff`, `tflm_matches_litert`).
# Beyond it, the model is checked kernel by kernel (`kernel_parity`): ops
# that divide by small values (a LayerNorm's L2_NORMALIZATION) amplify that
# one-step rounding, which the end-to-end difference cannot tell from a
# kernel computing something else.
TFLM_TOLERANCE_STEPS = 5
# Kernels whose TFLite Micro int8 algorithm is not LiteRT's: TFLite Micro's
# UNIDIRECTIONAL_SEQUENCE_LSTM keeps a 16-bit cell state and its own gate
# arithmetic, so four stacked LSTMs end ~9 steps from LiteRT's kernel while
# being *closer* to the float model. With one of these ops, TFLite Micro is
# verified against the float model instead: its error may exceed LiteRT's by
# at most the tolerance (`tflm_reference: "float"`).
FLOAT_VERIFIED_OPS = {"UNIDIRECTIONAL_SEQUENCE_LSTM"}


def metrics(reference: np.ndarray, actual: np.ndarray) -> dict:
    """top1_agreement (classifiers), max/mean abs error, cosine similarity."""
    ref = reference.reshape(len(reference), -1).astype("float64")
    act = actual.reshape(len(actual), -1).astype("float64")
    out = {}
    if ref.shape[1] > 1:
        out["top1_agreement"] = float(np.mean(ref.argmax(1) == act.argmax(1)))
    diff = np.abs(ref - act)
    out["max_abs_error"] = float(diff.max())
    out["mean_abs_error"] = float(diff.mean())
    denom = np.linalg.norm(ref) * np.linalg.norm(act)
    out["cosine"] = float((ref * act).sum() / denom) if denom else 1.0
    return out


def run_litert(tflite, xs, reference=False, info=None):
    """Float inputs -> float outputs through LiteRT (quantizing as the model needs)."""
    ins, outs = runtimes.io_details(tflite, info=info)
    q = [runtimes.quantize(x, d) for x, d in zip(xs, ins)]
    raw = runtimes.litert_run(tflite, q, reference=reference)
    return raw, [runtimes.dequantize(r, d) for r, d in zip(raw, outs)], q


def measure(source, tflite, target, xs, y=None, arena_bytes=None, info=None) -> dict:
    """Compare the source model, LiteRT and (int8 targets) TFLite Micro on `xs`.

    `info` is `tflite` parsed (`_tflite.parse`), when the caller has it.
    """
    xs = [x[:MAX_SAMPLES] for x in xs]
    expected = _model.predict(source, xs)[0]
    _, got, _ = run_litert(tflite, xs, info=info)
    out = {"samples": len(xs[0]), **metrics(expected, got[0])}
    if y is not None and expected.ndim == 2 and expected.shape[1] > 1:
        labels = np.asarray(y[: len(expected)]).reshape(-1)
        if labels.shape[0] == expected.shape[0]:
            out["float_accuracy"] = float(np.mean(expected.argmax(1) == labels))
            out["tflite_accuracy"] = float(np.mean(got[0].argmax(1) == labels))
    if target.quantization != "int8":
        return out
    small = [x[:MAX_TFLM_SAMPLES] for x in xs]
    ref_raw, _, q = run_litert(tflite, small, reference=True, info=info)
    info = info or _tflite.parse(tflite)
    if arena_bytes is None:
        arena_bytes = 4 * _tflite.activation_lower_bound(info) + (1 << 20)
    else:
        arena_bytes = int(arena_bytes) + 1024
    try:
        tflm_raw = runtimes.tflm_run(tflite, q, arena_bytes, info=info)
    except runtimes.RuntimeFailure as e:
        if target.is_mcu:
            raise
        # A LiteRT target may hold ops TFLite Micro lacks (e.g. GELU): the
        # cross-check does not apply; say why instead of failing.
        out["tflm_error"] = str(e)
        return out
    diffs = [
        np.abs(a.astype("float64") - b.astype("float64")).max()
        for a, b in zip(tflm_raw, ref_raw)
    ]
    out["tflm_samples"] = len(small[0])
    out["tflm_max_abs_diff"] = float(max(diffs))
    out["tflm_matches_litert"] = bool(
        all(np.array_equal(a, b) for a, b in zip(tflm_raw, ref_raw))
    )
    out["tflm_tolerance_steps"] = TFLM_TOLERANCE_STEPS
    out["tflm_within_tolerance"] = bool(
        out["tflm_max_abs_diff"] <= TFLM_TOLERANCE_STEPS
    )
    if FLOAT_VERIFIED_OPS & set(info.ops):
        out.update(_against_float(tflite, info, expected, tflm_raw, ref_raw))
    elif not out["tflm_within_tolerance"]:
        out.update(_by_kernels(tflite, info, q, expected, tflm_raw, ref_raw))
    return out


def _by_kernels(tflite, info, q, expected, tflm_raw, ref_raw) -> dict:
    """Outputs further apart than the tolerance: verified when every kernel,
    fed the same inputs, is within its own tolerance of LiteRT's
    (`kernel_parity.check`: the difference is amplified rounding, not a
    kernel computing something else) and TFLite Micro is no further from
    the float model than LiteRT plus the tolerance (`tflm_reference:
    "kernels"`)."""
    from keras_microtune.export import kernel_parity

    kernels = kernel_parity.check(tflite, info, q)
    if kernels is None:
        return {}
    out = {"tflm_kernels": kernels}
    if kernels["within_tolerance"]:
        out.update(_against_float(tflite, info, expected, tflm_raw, ref_raw))
        out["tflm_reference"] = "kernels"
    return out


def _against_float(tflite, info, expected, tflm_raw, ref_raw) -> dict:
    """TFLite Micro and LiteRT output errors vs the float model, in output steps."""
    detail = runtimes.io_details(tflite, info=info)[1][0]
    want = expected[: len(tflm_raw[0])].astype("float64")
    errors = [
        float(np.abs(runtimes.dequantize(raw, detail) - want).max())
        for raw in (tflm_raw[0], ref_raw[0])
    ]
    step = float(detail["quantization"][0]) or 1.0
    return {
        "tflm_reference": "float",
        "tflm_float_max_abs_error": errors[0],
        "litert_float_max_abs_error": errors[1],
        "tflm_within_tolerance": bool(
            errors[0] <= errors[1] + TFLM_TOLERANCE_STEPS * step
        ),
    }


MAX_STREAM_SAMPLES = 64  # Sequences streamed through LiteRT for float parity.


def measure_stream(
    step, tflite, target, sequences, y=None, arena_bytes=None, info=None
):
    """A streaming model (`streaming.StepModel` converted) fed frame by frame.

    The Keras model runs each whole sequence; the float step model, LiteRT and
    (int8) TFLite Micro run it one frame per invoke from a zero state. Their
    outputs after each frame are compared with the Keras model's: every step
    for a sequence output, else the output after the last frame. TFLite Micro
    is verified against LiteRT's reference kernels per frame, as `measure`
    does per sample.
    """
    sequences = np.asarray(sequences)[:MAX_STREAM_SAMPLES]
    expected = _model.predict(step.model, [sequences])[0]

    def comparable(per_step):  # (N, T, ...) -> what the Keras model outputs
        return per_step if step.sequence_output else per_step[:, -1]

    small = sequences[:MAX_TFLM_SAMPLES]
    float_steps = comparable(step.run(small))
    ins, outs = runtimes.io_details(tflite, info=info)
    q = runtimes.quantize(sequences, ins[0])
    got = comparable(runtimes.dequantize(runtimes.litert_stream(tflite, q), outs[0]))
    out = {
        "samples": len(sequences),
        "frames_per_sample": int(sequences.shape[1]),
        "step_float_max_abs_error": float(
            np.abs(float_steps - expected[: len(small)]).max()
        ),
        **metrics(expected, got),
    }
    if y is not None and expected.ndim == 2 and expected.shape[1] > 1:
        labels = np.asarray(y[: len(expected)]).reshape(-1)
        if labels.shape[0] == expected.shape[0]:
            out["float_accuracy"] = float(np.mean(expected.argmax(1) == labels))
            out["tflite_accuracy"] = float(np.mean(got.argmax(1) == labels))
    if target.quantization != "int8":
        return out
    info = info or _tflite.parse(tflite)
    if arena_bytes is None:
        arena_bytes = 4 * _tflite.activation_lower_bound(info) + (1 << 20)
    ref_raw = runtimes.litert_stream(tflite, q[: len(small)], reference=True)
    tflm_raw = runtimes.tflm_run(
        tflite, [q[: len(small)]], int(arena_bytes) + 1024, info=info, frames=True
    )[0]
    diff = np.abs(tflm_raw.astype("float64") - ref_raw.astype("float64")).max()
    out["tflm_samples"] = len(small)
    out["tflm_max_abs_diff"] = float(diff)
    out["tflm_matches_litert"] = bool(np.array_equal(tflm_raw, ref_raw))
    out["tflm_tolerance_steps"] = TFLM_TOLERANCE_STEPS
    out["tflm_within_tolerance"] = bool(diff <= TFLM_TOLERANCE_STEPS)
    tflm = comparable(runtimes.dequantize(tflm_raw, outs[0]))
    out["tflm_float_max_abs_error"] = float(np.abs(tflm - expected[: len(small)]).max())
    if FLOAT_VERIFIED_OPS & set(info.ops):  # The fused form: as `measure` does.
        out.update(
            _against_float(
                tflite, info, expected, [comparable(tflm_raw)], [comparable(ref_raw)]
            )
        )
    return out
