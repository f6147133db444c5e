"""Anomaly-detection autoencoder: every int8 path, scored by AUC in TFLite Micro.

The autoencoder row of issue 19's "benchmark where PTQ hurts" (table 3).
aeon's bundled KDD-TSAD 135 (UCR anomaly archive, InternalBleeding16: an
arterial blood pressure trace, 1,200 normal training points, 7,501 test
points with one labelled 12-point anomaly) is cut into sliding windows of
64 points (standardized with the training mean and std). A Dense autoencoder
(64-32-8-32-64, ReLU) learns to reconstruct the normal windows; a test
window's anomaly score is its mean squared reconstruction error, and the
score is the ROC AUC (`sklearn.metrics.roc_auc_score`) of windows that
overlap the anomaly against the rest (every other test window: 3,719, 38
positive).

Rows: table 3's (`benchmarks.quantization.ROWS`, described there), each
converted model run in the TFLite Micro interpreter; one differs here:

- tfmot QAT: `tfmot.quantization.keras.quantize_model` on the tf_keras twin
  (same weights, same fine-tuning), converted by the plain converter.

Calibration data is training windows only. `--seeds` trains the model that
many times (mean ± spread).

    python -m benchmarks.ptq_autoencoder [--tiny] [--seeds 3]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from benchmarks.quantization import (  # noqa: E402
    ROWS,
    keras_litert,
    plain_converter,
    print_rows,
    why,
)

WINDOW = 64
WIDTHS = (32, 8, 32)
FIT = (1e-3, 60, 32)  # Adam rate, epochs, batch
QAT_EPOCHS = 5


def load(tiny=False):
    """Training windows, test windows (every other one) and their labels."""
    from aeon.datasets import load_kdd_tsad_135

    train, _ = load_kdd_tsad_135(split="train")
    test, labels = load_kdd_tsad_135(split="test")
    train = np.asarray(train, "float32").ravel()
    test = np.asarray(test, "float32").ravel()
    mean, std = train.mean(), train.std()

    def windows(series):
        return np.lib.stride_tricks.sliding_window_view(series, WINDOW)

    x = windows((train - mean) / std).astype("float32")
    xt = windows((test - mean) / std).astype("float32")[::2]
    yt = windows(np.asarray(labels).ravel()).max(1)[::2].astype("int32")
    if tiny:
        # Keep the anomaly: the windows around it and a few normal ones.
        keep = np.r_[np.flatnonzero(yt)[:8], np.arange(0, len(yt), 100)[:24]]
        x, xt, yt = x[::8], xt[keep], yt[keep]
    return x, xt, yt


def _model(lib):
    dense = [lib.layers.Dense(w, activation="relu") for w in WIDTHS]
    return lib.Sequential([lib.Input((WINDOW,)), *dense, lib.layers.Dense(WINDOW)])


def _fit(model, x, rate, epochs, batch, lib=None):
    import keras

    optimizer = (lib or keras).optimizers.Adam(rate)
    model.compile(optimizer, "mse")
    model.fit(x, x, epochs=epochs, batch_size=batch, verbose=0)
    return model


def tflm_outputs(tflite, x):
    """The model's float outputs for `x`, run in TFLite Micro."""
    from keras_microtune.export import _tflite, runtimes
    from keras_microtune.export.evaluate import EVAL_ARENA_BYTES

    info = _tflite.parse(tflite)
    ins, outs = runtimes.io_details(tflite, info=info)
    raw = runtimes.tflm_run(
        tflite, [runtimes.quantize(x, ins[0])], EVAL_ARENA_BYTES, info=info
    )
    return runtimes.dequantize(raw[0], outs[0])


def auc(tflite, xt, yt):
    from sklearn.metrics import roc_auc_score

    error = ((tflm_outputs(tflite, xt) - xt) ** 2).mean(axis=1)
    return 100.0 * roc_auc_score(yt, error)


def run(seed, tiny):
    import keras
    import tf_keras

    import keras_microtune as kmt
    from keras_microtune.optimize import tfmot_bridge

    x, xt, yt = load(tiny)
    rate, epochs, batch = FIT
    qat_epochs = QAT_EPOCHS
    if tiny:
        epochs, qat_epochs = 2, 1
    keras.utils.set_random_seed(seed)
    model = _fit(_model(keras), x, rate, epochs, batch)
    calib = x[::4][:300]
    cells = {}  # row -> (AUC %, flatbuffer bytes) or (None, why)

    def score(row, make):
        try:
            made = make()
            tflite = made.tflite if hasattr(made, "tflite") else made
        except Exception as error:  # the row says why it has no number
            cells[row] = (None, why(error))
            return None
        try:
            cells[row] = (auc(tflite, xt, yt), len(tflite))
        except Exception as error:
            cells[row] = (None, "does not run in TFLite Micro: " + why(error))
        return made

    score("float", lambda: kmt.convert(model, "float32", verbose=0))
    score("Keras LiteRT PTQ", lambda: keras_litert(model, calib))
    score("TFLiteConverter PTQ", lambda: plain_converter(model, calib))
    ptq = score("ours PTQ", lambda: kmt.convert(model, "mcu", calib, verbose=0))

    def ours_qat():
        wrapped = kmt.optimize.quantize_model(model)
        _fit(wrapped, x, rate / 5, qat_epochs, batch)
        return kmt.convert(kmt.optimize.strip(wrapped), "mcu", calib, verbose=0)

    score("ours QAT", ours_qat)
    auto = score(
        'ours precision="auto"',
        lambda: kmt.convert(model, "mcu", calib, precision="auto", verbose=0),
    )

    def tfmot_qat():
        twin = _model(tf_keras)
        twin.set_weights(model.get_weights())
        wrapped = tfmot_bridge.quantize_model(twin)
        _fit(wrapped, x, rate / 5, qat_epochs, batch, lib=tf_keras)
        return plain_converter(wrapped, calib)

    score("tfmot QAT", tfmot_qat)
    raised = {}
    if auto is not None:
        raised = {
            k: v for k, v in (auto.report.get("precision") or {}).items() if v != "int8"
        }
    worst = None
    if ptq is not None and ptq.report.get("layer_errors"):
        first = ptq.report["layer_errors"][0]
        worst = f"{first['layer']} {first['sqnr_db']:.1f} dB"
    return cells, raised, worst, (len(x), len(xt), int(yt.sum()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="fast smoke run")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    seeds = 1 if args.tiny else args.seeds
    runs = [run(seed, args.tiny) for seed in range(seeds)]
    cells = {row: [r[0][row] for r in runs] for row in ROWS}
    train, test, positive = runs[0][3]
    print(
        f"autoencoder (KDD-TSAD 135): {train} train windows / {test} test windows "
        f"({positive} anomalous), {seeds} seed(s), anomaly AUC (%) in TFLite Micro"
    )
    print_rows("autoencoder", cells, "AUC (%)", runs)
    return cells


if __name__ == "__main__":
    main()
