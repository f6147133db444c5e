import keras
import numpy as np
import pytest

import keras_microtune as kmt


def _model():
    # Fixed weights so the loss is a known function of the clipping value.
    inputs = keras.Input((2,))
    x = keras.layers.Dense(2, kernel_initializer="ones", use_bias=False, name="pre")(
        inputs
    )
    x = keras.layers.ReLU(name="relu")(x)
    outputs = keras.layers.Dense(1, kernel_initializer="ones", use_bias=False)(x)
    return keras.Model(inputs, outputs)


class FunctionRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ids = []

    def on_epoch_end(self, epoch, logs=None):
        self.ids.append(id(self.model.train_function))


def _expected_loss(x, y, clip):
    hidden = np.maximum(x.sum(axis=1, keepdims=True), 0.0)
    if clip is not None:
        hidden = np.minimum(hidden, clip)
    return float(np.mean((2.0 * hidden - y) ** 2))


@pytest.mark.parametrize(
    "distributed, steps_per_execution", [(False, 1), (False, 2), (True, 1)]
)
def test_clip_changes_the_compiled_computation(
    distributed, steps_per_execution, mirrored
):
    x = np.full((16, 2), 6.0, dtype="float32")  # pre-activation 12 for each unit
    y = np.zeros((16, 1), dtype="float32")
    if distributed:
        with mirrored.scope():
            model = _model()
            model.compile(
                keras.optimizers.SGD(0.0),
                "mse",
                steps_per_execution=steps_per_execution,
            )
    else:
        model = _model()
        model.compile(
            keras.optimizers.SGD(0.0), "mse", steps_per_execution=steps_per_execution
        )
    anneal = kmt.callbacks.ActivationClipAnneal(
        start=10.0, end=6.0, epochs=2, start_epoch=1
    )
    functions = FunctionRecorder()
    history = model.fit(
        x, y, batch_size=4, epochs=4, callbacks=[anneal, functions], verbose=0
    )
    # One train function from the first clipped epoch on: values change by
    # assignment, not by retracing.
    assert len(set(functions.ids[1:])) == 1
    clips = [None, 10.0, 8.0, 6.0]
    assert history.history["activation_clip"] == [float("inf"), 10.0, 8.0, 6.0]
    expected = [_expected_loss(x, y, clip) for clip in clips]
    np.testing.assert_allclose(history.history["loss"], expected, rtol=1e-5)
    relu = model.get_layer("relu")
    assert relu.max_value == 6.0 and "call" not in vars(relu)
    assert relu.get_config()["max_value"] == 6.0
    # Evaluation and prediction after training use the final clip too.
    np.testing.assert_allclose(model.predict(x[:2], verbose=0), [[12.0], [12.0]])


def test_finds_relus_inside_feature_stage(rng):
    model = keras.Sequential(
        [
            keras.Input((16, 3)),
            kmt.layers.FeatureStage([4, 8]),
            kmt.layers.EmbeddingStage(),
            kmt.layers.OutputStage(2),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    anneal = kmt.callbacks.ActivationClipAnneal(start=8.0, end=6.0, epochs=1)
    x = rng.normal(size=(8, 16, 3)).astype("float32")
    y = rng.integers(0, 2, size=(8,))
    history = model.fit(x, y, epochs=2, callbacks=[anneal], verbose=0)
    assert history.history["activation_clip"] == [8.0, 6.0]
    relus = [
        layer
        for layer in model.layers[0]._flatten_layers()
        if isinstance(layer, keras.layers.ReLU)
    ]
    assert len(relus) >= 4 and all(layer.max_value == 6.0 for layer in relus)


def test_backup_and_restore_resume(tmp_path, interrupt_at):
    x = np.full((8, 2), 6.0, dtype="float32")
    y = np.zeros((8, 1), dtype="float32")

    def fit(model, *extra):
        model.compile(keras.optimizers.SGD(0.0), "mse")
        callbacks = [
            keras.callbacks.BackupAndRestore(str(tmp_path)),
            kmt.callbacks.ActivationClipAnneal(start=12.0, end=6.0, epochs=3),
            *extra,
        ]
        return model.fit(x, y, batch_size=4, epochs=4, callbacks=callbacks, verbose=0)

    with pytest.raises(RuntimeError, match="interrupted"):
        fit(_model(), interrupt_at(2))
    history = fit(_model())
    assert history.history["activation_clip"] == [8.0, 6.0]
    np.testing.assert_allclose(
        history.history["loss"],
        [_expected_loss(x, y, 8.0), _expected_loss(x, y, 6.0)],
        rtol=1e-5,
    )


def test_invalid_arguments_and_missing_relu(rng):
    with pytest.raises(ValueError, match="invalid value for `end`.*Received: end=0"):
        kmt.callbacks.ActivationClipAnneal(end=0)
    with pytest.raises(
        ValueError, match="invalid value for `epochs`.*Received: epochs=1.5"
    ):
        kmt.callbacks.ActivationClipAnneal(epochs=1.5)
    with pytest.raises(ValueError, match="invalid value for `layers`"):
        kmt.callbacks.ActivationClipAnneal(layers="relu")
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(1, activation="relu")]
    )
    model.compile("adam", "mse")
    with pytest.raises(ValueError, match="found no `keras.layers.ReLU`"):
        model.fit(
            np.ones((4, 2)),
            np.ones((4, 1)),
            verbose=0,
            callbacks=[kmt.callbacks.ActivationClipAnneal()],
        )
    model = _model()
    model.compile("adam", "mse")
    with pytest.raises(ValueError, match="no ReLU layer named"):
        model.fit(
            np.ones((4, 2)),
            np.ones((4, 1)),
            verbose=0,
            callbacks=[kmt.callbacks.ActivationClipAnneal(layers=["pre"])],
        )
