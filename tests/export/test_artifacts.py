"""save(): test vector, application template, plots and mobile notes."""

import os
import re
import shutil
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


def _fake_tflm(root, *builds):
    """A TFLite Micro tree holding (empty) libraries for the named builds."""
    for build in builds:
        lib = root / "gen" / build / "lib" / "libtensorflow-microlite.a"
        lib.parent.mkdir(parents=True)
        lib.write_bytes(b"")
    return root


def _make_n(project, tflm, *args):
    return subprocess.run(
        ["make", "-n", "-C", str(project), f"TFLM_DIR={tflm}", *args, "app"],
        capture_output=True,
        text=True,
    )


@pytest.mark.skipif(
    shutil.which("make") is None or os.name != "posix", reason="needs GNU make"
)
def test_project_makefile_links_this_pcs_library_not_a_cortex_m_one(
    small_model, tmp_path
):
    """Issue 18: `firstword` of gen/*/lib took gen/cortex_m_generic_... first."""
    model, x = small_model
    result = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    project = tmp_path / "p"
    result.save(project, project=True)
    system, machine = os.uname().sysname, os.uname().machine
    machine = "x86_32" if re.fullmatch(r"i[3-8]86", machine) else machine
    host = {"Darwin": "osx"}.get(system, system.lower()) + "_" + machine
    cortex = "cortex_m_generic_cortex-m4+fp_default_gcc"
    both = _fake_tflm(tmp_path / "both", cortex, f"{host}_default_gcc")
    run = _make_n(project, both)
    assert run.returncode == 0, run.stderr
    assert f"gen/{host}_default_gcc/lib/libtensorflow-microlite.a" in run.stdout
    assert "cortex_m" not in run.stdout
    only_cortex = _fake_tflm(tmp_path / "cortex", cortex)
    run = _make_n(project, only_cortex)
    assert run.returncode != 0 and "g++" not in run.stdout
    assert f"no TFLite Micro library built for this PC ({host})" in run.stderr
    assert f"libraries found: {only_cortex}/gen/{cortex}/lib/" in run.stderr
    assert "TFLM_LIB=" in run.stderr
    run = _make_n(project, only_cortex, "TFLM_LIB=/opt/host/libtflm.a")
    assert run.returncode == 0 and " /opt/host/libtflm.a -o app" in run.stdout
    release = f"{host}_release_gcc"
    several = _fake_tflm(tmp_path / "several", release, f"{host}_debug_gcc")
    run = _make_n(project, several)
    assert run.returncode != 0 and "several TFLite Micro libraries" in run.stderr
    assert release in run.stderr and f"{host}_debug_gcc" in run.stderr
