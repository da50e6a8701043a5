"""Benchmark records: provenance fields, flat rows, and loading as one table."""

import pytest

from experiments import records


def test_write_and_load_rows(tmp_path):
  path = records.write("demo", {"size": 3}, [{"impl": "a", **records.summarize([1, 2, 3], "t_")}],
                       root=tmp_path)
  assert path.parent.name == "demo" and path.suffix == ".json"
  rec, = records.load("demo", root=tmp_path)
  for key in ("experiment", "git_sha", "date", "jax_version", "device_kind", "num_devices",
              "xla_flags", "config", "results"):
    assert key in rec
  row, = records.load_rows("demo", root=tmp_path)
  assert row["impl"] == "a" and row["t_median"] == 2.0 and row["t_n"] == 3
  assert row["t_p10"] == pytest.approx(1.2) and row["t_p99"] == pytest.approx(2.98)


def test_rows_must_be_flat(tmp_path):
  with pytest.raises(TypeError, match=r"results\[0\] is not flat: non-scalar values \{'x': 'list'\}"):
    records.write("demo", {}, [{"x": [1, 2]}], root=tmp_path)


def test_rewrite_keeps_one_record(tmp_path):
  """Benchmarks rewrite their record after every configuration: one file, the latest rows."""
  rows = [{"impl": "a"}]
  path = records.write("demo", {}, rows, root=tmp_path)
  rows.append({"impl": "b"})
  assert records.write("demo", {}, rows, root=tmp_path, path=path) == path
  assert [r["impl"] for r in records.load_rows("demo", root=tmp_path)] == ["a", "b"]
