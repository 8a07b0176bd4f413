"""experiments/bench.py on a tiny MLP: every section measured and written to bench.json."""

import json

from configs import bench as bench_config
from experiments import bench


def test_bench_writes_every_section(tmp_path):
  config = bench_config.get_config()
  config.workdir = str(tmp_path)
  config.input_dim, config.hidden = 32, (48, 48)
  config.ranks, config.exact_ranks, config.optimality_ranks = (4, 8), (4,), (4,)
  config.repeats, config.exact_repeats = 2, 1
  config.optimality_steps, config.optimality_every = 6, 3
  config.latency_batch_sizes = (8,)
  result = bench.run_bench(config, log=lambda _: None)
  on_disk = json.loads((tmp_path / "bench.json").read_text())
  assert on_disk == json.loads(json.dumps(result))
  assert on_disk["matmul_1024_gflops"] > 0 and on_disk["dense_step_ms"] > 0
  assert [row["rank"] for row in on_disk["train_steps"]] == [4, 8]
  assert "exact_ratio" in on_disk["train_steps"][0] and "exact_ratio" not in on_disk["train_steps"][1]
  assert all(row["subspace_every4_ratio"] > 0 for row in on_disk["train_steps"])
  for entry in on_disk["optimality"]:
    # Eckart–Young: no rank-r projection beats the truncated SVD, and the tracker stays close.
    assert 1.0 - 1e-4 <= entry["median"] <= entry["max"] < 1.01
    assert entry["measurements"] == 2 * 2
  theory = {row["rank"]: row["theoretical_ratio"] for row in on_disk["latency"]}
  assert theory[4] == (4 * (32 + 48) + 4 * (48 + 48)) / (32 * 48 + 48 * 48)
