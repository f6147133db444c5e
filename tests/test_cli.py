"""The keras-microtune command line: exit codes, one-line errors, JSON."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_microtune import cli


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.save(tmp / "m.keras")
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    np.savez(tmp / "calib.npz", x=x, y=np.zeros(32, "int32"))
    return tmp


def test_targets_table(capsys):
    assert cli.main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "cortex-m4" in out and "256 KiB" in out and "ethos-u55" in out


def test_convert_then_inspect(model_and_data, capsys):
    tmp = model_and_data
    out_dir = tmp / "out"
    code = cli.main(
        [
            "convert",
            str(tmp / "m.keras"),
            "--target",
            "cortex-m4",
            "--calibration",
            str(tmp / "calib.npz"),
            "--validation",
            str(tmp / "calib.npz"),
            "-o",
            str(out_dir),
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["budget"]["fits"] and report["verified"]
    assert (out_dir / "model_data.cc").exists()
    assert cli.main(["inspect", str(out_dir / "model.tflite")]) == 0
    assert "tensor arena (measured)" in capsys.readouterr().out
    tiny = cli.main(["inspect", str(out_dir / "model.tflite"), "--target", "mcu"])
    assert tiny == 0


def test_bad_input_exit_2_one_line(model_and_data, tmp_path, capsys):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"garbage")
    assert cli.main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TFL3" in err and "Traceback" not in err
    assert cli.main(["convert", str(model_and_data / "m.keras"), "-t", "nope"]) == 2
    assert "expected one of" in capsys.readouterr().err


def test_does_not_fit_exit_1(model_and_data, capsys, monkeypatch):
    from keras_microtune.export import targets

    tiny = targets.Target("cortex-m4", "tiny", "tflm", "int8", "int8", 16, 16)
    monkeypatch.setitem(targets._TARGETS, "cortex-m4", tiny)
    code = cli.main(
        [
            "convert",
            str(model_and_data / "m.keras"),
            "-t",
            "cortex-m4",
            "--calibration",
            str(model_and_data / "calib.npz"),
        ]
    )
    assert code == 1
    assert "NO: RAM" in capsys.readouterr().out


def test_entry_point_runs_as_module():
    proc = subprocess.run(
        [sys.executable, "-m", "keras_microtune.cli", "targets", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "mcu" in [t["name"] for t in json.loads(proc.stdout)]


def test_convert_with_patch_inference(tmp_path, capsys):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1"),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    model.save(tmp_path / "cnn.keras")
    x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype("float32")
    np.savez(tmp_path / "calib.npz", x=x)
    args = ["convert", str(tmp_path / "cnn.keras"), "--calibration"]
    args += [str(tmp_path / "calib.npz"), "--json", "--patch-inference", "pool:2x1"]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    patched = report["patch_inference"]
    assert patched["applied"] and patched["grid"] == [2, 1]
    assert patched["until"] == "pool" and report["verified"]
    assert {"STRIDED_SLICE", "CONCATENATION"} <= set(report["ops"])
    assert cli.patch_option("auto") == "auto"
    assert cli.patch_option("pool") == {"until": "pool", "grid": "auto"}
    with pytest.raises(SystemExit) as stop:
        cli.main(args[:-1] + ["pool:2by2"])
    assert stop.value.code == 2
    assert "LAYER:ROWSxCOLS" in capsys.readouterr().err
