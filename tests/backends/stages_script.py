"""Train every keras_microtune stage and callback on this process's backend.

Run by `test_jax.py` with `KERAS_BACKEND=jax` (the backend is fixed when
Keras is imported, so it needs its own process):

    KERAS_BACKEND=jax python tests/backends/stages_script.py OUT_DIR --stages
    KERAS_BACKEND=jax python tests/backends/stages_script.py OUT_DIR --qat-convert
    KERAS_BACKEND=jax python tests/backends/stages_script.py OUT_DIR --quick

Each check asserts what the stage must do (the loss falls, schedules reach
their values, masks and clusters hold in what the model computes, the
prefix cache trains the same weights as the plain fit); a failed check
exits non-zero with its traceback. `--stages` runs every check, the
callbacks that convert (DeviceBudget, Int8Evaluation: each conversion in a
TensorFlow child process) included; `--quick` only QAT (with WarmupCosine
and QuantizationSchedule) and pruning (with PruningSchedule).
`--qat-convert` microtunes with QAT and converts, writing `qat.keras`,
`predictions.npy`, `model.tflite` and `report.json` for the test to compare
with a TensorFlow-backend conversion. All write the logs of every fit to
`OUT_DIR/logs.json`.
"""

import json
import logging
import os
import sys

import keras
import numpy as np

import keras_microtune as kmt

RNG = np.random.default_rng(0)
X = RNG.uniform(size=(64, 8, 8, 1)).astype("float32")
Y = (X[:, :4].mean(axis=(1, 2, 3)) > X[:, 4:].mean(axis=(1, 2, 3))).astype("int32")
LOGS = {}


def backbone():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            kmt.layers.FeatureStage([8], stem_filters=4, pooling="max", name="b1"),
            kmt.layers.FeatureStage([8], pooling="max", name="b2"),
            kmt.layers.EmbeddingStage("avg"),
            kmt.layers.OutputStage(2),
        ]
    )
    return model


def fit(name, model, callbacks=(), epochs=3, **kwargs):
    if not getattr(model, "compiled", False) or model.optimizer is None:
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    history = model.fit(
        X,
        Y,
        epochs=epochs,
        batch_size=16,
        verbose=0,
        callbacks=list(callbacks),
        **kwargs,
    )
    LOGS[name] = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    return LOGS[name]


def check_attach(trained):
    logs = fit("attach", kmt.attach(trained, num_classes=2))
    assert logs["loss"][-1] < logs["loss"][0], logs
    logs = fit("attach_microtune", kmt.attach(trained, num_classes=2, adapters="auto"))
    assert logs["loss"][-1] < logs["loss"][0], logs


def check_prefix_cache(trained):
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("keras_microtune.training.prefix_cache").addHandler(handler)
    logging.getLogger("keras_microtune.training.prefix_cache").setLevel(logging.INFO)
    weights = []
    for cache in (True, False):
        keras.utils.set_random_seed(1)
        model = kmt.attach(trained, num_classes=2, lora=["b2"])
        model.cache_prefix = cache
        fit(f"prefix_cache_{cache}", model, shuffle=False, epochs=2)
        weights.append([np.asarray(w) for w in model.trainable_weights])
    assert messages[0].startswith("Prefix cache: computed"), messages
    assert messages[1].startswith("Prefix cache off"), messages
    for cached, plain in zip(*weights):
        np.testing.assert_allclose(cached, plain, rtol=1e-4, atol=1e-5)


def check_qat(trained):
    model = kmt.optimize.quantize_model(kmt.attach(trained, num_classes=2, groups=2))
    warmup = kmt.callbacks.WarmupCosine(1e-2, warmup_steps=4, decay_steps=16)
    schedule = kmt.callbacks.QuantizationSchedule(
        start_epoch=1, freeze_ranges_epoch=2, freeze_batch_norm_epoch=2
    )

    def ranges():
        names = ("range_min", "range_max")
        return np.array([float(v.numpy()) for v in model.variables if v.name in names])

    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, _: seen.append(ranges())
    )
    logs = fit("qat", model, [warmup, schedule, record], epochs=4)
    assert logs["quantization_enabled"] == [0.0, 1.0, 1.0, 1.0], logs
    assert logs["ranges_frozen"] == [0.0, 0.0, 1.0, 1.0], logs
    assert logs["batch_norm_frozen"] == [0.0, 0.0, 1.0, 1.0], logs
    expected = [warmup.value(4 * epoch + 3) for epoch in range(4)]  # Last step.
    np.testing.assert_allclose(logs["learning_rate"], expected, rtol=1e-5)
    assert not np.array_equal(seen[0], seen[1])  # Ranges follow the data...
    np.testing.assert_array_equal(seen[1], seen[3])  # ...until frozen.
    return model


def check_pruning():
    model = kmt.optimize.prune_low_magnitude(
        backbone(), target_sparsity=0.5, begin_step=0, end_step=6, frequency=2
    )
    logs = fit("pruning", model, [kmt.callbacks.PruningSchedule()], epochs=3)
    assert logs["pruning_step"] == [4.0, 8.0, 12.0], logs
    for path, sparsity in kmt.optimize.pruning_summary(model).items():
        assert abs(sparsity - 0.5) < 0.1, (path, sparsity)
    stripped = kmt.optimize.strip(model)  # The zeros are in what it computes.
    for path, sparsity in kmt.optimize.pruning_summary(stripped).items():
        assert abs(sparsity - 0.5) < 0.1, (path, sparsity)
    np.testing.assert_allclose(
        model.predict(X, verbose=0), stripped.predict(X, verbose=0), atol=1e-5
    )


def check_clustering():
    model = kmt.optimize.cluster_weights(backbone(), number_of_clusters=4)
    schedule = kmt.callbacks.ClusteringSchedule(
        freeze_assignments_epoch=1, freeze_centroids_epoch=2
    )
    logs = fit("clustering", model, [schedule], epochs=3)
    assert logs["assignments_changed"][1:] == [0.0, 0.0], logs
    assert logs["max_clusters_per_table"] == [4.0, 4.0, 4.0], logs
    before = model.predict(X, verbose=0)
    stripped = kmt.optimize.strip_clustering(model)
    np.testing.assert_allclose(before, stripped.predict(X, verbose=0), atol=1e-5)
    for path, count in kmt.optimize.clustering_summary(model).items():
        assert count <= 4, (path, count)


def check_unfreeze_clip_distill(trained):
    model = kmt.attach(trained, num_classes=2, freeze=True)
    block = model.get_layer("b2")
    start = [np.asarray(w) for w in block.weights]
    unfreeze = kmt.callbacks.ProgressiveUnfreeze([1], blocks=["b2"])
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, _: seen.append([np.asarray(w) for w in block.weights])
    )
    logs = fit("unfreeze", model, [unfreeze, record], epochs=2)
    assert logs["unfrozen_blocks"] == [0.0, 1.0], logs
    assert all(np.array_equal(a, b) for a, b in zip(start, seen[0]))
    assert not all(np.array_equal(a, b) for a, b in zip(seen[0], seen[1]))

    clip = kmt.callbacks.ActivationClipAnneal(start=8.0, end=2.0, epochs=2)
    logs = fit("clip", kmt.attach(trained, num_classes=2), [clip], epochs=3)
    assert logs["activation_clip"] == [8.0, 5.0, 2.0], logs

    distiller = kmt.losses.Distiller(kmt.attach(trained, num_classes=2), trained)
    schedule = kmt.callbacks.DistillationSchedule(alpha=(0.9, 0.1), epochs=2)
    logs = fit("distillation", distiller, [schedule], epochs=3)
    np.testing.assert_allclose(logs["distillation_alpha"], [0.9, 0.5, 0.1], rtol=1e-6)


def check_converting_callbacks(trained):
    budget = kmt.callbacks.DeviceBudget("cortex-m0plus", X[:16], every=2)
    int8 = kmt.callbacks.Int8Evaluation(X[:16], Y[:16], target="mcu", every=2)
    logs = fit("converting", kmt.attach(trained, num_classes=2), [budget, int8], 2)
    assert logs["fits_target"][1] == 1.0 and logs["int8_size_bytes"][1] > 0, logs
    assert 0.0 <= logs["int8_accuracy"][1] <= 1.0, logs


def qat_convert(out):
    """Microtune with QAT, convert (TensorFlow child), keep what the test compares."""
    model = kmt.optimize.quantize_model(kmt.attach(backbone(), num_classes=2, groups=2))
    fit("qat", model, [kmt.callbacks.QuantizationSchedule(start_epoch=1)], epochs=2)
    model.save(os.path.join(out, "qat.keras"))
    predictions = keras.ops.convert_to_numpy(model(X, training=False))
    np.save(os.path.join(out, "predictions.npy"), predictions)
    result = kmt.convert(model, "mcu", representative_data=X[:16], verbose=0)
    with open(os.path.join(out, "model.tflite"), "wb") as f:
        f.write(result.tflite)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(result.report, f)


def main(out, mode):
    if mode == "--qat-convert":
        qat_convert(out)
    elif mode == "--quick":  # The default suite's share: the failures.
        check_qat(backbone())
        check_pruning()
    else:
        trained = backbone()
        fit("backbone", trained)
        check_attach(trained)
        check_prefix_cache(trained)
        check_qat(trained)
        check_pruning()
        check_clustering()
        check_unfreeze_clip_distill(trained)
        check_converting_callbacks(trained)
    with open(os.path.join(out, "logs.json"), "w") as f:
        json.dump({"backend": keras.backend.backend(), "logs": LOGS}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
