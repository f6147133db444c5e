"""save(): test vector, application template, plots and mobile notes."""

import subprocess

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.export import artifacts, runtimes


@pytest.fixture(scope="module")
def small_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            kmt.layers.FeatureStage([8], pooling="max"),
            kmt.layers.EmbeddingStage("avg"),
            kmt.layers.OutputStage(3),
        ]
    )
    x = np.random.default_rng(0).uniform(size=(16, 8, 8, 1)).astype("float32")
    return model, x


def test_test_vector_is_what_tflm_computes(small_model, tmp_path):
    model, x = small_model
    result = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    history = {"loss": [1.0, 0.5], "accuracy": [0.5, 0.8], "learning_rate": [0.1, 0.05]}
    evaluations = {
        "float": {"confusion_matrix": [[2, 0], [1, 3]]},
        "int8 (TFLM)": {"confusion_matrix": [[2, 0], [0, 4]]},
    }
    out = result.save(
        tmp_path / "p", history=history, evaluations=evaluations, project=True
    )
    names = {p.name for p in (tmp_path / "p").iterdir()}
    assert {
        "test_data.h",
        "main.cc",
        "Makefile",
        "README.md",
        "memory.png",
        "flash.png",
        "training.png",
        "confusion.png",
    } <= names
    for png in ("memory.png", "flash.png", "training.png", "confusion.png"):
        assert (tmp_path / "p" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "p" / "report.md").read_text()
    assert "![memory](memory.png)" in report
    # The header's arrays are the seeded input and TFLM's output for it.
    data_in, data_out = artifacts.test_vector(result.tflite, result.arena_bytes)
    header = (tmp_path / "p" / "test_data.h").read_text()
    assert f"kTestInputLen = {len(data_in)};" in header
    assert f"kExpectedOutputLen = {len(data_out)};" in header
    ins, _ = runtimes.io_details(result.tflite)
    q = np.frombuffer(data_in, np.int8).reshape(ins[0]["shape"])
    ref = runtimes.litert_run(result.tflite, [q], reference=True)[0]
    assert ref.tobytes() == data_out
    # test_data.h compiles and holds exactly those bytes.
    harness = tmp_path / "check.cc"
    harness.write_text(
        '#include <cstdio>\n#include "test_data.h"\nint main() {\n'
        "  for (unsigned i = 0; i < kmt::kExpectedOutputLen; ++i)\n"
        '    std::printf("%d ", kmt::kExpectedOutput[i]);\n}\n'
    )
    exe = tmp_path / "check"
    subprocess.run(
        ["g++", "-Wall", "-Werror", "-I", out, str(harness), "-o", str(exe)], check=True
    )
    printed = subprocess.run([str(exe)], capture_output=True, text=True).stdout.split()
    assert [int(v) for v in printed] == np.frombuffer(data_out, np.int8).tolist()


def test_flash_rows_add_up_to_the_file(small_model):
    model, x = small_model
    result = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    rows = artifacts.flash_rows(result.tflite)
    total = sum(sum(parts.values()) for _, parts in rows)
    assert total == result.size_bytes
    assert any("CONV_2D" in name and parts.get("weights") for name, parts in rows)


def test_mobile_notes_carry_real_io(small_model, tmp_path):
    model, x = small_model
    result = kmt.convert(model, "mobile-int8", representative_data=x, verbose=0)
    result.save(tmp_path / "m")
    notes = (tmp_path / "m" / "mobile.md").read_text()
    assert "`float32` [1x8x8x1]" in notes
    assert not (tmp_path / "m" / "test_data.h").exists()
