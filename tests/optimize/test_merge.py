"""merge_adapters(): LoRA and exact MicroTune folds, float equality, +0 bytes."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune import layers


def _stages():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.FeatureStage([8], stem_filters=4, pooling="max", name="b1"),
            layers.FeatureStage([8], name="b2"),
            layers.EmbeddingStage("avg", units=8, activation="relu", name="emb"),
            layers.OutputStage(3, name="out"),
        ],
        name="stages",
    )


def _cnn():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(6, 1, name="conv2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(8, name="fc")(x)
    x = keras.layers.ReLU(name="relu3")(x)  # keeps `fc` out of the head
    return keras.Model(inputs, keras.layers.Dense(3, name="dense")(x), name="cnn")


def _data(model, rng, n=32):
    x = rng.normal(size=(n, *model.inputs[0].shape[1:])).astype("float32")
    return x, rng.integers(0, 3, n)


def _fit(model, x, y, epochs=2):
    model.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0)
    return model


@pytest.fixture(scope="module")
def trained_stages():
    rng = np.random.default_rng(0)
    backbone = _stages()
    x, y = _data(backbone, rng)
    _fit(backbone, x, y, 1)
    kwargs = dict(num_classes=3, adapters=None, train_norm=True)
    plain = kmt.attach(backbone, **kwargs)
    adapted = _fit(kmt.attach(backbone, lora=["b1", "b2"], lora_rank=2, **kwargs), x, y)
    return plain, adapted, x, y


def _assert_lora_gone(model):
    assert not any(getattr(x, "lora_enabled", False) for x in model._flatten_layers())
    assert not any("lora" in v.path for v in model.weights)


def test_merge_float_equality_and_backbone_structure(trained_stages):
    plain, adapted, x, _ = trained_stages
    merged = kmt.optimize.merge_adapters(adapted)
    _assert_lora_gone(merged)
    assert any(getattr(x, "lora_enabled", False) for x in adapted._flatten_layers())
    np.testing.assert_allclose(
        merged.predict(x, verbose=0),
        adapted.predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
    shapes = [tuple(w.shape) for w in merged.weights]
    assert shapes == [tuple(w.shape) for w in plain.weights]
    assert merged.get_layer("b1").get_config()["lora_rank"] is None
    report = kmt.optimize.merge_report(adapted)
    assert [r["layer"] for r in report] == [
        "b1/stem_conv",
        "b1/block0_pw",
        "b2/block0_pw",
    ]
    assert all(r["merged"] and r["form"] == "lora" for r in report)


def test_merged_model_converts_to_the_backbones_ops_and_size(trained_stages):
    plain, adapted, x, _ = trained_stages
    merged = kmt.optimize.merge_adapters(adapted)
    # The plain backbone carrying the merged values (set_weights checks that
    # every weight matches in shape): constant deduplication in the
    # converter depends on values (e.g. an untrained all-zero head bias).
    plain.set_weights(merged.get_weights())
    base, ours = (
        kmt.convert(m, "mcu", representative_data=x, verbose=0) for m in (plain, merged)
    )
    assert ours.ops == base.ops
    assert ours.size_bytes == base.size_bytes
    assert ours.arena_bytes == base.arena_bytes


def test_convert_merges_adapters_itself_and_reports_it(trained_stages, rng):
    plain, adapted, x, _ = trained_stages
    merged = kmt.optimize.merge_adapters(adapted)
    ours, direct = (
        kmt.convert(m, "mcu", representative_data=x, verbose=0)
        for m in (merged, adapted)
    )
    assert direct.tflite == ours.tflite
    (entry,) = [p for p in direct.report["passes"] if p["name"] == "merge_adapters"]
    assert entry["adapters"] == kmt.optimize.merge_report(adapted)
    assert "merge_adapters" not in [p["name"] for p in ours.report["passes"]]
    # MicroTune after a ReLU cannot fold: it stays, and the report says why.
    backbone = _stages()
    x2, _ = _data(backbone, rng, 8)
    kept = kmt.convert(
        kmt.attach(backbone, num_classes=3, adapters="auto", groups=2),
        "mcu",
        representative_data=x2,
        verbose=0,
    )
    (entry,) = [p for p in kept.report["passes"] if p["name"] == "merge_adapters"]
    assert entry["adapters"] and not any(r["merged"] for r in entry["adapters"])
    assert all(r["form"] == "microtune" and r["reason"] for r in entry["adapters"])


def test_functional_cnn_lora_and_microtune_folds(rng):
    backbone = _cnn()
    x, y = _data(backbone, rng)
    _fit(backbone, x, y, 1)
    adapted = kmt.attach(
        backbone,
        adapters=["fc", "relu1"],
        groups=2,
        rank=2,
        lora=["conv1", "conv2"],
        train_bias=True,
        train_norm=True,
    )
    _fit(adapted, x, y)
    report = {r["layer"]: r for r in kmt.optimize.merge_report(adapted)}
    assert report["fc_microtune"]["merged"], report
    assert not report["relu1_microtune"]["merged"]
    assert "'relu1' (ReLU), not a Dense/Conv" in report["relu1_microtune"]["reason"]
    assert report["conv1"]["merged"] and report["conv2"]["form"] == "lora"
    merged = kmt.optimize.merge_adapters(adapted)
    _assert_lora_gone(merged)
    names = [layer.name for layer in merged.layers]
    assert "fc_microtune" not in names and "relu1_microtune" in names
    np.testing.assert_allclose(
        merged.predict(x, verbose=0),
        adapted.predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-5,
    )
    # The input model is untouched and still has its adapters.
    assert adapted.get_layer("conv1").lora_enabled


def test_qat_merge_convert_matches_trained_int8(trained_stages, tools):
    _, adapted, x, y = trained_stages
    qat = kmt.optimize.quantize_model(adapted)
    trainable = {
        v.path.rsplit("/", 2)[-2] + "/" + v.name for v in qat.trainable_weights
    }
    assert {"block0_pw/lora_kernel_a", "stem_conv/lora_kernel_b"} <= trainable
    assert not any(v.name == "kernel" and "pw" in v.path for v in qat.trainable_weights)
    names = ("kernel", "moving_mean", "moving_variance")
    frozen = [(v, v.numpy()) for v in qat.weights if v.name in names]
    frozen = [(v, value) for v, value in frozen if not v.trainable]
    assert len(frozen) == 5 + 5 * 2  # b1: stem, dw, pw; b2: dw, pw; their BNs
    _fit(qat, x, y, 1)
    for v, value in frozen:  # base kernels (and BN statistics) stay frozen
        np.testing.assert_array_equal(v.numpy(), value)
    merged = kmt.optimize.merge_adapters(qat)
    _assert_lora_gone(merged)
    expected = qat.predict(x, verbose=0)
    np.testing.assert_allclose(merged.predict(x, verbose=0), expected, atol=1e-5)
    result = kmt.convert(merged, "mcu", verbose=0)
    assert result.report["conversion"]["quantization_aware_training"]
    got, scale = tools.run_tflm(result.tflite, x)
    assert np.abs(got - expected).max() <= 2 * scale + 1e-6
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.95


@pytest.mark.parametrize("merge, rank", [("sum", None), ("concat", 2)])
def test_microtune_fold_is_exact_for_each_form(merge, rank, rng):
    inputs = keras.Input((5, 3))
    x = keras.layers.Conv1D(4, 3, name="conv")(inputs)
    x = layers.MicroTune(groups=2, rank=rank, merge=merge, name="mt")(x)
    model = keras.Model(inputs, keras.layers.ReLU()(x))
    for v in model.weights:  # non-zero adapter weights
        v.assign(rng.normal(size=v.shape).astype("float32"))
    x = rng.normal(size=(4, 5, 3)).astype("float32")
    merged = kmt.optimize.merge_adapters(model)
    assert [type(x).__name__ for x in merged.layers] == ["InputLayer", "Conv1D", "ReLU"]
    np.testing.assert_allclose(merged(x), model(x), rtol=1e-5, atol=1e-5)


def test_merge_refuses_non_graph_models():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="Sequential or Functional.*Sub"):
        kmt.optimize.merge_adapters(Sub())


def test_merge_keeps_an_adapted_normalization():
    """merge_adapters copies the layers around the merged ones; an adapted
    Normalization's copy keeps its statistics (it normalized nothing before)."""
    x = (np.random.default_rng(0).random((64, 6)) * 100 + 50).astype("float32")
    norm = keras.layers.Normalization()
    norm.adapt(x)
    model = keras.Sequential(
        [keras.Input((6,)), norm, keras.layers.Dense(8, "relu"), keras.layers.Dense(3)]
    )
    model.layers[1].enable_lora(2)
    merged = kmt.optimize.merge_adapters(model)
    np.testing.assert_allclose(
        merged.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-4
    )
