"""attach(budget=..., data=...): placement by contribution analysis."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune import layers


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def _two_branch(seed=0):
    """Input (16, 1): branch `left` sees steps 0-7 only, branch `right` 8-15."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 1))
    branches = []
    for name, crop in (("left", (0, 8)), ("right", (8, 0))):
        x = keras.layers.Cropping1D(crop)(inputs)
        x = keras.layers.Flatten()(x)
        branches.append(keras.layers.Dense(16, activation="relu", name=name)(x))
    x = keras.layers.Concatenate(name="concat")(branches)
    outputs = keras.layers.Dense(3, activation="softmax", name="old_head")(x)
    return keras.Model(inputs, outputs)


def _region_task(region, n=256, seed=0):
    """Labels from a nonlinear function of features 0-7 or 8-15 only."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16, 1)).astype("float32")
    part = x[:, :8, 0] if region == "left" else x[:, 8:, 0]
    y = (part[:, 0] * part[:, 1] > 0).astype("int32") + (part[:, 2] > 1)
    return x, y.astype("int32")


@pytest.fixture(scope="module")
def cnn():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16, 3)),
            layers.FeatureStage([8], stem_filters=8, name="block1"),
            layers.FeatureStage([16], name="block2"),
            layers.EmbeddingStage(),
            layers.OutputStage(4),
        ]
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16, 3)).astype("float32")
    y = (x[:, :, 0].mean(1) > 0).astype("int32") + 2 * (x[:, :8, 1].mean(1) > 0)
    return model, x, y.astype("int32")


@pytest.mark.parametrize("budget", [300, 0.3])
def test_plan_stays_within_budget(cnn, budget):
    model, x, y = cnn
    attached = kmt.attach(model, num_classes=3, budget=budget, data=(x, y % 3))
    report = kmt.placement_report(attached)
    limit = budget if isinstance(budget, int) else int(budget * report["full_params"])
    trainable = _count(attached.trainable_weights)
    assert trainable == report["trainable_params"] <= limit
    assert report["chosen"], "a budget above the head's cost buys something"
    assert trainable > report["head_params"] == 16 * 3 + 3
    kinds = {c["kind"] for c in report["chosen"]}
    assert kinds <= {"lora", "bias", "norm", "kernel"}


def test_identity_at_init_and_backbone_untouched(cnn):
    model, x, y = cnn
    before = [w.copy() for w in model.get_weights()]
    attached = kmt.attach(model, num_classes=3, budget=0.5, data=(x, y % 3))
    assert any(c["kind"] == "lora" for c in kmt.placement_report(attached)["chosen"])
    body = keras.Model(model.inputs, model.layers[1].output)
    features = keras.Model(attached.inputs, attached.get_layer("embedding").input)
    np.testing.assert_allclose(
        features.predict(x, verbose=0), body.predict(x, verbose=0), atol=1e-5
    )
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_plan_is_deterministic(cnn):
    model, x, y = cnn
    plans, outputs = [], []
    for _ in range(2):
        keras.utils.set_random_seed(3)
        attached = kmt.attach(model, num_classes=3, budget=400, data=(x, y % 3))
        plans.append(kmt.placement_report(attached))
        outputs.append(attached.predict(x[:8], verbose=0))
    assert plans[0] == plans[1]
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("region", ["left", "right"])
def test_plan_follows_the_data(region):
    model = _two_branch()
    x, y = _region_task(region)
    # The head trains 99; room for a rank-1 LoRA (24) and a bias (16) more.
    attached = kmt.attach(model, num_classes=3, budget=99 + 24 + 16, data=(x, y))
    chosen = kmt.placement_report(attached)["chosen"]
    assert chosen and {c["layer"] for c in chosen} == {region}, chosen


def test_training_moves_only_the_chosen_variables(cnn):
    model, x, y = cnn
    attached = kmt.attach(model, num_classes=3, budget=0.3, data=(x, y % 3))
    trainable = {id(v) for v in attached.trainable_weights}
    before = {id(v): v.numpy().copy() for v in attached.weights}
    attached.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    attached.fit(x, y % 3, epochs=2, batch_size=16, verbose=0)
    for v in attached.weights:
        moved = not np.array_equal(before[id(v)], v.numpy())
        assert moved == (id(v) in trainable), v.path  # BN statistics stay put


def test_invalid_arguments(cnn):
    model, x, y = cnn
    with pytest.raises(ValueError, match="expected a positive int"):
        kmt.attach(model, num_classes=3, budget=0, data=(x, y))
    with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
        kmt.attach(model, num_classes=3, budget=1.5, data=(x, y))
    with pytest.raises(
        ValueError, match="smaller than the head alone, which trains 51"
    ):
        kmt.attach(model, num_classes=3, budget=50, data=(x, y % 3))
    with pytest.raises(ValueError, match="`budget` needs `data`"):
        kmt.attach(model, num_classes=3, budget=100)
    with pytest.raises(ValueError, match="keeps the model's own head"):
        kmt.attach(model, data=(x, y))
    with pytest.raises(ValueError, match="expected integer classes in \\[0, 2\\]"):
        kmt.attach(model, num_classes=3, data=(x, y))
    with pytest.raises(ValueError, match="wrong shape.*x of shape \\(n, 16, 3\\)"):
        kmt.attach(model, num_classes=3, budget=100, data=(x[:, :8], y))
    with pytest.raises(ValueError, match="expected integer classes in \\[0, 2\\]"):
        kmt.attach(model, num_classes=3, budget=100, data=(x, y))
    with pytest.raises(ValueError, match="leave `adapters`, `train_bias` at the"):
        kmt.attach(
            model,
            num_classes=3,
            adapters=["block1"],
            train_bias=True,
            budget=100,
            data=(x, y),
        )


def _head_loss(attached, x, y):
    probs = attached.predict(x, verbose=0)
    return float(keras.losses.sparse_categorical_crossentropy(y, probs).numpy().mean())


def test_data_fits_the_new_head_and_nothing_else(cnn):
    model, x, y = cnn
    keras.utils.set_random_seed(1)
    plain = kmt.attach(model, num_classes=3)
    keras.utils.set_random_seed(1)
    fitted = kmt.attach(model, num_classes=3, data=(x, y % 3))
    # The same default placement trains, and the backbone is the copy of
    # `model`: only the head's weights differ, and they fit the data.
    assert [v.path for v in fitted.trainable_weights] == [
        v.path for v in plain.trainable_weights
    ]
    head = {v.path for v in fitted.get_layer("classifier").weights} | {
        v.path for v in fitted.get_layer("embedding").weights
    }
    moved = set()
    for a, b in zip(plain.weights, fitted.weights):
        if not np.array_equal(a.numpy(), b.numpy()):
            moved.add(b.path)
    assert moved and moved <= head, moved
    assert _head_loss(fitted, x, y % 3) < 0.95 * _head_loss(plain, x, y % 3)
    body = keras.Model(model.inputs, model.layers[1].output)
    features = keras.Model(fitted.inputs, fitted.get_layer("embedding").input)
    np.testing.assert_allclose(
        features.predict(x, verbose=0), body.predict(x, verbose=0), atol=1e-5
    )


def test_data_fits_a_custom_regression_head(cnn):
    model, x, _ = cnn
    target = x[:, :, :1].mean(1) * 3  # (n, 1) float targets: mean squared error

    def attach(**kwargs):
        keras.utils.set_random_seed(2)
        head = keras.Sequential(
            [keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)]
        )
        return kmt.attach(model, head=head, **kwargs)

    fitted, plain = attach(data=(x, target)), attach()

    def mse(m):
        return float(np.mean((m.predict(x, verbose=0) - target) ** 2))

    assert mse(fitted) < 0.9 * mse(plain)


def test_data_beyond_the_sample_limit_is_sampled_across_it(cnn):
    from keras_microtune.placement import MAX_SAMPLES

    model, x, y = cnn
    # Sorted by class, class 2 only after the first MAX_SAMPLES samples; the
    # class shifts the input, so the frozen features separate the classes.
    labels = np.repeat([0, 1, 2], [300, 250, 11 * len(x) - 550])
    big = np.concatenate([x] * 11) + 2.0 * labels[:, None, None]
    assert (labels[:MAX_SAMPLES] != 2).all() and (labels == 2).any()
    keras.utils.set_random_seed(1)
    attached = kmt.attach(
        model, num_classes=3, budget=300, data=(big.astype("float32"), labels)
    )
    assert kmt.placement_report(attached)["head_fit"]["samples"] == MAX_SAMPLES
    # A head fitted on the first MAX_SAMPLES samples only never sees class 2
    # and gives it 0.10 here; fitted across the data, 0.27.
    probs = attached.predict(big[labels == 2].astype("float32"), verbose=0)
    assert probs[:, 2].mean() > 0.2, probs[:, 2].mean()


def test_budget_keeps_the_fitted_head(cnn):
    model, x, y = cnn
    keras.utils.set_random_seed(1)
    plain = kmt.attach(model, num_classes=3)
    keras.utils.set_random_seed(1)
    attached = kmt.attach(model, num_classes=3, budget=300, data=(x, y % 3))
    fit = kmt.placement_report(attached)["head_fit"]
    assert fit["samples"] == len(x) and fit["after"] < fit["before"]
    assert _head_loss(attached, x, y % 3) == pytest.approx(fit["after"], rel=1e-3)
    assert _head_loss(attached, x, y % 3) < _head_loss(plain, x, y % 3)


def test_report_reads_the_default_placement_from_the_model(cnn):
    model, _, _ = cnn
    attached = kmt.attach(model, num_classes=3)
    report = kmt.placement_report(attached)
    assert report["recorded"] is False
    total = _count(attached.trainable_weights)
    assert report["trainable_params"] == total
    assert sum(c["params"] for c in report["chosen"]) == total
    lora = {c["layer"]: c["rank"] for c in report["chosen"] if c["kind"] == "lora"}
    assert lora == {"block1/stem_conv": 2, "block1/block0_pw": 2, "block2/block0_pw": 2}
    assert {"bias", "norm", "kernel"} <= {c["kind"] for c in report["chosen"]}
