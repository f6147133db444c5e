"""Target mobile-trainable: the exported train step runs in LiteRT's signature
runners, builtin ops only, and trains exactly as Keras does."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

import keras_microtune as kmt
from keras_microtune import layers as kl
from keras_microtune.export import int8_weights, train_graph, trainable_check

BATCH = 8
SIGNATURES = {"infer", "train", "get_weights", "set_weights"}


def _backbone():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            kl.FeatureStage([8], stem_filters=4, pooling="max", name="block1"),
            kl.EmbeddingStage("avg", units=8, activation="relu"),
            kl.OutputStage(4),
        ],
        name="tiny_backbone",
    )


def _attached(optimizer):
    """LoRA on block1's 3x3 stem and 1x1 kernels, MicroTune (2 groups) after
    it and every BatchNorm's scale and offset: the gradient crosses ReLU, max
    pooling, depthwise and 1x1 convolutions and MicroTune's kernel slices."""
    keras.utils.set_random_seed(0)
    model = kmt.attach(
        _backbone(),
        num_classes=3,
        adapters=["block1"],
        groups=2,
        lora="block1",
        lora_rank=2,
        train_norm=True,
    )
    model.compile(optimizer, "sparse_categorical_crossentropy")
    return model


def _batches(n, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, BATCH, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, (n, BATCH)).astype("int32")
    return x, y


@pytest.fixture(scope="module")
def exported():
    model = _attached(keras.optimizers.Adam(1e-2))
    result = kmt.convert(model, "mobile-trainable", train_batch_size=BATCH, verbose=0)
    return model, result


def _runners(tflite):
    interp = Interpreter(model_content=bytes(tflite))
    return {name: interp.get_signature_runner(name) for name in SIGNATURES}


def test_four_signatures_in_builtin_ops(exported):
    model, result = exported
    interp = Interpreter(model_content=bytes(result.tflite))
    signatures = interp.get_signature_list()
    assert set(signatures) == SIGNATURES
    assert signatures["train"] == {"inputs": ["x", "y"], "outputs": ["loss"]}
    assert signatures["infer"] == {"inputs": ["x"], "outputs": ["output"]}
    names = [v["name"] for v in result.report["training"]["variables"]]
    assert sorted(signatures["get_weights"]["outputs"]) == sorted(names)
    assert sorted(signatures["set_weights"]["inputs"]) == sorted(names)
    # Exactly what attach made trainable, nothing else.
    paths = [v["path"] for v in result.report["training"]["variables"]]
    assert paths == [v.path for v in model.trainable_variables]
    assert any("lora_kernel_b" in p for p in paths)
    assert any("microtune/kernel" in p for p in paths)
    ops = result.report["training"]["ops_by_signature"]["train"]
    # A LiteRT build without Flex runs every op: none is custom.
    assert "CUSTOM" not in result.ops and "TRANSPOSE_CONV" in ops
    assert (
        result.report["verified"]
        and result.report["training"]["check"]["within_tolerance"]
    )
    assert [p["name"] for p in result.report["passes"]][:4] == [
        "load",
        "plan_training",
        "data_to_arrays",
        "convert_trainable",
    ]


def test_train_steps_match_keras_and_weights_round_trip(exported):
    model, result = exported
    run = _runners(result.tflite)
    x, y = _batches(4)
    start = run["get_weights"]()
    lite = [float(run["train"](x=xb, y=yb)["loss"]) for xb, yb in zip(x, y)]
    trained = run["get_weights"]()
    assert max(np.max(np.abs(trained[n] - start[n])) for n in start) > 1e-3

    # A new interpreter restored from the saved weights infers the same.
    fresh = _runners(result.tflite)
    fresh["set_weights"](**trained)
    restored = fresh["get_weights"]()
    assert all(np.array_equal(restored[n], trained[n]) for n in trained)
    np.testing.assert_array_equal(
        fresh["infer"](x=x[0])["output"], run["infer"](x=x[0])["output"]
    )

    names = [v["name"] for v in result.report["training"]["variables"]]
    for v, name in zip(model.trainable_variables, names):  # Before Keras trains.
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), start[name])
    ref = [float(model.train_on_batch(xb, yb)) for xb, yb in zip(x, y)]
    np.testing.assert_allclose(lite, ref, rtol=1e-5, atol=1e-6)
    for v, name in zip(model.trainable_variables, names):
        np.testing.assert_allclose(
            trained[name], keras.ops.convert_to_numpy(v), rtol=1e-4, atol=1e-5
        )
    np.testing.assert_allclose(
        run["infer"](x=x[0])["output"],
        keras.ops.convert_to_numpy(model(x[0])),
        atol=1e-5,
    )


@pytest.mark.slow
def test_sgd_momentum_steps_match_keras():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", trainable=False),
            kl.MicroTune(groups=2, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy"
    )
    result = kmt.convert(model, "mobile-trainable", train_batch_size=4, verbose=0)
    run = _runners(result.tflite)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4, 6)).astype("float32")
    y = rng.integers(0, 3, (5, 4)).astype("int32")
    lite = [float(run["train"](x=xb, y=yb)["loss"]) for xb, yb in zip(x, y)]
    ref = [float(model.train_on_batch(xb, yb)) for xb, yb in zip(x, y)]
    np.testing.assert_allclose(lite, ref, rtol=1e-5)
    weights = run["get_weights"]()
    names = [v["name"] for v in result.report["training"]["variables"]]
    for v, name in zip(model.trainable_variables, names):
        np.testing.assert_allclose(
            weights[name], keras.ops.convert_to_numpy(v), rtol=1e-5, atol=1e-6
        )


def test_int8_frozen_weights_train_like_the_float_file(exported):
    _, result = exported
    int8, summary = int8_weights.apply(result.tflite, min_elements=16)
    assert summary["tensors"] > 0  # (too few bytes here to shrink the file)
    assert summary["int8_bytes"] * 4 == summary["float_bytes"]
    ops = trainable_check.signature_ops(int8)
    assert "DEQUANTIZE" in ops["train"] and "DEQUANTIZE" in ops["infer"]
    f, q = _runners(result.tflite), _runners(int8)
    start = f["get_weights"]()
    # What trains is untouched: the same float32 initial values.
    assert all(np.array_equal(v, start[n]) for n, v in q["get_weights"]().items())
    x, y = _batches(3)
    lf = [float(f["train"](x=xb, y=yb)["loss"]) for xb, yb in zip(x, y)]
    lq = [float(q["train"](x=xb, y=yb)["loss"]) for xb, yb in zip(x, y)]
    np.testing.assert_allclose(lq, lf, rtol=2e-2)
    q["set_weights"](**start)
    assert all(np.array_equal(v, start[n]) for n, v in q["get_weights"]().items())


def test_save_writes_mobile_notes_with_the_real_names(exported, tmp_path):
    _, result = exported
    out = result.save(tmp_path / "out")
    notes = (tmp_path / "out" / "mobile.md").read_text()
    first = result.report["training"]["variables"][0]["name"]
    assert f"`{first}`" in notes
    assert '"train")' in notes and 'signatureRunner(with: "train")' in notes
    assert f"[{BATCH}, 8, 8, 1]" in notes and "int32" in notes
    with open(f"{out}/model.tflite", "rb") as f:
        assert f.read() == result.tflite


def _dense(**compile_args):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    if compile_args:
        model.compile(**compile_args)
    return model


def _with_dropout():
    model = keras.Sequential([keras.Input((4,)), kl.OutputStage(2, dropout=0.5)])
    model.compile("adam", "mse")
    return model


def _elu_below_the_loss():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, activation="elu"),
            keras.layers.Dense(2, trainable=False),
        ]
    )
    model.compile("sgd", "mse")
    return model


@pytest.mark.parametrize(
    "model, match",
    [
        (lambda: _dense(), "not compiled with a loss"),
        (
            lambda: _dense(optimizer="rmsprop", loss="mse"),
            r"implements the optimizers \['SGD', 'Adam'\].*RMSprop",
        ),
        (
            lambda: _dense(optimizer=keras.optimizers.Adam(clipnorm=1.0), loss="mse"),
            "clipnorm",
        ),
        (lambda: _with_dropout(), "random in training"),
        (lambda: _elu_below_the_loss(), r"no builtin TFLite kernel: \['EluGrad'\]"),
    ],
)
def test_refuses_what_it_cannot_train_before_writing(model, match, tmp_path):
    built = model()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        kmt.convert(built, "mobile-trainable", output_dir=out, verbose=0)
    assert not out.exists()


def test_train_batch_size_only_for_the_trainable_target():
    with pytest.raises(ValueError, match="train_batch_size"):
        kmt.convert(_dense(), "float32", train_batch_size=8)
    with pytest.raises(ValueError, match="positive integer"):
        kmt.convert(_dense(), "mobile-trainable", train_batch_size=0)


_RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    "name, forward, shapes",
    [
        ("relu", tf.nn.relu, [(4, 5)]),
        ("relu6", lambda x: tf.nn.relu6(4 * x), [(4, 5)]),
        ("sigmoid", tf.sigmoid, [(4, 5)]),
        ("rsqrt", lambda x: tf.math.rsqrt(x * x + 1), [(4, 5)]),
        ("maxpool same", lambda x: tf.nn.max_pool2d(x, 2, 2, "SAME"), [(2, 5, 7, 3)]),
        ("maxpool valid", lambda x: tf.nn.max_pool2d(x, 3, 3, "VALID"), [(2, 7, 8, 3)]),
        (
            "conv s2",
            lambda x, k: tf.nn.conv2d(x, k, 2, "SAME"),
            [(2, 7, 6, 3), (3, 3, 3, 4)],
        ),
        (
            "conv 1x1",
            lambda x, k: tf.nn.conv2d(x, k, 1, "VALID"),
            [(2, 6, 6, 3), (1, 1, 3, 4)],
        ),
        (
            "depthwise s2 x2",
            lambda x, k: tf.nn.depthwise_conv2d(x, k, [1, 2, 2, 1], "SAME"),
            [(2, 7, 6, 3), (3, 3, 3, 2)],
        ),
        (
            "depthwise valid 5x5",
            lambda x, k: tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], "VALID"),
            [(2, 8, 7, 3), (5, 5, 3, 1)],
        ),
        ("avgpool same", lambda x: tf.nn.avg_pool2d(x, 2, 2, "SAME"), [(2, 5, 7, 3)]),
        ("avgpool valid", lambda x: tf.nn.avg_pool2d(x, 3, 3, "VALID"), [(2, 7, 8, 3)]),
        ("slice", lambda v: v[1] * 2 + tf.reduce_sum(v[0:2, 1:3]), [(3, 4, 4)]),
    ],
)
def test_builtin_gradients_equal_tensorflows(name, forward, shapes):
    args = [tf.constant(_RNG.normal(size=s).astype("float32")) for s in shapes]
    weights = tf.constant(_RNG.normal(size=forward(*args).shape).astype("float32"))

    def gradients(override):
        traced = []

        @tf.function
        def fn(*a):
            context = train_graph.builtin_gradients() if override else None
            with context or contextlib.nullcontext():
                y = forward(*a)
            grads = tf.gradients(tf.reduce_sum(y * weights), a)
            graph = tf.compat.v1.get_default_graph()
            traced.extend(op.type for op in graph.get_operations())
            return grads

        return fn(*args), set(traced)

    (expected, plain_ops), (got, ops) = gradients(False), gradients(True)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)
    not_builtin = {
        "ReluGrad",
        "Relu6Grad",
        "SigmoidGrad",
        "TanhGrad",
        "RsqrtGrad",
        "MaxPoolGrad",
        "AvgPoolGrad",
        "Conv2DBackpropFilter",
        "DepthwiseConv2dNativeBackpropInput",
        "DepthwiseConv2dNativeBackpropFilter",
        "StridedSliceGrad",
    }
    assert not_builtin & plain_ops  # TensorFlow's own would need Flex...
    assert not not_builtin & ops  # ...ours does not.


@pytest.mark.slow
def test_cli_exports_a_saved_microtune_model(tmp_path, capsys):
    """A `.keras` file keeps MicroTune's and the head's trainable flags and
    the compiled loss and optimizer: the CLI exports and verifies it."""
    import json

    from keras_microtune import cli

    keras.utils.set_random_seed(0)
    model = kmt.attach(_backbone(), num_classes=3, groups=2)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "categorical_crossentropy")
    model.save(tmp_path / "m.keras")
    out = tmp_path / "out"
    argv = ["convert", str(tmp_path / "m.keras"), "--target", "mobile-trainable"]
    code = cli.main([*argv, "--train-batch-size", "4", "-o", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["verified"]
    training = report["training"]
    assert training["optimizer"]["name"] == "SGD" and training["batch_size"] == 4
    assert training["labels"] == {"shape": [4, 3], "dtype": "float32"}
    assert all(
        "microtune" in v["path"] or "classifier" in v["path"]
        for v in training["variables"]
    )
    assert (out / "mobile.md").exists() and (out / "model.tflite").exists()


@pytest.mark.slow
def test_int8_target_end_to_end():
    model = _attached(keras.optimizers.Adam(1e-2))
    result = kmt.convert(model, "mobile-trainable-int8", train_batch_size=BATCH)
    float_result = kmt.convert(model, "mobile-trainable", train_batch_size=BATCH)
    assert result.report["conversion"]["frozen_weights"] == "int8"
    assert result.report["verified"]
    assert result.size_bytes <= float_result.size_bytes
    assert result.report["training"]["check"]["int8_weights"][
        "set_get_round_trip_exact"
    ]


@pytest.mark.slow
def test_digits_trained_only_in_litert_reach_keras_accuracy():
    """Digits 5-9 from 20 shots on the demo backbone, default attach(), Adam,
    40 epochs: trained in the interpreter only vs the same steps in Keras."""
    from benchmarks import on_device_training

    r = on_device_training.run()
    assert r["keras_accuracy"] > 0.8
    assert abs(r["accuracy_gap_points"]) <= 2.0, r
