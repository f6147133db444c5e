import keras
import numpy as np
import pytest

import keras_microtune as kmt

L = keras.layers


def _model():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, use_bias=False)(inputs)
    x = L.ReLU()(L.BatchNormalization()(x))
    x = kmt.EmbeddingStage("avg")(x)
    x = L.Dense(16, activation="relu")(x)
    return keras.Model(inputs, kmt.OutputStage(3)(x))


def _fit(model, x, epochs=1):
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, np.arange(len(x)) % 3, epochs=epochs, batch_size=8, verbose=0)


def _kernel_sparsity(model):
    return {k: v for k, v in kmt.optimize.pruning_summary(model).items() if v > 0}


def test_polynomial_schedule():
    layer = kmt.optimize.PruneLowMagnitude(
        L.Dense(2), 0.8, begin_step=10, end_step=20, frequency=1, power=3
    )
    values = [float(layer.sparsity_at(s)) for s in (0, 10, 15, 20, 30)]
    np.testing.assert_allclose(values, [0, 0, 0.8 * (1 - 0.5**3), 0.8, 0.8], rtol=1e-6)


def test_sparsity_reached_and_stripped(rng, tmp_path):
    x = rng.normal(size=(32, 8, 8, 1)).astype("float32")
    pruned = kmt.optimize.prune_low_magnitude(
        _model(), target_sparsity=0.5, end_step=4, frequency=2
    )
    _fit(pruned, x, epochs=2)  # 8 steps
    summary = kmt.optimize.pruning_summary(pruned)
    kernels = {k: v for k, v in summary.items() if "mask" not in k}
    assert len(kernels) == 3
    for path, sparsity in kernels.items():
        assert sparsity == pytest.approx(0.5, abs=0.03), path
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(pruned(x[:4])),
        keras.ops.convert_to_numpy(loaded(x[:4])),
    )
    stripped = kmt.optimize.strip(pruned)
    assert not any(
        isinstance(layer, kmt.optimize.PruneLowMagnitude) for layer in stripped.layers
    )
    assert sorted(kmt.optimize.pruning_summary(stripped).values()) == pytest.approx(
        sorted(kernels.values())
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(pruned(x[:4])),
        keras.ops.convert_to_numpy(stripped(x[:4])),
        atol=1e-6,
    )


def test_convert_strips_the_wrappers_and_keeps_the_zeros(rng, tools):
    x = rng.normal(size=(32, 8, 8, 1)).astype("float32")
    pruned = kmt.optimize.prune_low_magnitude(_model(), 0.5, end_step=2, frequency=1)
    _fit(pruned, x)
    result = kmt.convert(pruned, "cortex-m4", representative_data=x, verbose=0)
    assert result.report["conversion"]["pruning_wrappers_stripped"]
    assert "ASSIGN_VARIABLE" not in result.ops
    assert result.parity["tflm_within_tolerance"]
    assert result.parity["cosine"] > 0.99
    weights = tools.int8_weights(result.tflite)
    assert len(weights) == 3
    for w in weights:
        assert (w == 0).mean() >= 0.49
    # The training model keeps its wrappers.
    assert kmt.optimize.prune.has_pruning(pruned)
    plain = kmt.convert(_model(), "cortex-m4", representative_data=x, verbose=0)
    assert not plain.report["conversion"]["pruning_wrappers_stripped"]


def test_update_pruning_masks_hook():
    pruned = kmt.optimize.prune_low_magnitude(_model(), 0.75, end_step=10)
    kmt.optimize.update_pruning_masks(pruned, step=10)
    values = [
        v for k, v in kmt.optimize.pruning_summary(pruned).items() if "mask" not in k
    ]
    assert values == pytest.approx([0.75] * 3, abs=0.02)


def test_pqat_zeros_survive_into_int8(rng, tools):
    x = rng.normal(size=(32, 8, 8, 1)).astype("float32")
    pruned = kmt.optimize.prune_low_magnitude(_model(), 0.5, end_step=2, frequency=1)
    _fit(pruned, x)
    qat = kmt.optimize.quantize_model(pruned)
    assert not any(
        isinstance(layer, kmt.optimize.PruneLowMagnitude) for layer in qat.layers
    )
    _fit(qat, x)
    weights = tools.int8_weights(tools.to_int8(qat))
    assert len(weights) == 3
    for w in weights:
        assert (w == 0).mean() >= 0.49


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_sparsity": 1.0}, "Received: target_sparsity=1.0"),
        ({"frequency": 0}, "Received: frequency=0"),
        ({"begin_step": 5, "end_step": 2}, "Received: end_step=2"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kmt.optimize.prune_low_magnitude(_model(), **kwargs)


@pytest.mark.parametrize("frequency", [100, 40])
def test_last_mask_update_is_at_end_step_whatever_the_frequency(frequency):
    """Issue 18: with frequency > end_step - begin_step the masks never left 0."""
    layer = kmt.optimize.PruneLowMagnitude(
        L.Dense(64), 0.5, begin_step=0, end_step=93, frequency=frequency, power=3
    )
    layer.build((None, 32))
    layer.layer.kernel.assign(np.random.default_rng(0).normal(size=(32, 64)))

    def sparsity_after(step):
        layer.update_masks(step=step, force=False)
        return float(np.mean(keras.ops.convert_to_numpy(layer.masks[0]) == 0))

    assert sparsity_after(50) == 0.0  # Not an update step: masks stay.
    assert sparsity_after(93) == 0.5
    layer.layer.kernel.assign(np.ones((32, 64)))
    assert sparsity_after(94) == 0.5  # After end_step: no update either.
    assert [layer.last_update_step(s) for s in (0, 39, 40, 92, 93, 500)] == (
        [0, 0, 0, 0, 93, 93] if frequency == 100 else [0, 0, 40, 80, 93, 93]
    )
