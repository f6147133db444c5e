"""convert() as a pass pipeline: the pass records, one parse per flatbuffer."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.export import _tflite, converter, pipeline

MCU_PASSES = [
    "load",
    "strip_pruning",
    "plan_preprocessing",
    "trace",
    "detect_qat",
    "data_to_arrays",
    "convert_to_tflite",
    "check_mcu_ops",
    "check_softmax_scale",
    "check_full_int8",
    "layer_errors",
    "strip",
    "memory_plan",
    "arena",
    "parity",
    "budget",
    "describe",
    "verify",
]
MCU_ONLY = {"check_mcu_ops", "check_softmax_scale", "strip", "memory_plan", "arena"}
MCU_ONLY |= {"check_full_int8", "layer_errors"}  # layer_errors: int8 targets.


@pytest.fixture
def parses(monkeypatch):
    """Every flatbuffer `_tflite.parse` is called on during the test, as bytes."""
    seen = []
    real = _tflite.parse

    def counting(data):
        seen.append(bytes(data))
        return real(data)

    monkeypatch.setattr(_tflite, "parse", counting)
    return seen


def _lut_model():
    """A model whose Dense kernel holds 4 values per output channel (lut2 fits)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(4),
        ]
    )
    kernel, bias = model.layers[0].get_weights()
    values = np.array([-0.3, -0.1, 0.1, 0.3], "float32")
    kernel = values[np.random.default_rng(0).integers(0, 4, kernel.shape)]
    model.layers[0].set_weights([kernel, bias])
    return model


def test_each_distinct_flatbuffer_is_parsed_once(trained, parses, tmp_path):
    model, x, y = trained["conv1d"]
    result = kmt.convert(
        model,
        "mcu",
        representative_data=x[:32],
        validation_data=(x, y),
        output_dir=tmp_path / "out",
        verbose=0,
    )
    # Converted and stripped models at least; saving re-parses nothing.
    assert len(set(parses)) >= 2
    assert len(parses) == len(set(parses))
    assert bytes(result.tflite) in parses
    assert (tmp_path / "out" / "test_data.h").is_file()


def test_compressed_conversion_parses_each_flatbuffer_once(parses):
    model = _lut_model()
    x = np.random.default_rng(1).normal(size=(32, 64)).astype("float32")
    result = kmt.convert(
        model, "mcu", representative_data=x, compression="auto", verbose=0
    )
    assert result.report["compression"]["tensors"], result.report["compression"]
    # Converted, stripped and compressed (plus a planned one if tried).
    assert len(set(parses)) >= 3
    assert len(parses) == len(set(parses))
    names = [p["name"] for p in result.report["passes"]]
    assert names.index("strip") < names.index("compress") < names.index("memory_plan")
    compress = result.report["passes"][names.index("compress")]
    assert compress["bytes_after"] < compress["bytes_before"]
    assert compress["bytes_after"] == result.report["compression"]["size_bytes_after"]


def test_passes_report_in_order(mcu_results):
    result = mcu_results["ds_cnn"]
    passes = result.report["passes"]
    assert [p["name"] for p in passes] == MCU_PASSES
    # Wall times beside the report, which stays reproducible (no timings).
    assert list(result.timings) == MCU_PASSES
    assert all(seconds >= 0 for seconds in result.timings.values())
    assert result.timings["parity"] > 0
    by_name = {p["name"]: p for p in passes}
    strip = by_name["strip"]
    assert strip["bytes_before"] > strip["bytes_after"]
    assert (
        strip["bytes_before"] - strip["bytes_after"]
        == result.report["stripped_bytes_saved"]
    )
    assert "bytes_before" not in by_name["convert_to_tflite"]
    assert by_name["convert_to_tflite"]["bytes_after"] == strip["bytes_before"]
    rewrites = [p for p in passes if "bytes_after" in p]
    assert rewrites[-1]["bytes_after"] == result.size_bytes
    assert (
        by_name["memory_plan"]["offline_plan"]
        == (result.report["memory"]["offline_plan"])
    )
    assert by_name["arena"]["arena_bytes"] == result.arena_bytes
    assert by_name["strip_pruning"] == {
        "name": "strip_pruning",
        "pruning_wrappers_stripped": False,
    }
    md = result.files()["report.md"].decode()
    assert "## Passes" in md
    before, after = strip["bytes_before"], strip["bytes_after"]
    assert f"| strip | flatbuffer: {before:,} B -> {after:,} B |" in md


def test_mobile_target_skips_flatbuffer_passes(trained):
    model, x, _ = trained["conv1d"]
    result = kmt.convert(model, "mobile-float16", representative_data=x[:8], verbose=0)
    names = [p["name"] for p in result.report["passes"]]
    assert names == [n for n in MCU_PASSES if n not in MCU_ONLY]
    assert result.report["stripped_bytes_saved"] == 0
    assert list(result.timings) == names


def test_a_new_pass_is_one_function_and_one_list_entry(trained, monkeypatch):
    model, x, _ = trained["conv1d"]

    def count_ops(c):
        return {"ops": len(c.info.op_sequence)}

    at = converter.PASSES.index(converter.flatbuffer.strip) + 1
    passes = (*converter.PASSES[:at], count_ops, *converter.PASSES[at:])
    monkeypatch.setattr(converter, "PASSES", passes)
    result = kmt.convert(model, "mcu", representative_data=x[:16], verbose=0)
    names = [p["name"] for p in result.report["passes"]]
    assert names.index("count_ops") == names.index("strip") + 1
    record = result.report["passes"][names.index("count_ops")]
    assert record["ops"] == len(_tflite.parse(result.tflite).op_sequence)
    assert "bytes_after" not in record  # It did not rewrite the flatbuffer.


def test_conversion_caches_info_until_the_bytes_change(mcu_results, parses):
    a, b = mcu_results["ds_cnn"].tflite, mcu_results["conv1d"].tflite
    c = pipeline.Conversion(model=None, target=kmt.targets.get("mcu"))
    c.tflite = a
    info = c.info
    assert c.info is info and len(parses) == 1
    c.tflite = a  # The same bytes: still cached.
    assert c.info is info and len(parses) == 1
    c.tflite = b
    assert c.info.size_bytes == len(b) and len(parses) == 2
    parsed = _tflite.parse(a)
    c.set_tflite(a, parsed)
    assert c.info is parsed and len(parses) == 3
