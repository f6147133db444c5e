"""Sequence models on BasicMotions: float vs int8 in TFLite Micro.

A Keras 3 LSTM (lowered to the fused int8 UNIDIRECTIONAL_SEQUENCE_LSTM), a
GRU (unrolled: TFLite Micro has no GRU kernel), the same two converted with
`streaming=True` (one frame per invoke: the LSTM's state inside the fused
op, the GRU's in resource variables) and a Conv1D model of similar size,
trained on aeon's bundled BasicMotions (6-axis
accelerometer + gyroscope, 100 steps, 4 activities; 40 train / 40 test).
Accuracy is measured in the TFLite Micro interpreter on the test set; the
streaming models are fed each test sequence frame by frame from a zero state
and classified by their output after the last frame (`kmt.evaluate` does so
for a streaming model). Invoke time is the median
of TFLite Micro invokes in this process (Python interpreter, x86 reference
kernels): a ratio between rows, not a device figure; the streaming row gives
one frame and, in brackets, one frame times the 100 frames of a sequence.

    python -m benchmarks.sequence [--tiny]
"""

import argparse
import time

import keras
import numpy as np

import keras_microtune as kmt
from keras_microtune.export import runtimes

UNITS = 16


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
        "conv1d": conv,
    }


def _fit(model, x, y, epochs):
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
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
    epochs = 3 if tiny else 120
    repeats = 3 if tiny else 50
    rows = []
    models = _models(x.shape[1], x.shape[2], len(data["classes"]))
    variants = [(n, m, False) for n, m in models.items()]
    variants.insert(1, ("lstm streaming", models["lstm"], True))
    variants.insert(3, ("gru streaming", models["gru"], True))
    for name, model, streaming in variants:
        if not streaming:
            _fit(model, x, y, epochs)
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
            )
        )
    print(
        "| model | lowering | parameters | float accuracy (%) | int8 TFLM accuracy "
        "(%) | flatbuffer (B) | arena (B) | TFLM invoke (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, lowering, params, fa, qa, size, arena, ms in rows:
        print(
            f"| {name} | {lowering} | {params:,} | {fa:.1f} | {qa:.1f} | "
            f"{size:,} | {arena:,} | {ms} |"
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="fast smoke run")
    main(parser.parse_args().tiny)
