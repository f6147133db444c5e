"""Human activity recognition from a 6-axis IMU, int8 for a Cortex-M4.

aeon's bundled BasicMotions set (accelerometer + gyroscope, 100 steps at 10 Hz,
4 activities: standing, walking, running, badminton) trains a 1-D FeatureStage
model, which is converted for `cortex-m4` and checked in TFLite Micro:

    python examples/activity_recognition.py [-o build/activity]

KMT_EXAMPLE_QUICK=1 runs a few-second smoke version.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import keras_microtune as kmt  # noqa: E402

QUICK = os.environ.get("KMT_EXAMPLE_QUICK") == "1"


def main(output_dir):
    keras.utils.set_random_seed(0)
    motions = kmt.data.load_basic_motions()
    (x_train, y_train), (x_test, y_test) = motions["train"], motions["test"]
    model = keras.Sequential(
        [
            keras.Input(x_train.shape[1:]),  # (100 steps, 6 channels)
            kmt.layers.FeatureStage(
                [16, 32], kernel_size=5, strides=2, stem_filters=16
            ),
            kmt.layers.MicroTune(groups=4),
            kmt.layers.EmbeddingStage("avg"),
            kmt.layers.OutputStage(len(motions["classes"]), dropout=0.2),
        ]
    )
    model.compile(
        keras.optimizers.Adam(3e-3),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=3 if QUICK else 60, batch_size=8, verbose=2)
    result = kmt.convert(
        model,
        "cortex-m4",
        representative_data=x_train,
        validation_data=(x_test, y_test),
    )
    float_metrics = kmt.evaluate(model, x_test, y_test)
    int8 = kmt.evaluate(result, x_test, y_test, runtime="tflm")
    print(f"classes: {motions['classes']}")
    print(f"float accuracy {float_metrics['accuracy']:.4f}")
    print(f"int8 accuracy on TFLite Micro {int8['accuracy']:.4f}")
    print(f"flatbuffer {result.size_bytes:,} B, arena {result.arena_bytes:,} B")
    result.save(
        output_dir,
        overwrite=True,
        evaluations={"float": float_metrics, "int8 (TFLite Micro)": int8},
        project=True,
    )
    return result, int8


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="build/activity")
    main(parser.parse_args().output)
