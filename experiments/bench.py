r"""Benchmark: dense vs straight-through train steps, the fast projection's optimality over real
steps, factorized vs dense inference, and the machine's matmul throughput, in ONE run.

  python -m experiments.bench --config=configs/bench.py --config.workdir=/tmp/lrnet_bench

Writes `bench.json` (atomically) into the workdir and prints a table. Train steps are timed as the
mean of consecutive jitted steps after warm-up, forward latencies as medians of repeated jitted calls
(`lrnet.train.measure_latency`); ratios compare numbers taken in this one run.
"""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from lrnet import compression
from lrnet import io
from lrnet import models
from lrnet import subspace
from lrnet import train


def _step_fn(net, optimizer):
  """One Adam step of `net` (stateful apply), jitted: (state, x, y) -> state."""
  apply = train.stateful_apply(net)

  def step(state, images, labels):
    def loss_fn(params):
      logits, model_state = apply(params, state.model_state, images)
      return train.cross_entropy(logits, labels), model_state
    (_, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state._replace(params=jax.tree_util.tree_map(jnp.add, state.params, updates),
                          opt_state=opt_state, model_state=model_state, step=state.step + 1)
  return jax.jit(step)


def _matmul_gflops(repeats: int) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (1024, 1024))
  ms = train.measure_latency(jax.jit(lambda a: a @ a), a, repeats=max(repeats, 10))
  return 2 * 1024**3 / (ms * 1e-3) / 1e9


def run_bench(config, log=print) -> dict:
  os.makedirs(config.workdir, exist_ok=True)
  key = jax.random.PRNGKey(config.seed)
  hidden, batch = tuple(config.hidden), config.batch_size
  images = jax.random.uniform(key, (batch, config.input_dim))
  labels = jax.random.randint(key, (batch,), 0, config.num_classes)
  dense = models.mlp(hidden, config.num_classes)
  params = dense.init(key, images[:1])
  optimizer = train.adam(1e-3)
  widths = [config.input_dim, *hidden, config.num_classes]
  shapes = list(zip(widths[:-1], widths[1:]))
  out = {"device": str(jax.devices()[0]), "platform": platform.platform(),
         "cpu_count": os.cpu_count(), "jax": jax.__version__, "config": config.to_dict()}

  gflops = _matmul_gflops(config.repeats)
  out["matmul_1024_gflops"] = gflops
  log(f"matmul 1024²: {gflops:.1f} GFLOP/s")

  def time_step(net, model_state=None, repeats=config.repeats):
    """Mean ms per step over 4·repeats consecutive steps (the state advances, so amortised
    subspace refinements count at their real frequency), after two warm-up steps."""
    state = train.commit(train.init_state(jax.tree_util.tree_map(jnp.copy, params), optimizer,
                                          model_state=model_state))
    step = _step_fn(net, optimizer)
    for _ in range(2):
      state = jax.block_until_ready(step(state, images, labels))
    count = 4 * repeats
    start = time.perf_counter()
    for _ in range(count):
      state = step(state, images, labels)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / count * 1e3

  dense_ms = time_step(dense)
  step_flops = 3 * 2 * batch * sum(m * n for m, n in shapes)  # forward + two backward products
  out["dense_step_ms"] = dense_ms
  out["dense_step_gflops"] = step_flops / (dense_ms * 1e-3) / 1e9
  log(f"dense step: {dense_ms:.1f} ms, {out['dense_step_gflops']:.1f} GFLOP/s "
      f"({100 * out['dense_step_gflops'] / gflops:.0f} % of matmul)")

  steps = []
  for rank in config.ranks:
    row = {"rank": rank}
    if rank in config.exact_ranks:
      ms = time_step(models.mlp(hidden, config.num_classes, project_rank=rank),
                     repeats=config.exact_repeats)
      row["exact_ms"], row["exact_ratio"] = ms, ms / dense_ms
    for every in config.update_every:
      net = models.mlp(hidden, config.num_classes, project_rank=rank, projection_method="subspace",
                       projection_update_every=every)
      ms = time_step(net, models.projection_state(params, rank, len(hidden)))
      row[f"subspace_every{every}_ms"], row[f"subspace_every{every}_ratio"] = ms, ms / dense_ms
    steps.append(row)
    log("rank {:>4}: ".format(rank) + ", ".join(
        f"{k[:-6]} {v:.2f}×" for k, v in row.items() if k.endswith("_ratio")))
  out["train_steps"] = steps

  # Optimality of the tracked projection along real training: a subspace student trained with
  # Adam on fixed random data; exact ratio ‖W − Ŵ‖_F / ‖W − W_r‖_F of every hidden layer.
  optimality = []
  data_images = jax.random.uniform(jax.random.PRNGKey(1), (batch * 20, config.input_dim))
  data_labels = jax.random.randint(jax.random.PRNGKey(2), (batch * 20,), 0, config.num_classes)
  ratio_fn = jax.jit(subspace.optimality_ratio, static_argnums=2)
  for rank in config.optimality_ranks:
    for every in config.update_every:
      net = models.mlp(hidden, config.num_classes, project_rank=rank,
                       projection_method="subspace", projection_update_every=every)
      step = _step_fn(net, optimizer)
      state = train.commit(train.init_state(jax.tree_util.tree_map(jnp.copy, params), optimizer,
                                            model_state=models.projection_state(params, rank,
                                                                                len(hidden))))
      ratios = []
      for i in range(config.optimality_steps):
        start = (i % 20) * batch
        state = step(state, data_images[start:start + batch], data_labels[start:start + batch])
        if (i + 1) % config.optimality_every == 0:
          for layer in range(len(hidden)):
            name = f"linear_{layer}"
            w = state.params[name]
            w = w["w"]
            basis = subspace.right_basis(state.model_state[name]["subspace"], rank)
            ratios.append(float(ratio_fn(w, (w @ basis) @ basis.T, rank)))
      optimality.append({"rank": rank, "update_every": every, "max": max(ratios),
                         "median": float(np.median(ratios)), "measurements": len(ratios)})
      log(f"optimality rank {rank} every {every}: max {max(ratios):.5f}, "
          f"median {np.median(ratios):.5f} over {len(ratios)} layer-steps")
  out["optimality"] = optimality

  latency = []
  for size in config.latency_batch_sizes:
    x = jax.random.uniform(key, (size, config.input_dim))
    dense_fwd = train.measure_latency(jax.jit(dense.apply), params, x, repeats=config.repeats * 4)
    for rank in config.ranks:
      factorized = models.mlp(hidden, config.num_classes, ranks=rank)
      ms = train.measure_latency(jax.jit(factorized.apply), compression.compress(params, rank), x,
                                 repeats=config.repeats * 4)
      theory = sum(rank * (m + n) for m, n in shapes[:-1]) / sum(m * n for m, n in shapes[:-1])
      latency.append({"batch": size, "rank": rank, "dense_ms": dense_fwd, "factorized_ms": ms,
                      "ratio": ms / dense_fwd, "theoretical_ratio": theory})
      log(f"latency batch {size:>5} rank {rank:>4}: dense {dense_fwd:.3f} ms, factorized "
          f"{ms:.3f} ms, ratio {ms / dense_fwd:.3f} (theory {theory:.3f})")
  out["latency"] = latency
  io.atomic_write_json(os.path.join(config.workdir, "bench.json"), out)
  log(f"wrote {os.path.join(config.workdir, 'bench.json')}")
  return out


if __name__ == "__main__":
  cli.run_app(run_bench)
