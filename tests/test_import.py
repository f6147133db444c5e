import subprocess
import sys

LAZY = ("ai_edge_litert", "tflite_micro", "ethosu")


def test_import_is_lazy_about_runtimes():
    code = (
        "import sys, keras_microtune as kmt;"
        f"print([m for m in {LAZY!r} if any(k == m or k.startswith(m + '.') "
        "for k in sys.modules)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"


def test_public_names():
    import keras_microtune as kmt

    for name in ("FeatureStage", "EmbeddingStage", "MicroTune", "OutputStage"):
        assert getattr(kmt, name) is getattr(kmt.layers, name)
    assert callable(kmt.attach)
