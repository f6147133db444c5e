"""A tiny transformer on a 6-axis IMU, full int8 in TFLite Micro.

aeon's bundled BasicMotions set (100 steps, 6 channels, 4 activities) trains a
one-block transformer: a Dense embedding, `MultiHeadAttention`,
`LayerNormalization` and a `Dense(activation="gelu")` feed-forward block.
TFLite Micro has no GELU kernel and TFLite keeps a float NEG in Keras'
LayerNormalization; `kmt.convert` lowers both before tracing (see
`report["lowering"]`), so the model runs in int8 with no DEQUANTIZE:

    python examples/tiny_transformer.py [-o build/transformer]

KMT_EXAMPLE_QUICK=1 runs a few-second smoke version.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import keras_microtune as kmt  # noqa: E402

QUICK = os.environ.get("KMT_EXAMPLE_QUICK") == "1"


def tiny_transformer(shape, classes, width=16, heads=2):
    inputs = keras.Input(shape)
    x = keras.layers.Dense(width, name="embed")(inputs)
    a = keras.layers.MultiHeadAttention(heads, width // heads, name="attention")(x, x)
    x = keras.layers.LayerNormalization(name="norm1")(keras.layers.Add()([x, a]))
    f = keras.layers.Dense(2 * width, activation="gelu", name="ffn_in")(x)
    f = keras.layers.Dense(width, name="ffn_out")(f)
    x = keras.layers.LayerNormalization(name="norm2")(keras.layers.Add()([x, f]))
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="tiny_transformer")


def main(output_dir):
    keras.utils.set_random_seed(0)
    motions = kmt.data.load_basic_motions()
    (x_train, y_train), (x_test, y_test) = motions["train"], motions["test"]
    model = tiny_transformer(x_train.shape[1:], len(motions["classes"]))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=3 if QUICK else 30, batch_size=8, verbose=2)
    result = kmt.convert(
        model,
        "cortex-m4",
        representative_data=x_train,
        validation_data=(x_test, y_test),
    )
    float_metrics = kmt.evaluate(model, x_test, y_test)
    int8 = kmt.evaluate(result, x_test, y_test, runtime="tflm")
    for row in result.report["lowering"]["layers"]:
        print(f"lowered {row['layer']} ({row['op']}): {row['as']}")
    print(f"ops: {', '.join(result.ops)}")
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
    parser.add_argument("-o", "--output", default="build/transformer")
    main(parser.parse_args().output)
