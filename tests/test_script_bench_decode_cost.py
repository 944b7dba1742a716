"""benchmark/bench_decode_cost.py: per-forward costs table, JSON and plot (embedded target, tiny settings)."""
import json

from benchmark import bench_decode_cost


def test_writes_costs_for_each_size_and_dtype(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert bench_decode_cost.main(["--draft", "", "--dtypes", "fp32", "--sizes", "1", "4", "--repeats", "1",
                                   "--context", "16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    row = report["rows"]["fp32"]
    assert set(row["target_ms"]) == {"1", "4"} and all(v > 0 for v in row["target_ms"].values())
    assert row["hf_generate_ms_per_token"] > 0 and "draft_ms" not in row
    assert out.with_suffix(".png").is_file()
    assert set(report["rows"]) == {"fp32", "fp32 mkl"}, "fp32 is measured packed and unpacked, side by side"
    assert all(v > 0 for v in report["rows"]["fp32 mkl"]["target_ms"].values())
    assert "x step(1)" in capsys.readouterr().out
