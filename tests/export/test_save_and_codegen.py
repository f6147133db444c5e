"""ConversionResult.save(): atomic writes, C sources that compile, safe strings."""

import builtins
import json
import subprocess

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.export import codegen

HARNESS = r"""
#include <cstdint>
#include <cstdio>
#include <cstring>
#include "model_data.h"
int main(int argc, char** argv) {
  FILE* f = std::fopen(argv[1], "rb");
  static unsigned char buf[1 << 22];
  size_t n = std::fread(buf, 1, sizeof(buf), f);
  std::fclose(f);
  if (n != g_model_data_len || n != kModelDataLen) return 2;
  if (reinterpret_cast<std::uintptr_t>(g_model_data) % 16 != 0) return 3;
  if (kTensorArenaSize < kTensorArenaMeasuredSize) return 4;
  std::printf("%s\n", g_model_name);
  return std::memcmp(buf, g_model_data, n) == 0 ? 0 : 1;
}
"""


def _compile_and_run(folder, tmp_path, cpp_compile):
    main = tmp_path / "harness.cc"
    main.write_text(HARNESS)
    exe = cpp_compile(
        [main, folder / "model_data.cc"], tmp_path / "harness", f"-I{folder}"
    )
    return subprocess.run(
        [str(exe), str(folder / "model.tflite")], capture_output=True, text=True
    )


def test_save_writes_all_files_and_c_array_matches(mcu_results, tmp_path, cpp_compile):
    result = mcu_results["ds_cnn"]
    out = tmp_path / "out"
    assert result.save(out) == str(out.resolve())
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "flash.png",
        "layer_errors.png",
        "memory.png",
        "model.tflite",
        "model_data.cc",
        "model_data.h",
        "op_resolver.h",
        "report.json",
        "report.md",
        "test_data.h",
    ]
    assert (out / "model.tflite").read_bytes() == result.tflite
    run = _compile_and_run(out, tmp_path, cpp_compile)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ds_cnn"
    header = (out / "model_data.h").read_text()
    assert f"kTensorArenaSize = {codegen.arena_size(result.arena_bytes)};" in header
    resolver = (out / "op_resolver.h").read_text()
    adds = [
        ln.split("resolver.")[1].split("(")[0]
        for ln in resolver.splitlines()
        if "resolver.Add" in ln
    ]
    assert adds == [codegen.resolver_method(op) for op in result.ops]
    assert "MicroMutableOpResolver<kNumOps>" in resolver
    assert f"kNumOps = {len(result.ops)};" in resolver
    report = json.loads((out / "report.json").read_text())
    assert report["memory"]["arena_bytes"] == result.arena_bytes
    assert (
        "Tensor arena" in (out / "report.md").read_text()
        or "arena" in (out / "report.md").read_text()
    )


def test_resolver_method_names():
    assert codegen.resolver_method("CONV_2D") == "AddConv2D"
    assert codegen.resolver_method("DEPTHWISE_CONV_2D") == "AddDepthwiseConv2D"
    assert codegen.resolver_method("FULLY_CONNECTED") == "AddFullyConnected"
    assert codegen.resolver_method("L2_NORMALIZATION") == "AddL2Normalization"
    assert codegen.resolver_method("MAX_POOL_2D") == "AddMaxPool2D"
    # A transformer's attention (tests/export/test_lowering.py) needs these.
    assert codegen.resolver_method("BATCH_MATMUL") == "AddBatchMatMul"
    assert codegen.resolver_method("CUMSUM") == "AddCumSum"
    assert codegen.resolver_method("PADV2") == "AddPadV2"


def test_hostile_model_name_cannot_inject(mcu_results, tmp_path, cpp_compile):
    result = mcu_results["conv1d"]
    evil = 'x*/ #include "evil.h" //\n"q\\é'
    hostile = type(result)(tflite=result.tflite, report=result.report, name=evil)
    out = tmp_path / "evil"
    hostile.save(out)
    for name in ("model_data.cc", "model_data.h"):
        text = (out / name).read_text()
        assert 'evil.h"' not in text and "*/" not in text
        assert all(not ln.startswith('#include "evil') for ln in text.splitlines())
    run = _compile_and_run(out, tmp_path, cpp_compile)
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip("\n") == evil


def test_hostile_name_on_a_real_model_converts_and_cannot_inject(tmp_path, cpp_compile):
    """Issue 18: the name reaches TensorFlow's name scopes (sanitized there) and
    the generated sources (escaped there), from one convert call. Keras refuses
    "/" in names (so no "*/"); quotes, newlines and "#include" it accepts."""
    keras.utils.set_random_seed(0)
    evil = 'x* #include "evil.h" \\\n#define Y "q\\é'
    layer = 'q"\n#include <x>'
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(3, name=layer)], name=evil
    )
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    out = tmp_path / "evil"
    result = kmt.convert(model, "mcu", x, output_dir=out, verbose=0)
    assert result.name == model.name == evil and model.layers[0].name == layer
    for name in ("model_data.cc", "model_data.h", "op_resolver.h"):
        text = (out / name).read_text()
        assert 'evil.h"' not in text and "<x>" not in text
        for line in text.splitlines():
            assert not line.lstrip().startswith("#define Y"), (name, line)
            assert "evil" not in line or not line.lstrip().startswith("#")
    run = _compile_and_run(out, tmp_path, cpp_compile)
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip("\n") == evil


def test_save_refuses_non_empty_folder_and_overwrites_on_request(mcu_results, tmp_path):
    result = mcu_results["conv1d"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        result.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    result.save(out, overwrite=True)
    assert (out / "model.tflite").read_bytes() == result.tflite
    assert not (out / "keep.txt").exists()


@pytest.mark.parametrize("fail_at", [1, 3, 6])
def test_failure_part_way_leaves_destination_unchanged(
    mcu_results, tmp_path, monkeypatch, fail_at
):
    result = mcu_results["conv1d"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    real_open, calls = builtins.open, []

    def flaky_open(path, mode="r", *args, **kwargs):
        if "w" in mode:
            calls.append(path)
            if len(calls) == fail_at:
                raise KeyboardInterrupt
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", flaky_open)
    with pytest.raises(KeyboardInterrupt):
        result.save(out, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
