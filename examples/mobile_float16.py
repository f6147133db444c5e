"""MobileNetV2 for a phone: float16 and int8 LiteRT models, and their speed.

MobileNetV2(alpha=0.35, weights=None) is trained briefly on scikit-learn's
digits upsampled to 96x96x3, exported as `mobile-float16` and `mobile-int8`,
and timed in the LiteRT interpreter (median of repeated invokes):

    python examples/mobile_float16.py [-o build/mobile]

KMT_EXAMPLE_QUICK=1 runs a short smoke version.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_microtune as kmt  # noqa: E402

QUICK = os.environ.get("KMT_EXAMPLE_QUICK") == "1"


def upsample(x):
    """(n, 8, 8, 1) digits -> (n, 96, 96, 3) images."""
    return np.repeat(np.repeat(np.repeat(x, 12, axis=1), 12, axis=2), 3, axis=3)


def latency_ms(tflite, x, repeats):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite, num_threads=1)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], x[:1].astype(detail["dtype"]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main(output_dir):
    keras.utils.set_random_seed(0)
    digits = kmt.data.load_digits_transfer(shots=None)
    n = 64 if QUICK else 600
    x, y = upsample(digits["source"][0][:n]), digits["source"][1][:n]
    x_test, y_test = upsample(digits["source"][0][-200:]), digits["source"][1][-200:]
    model = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=5
    )
    model.compile(
        keras.optimizers.Adam(1e-3),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=1 if QUICK else 5, batch_size=32, verbose=2)
    repeats = 5 if QUICK else 50
    rows = []
    for target in ("float32", "mobile-float16", "mobile-int8"):
        result = kmt.convert(
            model,
            target,
            representative_data=x[:64],
            validation_data=(x_test, y_test),
            output_dir=os.path.join(output_dir, target),
            overwrite=True,
        )
        metrics = kmt.evaluate(result, x_test, y_test, runtime="litert")
        rows.append(
            (
                target,
                result.size_bytes,
                metrics["accuracy"],
                latency_ms(result.tflite, x_test, repeats),
            )
        )
    base = rows[0][3]
    print("| target | bytes | accuracy (LiteRT) | latency ms | vs float32 |")
    print("|---|---|---|---|---|")
    for target, size, accuracy, ms in rows:
        print(f"| {target} | {size:,} | {accuracy:.4f} | {ms:.2f} | {ms / base:.2f}x |")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="build/mobile")
    main(parser.parse_args().output)
