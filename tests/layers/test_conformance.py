"""Keras' own layer conformance harness on each stage, several configs each."""

import pytest
from keras.src import testing

from keras_microtune import layers

CASES = [
    # (class, kwargs, input shape, output shape, trainable, non-trainable weights)
    (layers.MicroTune, {"groups": 4}, (2, 8), (2, 8), 2, 0),
    (layers.MicroTune, {"groups": 2, "rank": 2}, (2, 5, 8), (2, 5, 8), 3, 0),
    (
        layers.MicroTune,
        {"groups": 4, "merge": "sum", "activation": "relu"},
        (2, 3, 3, 8),
        (2, 3, 3, 8),
        2,
        0,
    ),
    (layers.MicroTune, {"groups": 1, "use_bias": False}, (2, 6), (2, 6), 1, 0),
    # dw + pw per block, each with BN (gamma, beta trainable; mean, var not)
    (layers.FeatureStage, {"filters": [4, 8]}, (2, 16, 3), (2, 16, 8), 12, 8),
    (
        layers.FeatureStage,
        {"filters": 8, "strides": 2, "pooling": "max", "activation": "relu6"},
        (2, 16, 16, 3),
        (2, 4, 4, 8),
        6,
        4,
    ),
    (
        layers.FeatureStage,
        {"filters": [4], "use_batchnorm": False, "stem_filters": 4, "pooling": "avg"},
        (2, 8, 8, 2),
        (2, 4, 4, 4),
        6,
        0,
    ),
    (layers.EmbeddingStage, {"pooling": "avg"}, (2, 4, 4, 6), (2, 6), 0, 0),
    (layers.EmbeddingStage, {"pooling": "max", "units": 5}, (2, 7, 6), (2, 5), 2, 0),
    (
        layers.EmbeddingStage,
        {"pooling": "flatten", "normalize": "l2"},
        (2, 3, 3, 2),
        (2, 18),
        0,
        0,
    ),
    (
        layers.EmbeddingStage,
        {"pooling": None, "units": 3, "activation": "relu"},
        (2, 6),
        (2, 3),
        2,
        0,
    ),
    (layers.OutputStage, {"units": 3}, (2, 6), (2, 3), 2, 0),
    (
        layers.OutputStage,
        {"units": 1, "activation": "sigmoid", "dropout": 0.2},
        (2, 6),
        (2, 1),
        2,
        0,
    ),
    (
        layers.OutputStage,
        {"units": 2, "activation": None, "use_bias": False},
        (2, 6),
        (2, 2),
        1,
        0,
    ),
]


class ConformanceTest(testing.TestCase):
    pass


@pytest.mark.parametrize(
    "cls, kwargs, in_shape, out_shape, trainable, non_trainable",
    CASES,
    ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)],
)
def test_run_layer_test(cls, kwargs, in_shape, out_shape, trainable, non_trainable):
    case = ConformanceTest()
    case.run_layer_test(
        cls,
        init_kwargs=kwargs,
        input_shape=in_shape,
        expected_output_shape=out_shape,
        expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=non_trainable,
        expected_num_seed_generators=1 if kwargs.get("dropout") else 0,
        supports_masking=cls is layers.MicroTune or None,
    )
