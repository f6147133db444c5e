"""Issue 4 benchmark: QAT on scikit-learn digits, every accuracy on TFLite Micro.

A small CNN (Conv-BN-ReLU x2, global average pooling, dense) is trained in
float, then compared on the same test split, each model run in the TFLite
Micro interpreter:

- float: the float32 .tflite;
- PTQ int8: post-training full-int8 conversion, calibrated on training data;
- ours QAT int8: `kmt.optimize.quantize_model`, fine-tuned, converted without
  representative data;
- tfmot QAT int8: the same architecture in tf_keras with the same float
  weights, `tfmot.quantization.keras.quantize_model`, same fine-tuning.

Also the train step time of our QAT model as a ratio to the float model.

    python -m benchmarks.quantization [--tiny]

The int8 conversion helper here stands in for `kmt.convert(model,
target="mcu")` until that lands.
"""

import argparse
import time

import numpy as np


def _data(tiny):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    if tiny:
        return x_train[:256], y_train[:256], x_test[:64], y_test[:64]
    return x_train, y_train, x_test, y_test


def _layers(lib):
    L = lib.layers
    return [
        L.Conv2D(16, 3, padding="same", use_bias=False),
        L.BatchNormalization(),
        L.ReLU(),
        L.Conv2D(32, 3, strides=2, padding="same", use_bias=False),
        L.BatchNormalization(),
        L.ReLU(),
        L.GlobalAveragePooling2D(),
        L.Dense(10),
    ]


def _model(lib):
    return lib.Sequential([lib.Input((8, 8, 1)), *_layers(lib)])


def _convert(model, int8, representative=None):
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec((1, 8, 8, 1), tf.float32))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    converter.experimental_lower_to_saved_model = False
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    if representative is not None:
        converter.representative_dataset = lambda: ([x[None]] for x in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def _tflm_accuracy(tflite, x, y):
    from ai_edge_litert.interpreter import Interpreter
    from tflite_micro.python.tflite_micro import runtime

    details = Interpreter(model_content=tflite).get_input_details()[0]
    scale, zero = details["quantization"]
    micro = runtime.Interpreter.from_bytes(tflite, arena_size=128 * 1024)
    correct = 0
    for sample, label in zip(x, y):
        if details["dtype"] == np.int8:
            sample = np.clip(np.round(sample / scale + zero), -128, 127).astype(np.int8)
        micro.set_input(sample[None], 0)
        micro.invoke()
        correct += int(np.argmax(micro.get_output(0)) == label)
    return 100.0 * correct / len(y)


def _fit(model, x, y, epochs, lr, loss):
    model.compile(optimizer=_adam(model, lr), loss=loss)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        times.append(time.perf_counter() - start)
    return times


def _adam(model, lr):
    module = type(model).__module__
    if module.startswith("tf_keras"):
        import tf_keras

        return tf_keras.optimizers.Adam(lr)
    import keras

    return keras.optimizers.Adam(lr)


def main(tiny=False):
    import keras

    import keras_microtune as kmt

    keras.utils.set_random_seed(0)
    x_train, y_train, x_test, y_test = _data(tiny)
    epochs, qat_epochs = (2, 1) if tiny else (40, 5)
    logits = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    float_model = _model(keras)
    float_times = _fit(float_model, x_train, y_train, epochs, 3e-3, logits)
    rows = {"float": _tflm_accuracy(_convert(float_model, False), x_test, y_test)}
    ptq = _convert(float_model, True, representative=x_train[:200])
    rows["PTQ int8"] = _tflm_accuracy(ptq, x_test, y_test)

    qat = kmt.optimize.quantize_model(float_model)
    qat_times = _fit(qat, x_train, y_train, qat_epochs + 1, 5e-4, logits)
    rows["ours QAT int8"] = _tflm_accuracy(_convert(qat, True), x_test, y_test)

    import tf_keras

    from keras_microtune.optimize import tfmot_bridge

    legacy = _model(tf_keras)
    legacy.set_weights(float_model.get_weights())
    legacy_qat = tfmot_bridge.quantize_model(legacy)
    legacy_loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    _fit(legacy_qat, x_train, y_train, qat_epochs + 1, 5e-4, legacy_loss)
    rows["tfmot QAT int8"] = _tflm_accuracy(_convert(legacy_qat, True), x_test, y_test)

    # Per-epoch time after the first (tracing) epoch, same batch count.
    ratio = np.median(qat_times[1:] or qat_times) / np.median(float_times[1:])
    print(f"digits: {len(x_train)} train / {len(x_test)} test, TFLite Micro")
    print("| model | accuracy (%) |")
    print("|---|---|")
    for name, accuracy in rows.items():
        print(f"| {name} | {accuracy:.2f} |")
    print(f"\nQAT / float train step time: {ratio:.2f}x")
    return rows, ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="fast smoke run")
    main(parser.parse_args().tiny)
