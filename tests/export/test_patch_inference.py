"""convert(patch_inference=...): the first stage run patch by patch, checked in
the real TFLite Micro and LiteRT interpreters against the unpatched model."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.export import _tflite, patch_inference, patching, runtimes, targets

SPEC = {"until": "pool", "grid": (2, 2)}
# RAM between the patched and the unpatched arena of the model below (measured
# in TFLite Micro: about 30 KB patched, 52 KB plain).
SMALL_RAM = targets.Target(
    "patch-test", "tiny-CNN test part", "tflm", "int8", "int8", ram_bytes=42_000
)


def tiny_cnn():
    """32x32 CNN: conv + BN + ReLU, a residual depthwise block, pooling, conv."""
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = keras.layers.ReLU(6.0, name="r2")(y)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Conv2D(
        8, 3, strides=2, padding="same", activation="relu", name="c3"
    )(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, keras.layers.Dense(4, name="head")(x), name="tiny_cnn")


@pytest.fixture(scope="module")
def cnn():
    keras.utils.set_random_seed(0)
    model = tiny_cnn()
    x = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype("float32")
    model(x, training=True)  # BatchNorm statistics with realistic ranges.
    return model, x


@pytest.fixture(scope="module")
def plain(cnn):
    model, x = cnn
    return kmt.convert(model, SMALL_RAM, representative_data=x, verbose=0)


@pytest.fixture(scope="module")
def patched(cnn):
    model, x = cnn
    return kmt.convert(
        model, SMALL_RAM, representative_data=x, verbose=0, patch_inference=SPEC
    )


@pytest.fixture(scope="module")
def float_tflite(cnn):
    """The float32 flatbuffer, names kept (float targets are not stripped)."""
    model, x = cnn
    return kmt.convert(model, "float32", representative_data=x, verbose=0).tflite


def _int8_inputs(n=3):
    return [np.random.default_rng(1).integers(-128, 128, (n, 32, 32, 3)).astype("int8")]


def test_patched_int8_outputs_equal_unpatched_in_tflite_micro(plain, patched):
    xs = _int8_inputs()
    want = runtimes.tflm_run(plain.tflite, xs, plain.arena_bytes)
    got = runtimes.tflm_run(patched.tflite, xs, patched.arena_bytes)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(
        runtimes.litert_run(patched.tflite, xs)[0],
        runtimes.litert_run(plain.tflite, xs)[0],
    )
    assert patched.report["verified"]
    assert {"STRIDED_SLICE", "CONCATENATION"} <= set(patched.ops)


def test_quantization_parameters_are_the_unpatched_ones(plain, patched):
    def activation_quant(tflite):
        sub = _tflite._schema().Model.GetRootAs(tflite, 0).Subgraphs(0)
        info = _tflite.parse(tflite)
        out = set()
        for t in range(sub.TensorsLength()):
            q = sub.Tensors(t).Quantization()
            if not info.tensors[t].constant and q is not None and q.ScaleLength():
                out.add((round(float(q.Scale(0)), 12), int(q.ZeroPoint(0))))
        return out

    # Patches calibrated on their own would have their own (smaller) ranges.
    assert activation_quant(patched.tflite) == activation_quant(plain.tflite)


def test_report_measures_arena_macs_and_time(plain, patched):
    rep = patched.report["patch_inference"]
    assert rep["applied"] and rep["until"] == "pool" and rep["grid"] == [2, 2]
    assert rep["arena_bytes_before"] == plain.arena_bytes
    assert rep["arena_bytes_after"] < rep["arena_bytes_before"]
    assert patched.arena_bytes <= rep["arena_bytes_after"]  # Memory plan on top.
    info = _tflite.parse(patched.tflite)
    assert rep["macs_after"] == patching.macs(info)
    assert rep["macs_before"] == patching.macs(_tflite.parse(plain.tflite))
    assert (
        0
        < rep["mac_overhead"]
        == pytest.approx(rep["macs_after"] / rep["macs_before"] - 1, abs=1e-4)
    )
    assert rep["invoke_time_ratio"] > 0
    assert len(rep["live_bytes_before"]) == len(_tflite.parse(plain.tflite).op_sequence)
    # The model only fits the part's RAM with patching, and says so.
    assert not plain.fits and patched.fits


def test_one_allocation_gives_the_arena_and_bounds_it_from_below(plain, patched):
    """`tflm_allocations` is the arena the bisection finds (TFLite Micro's
    recording allocator), and `lower_bound`, which "auto" prunes with, is
    never above it."""
    models = [plain.tflite, patched.tflite, b"not a model"]
    first, second, bad = runtimes.tflm_allocations(models, 1 << 20)
    assert bad is None
    assert first["total_bytes"] == plain.arena_bytes
    assert second["total_bytes"] == patched.arena_bytes
    assert first["total_bytes"] == first["head_bytes"] + first["tail_bytes"]
    assert second["nodes_count"] > first["nodes_count"]  # One per copied op.
    floor = patch_inference.lower_bound(
        _tflite.parse(plain.tflite), _tflite.parse(patched.tflite), first
    )
    assert first["tail_bytes"] < floor <= second["total_bytes"]


def test_patches_run_one_after_another(patched):
    """Each patch's tensors die before the next patch starts: the peak of live
    activations is below the unpatched model's."""
    info = _tflite.parse(patched.tflite)
    concats = [
        k for k, (n, _, _) in enumerate(info.op_sequence) if n == "CONCATENATION"
    ]
    slices = [k for k, (n, _, _) in enumerate(info.op_sequence) if n == "STRIDED_SLICE"]
    first_ops = [k for k in slices if info.op_sequence[k][1][0] == info.inputs[0]]
    assert len(first_ops) == 4  # One slice of the input per patch, spread out.
    assert first_ops == sorted(first_ops) and first_ops[-1] > first_ops[0] + 3
    assert max(first_ops) < min(concats[-1:])
    before = patched.report["patch_inference"]["live_bytes_before"]
    assert _tflite.activation_lower_bound(info) < max(before)


def test_float_rewrite_outputs_equal_exactly(cnn, float_tflite):
    model, x = cnn
    info = _tflite.parse(float_tflite)
    names = [layer.name for layer in model.layers]
    split = patch_inference.find_split(info, "pool", names)
    data = patching.rewrite(float_tflite, patching.stage(info, split), (3, 2))
    for reference in (True, False):
        np.testing.assert_array_equal(
            runtimes.litert_run(data, [x[:4]], reference=reference)[0],
            runtimes.litert_run(float_tflite, [x[:4]], reference=reference)[0],
        )


@pytest.mark.slow
def test_compression_and_patching(cnn, plain):
    model, x = cnn
    clustered = kmt.optimize.strip_clustering(
        kmt.optimize.cluster_weights(model, number_of_clusters=8)
    )
    result = kmt.convert(
        clustered,
        "mcu",
        representative_data=x,
        verbose=0,
        compression="lut3",
        patch_inference=SPEC,
    )
    assert result.report["patch_inference"]["applied"]
    assert result.report["compression"]["tensors"]
    assert result.report["verified"]


def test_unsupported_layer_is_named(cnn, float_tflite):
    model, _ = cnn
    info = _tflite.parse(float_tflite)
    names = [layer.name for layer in model.layers]
    describe = patch_inference.describe_ops(info, names)
    split = patch_inference.find_split(info, "gap", names)
    with pytest.raises(patching.PatchError, match=r"layer 'gap'.*MEAN.*not support"):
        patching.stage(info, split, describe)
    inside = patch_inference.find_split(info, "r2", names)
    with pytest.raises(patching.PatchError, match="skip connection crosses"):
        patching.stage(info, inside, describe)
    with pytest.raises(ValueError, match="has no layer 'nope'"):
        patch_inference.find_split(info, "nope", names)


@pytest.mark.parametrize(
    "value, match",
    [
        ("yes", "invalid value for `patch_inference`"),
        ({"until": "pool", "grid": (1, 1)}, "grid"),
        ({"until": "pool", "grid": (2, 0)}, "grid"),
        ({"until": "pool", "tile": 2}, "invalid value for `patch_inference`"),
        ({"until": "pool", "max_mac_overhead": -1}, "max_mac_overhead"),
    ],
)
def test_bad_option_fails_before_converting(cnn, value, match, tmp_path):
    model, x = cnn
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        kmt.convert(
            model, "mcu", representative_data=x, output_dir=out, patch_inference=value
        )
    assert not out.exists()


def test_non_mcu_target_refused(cnn):
    model, x = cnn
    with pytest.raises(ValueError, match="for TFLite Micro targets"):
        kmt.convert(model, "float32", representative_data=x, patch_inference="auto")


def test_auto_does_nothing_without_a_stage():
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8)])
    x = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    result = kmt.convert(
        model, "mcu", representative_data=x, verbose=0, patch_inference="auto"
    )
    rep = result.report["patch_inference"]
    assert rep["applied"] is False and "no split" in rep["reason"]
    assert rep["arena_bytes_before"] == result.arena_bytes
    assert "STRIDED_SLICE" not in result.ops


@pytest.mark.slow
def test_auto_picks_the_smallest_measured_arena(cnn, plain):
    model, x = cnn
    result = kmt.convert(
        model, "mcu", representative_data=x, verbose=0, patch_inference="auto"
    )
    rep = result.report["patch_inference"]
    assert rep["applied"]
    measured = [c["arena_bytes"] for c in rep["candidates"]]
    assert rep["arena_bytes_after"] == min(measured) < plain.arena_bytes
    assert all(c["mac_overhead"] <= 0.2 for c in rep["candidates"])
    xs = _int8_inputs()
    np.testing.assert_array_equal(
        runtimes.tflm_run(result.tflite, xs, result.arena_bytes)[0],
        runtimes.tflm_run(plain.tflite, xs, plain.arena_bytes)[0],
    )


def test_save_writes_the_before_after_memory_plot(patched, tmp_path):
    pytest.importorskip("matplotlib")
    patched.save(tmp_path / "out")
    png = (tmp_path / "out" / "memory_patching.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "out" / "report.md").read_text()
    assert "patch inference" in text and "TFLite Micro tail" in text


@pytest.mark.slow
@pytest.mark.parametrize("option", [SPEC, "auto"], ids=["spec", "auto"])
def test_device_budget_reports_fitting_with_patches(cnn, plain, option):
    trained, x = cnn
    model = keras.models.clone_model(trained)  # The fixture's weights stay as
    model.set_weights(trained.get_weights())  # `plain` was converted from.
    model.compile("adam", keras.losses.MeanSquaredError())
    budget = kmt.callbacks.DeviceBudget(SMALL_RAM, x, patch_inference=option)
    history = model.fit(
        x, np.zeros((len(x), 4)), epochs=1, verbose=0, callbacks=[budget]
    )
    assert not plain.fits  # Without patches the arena is over the part's RAM.
    assert history.history["fits_target"] == [1.0]
    assert history.history["arena_bytes"][0] <= SMALL_RAM.ram_bytes
    assert budget.result.report["patch_inference"]["applied"]


@pytest.mark.slow
def test_mobilenet_v2_035_96_auto():
    """The issue's benchmark model: MobileNetV2(0.35) 96x96, weights=None, on
    a 192 KiB part it fits only with patches."""
    from benchmarks import zoo

    part = targets.Target("part-192k", "192 KiB part", "tflm", "int8", "int8", 196_608)
    model, x = zoo.build("mobilenet_v2_0.35")
    plain = kmt.convert(model, part, representative_data=x, verbose=0)
    ours = kmt.convert(
        model, part, representative_data=x, verbose=0, patch_inference="auto"
    )
    rep = ours.report["patch_inference"]
    assert rep["applied"] and rep["mac_overhead"] <= 0.2
    assert rep["arena_bytes_before"] == plain.arena_bytes
    assert not plain.fits and ours.fits
    # Measured 2026-12-02: 210,272 -> 155,712 B (block_1_project_BN, 2x4).
    # TFLite Micro's 72 KB tail (56 KB of it per-channel multipliers and
    # shifts) is not patchable and grows with each copied op.
    assert ours.arena_bytes < 0.8 * plain.arena_bytes
    assert rep["arena_parts_after"]["tail_bytes"] > plain.arena_bytes * 0.34
    head_before = plain.report["memory"]["head_bytes"]
    assert ours.report["memory"]["head_bytes"] < 0.55 * head_before
    q = [np.random.default_rng(0).integers(-128, 128, (2, 96, 96, 3)).astype("int8")]
    np.testing.assert_array_equal(
        runtimes.tflm_run(ours.tflite, q, ours.arena_bytes)[0],
        runtimes.tflm_run(plain.tflite, q, plain.arena_bytes)[0],
    )


def test_convert_names_the_unsupported_layer_before_writing(cnn, tmp_path):
    model, x = cnn
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"layer 'gap' .*MEAN.*End the stage"):
        kmt.convert(
            model,
            "mcu",
            representative_data=x,
            output_dir=out,
            verbose=0,
            patch_inference={"until": "gap", "grid": (2, 2)},
        )
    assert not out.exists()


def test_until_names_a_layer_of_a_nested_model(cnn, plain):
    model, x = cnn
    inp = keras.Input((32, 32, 3))
    outer = keras.Model(inp, keras.layers.Activation("linear")(model(inp)))
    result = kmt.convert(
        outer, "mcu", representative_data=x, verbose=0, patch_inference=SPEC
    )
    assert result.report["patch_inference"]["until"] == "pool"
    xs = _int8_inputs()
    np.testing.assert_array_equal(
        runtimes.tflm_run(result.tflite, xs, result.arena_bytes)[0],
        runtimes.tflm_run(plain.tflite, xs, plain.arena_bytes)[0],
    )
