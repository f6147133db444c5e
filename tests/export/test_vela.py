"""ethos-u55: Vela compiles the model and its figures reach the report."""

import pytest

import keras_microtune as kmt
from keras_microtune.export import vela


def test_ethos_u55_reports_vela_figures(trained):
    pytest.importorskip("ethosu")
    model, x, _ = trained["ds_cnn"]
    result = kmt.convert(model, "ethos-u55", representative_data=x[:16], verbose=0)
    v = result.report["vela"]
    assert v["accelerator"] == "ethos-u55-128"
    assert v["npu_ops"] > 0 and v["cpu_ops"] == 0
    assert v["sram_bytes"] > 0 and v["flash_bytes"] > 0 and v["cycles"] > 0
    assert v["inferences_per_second"] > 0
    assert result.report["budget"]["ram_used_bytes"] == v["sram_bytes"]
    assert result.parity["tflm_matches_litert"]


def test_missing_vela_names_the_extra(monkeypatch):
    monkeypatch.setattr(vela.os.path, "isfile", lambda p: False)
    monkeypatch.setattr(vela.shutil, "which", lambda name: None)
    with pytest.raises(vela.VelaNotInstalledError, match=r"keras_microtune\[vela\]"):
        vela.compile_model(b"TFL3")
