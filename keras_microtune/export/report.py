"""The conversion report: budgets, parity and memory as a dict, Markdown and text."""

from __future__ import annotations

import dataclasses

from keras_microtune.export.targets import Target


def budget(target: Target, ram_used: int | None, flash_used: int) -> dict:
    """Compare the model's RAM and flash use with the target's budgets."""
    out = {
        "ram_bytes": target.ram_bytes,
        "flash_bytes": target.flash_bytes,
        "ram_used_bytes": ram_used,
        "flash_used_bytes": flash_used,
        "problems": [],
    }
    for kind, used, limit in (
        ("RAM", ram_used, target.ram_bytes),
        ("flash", flash_used, target.flash_bytes),
    ):
        if limit is None or used is None:
            continue
        if used > limit:
            out["problems"].append(
                f"{kind}: needs {used:,} bytes, {target.name} has {limit:,} "
                f"(over by {used - limit:,} bytes, {100 * (used - limit) / limit:.1f}%)"
            )
    out["fits"] = not out["problems"]
    return out


def build(
    *,
    target: Target,
    info,
    size_bytes: int,
    bytes_saved: int,
    arena: dict | None,
    lower_bound: int,
    parity: dict | None,
    vela: dict | None,
    conversion: dict,
    tensor_arena_size: int | None,
) -> dict:
    """Assemble the report dict (plain JSON types only)."""
    ram = vela["sram_bytes"] if vela else (arena or {}).get("arena_bytes")
    flash = vela["flash_bytes"] if vela else size_bytes
    op_counts = {}
    for name, _, _ in info.op_sequence:
        op_counts[name] = op_counts.get(name, 0) + 1
    memory = {"activation_lower_bound_bytes": lower_bound}
    if arena:
        memory.update(arena)
        memory["arena_over_lower_bound"] = (
            round(arena["arena_bytes"] / lower_bound, 3) if lower_bound else None
        )
        memory["tensor_arena_size"] = tensor_arena_size
    verified = bool(parity is None or parity.get("tflm_within_tolerance", True))
    return {
        "target": dataclasses.asdict(target),
        "conversion": conversion,
        "size_bytes": size_bytes,
        "stripped_bytes_saved": bytes_saved,
        "ops": sorted(op_counts),
        "op_counts": dict(sorted(op_counts.items())),
        "inputs": [_tensor(info.tensors[t]) for t in info.inputs],
        "outputs": [_tensor(info.tensors[t]) for t in info.outputs],
        "memory": memory,
        "parity": parity,
        "vela": {k: v for k, v in vela.items() if k != "tflite"} if vela else None,
        "budget": budget(target, ram, flash),
        "verified": verified,
    }


def _tensor(t) -> dict:
    return {"shape": list(t.shape), "dtype": t.dtype}


def _kib(n):
    return "-" if n is None else f"{n:,} B ({n / 1024:.1f} KiB)"


def rows(report: dict) -> list[tuple[str, str]]:
    """(label, value) rows for the summary table."""
    b, mem = report["budget"], report["memory"]
    out = [
        ("target", report["target"]["name"]),
        ("quantization", report["conversion"].get("quantization", "-")),
        ("size", _kib(report["size_bytes"])),
        ("stripped", f"{report['stripped_bytes_saved']:,} B saved"),
        ("ops", ", ".join(report["ops"])),
    ]
    if report.get("input"):  # What the device must feed (preprocessing).
        out.append(("device input", report["input"]["feed"]))
        entry = report["input"].get("metadata")
        if entry:
            out.append(
                (
                    "input metadata",
                    f"{entry['name']} version {entry['version']}"
                    + (
                        f", {entry['bytes']} B of JSON in the .tflite"
                        if "bytes" in entry
                        else ": not readable by this keras_microtune"
                    ),
                )
            )
    if "arena_bytes" in mem:
        out += [
            ("tensor arena (measured)", _kib(mem["arena_bytes"])),
            ("activation lower bound", _kib(mem["activation_lower_bound_bytes"])),
            ("arena / lower bound", str(mem["arena_over_lower_bound"])),
        ]
    if "offline_plan" in mem:
        plan = "no"
        if mem["offline_plan"]:
            plan = f"yes: arena without it {_kib(mem['arena_bytes_without_plan'])}"
        out.append(("offline memory plan", plan))
    if report["vela"]:
        v = report["vela"]
        out += [
            ("NPU / CPU ops", f"{v['npu_ops']} / {v['cpu_ops']}"),
            (
                "Vela SRAM / flash",
                f"{_kib(v['sram_bytes'])} / {_kib(v['flash_bytes'])}",
            ),
            (
                "inferences/s",
                f"{v['inferences_per_second']:.1f} ({v['cycles']:,} cycles)",
            ),
        ]
    from keras_microtune.export import compression, patch_inference

    out += compression.rows(report)
    out += patch_inference.rows(report)
    if report.get("training"):
        t = report["training"]
        check = t["check"]
        out += [
            ("signatures", ", ".join(t["signatures"])),
            (
                "trains",
                f"{t['trained_parameters']:,} parameters in {len(t['variables'])} "
                f"variables ({t['optimizer']['name']}, {t['loss']}, batch "
                f"{t['batch_size']})",
            ),
            (
                "train step vs Keras",
                f"loss error {check['loss_abs_error']:.3g}, weights error "
                f"{check['weights_max_abs_error']:.3g}, set/get round trip "
                + ("exact" if check["set_get_round_trip_exact"] else "NOT exact"),
            ),
        ]
    for key, value in (report["parity"] or {}).items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        out.append((f"parity {key}", str(value)))
    out += [
        ("RAM budget", f"{_kib(b['ram_used_bytes'])} of {_kib(b['ram_bytes'])}"),
        ("flash budget", f"{_kib(b['flash_used_bytes'])} of {_kib(b['flash_bytes'])}"),
        ("fits", "yes" if b["fits"] else "NO: " + "; ".join(b["problems"])),
        ("verified", "yes" if report["verified"] else "NO"),
    ]
    return out


def text(report: dict) -> str:
    """A plain-text table for terminals."""
    table = rows(report)
    width = max(len(label) for label, _ in table)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in table)


def markdown(report: dict) -> str:
    """report.md: the same table in Markdown."""
    lines = [
        f"# keras_microtune report: {report['target']['name']}",
        "",
        "| | |",
        "|---|---|",
    ]
    for label, value in rows(report):
        lines.append(f"| {_md(label)} | {_md(value)} |")
    if "tensor_arena_size" in report["memory"]:
        lines += [
            "",
            f"`kTensorArenaSize` = {report['memory']['tensor_arena_size']} bytes: the "
            "measured arena plus 20% and 1024 bytes for optimized kernels' scratch "
            "buffers (CMSIS-NN, ESP-NN) and 32-bit layout differences.",
        ]
    lines += layer_errors_table(report.get("layer_errors"))
    lines += _passes_table(report.get("passes"))
    return "\n".join(lines) + "\n"


def layer_errors_table(rows) -> list[str]:
    """report.md's "Per-layer error" section, worst layer first."""
    if not rows:
        return []
    lines = [
        "",
        "## Per-layer error (converted vs float, worst first)",
        "",
        "| layer | SQNR dB | cosine | max abs error | op | dtype |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_md(r['layer'])} | {r['sqnr_db']:.1f} | {r['cosine']:.5f} | "
            f"{r['max_abs_error']:.4g} | {r['op']} | {r['dtype']} |"
        )
    return lines


def _passes_table(passes) -> list[str]:
    """report.md's "Passes" section: each pass and what it changed."""
    if not passes:
        return []
    lines = ["", "## Passes", "", "| pass | what it did |", "|---|---|"]
    for record in passes:
        did = {k: v for k, v in record.items() if k != "name"}
        if "bytes_after" in did:
            before = did.pop("bytes_before", None)
            after = did.pop("bytes_after")
            size = f"{after:,} B" if before is None else f"{before:,} B -> {after:,} B"
            did = {"flatbuffer": size, **did}
        text = ", ".join(f"{k}: {v}" for k, v in did.items()) or "-"
        lines.append(f"| {record['name']} | {_md(text)} |")
    return lines


def _md(value: str) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
