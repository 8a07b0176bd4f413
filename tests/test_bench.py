"""experiments/bench.py on a tiny MLP and the digits: every section measured and written."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bench as bench_config
from experiments import bench
from lrnet import config as config_lib
from lrnet import models
from lrnet import svd


def test_bench_writes_every_section(tmp_path):
  config = bench_config.get_config()
  config.workdir = str(tmp_path)
  config.data_name = "digits"  # offline; 64 inputs
  config.hidden = (48, 48)
  config.batch_size = 32
  config.pretrain_steps = 20
  config.ranks, config.exact_ranks, config.optimality_ranks = (4, 8), (4,), (4,)
  config.repeats, config.exact_repeats = 2, 1
  config.optimality_steps, config.optimality_every = 6, 3
  config.parallel_steps = 5
  config.latency_batch_sizes = (8,)
  config.update_every = (1, 8)
  config.optimality_update_every = (1,)
  config.compare_ranks, config.compare_steps, config.compare_eval_every = (4,), 10, 5
  config.compare_update_every = (1,)
  result = bench.run_bench(config, log=lambda _: None)
  on_disk = json.loads((tmp_path / "bench.json").read_text())
  assert on_disk == json.loads(json.dumps(result))
  assert on_disk["start"].startswith("reference MLP after 20 Adam steps on digits")
  assert on_disk["matmul_1024_gflops"] > 0 and on_disk["dense_step_ms"] > 0
  assert [row["rank"] for row in on_disk["train_steps"]] == [4, 8]
  assert "exact_ratio" in on_disk["train_steps"][0] and "exact_ratio" not in on_disk["train_steps"][1]
  assert config.methods == ("alternating", "streaming")
  assert all(row[f"{method}_every{every}_ratio"] > 0 for row in on_disk["train_steps"]
             for method, every in (("streaming", 1), ("streaming", 8), ("alternating", 1)))
  # The alternating projection refines on every step only: no period-8 entry.
  assert all("alternating_every8_ratio" not in row for row in on_disk["train_steps"])
  assert [(e["method"], e["update_every"]) for e in on_disk["optimality"]] == [
      ("alternating", 1), ("streaming", 1)]
  for entry in on_disk["optimality"]:
    # Eckart–Young: no rank-r projection beats the truncated SVD, and the tracker stays close.
    assert 1.0 - 1e-4 <= entry["median"] <= entry["max"] < 1.01
    assert entry["measurements"] == 2 * 2
  parallel = on_disk["parallel_ranks"]
  assert parallel["ranks"] == [4, 8] and parallel["sequential_s"] > 0
  # Zero-padded members train exactly like rank-r networks: same parameters as one by one.
  assert parallel["vmap_max_param_difference"] < 1e-4
  assert parallel["map_max_param_difference"] < 1e-4
  # On the CPU, ranks 4 and 8 padded together would cost 1.33× one by one: the sweep keeps them
  # apart, so it trains exactly the one-by-one programs.
  assert parallel["sweep_batches"] == [[4], [8]]
  assert parallel["sweep_ratio"] > 0 and parallel["sweep_max_param_difference"] < 1e-4
  theory = {row["rank"]: row["theoretical_ratio"] for row in on_disk["latency"]}
  assert theory[4] == (4 * (64 + 48) + 4 * (48 + 48)) / (64 * 48 + 48 * 48)
  (compare,) = on_disk["exact_vs_fast"]
  assert compare["rank"] == 4 and compare["steps"] == 10
  assert compare["streaming_every1_speedup"] > 0 and compare["alternating_every1_speedup"] > 0
  assert len(compare["exact_accuracies"]) == len(compare["alternating_every1_accuracies"]) == 2
  assert compare["exact_accuracy_last4"] == sum(compare["exact_accuracies"]) / 2
  # Ten steps from the same start on the same batches: the projections agree closely.
  for method in ("streaming", "alternating"):
    assert abs(compare[f"{method}_every1_accuracy_difference_points"]) < 3.0


def test_bench_rejects_bad_counts_with_a_one_line_error(tmp_path):
  config = bench_config.get_config()
  config.workdir = str(tmp_path)
  config.compare_eval_every = 0
  with pytest.raises(config_lib.ConfigError, match=r"compare_eval_every=0 .*integer >= 1"):
    bench.run_bench(config, log=lambda _: None)
  config.compare_eval_every, config.update_every = 25, (1, 0)
  with pytest.raises(config_lib.ConfigError, match=r"update_every=\(1, 0\) .*integers >= 1"):
    bench.run_bench(config, log=lambda _: None)
  config.update_every, config.methods = (1,), ("subspace", "svd")
  with pytest.raises(config_lib.ConfigError, match=r"methods=.*subspace, streaming, alternating"):
    bench.run_bench(config, log=lambda _: None)
  assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("method", ["subspace", "streaming", "alternating"])
def test_w_hat_is_the_projection_a_layer_applies_next_without_advancing_it(method):
  net = models.mlp((24,), 10)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 32)))
  state = models.projection_state(params, 5, 1, method=method)["linear_0"]
  w = params["linear_0"]["w"] * 1.001  # a step later: the tracker's next call projects this W
  w_hat = bench._w_hat(state, method, w, 5)
  np.testing.assert_allclose(w_hat, svd.truncate(w, 5), atol=1e-4)
  assert np.linalg.matrix_rank(np.asarray(w_hat), tol=1e-4) == 5
  np.testing.assert_array_equal(bench._w_hat(state, method, w, 5), w_hat)  # state untouched
