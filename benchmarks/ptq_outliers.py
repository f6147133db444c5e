"""Where plain PTQ int8 hurts: an outlier channel, and precision="auto".

A digits MLP (scikit-learn's bundled 8x8 digits) is trained, then one hidden
unit of its first layer is scaled up by `--scale` and the next layer's
matching input row down by the same factor. ReLU commutes with a positive
scale, so the float model computes the same function (same accuracy), but
the first layer's activation range is now set by one unit: per-tensor int8
leaves the other units a few steps of resolution (the outlier channels seen
in real networks, which cross-layer equalization exists to undo). Rows: the
float model, plain post-training int8, QAT fine-tuning (`quantize_model`, 3
epochs), and `precision="auto"`; every converted model scored in TFLite
Micro on the held-out digits.

    python -m benchmarks.ptq_outliers [--scale 100]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=100.0)
    args = parser.parse_args(argv)
    import keras
    import numpy as np
    from sklearn.datasets import load_digits

    import keras_microtune as kmt

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    x_train, y_train, x_test, y_test = x[:1300], y[:1300], x[1300:], y[1300:]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu", name="hidden1"),
            keras.layers.Dense(64, activation="relu", name="hidden2"),
            keras.layers.Dense(10, activation="softmax", name="head"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=30, batch_size=32, verbose=0)
    kernel, bias = model.get_layer("hidden1").get_weights()
    unit = int(np.argmax(np.abs(kernel).sum(0)))
    kernel[:, unit] *= args.scale
    bias[unit] *= args.scale
    model.get_layer("hidden1").set_weights([kernel, bias])
    kernel2, bias2 = model.get_layer("hidden2").get_weights()
    kernel2[unit, :] /= args.scale
    model.get_layer("hidden2").set_weights([kernel2, bias2])

    def tflm(result):
        return kmt.evaluate(result.tflite, x_test, y_test, runtime="tflm")["accuracy"]

    calib = x_train[:300]
    rows = [("float (Keras)", kmt.evaluate(model, x_test, y_test)["accuracy"], None)]
    ptq = kmt.convert(model, "mcu", calib, validation_data=(x_test, y_test), verbose=0)
    rows.append(("PTQ int8", tflm(ptq), ptq))
    qat = kmt.optimize.quantize_model(model)
    qat.compile("adam", "sparse_categorical_crossentropy")
    qat.fit(x_train, y_train, epochs=3, batch_size=32, verbose=0)
    stripped = kmt.optimize.strip(qat)
    qat_result = kmt.convert(stripped, "mcu", calib, verbose=0)
    rows.append(("QAT int8 (3 epochs)", tflm(qat_result), qat_result))
    auto = kmt.convert(
        model,
        "mcu",
        calib,
        validation_data=(x_test, y_test),
        precision="auto",
        verbose=0,
    )
    rows.append(('precision="auto"', tflm(auto), auto))
    print(f"outlier scale {args.scale:g} on hidden1 unit {unit}")
    print(
        "| model | accuracy (TFLite Micro) | size B | arena B "
        "| worst layer SQNR dB | precision |"
    )
    print("|---|---|---|---|---|---|")
    for name, acc, result in rows:
        if result is None:
            print(f"| {name} | {acc:.4f} | - | - | - | float32 |")
            continue
        worst = result.report["layer_errors"][0]
        raised = {
            k: v
            for k, v in (result.report.get("precision") or {}).items()
            if v != "int8"
        }
        print(
            f"| {name} | {acc:.4f} | {result.size_bytes:,} | {result.arena_bytes:,} | "
            f"{worst['sqnr_db']:.1f} ({worst['layer']}) | {raised or 'int8'} |"
        )


if __name__ == "__main__":
    main()
