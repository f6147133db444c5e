"""Every example and the demo run end to end in their quick mode, so they cannot rot."""

import importlib.util
import json
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name, monkeypatch):
    monkeypatch.setenv("KMT_EXAMPLE_QUICK", "1")
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.QUICK
    return module


@pytest.mark.parametrize("name", ["digits_microtune", "activity_recognition"])
def test_mcu_examples_end_in_a_verified_tflm_model(name, monkeypatch, tmp_path):
    result, int8 = _load(name, monkeypatch).main(str(tmp_path / name))
    assert result.fits and result.report["verified"]
    assert 0.0 <= int8["accuracy"] <= 1.0 and int8["runtime"] == "tflm"
    files = {p.name for p in (tmp_path / name).iterdir()}
    assert {"model.tflite", "model_data.cc", "op_resolver.h", "main.cc"} <= files


@pytest.mark.slow
def test_tiny_transformer_example_is_full_int8(monkeypatch, tmp_path):
    result, int8 = _load("tiny_transformer", monkeypatch).main(str(tmp_path / "t"))
    # TFLite Micro and LiteRT's reference kernels end a few int8 steps apart
    # after the LayerNorms; verified kernel by kernel (`kernel_parity`).
    assert result.fits and int8["runtime"] == "tflm"
    assert result.report["verified"], result.parity
    assert result.parity.get("tflm_reference") in (None, "kernels")
    assert result.parity["cosine"] > 0.99
    assert "BATCH_MATMUL" in result.ops and "DEQUANTIZE" not in result.ops
    assert "AddBatchMatMul()" in (tmp_path / "t" / "op_resolver.h").read_text()


def test_tf_keras_example(monkeypatch, tmp_path):
    result, metrics = _load("tf_keras_tfmot", monkeypatch).main(str(tmp_path / "t"))
    assert result.report["conversion"]["quantization_aware_training"]
    assert metrics["samples"] > 0 and (tmp_path / "t" / "model.tflite").exists()


@pytest.mark.slow
def test_mobile_example(monkeypatch, tmp_path):
    rows = _load("mobile_float16", monkeypatch).main(str(tmp_path))
    sizes = {target: size for target, size, _, _ in rows}
    assert sizes["mobile-int8"] < sizes["mobile-float16"] < sizes["float32"]


def test_demo_quick(tmp_path, capsys):
    from keras_microtune import cli

    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "int8 accuracy (TFLite Micro)" in printed and "5/5" in printed
    figures = json.loads((out / "demo.json").read_text())
    assert figures["fits"] and figures["arena_bytes"] > 0
    assert figures["trainable_parameters"] < figures["total_parameters"]
    assert {"training.png", "confusion.png", "test_data.h"} <= {
        p.name for p in out.iterdir()
    }
