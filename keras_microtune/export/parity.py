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
TFLM_TOLERANCE_STEPS = 5


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
    return out
