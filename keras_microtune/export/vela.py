"""Compile an int8 model for an Arm Ethos-U NPU with Vela and read its summary."""

from __future__ import annotations

import csv
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

INSTALL_HINT = "pip install keras_microtune[vela]"


class VelaNotInstalledError(ImportError):
    """Arm Vela (`ethos-u-vela`) is not installed."""


def vela_executable() -> str:
    """Path of the `vela` command; raises `VelaNotInstalledError` if missing."""
    candidate = os.path.join(os.path.dirname(sys.executable), "vela")
    found = candidate if os.path.isfile(candidate) else shutil.which("vela")
    if not found:
        raise VelaNotInstalledError(
            "The ethos-u55 target compiles with Arm Vela, which is not installed. "
            f"Install it with `{INSTALL_HINT}`."
        )
    return found


def compile_model(
    tflite: bytes, accelerator: str = "ethos-u55-128", timeout=600
) -> dict:
    """Run Vela on `tflite` and return its figures.

    Returns:
        dict with `accelerator`, `npu_ops`, `cpu_ops`, `sram_bytes`,
        `flash_bytes`, `cycles`, `inferences_per_second`, `macs`, and
        `tflite` (the Vela-compiled model bytes).
    """
    exe = vela_executable()
    with tempfile.TemporaryDirectory(prefix="kmt_vela_") as tmp:
        model = os.path.join(tmp, "model.tflite")
        with open(model, "wb") as f:
            f.write(tflite)
        out_dir = os.path.join(tmp, "out")
        proc = subprocess.run(
            [exe, model, "--accelerator-config", accelerator, "--output-dir", out_dir],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"Vela failed: {' '.join(tail)}")
        summaries = glob.glob(os.path.join(out_dir, "*_summary_*.csv"))
        if not summaries:
            raise RuntimeError("Vela wrote no summary CSV.")
        with open(summaries[0], newline="") as f:
            row = next(csv.DictReader(f))
        with open(os.path.join(out_dir, "model_vela.tflite"), "rb") as f:
            compiled = f.read()
    return {
        "accelerator": accelerator,
        **_op_split(proc.stdout),
        "sram_bytes": int(round(float(row["sram_memory_used"]) * 1024)),
        "flash_bytes": int(
            round(
                (
                    float(row["off_chip_flash_memory_used"])
                    + float(row["on_chip_flash_memory_used"])
                )
                * 1024
            )
        ),
        "cycles": int(float(row["cycles_total"])),
        "inferences_per_second": float(row["inferences_per_second"]),
        "macs": int(float(row["nn_macs"])),
        "tflite": compiled,
    }


def _op_split(stdout: str) -> dict:
    out = {}
    for kind in ("CPU", "NPU"):
        match = re.search(rf"{kind} operators = (\d+)", stdout)
        out[f"{kind.lower()}_ops"] = int(match.group(1)) if match else None
    return out
