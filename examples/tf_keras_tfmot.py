"""A tf_keras (Keras 2) model quantized with tfmot, converted by kmt.convert.

For teams still on tf_keras + tensorflow-model-optimization: the same
`kmt.optimize.quantize_model` call routes a tf_keras model to tfmot, and
`kmt.convert` turns the QAT model into a verified int8 TFLite Micro model
without representative data:

    python examples/tf_keras_tfmot.py [-o build/tfmot]

Needs the `tfmot` extra (`pip install keras_microtune[tfmot]`).
KMT_EXAMPLE_QUICK=1 runs a few-second smoke version.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_keras  # noqa: E402

import keras_microtune as kmt  # noqa: E402

QUICK = os.environ.get("KMT_EXAMPLE_QUICK") == "1"


def main(output_dir):
    tf_keras.utils.set_random_seed(0)
    digits = kmt.data.load_digits_transfer(shots=None)
    x, y = digits["source"]
    model = tf_keras.Sequential(
        [
            tf_keras.Input((8, 8, 1)),
            tf_keras.layers.Conv2D(16, 3, activation="relu"),
            tf_keras.layers.Conv2D(32, 3, activation="relu"),
            tf_keras.layers.GlobalAveragePooling2D(),
            tf_keras.layers.Dense(5, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=2 if QUICK else 15, verbose=2)
    qat = kmt.optimize.quantize_model(model)  # -> tfmot.quantization.keras
    qat.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    qat.fit(x, y, epochs=1 if QUICK else 3, verbose=2)
    result = kmt.convert(qat, "cortex-m4", output_dir=output_dir, overwrite=True)
    metrics = kmt.evaluate(result, x, y, runtime="tflm")
    print(f"int8 accuracy on TFLite Micro (digits 0-4): {metrics['accuracy']:.4f}")
    print(f"flatbuffer {result.size_bytes:,} B, arena {result.arena_bytes:,} B")
    return result, metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="build/tfmot")
    main(parser.parse_args().output)
