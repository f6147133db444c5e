"""Microtune a digits backbone to new classes and ship it to a Cortex-M4.

The `keras-microtune demo` job as a readable script, on scikit-learn's bundled
8x8 handwritten digits (no download):

    python examples/digits_microtune.py [-o build/digits]

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
    digits = kmt.data.load_digits_transfer(shots=20)

    # 1. A backbone trained on digits 0-4 (stands in for your pretrained model).
    backbone = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            kmt.layers.FeatureStage(
                [32], stem_filters=16, pooling="max", name="block1"
            ),
            kmt.layers.FeatureStage([64, 64], name="block2"),
            kmt.layers.FeatureStage([64], pooling="max", name="block3"),
            kmt.layers.EmbeddingStage("avg", units=64, activation="relu"),
            kmt.layers.OutputStage(5),
        ]
    )
    backbone.compile("adam", "sparse_categorical_crossentropy")
    backbone.fit(*digits["source"], epochs=2 if QUICK else 20, verbose=0)

    # 2. Attach MicroTune adapters and a new head for digits 5-9; make it QAT.
    model = kmt.optimize.quantize_model(kmt.attach(backbone, num_classes=5, groups=2))
    model.compile(
        keras.optimizers.Adam(1e-2),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.summary()

    # 3. Microtune on 20 labelled images per class, with the schedules.
    epochs = 3 if QUICK else 40
    x_train, y_train = digits["train"]
    steps = epochs * -(-len(y_train) // 16)
    history = model.fit(
        x_train,
        y_train,
        epochs=epochs,
        batch_size=16,
        verbose=2,
        callbacks=[
            kmt.callbacks.WarmupCosine(
                1e-2, warmup_steps=steps // 10, decay_steps=steps
            ),
            kmt.callbacks.QuantizationSchedule(start_epoch=epochs // 2),
        ],
    )

    # 4. Convert for the board, verified in TFLite Micro, and measure.
    x_test, y_test = digits["test"]
    result = kmt.convert(
        model,
        "cortex-m4",
        representative_data=x_train,
        validation_data=(x_test, y_test),
    )
    int8 = kmt.evaluate(result, x_test, y_test, runtime="tflm")
    keras_metrics = kmt.evaluate(model, x_test, y_test)
    print(f"Keras accuracy {keras_metrics['accuracy']:.4f}")
    print(f"int8 accuracy on TFLite Micro {int8['accuracy']:.4f}")
    print(f"flatbuffer {result.size_bytes:,} B, arena {result.arena_bytes:,} B")
    print(f"fits cortex-m4: {result.fits}")
    saved = result.save(
        output_dir,
        overwrite=True,
        history=history.history,
        evaluations={"Keras": keras_metrics, "TFLite Micro": int8},
        project=True,
    )
    print(f"wrote {saved}")
    return result, int8


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="build/digits")
    main(parser.parse_args().output)
