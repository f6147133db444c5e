"""Flash and int8 accuracy with clustering + TFLite Micro LUT weight compression.

For the digits transfer task (a small CNN trained on digits 0-4, fine-tuned
on 5-9) and zoo models: plain int8, post-training clustering + LUT, and
clustering-aware fine-tuning + LUT, at 16 and 8 clusters per output channel
(`lut4` / `lut3`). Flash is the .tflite size; accuracy is measured in TFLite
Micro (`kmt.evaluate(..., runtime="tflm")`); zoo models have random weights,
so their accuracy column is agreement with the plain int8 model.

    python -m benchmarks.compression [--tiny]
"""

import argparse

import keras

import keras_microtune as kmt


def _digits_model():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(64, 3, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x), name="digits_cnn")


def _fit(model, x, y, epochs, lr=1e-3):
    model.compile(
        keras.optimizers.Adam(lr),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def _int8(model, x_cal, compression=None):
    return kmt.convert(
        model, "mcu", representative_data=x_cal, compression=compression, verbose=0
    )


def _accuracy(result, x, y):
    return 100 * kmt.evaluate(result.tflite, x, y, runtime="tflm")["accuracy"]


def _rows(name, model, x_cal, x, y, fine_tune, epochs):
    """(row label, flash bytes, accuracy %) for each variant of `model`."""
    plain = _int8(model, x_cal)
    rows = [(f"{name} int8", plain.size_bytes, _accuracy(plain, x, y), 1.0, None)]
    for clusters, lut in ((16, "lut4"), (8, "lut3")):
        clustered = kmt.optimize.cluster_weights(model, number_of_clusters=clusters)
        variants = [("PTQ-clustered", clustered)]
        if fine_tune is not None:
            tuned = kmt.optimize.cluster_weights(model, number_of_clusters=clusters)
            fine_tune(tuned, epochs)
            variants.append(("clustering-aware fine-tuned", tuned))
        for label, variant in variants:
            result = _int8(kmt.optimize.strip_clustering(variant), x_cal, lut)
            c = result.report["compression"]
            rows.append(
                (
                    f"{name} {label} + {lut} ({clusters})",
                    result.size_bytes,
                    _accuracy(result, x, y),
                    result.size_bytes / plain.size_bytes,
                    c.get("invoke_time_ratio"),
                )
            )
    return rows


def main(tiny=False):
    keras.utils.set_random_seed(0)
    task = kmt.data.load_digits_transfer()
    (xs, ys), (xt, yt), (xv, yv) = task["source"], task["train"], task["test"]
    epochs = 2 if tiny else 20
    model = _digits_model()
    _fit(model, xs, ys % 5, epochs)
    _fit(model, xt, yt, epochs)

    def fine_tune(clustered, n):
        _fit(clustered, xt, yt, n, lr=3e-4)

    rows = _rows("digits", model, xt[:200], xv, yv, fine_tune, 1 if tiny else 5)
    for name in ["ds_cnn"] if tiny else ["ds_cnn", "resnet8"]:
        from benchmarks import zoo

        zmodel, x = zoo.build(name, samples=16 if tiny else 64)
        labels = zmodel.predict(x, verbose=0).argmax(-1)
        rows += _rows(name, zmodel, x, x, labels, None, 0)
    print("| model | flash (B) | x int8 | TFLM accuracy (%) | invoke time x |")
    print("|---|---|---|---|---|")
    for label, flash, acc, ratio, speed in rows:
        speed = "-" if speed is None else f"{speed:.2f}"
        print(f"| {label} | {flash:,} | {ratio:.2f} | {acc:.2f} | {speed} |")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="fast smoke run")
    main(parser.parse_args().tiny)
