"""Sequence models on BasicMotions: float vs int8 in TFLite Micro.

A Keras 3 LSTM (lowered to the fused int8 UNIDIRECTIONAL_SEQUENCE_LSTM), a
GRU (unrolled: TFLite Micro has no GRU kernel), the same two converted with
`streaming=True` (one frame per invoke: the LSTM's state inside the fused
op, the GRU's in resource variables), the one-block tiny transformer of
`examples/tiny_transformer.py` (MultiHeadAttention, LayerNormalization, a
GELU feed-forward block; width 12 for a similar parameter count) and a
Conv1D model of similar size, trained on aeon's bundled BasicMotions (6-axis
accelerometer + gyroscope, 100 steps, 4 activities; 40 train / 40 test).
Accuracy is measured in the TFLite Micro interpreter on the test set; the
streaming models are fed each test sequence frame by frame from a zero state
and classified by their output after the last frame (`kmt.evaluate` does so
for a streaming model). Invoke time is the median
of TFLite Micro invokes in this process (Python interpreter, x86 reference
kernels): a ratio between rows, not a device figure; the streaming row gives
one frame and, in brackets, one frame times the 100 frames of a sequence.
"verified" is the conversion's `report["verified"]`: TFLite Micro's outputs
agree with LiteRT's reference kernels within the parity tolerance.

    python -m benchmarks.sequence [--tiny]
"""

import argparse
import time

import keras
import numpy as np

import keras_microtune as kmt
from examples.tiny_transformer import tiny_transformer
from keras_microtune.export import runtimes

UNITS = 16
WIDTH = 12  # Transformer width: about the parameters of the other rows.
# Adam learning rate and epochs per model; the transformer trains as
# `examples/tiny_transformer.py` does (1e-2 for 120 epochs is too hot for it).
FIT = {"transformer": (3e-3, 30)}
DEFAULT_FIT = (1e-2, 120)


def _models(steps, channels, classes):
    def rnn(layer, name):
        inp = keras.Input((steps, channels))
        out = keras.layers.Dense(classes, activation="softmax")(layer(inp))
        return keras.Model(inp, out, name=name)

    conv = keras.Sequential(
        [
            keras.Input((steps, channels)),
            keras.layers.Conv1D(UNITS, 5, activation="relu"),
            keras.layers.MaxPooling1D(2),
            keras.layers.Conv1D(UNITS, 3, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(classes, activation="softmax"),
        ],
        name="conv1d",
    )
    return {
        "lstm": rnn(keras.layers.LSTM(UNITS), "lstm"),
        "gru": rnn(keras.layers.GRU(UNITS), "gru"),
        "transformer": tiny_transformer((steps, channels), classes, width=WIDTH),
        "conv1d": conv,
    }


def _fit(model, x, y, rate, epochs):
    model.compile(keras.optimizers.Adam(rate), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=8, verbose=0)
    return model


def _invoke_seconds(result, frame, repeats):
    from tflite_micro.python.tflite_micro import runtime

    interp = runtime.Interpreter.from_bytes(
        result.tflite, arena_size=result.arena_bytes + 1024
    )
    ins, _ = runtimes.io_details(result.tflite)
    interp.set_input(runtimes.quantize(frame, ins[0]), 0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        interp.invoke()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(tiny=False):
    keras.utils.set_random_seed(0)
    data = kmt.data.load_basic_motions()
    (x, y), (xt, yt) = data["train"], data["test"]
    if tiny:
        x, xt, yt = x[:, :20], xt[:8, :20], yt[:8]
    repeats = 3 if tiny else 50
    rows = []
    models = _models(x.shape[1], x.shape[2], len(data["classes"]))
    variants = [(n, m, False) for n, m in models.items()]
    variants.insert(1, ("lstm streaming", models["lstm"], True))
    variants.insert(3, ("gru streaming", models["gru"], True))
    for name, model, streaming in variants:
        if not streaming:
            rate, epochs = FIT.get(name, DEFAULT_FIT)
            _fit(model, x, y, rate, 3 if tiny else epochs)
        float_acc = float(np.mean(model.predict(xt, verbose=0).argmax(-1) == yt))
        result = kmt.convert(
            model, "mcu", representative_data=x, streaming=streaming, verbose=0
        )
        acc = kmt.evaluate(result, xt, yt, runtime="tflm")["accuracy"]
        frame = xt[:1, 0] if streaming else xt[:1]
        seconds = _invoke_seconds(result, frame, repeats)
        passes = {p["name"]: p for p in result.report["passes"]}
        lowering = "-"
        if result.report.get("recurrent"):
            lowering = result.report["recurrent"]["layers"][0]["lowering"]
        elif (result.report.get("lowering") or {}).get("layers"):
            lowered = {row["op"] for row in result.report["lowering"]["layers"]}
            lowering = "lowered " + ", ".join(sorted(lowered))
        if streaming:
            described = passes["lower_recurrent"]["streaming"]
            if described["form"] == "fused":
                lowering = "streaming, state in the fused op (h int8, c int16)"
            else:
                n_vars = described["state_variables"]
                lowering = f"streaming, state in {n_vars} resource variables"
            ms = f"{1e3 * seconds:.3f} ({1e3 * seconds * x.shape[1]:.2f})"
        else:
            ms = f"{1e3 * seconds:.3f}"
        rows.append(
            (
                name,
                lowering,
                model.count_params(),
                100 * float_acc,
                100 * acc,
                result.size_bytes,
                result.arena_bytes,
                ms,
                "yes" if result.report["verified"] else "NO",
            )
        )
    print(
        "| model | lowering | parameters | float accuracy (%) | int8 TFLM accuracy "
        "(%) | flatbuffer (B) | arena (B) | TFLM invoke (ms) | verified |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, lowering, params, fa, qa, size, arena, ms, verified in rows:
        print(
            f"| {name} | {lowering} | {params:,} | {fa:.1f} | {qa:.1f} | "
            f"{size:,} | {arena:,} | {ms} | {verified} |"
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="fast smoke run")
    main(parser.parse_args().tiny)
