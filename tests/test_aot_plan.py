"""scripts/aot_plan.py --uptrain --table: the tables of docs/scaling.md come from the compile records (every
compile listed; per model and generation the smallest fitting slice, then the fewest microbatches)."""
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import aot_plan  # noqa: E402

GIB = 2 ** 30


def _record(topology, devices, m, fits, total_gib, roofline=None):
    result = {"per_device_bytes": {"arguments": None, "temp": None, "output": None, "alias": None,
                                   "total": int(total_gib * GIB)},
              "hbm_bytes": 32 * GIB, "fits": fits, "margin_bytes": int((32 - total_gib) * GIB),
              "roofline_seconds": roofline, "roofline_bound": "compute" if roofline else None,
              "compile_seconds": 100.0}
    return {"size": "xxl", "groups": 8, "num_heads": 64, "topology": topology, "mesh": f"data=1,fsdp={devices},model=1",
            "devices": devices, "batch_size": 2048, "inputs_length": 512, "targets_length": 114,
            "num_microbatches": m, "remat_policy": "full", "scan_layers": True, "compile_cpu_seconds": 90.0,
            "peak_rss_bytes": 9 * GIB, "load_average_1min_end": 3.0,
            "machine": {"load_average_1min": 2.5, "nice": 5}, "result": result}


def test_uptrain_table_lists_every_compile_and_the_smallest_fitting_slice(tmp_path):
    path = tmp_path / "aot_uptrain.jsonl"
    rows = [_record("v4:2x2x4", 16, 4, False, 40.0), _record("v4:2x2x4", 16, 8, True, 30.0, 12.5),
            _record("v4:2x4x4", 32, 2, True, 25.0, 6.0), _record("v4:2x4x4", 32, 4, True, 20.0, 6.1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    compiles, best = aot_plan.uptrain_table(path).split("\n\n")
    lines = compiles.splitlines()[2:]
    assert len(lines) == 4 and "| NO |" in lines[0] and "40.0 (32)" in lines[0]
    assert "12.5 (compute)" in lines[1] and "| 9.0 | 2.5, 3.0; 5 |" in lines[1]
    (row,) = best.splitlines()[2:]
    assert "v4:2x2x4 (16 chips)" in row and "| 8 |" in row and "| 2.0 |" in row  # 16 chips beat 32; margin 2 GiB
