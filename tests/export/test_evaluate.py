"""evaluate() on Keras, LiteRT and TFLite Micro against hand-computed metrics."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt


@pytest.fixture(scope="module")
def classifier():
    keras.utils.set_random_seed(0)
    digits = kmt.data.load_digits_transfer(shots=None)
    x, y = digits["train"]
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            kmt.layers.FeatureStage([8], pooling="max"),
            kmt.layers.EmbeddingStage("avg"),
            kmt.layers.OutputStage(5),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    x_test, y_test = digits["test"]
    result = kmt.convert(model, "mcu", representative_data=x[:64], verbose=0)
    return model, result, x_test[:120], y_test[:120]


def _reference(probabilities, y):
    predicted = probabilities.argmax(axis=1)
    cm = np.zeros((5, 5), int)
    for t, p in zip(y, predicted):
        cm[t, p] += 1
    return (predicted == y).mean(), cm


def test_keras_metrics_match_hand_computed(classifier):
    model, _, x, y = classifier
    accuracy, cm = _reference(model.predict(x, verbose=0), y)
    metrics = kmt.evaluate(model, x, y)
    assert metrics["runtime"] == "keras" and metrics["samples"] == len(y)
    assert metrics["accuracy"] == pytest.approx(accuracy)
    assert metrics["confusion_matrix"] == cm.tolist()
    recall = np.diag(cm) / cm.sum(axis=1)
    np.testing.assert_allclose(metrics["recall"], recall)


def test_tflm_and_litert_agree_with_hand_computed_int8(classifier):
    model, result, x, y = classifier
    from keras_microtune.export import runtimes

    ins, outs = runtimes.io_details(result.tflite)
    raw = runtimes.litert_run(result.tflite, [runtimes.quantize(x, ins[0])])[0]
    accuracy, cm = _reference(runtimes.dequantize(raw, outs[0]), y)
    litert = kmt.evaluate(result.tflite, x, y, runtime="litert")
    tflm = kmt.evaluate(result, (x, y), verbose=1)
    assert tflm["runtime"] == "tflm"
    assert litert["accuracy"] == pytest.approx(accuracy)
    assert litert["confusion_matrix"] == cm.tolist()
    # int8 stays close to the float model on this task
    float_accuracy = kmt.evaluate(model, x, y)["accuracy"]
    assert abs(tflm["accuracy"] - float_accuracy) <= 0.05
    assert abs(tflm["accuracy"] - litert["accuracy"]) <= 0.02


def test_regression_metrics(rng):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    x = rng.normal(size=(20, 3)).astype("float32")
    y = rng.normal(size=(20, 1)).astype("float32")
    error = model.predict(x, verbose=0) - y
    metrics = kmt.evaluate(model, x, y, metrics=["mean_abs_error"])
    assert set(metrics) == {"mean_abs_error", "runtime", "samples"}
    assert metrics["mean_abs_error"] == pytest.approx(np.abs(error).mean(), rel=1e-5)


def test_bad_arguments(classifier):
    model, result, x, y = classifier
    with pytest.raises(ValueError, match=r"`runtime`.*Received: runtime='gpu'"):
        kmt.evaluate(model, x, y, runtime="gpu")
    with pytest.raises(ValueError, match=r"convert the Keras model first"):
        kmt.evaluate(model, x, y, runtime="tflm")
    with pytest.raises(ValueError, match=r"needs labels"):
        kmt.evaluate(model, x)
    with pytest.raises(ValueError, match=r"120 samples but `y` has 3"):
        kmt.evaluate(model, x, y[:3])
    with pytest.raises(ValueError, match=r"unknown metrics \['auc'\]"):
        kmt.evaluate(result.tflite, x, y, metrics=["auc"])


def test_cli_evaluate(classifier, tmp_path, capsys):
    from keras_microtune import cli

    _, result, x, y = classifier
    model_path = tmp_path / "m.tflite"
    model_path.write_bytes(result.tflite)
    data = tmp_path / "test.npz"
    np.savez(data, x=x, y=y)
    assert cli.main(["evaluate", str(model_path), "--data", str(data), "--json"]) == 0
    import json

    printed = json.loads(capsys.readouterr().out)
    expected = kmt.evaluate(result.tflite, x, y, runtime="tflm")
    assert printed == expected
    assert (
        cli.main(["evaluate", str(model_path), "--data", str(tmp_path / "no.npz")]) == 2
    )
    assert "No such data file" in capsys.readouterr().err
