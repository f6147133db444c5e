"""The README's quickstart runs as written (with fewer epochs)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs(tmp_path, monkeypatch):
    text = README.read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    assert "kmt.convert" in code and "kmt.attach" in code
    assert len(code.strip().splitlines()) <= 25
    code = re.sub(r"epochs=\d+", "epochs=1", code)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    result = namespace["result"]
    assert result.fits and result.report["verified"]
    assert (tmp_path / "build" / "my_model" / "main.cc").exists()
