"""Property tests: random valid stage configurations build, train, save and load;
random invalid ones raise ValueError or TypeError with a message."""

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_microtune as kmt
from keras_microtune import layers

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@st.composite
def stage_models(draw):
    one_d = draw(st.booleans())
    spatial = (draw(st.integers(4, 12)),) if one_d else (draw(st.integers(4, 8)),) * 2
    channels = draw(st.integers(1, 3))
    blocks = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2, 4]))
    feature = dict(
        filters=[4 * draw(st.integers(1, 2)) for _ in range(blocks)],
        kernel_size=draw(st.sampled_from([1, 3])),
        strides=draw(st.sampled_from([1, 2])),
        activation=draw(st.sampled_from(["relu", "relu6"])),
        pooling=draw(st.sampled_from([None, "max", "avg"])),
        use_batchnorm=draw(st.booleans()),
        stem_filters=draw(st.sampled_from([None, 4])),
    )
    adapter = dict(
        groups=groups,
        rank=draw(st.sampled_from([None, 1, 2])),
        merge=draw(st.sampled_from(["concat", "sum"])),
        activation=draw(st.sampled_from([None, "relu"])),
    )
    embedding = dict(
        pooling=draw(st.sampled_from(["avg", "max", "flatten"])),
        units=draw(st.sampled_from([None, 4])),
        normalize=draw(st.sampled_from([None, "l2"])),
    )
    head = dict(
        units=draw(st.integers(1, 3)),
        activation=draw(st.sampled_from(["softmax", "sigmoid", "linear"])),
        dropout=draw(st.sampled_from([0.0, 0.25])),
    )
    return (*spatial, channels), feature, adapter, embedding, head


@SETTINGS
@given(spec=stage_models())
def test_random_valid_configurations_train_save_and_load(spec, tmp_path_factory):
    shape, feature, adapter, embedding, head = spec
    model = keras.Sequential(
        [
            keras.Input(shape),
            layers.FeatureStage(**feature),
            layers.MicroTune(**adapter),
            layers.EmbeddingStage(**embedding),
            layers.OutputStage(**head),
        ]
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, *shape)).astype("float32")
    y = rng.uniform(size=(4, head["units"])).astype("float32")
    model.compile("sgd", "mse")
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    path = tmp_path_factory.mktemp("model") / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )
    # ... and converts to full int8 that TFLite Micro runs, verified against
    # LiteRT's reference kernels.
    result = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    assert result.report["verified"], result.parity


INVALID = st.one_of(
    st.builds(
        lambda v: (layers.MicroTune, {"groups": v}),
        st.one_of(st.integers(-3, 0), st.floats(0.5, 3.5), st.text(max_size=2)),
    ),
    st.builds(
        lambda v: (layers.MicroTune, {"rank": v}),
        st.one_of(st.integers(-3, 0), st.just(True), st.just("2")),
    ),
    st.builds(lambda v: (layers.MicroTune, {"merge": v}), st.text(max_size=4)),
    st.builds(
        lambda v: (layers.FeatureStage, {"filters": v}),
        st.one_of(st.integers(-2, 0), st.just([]), st.just([4, "8"])),
    ),
    st.builds(
        lambda v: (layers.FeatureStage, {"kernel_size": v}),
        st.one_of(st.integers(-2, 0), st.just(2.5)),
    ),
    st.builds(lambda v: (layers.FeatureStage, {"activation": v}), st.text(max_size=4)),
    st.builds(lambda v: (layers.EmbeddingStage, {"pooling": v}), st.text(max_size=4)),
    st.builds(
        lambda v: (layers.EmbeddingStage, {"units": v}),
        st.one_of(st.integers(-2, 0), st.just(1.5)),
    ),
    st.builds(
        lambda v: (layers.OutputStage, {"units": v}),
        st.one_of(st.integers(-2, 0), st.just("3")),
    ),
    st.builds(
        lambda v: (layers.OutputStage, {"units": 2, "dropout": v}),
        st.one_of(st.floats(1.0, 5.0), st.floats(-5.0, -0.01)),
    ),
)


@SETTINGS
@given(case=INVALID)
def test_random_invalid_configurations_raise_value_or_type_error(case):
    cls, kwargs = case
    if (
        kwargs.get("merge") in ("concat", "sum")
        or kwargs.get("pooling") in ("avg", "max", "flatten")
        or kwargs.get("activation") in ("relu", "relu6")
    ):
        return  # drew a valid value
    with pytest.raises((ValueError, TypeError)) as info:
        cls(**kwargs)
    assert str(info.value)
