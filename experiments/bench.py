r"""Benchmark: dense vs straight-through train steps, the fast projection's optimality over real
steps, sequential vs parallel-rank students, factorized vs dense inference, the machine's matmul
throughput, and straight-through training with the exact vs the fast projection, in ONE run.

  python -m experiments.bench --config=configs/bench.py --config.workdir=/tmp/lrnet_bench

Writes `bench.json` (atomically) into the workdir and prints a table. Train steps are timed as the
mean of consecutive jitted steps after warm-up, forward latencies as medians of repeated jitted calls
(`lrnet.train.measure_latency`); ratios compare numbers taken in this one run.

Straight-through students start from a trained teacher, so the projection is measured where it
is used: from `teacher_dir` (a sweep workdir holding models/teacher) when given, else from the
reference MLP trained `pretrain_steps` Adam steps on `data_name` here (its weight spectra then
decay like a teacher's; a random initialisation has a flat spectrum, the tracker's worst case).
"""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import cli
from lrnet import checkpoint
from lrnet import compression
from lrnet import config as config_lib
from lrnet import data
from lrnet import io
from lrnet import models
from lrnet import rank_batch
from lrnet import runtime
from lrnet import subspace
from lrnet import sweep as sweep_lib
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


def _flat(images: np.ndarray) -> jax.Array:
  return jnp.asarray(images.reshape(images.shape[0], -1))


def _bench_data(config, log):
  """(train images [N, d], train labels, test images, test labels, num_classes, description).

  `data_name` from `lrnet.data`, or "random": uniform random images of `input_dim` pixels.
  """
  if config.data_name != "random":
    dataset = data.load_dataset(config.data_name, config.data_dir, seed=config.seed)
    log(f"data: {config.data_name} from {dataset.source}")
    return (_flat(dataset.train.images), jnp.asarray(dataset.train.labels),
            _flat(dataset.test.images), jnp.asarray(dataset.test.labels), dataset.num_classes,
            f"{config.data_name} ({dataset.source})")
  key = jax.random.PRNGKey(config.seed + 1)
  n = 20 * config.batch_size
  images = jax.random.uniform(key, (n, config.input_dim))
  labels = jax.random.randint(key, (n,), 0, config.num_classes)
  return images, labels, images, labels, config.num_classes, "random"


def _epoch_call(epoch_fn, state, images, labels, steps, batch, seed, *args):
  """Compiles `epoch_fn` on `steps` batches, then times one call. Returns (state, metrics, s, compile_s)."""
  order = jnp.asarray(train.epoch_order(seed, 1, images.shape[0])[:steps * batch])
  arguments = (state, images, labels, order, None, *args)
  start = time.perf_counter()
  compiled = jax.jit(epoch_fn).lower(*arguments).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  state, metrics = jax.block_until_ready(compiled(*arguments))
  return state, metrics, time.perf_counter() - start, compile_s


FAST_METHODS = tuple(models.TRACKER_STATE)


def _w_hat(layer_state, method: str, w: jax.Array, rank: int) -> jax.Array:
  """Ŵ, [m, n]: the rank-r projection a student's layer in `layer_state` would use for `w` on
  its next call (the tracker's state is not advanced)."""
  tracker = layer_state[models.TRACKER_STATE[method]]
  if method == "subspace":
    basis = subspace.right_basis(subspace.update_subspace(w, tracker, rank), rank)
    return (w @ basis) @ basis.T
  if method == "streaming":
    _, left, right = subspace.stream_projection(w, tracker, rank)
  else:
    _, left, right = subspace.alternate_projection(w, tracker, rank)
  return left[:rank].T @ right[:rank]


def _fast_settings(methods, update_every) -> list:
  """(method, k) for every method and refinement period it supports (alternating: k = 1)."""
  return [(method, every) for method in methods for every in update_every
          if every == 1 or method not in models.EVERY_STEP_ONLY]


def validate(config) -> None:
  """One-line `ConfigError`s for counts that must be positive integers."""
  for field in ("batch_size", "repeats", "exact_repeats", "optimality_steps", "optimality_every",
                "parallel_steps", "compare_steps", "compare_eval_every", "input_dim",
                "num_classes"):
    config_lib.check_positive_int(config, field)
  config_lib.check_positive_int(config, "pretrain_steps", allow_zero=True)
  methods = config.methods
  if (not isinstance(methods, (tuple, list)) or not methods
      or not all(m in FAST_METHODS for m in methods)):
    raise config_lib.ConfigError(f"config field methods={methods!r} is invalid: must be a "
                                 f"non-empty tuple of {', '.join(FAST_METHODS)}")
  for field in ("hidden", "ranks", "exact_ranks", "update_every", "optimality_ranks",
                "optimality_update_every", "latency_batch_sizes", "compare_ranks",
                "compare_update_every"):
    values = config[field]
    if not isinstance(values, (tuple, list)) or not all(config_lib.is_int(v) and v >= 1
                                                        for v in values):
      raise config_lib.ConfigError(f"config field {field}={values!r} is invalid: must be a tuple "
                                   "of integers >= 1")


def run_bench(config, log=print) -> dict:
  """Every section of the module docstring; SciPy's LAPACK capped at one thread (as in every
  entry point, `lrnet.runtime`) except for the exact projection's SVDs."""
  validate(config)
  runtime.limit_lapack_threads(1)
  os.makedirs(config.workdir, exist_ok=True)
  key = jax.random.PRNGKey(config.seed)
  hidden, batch = tuple(config.hidden), config.batch_size
  train_images, train_labels, test_images, test_labels, num_classes, source = _bench_data(config, log)
  input_dim = train_images.shape[1]
  dense = models.mlp(hidden, num_classes)
  optimizer = train.adam(1e-3)
  widths = [input_dim, *hidden, num_classes]
  shapes = list(zip(widths[:-1], widths[1:]))
  out = {"device": str(jax.devices()[0]), "platform": platform.platform(),
         "cpu_count": os.cpu_count(), "jax": jax.__version__, "config": config.to_dict(),
         "data": source}

  gflops = _matmul_gflops(config.repeats)
  out["matmul_1024_gflops"] = gflops
  log(f"matmul 1024²: {gflops:.1f} GFLOP/s")

  # The starting point of every straight-through student: a trained network.
  params = dense.init(key, train_images[:1])
  if config.teacher_dir:
    params = checkpoint.load_pytree(os.path.join(config.teacher_dir, "models", "teacher"), params)
    out["start"] = f"teacher from {config.teacher_dir}"
  else:
    state, _, seconds, _ = _epoch_call(train.make_train_epoch(train.stateful_apply(dense),
                                                              optimizer, batch),
                                       train.commit(train.init_state(params, optimizer)),
                                       train_images, train_labels,
                                       min(config.pretrain_steps, train_images.shape[0] // batch),
                                       batch, config.seed)
    params = state.params
    out["start"] = f"reference MLP after {int(state.step)} Adam steps on {source} ({seconds:.1f} s)"
  log(f"start: {out['start']}")
  images, labels = train_images[:batch], train_labels[:batch]

  class _Stepper:
    """A network's jitted Adam step and its advancing state, after two warm-up steps."""

    def __init__(self, net, model_state=None):
      self.step = _step_fn(net, optimizer)
      self.state = train.commit(train.init_state(params, optimizer, model_state=model_state))
      for _ in range(2):
        self.state = jax.block_until_ready(self.step(self.state, images, labels))

    def run(self, count: int) -> float:
      """Seconds for `count` consecutive steps (the state advances, so amortised subspace
      refinements and alternating calls count at their real frequency)."""
      start = time.perf_counter()
      for _ in range(count):
        self.state = self.step(self.state, images, labels)
      jax.block_until_ready(self.state)
      return time.perf_counter() - start

  dense_stepper = _Stepper(dense)
  dense_blocks = []

  def time_against_dense(net, model_state=None, blocks=config.repeats):
    """(ms per step, ratio to the dense step): `blocks` blocks of 8 steps, each right after a
    block of 8 dense steps, ratio = sum of the blocks / sum of the dense blocks. Interleaving
    keeps the ratio honest on a machine whose speed drifts (the dense step measured alone, first,
    ran 20–30 % slow here)."""
    stepper = _Stepper(net, model_state)
    seconds = dense_seconds = 0.0
    for _ in range(blocks):
      dense_block = dense_stepper.run(8)
      dense_blocks.append(dense_block / 8 * 1e3)
      dense_seconds += dense_block
      seconds += stepper.run(8)
    return seconds / (8 * blocks) * 1e3, seconds / dense_seconds

  dense_stepper.run(8 * config.repeats)  # settle
  step_flops = 3 * 2 * batch * sum(m * n for m, n in shapes)  # forward + two backward products

  steps = []
  for rank in config.ranks:
    row = {"rank": rank}
    if rank in config.exact_ranks:
      with runtime.lapack_threads(os.cpu_count()):  # the SVD of W itself is big: all cores
        row["exact_ms"], row["exact_ratio"] = time_against_dense(
            models.mlp(hidden, num_classes, project_rank=rank), blocks=config.exact_repeats)
    for method, every in _fast_settings(config.methods, config.update_every):
      net = models.mlp(hidden, num_classes, project_rank=rank, projection_method=method,
                       projection_update_every=every)
      ms, ratio = time_against_dense(
          net, models.projection_state(params, rank, len(hidden), method=method))
      row[f"{method}_every{every}_ms"], row[f"{method}_every{every}_ratio"] = ms, ratio
    steps.append(row)
    log("rank {:>4}: ".format(rank) + ", ".join(
        f"{k[:-6]} {v:.2f}×" for k, v in row.items() if k.endswith("_ratio")))
  dense_ms = float(np.median(dense_blocks))
  out["dense_step_ms"] = dense_ms
  out["dense_step_gflops"] = step_flops / (dense_ms * 1e-3) / 1e9
  log(f"dense step (median of {len(dense_blocks)} interleaved blocks): {dense_ms:.1f} ms, "
      f"{out['dense_step_gflops']:.1f} GFLOP/s "
      f"({100 * out['dense_step_gflops'] / gflops:.0f} % of matmul)")
  out["train_steps"] = steps

  # Optimality of the tracked projection along real training: a student trained with Adam on
  # the benchmark data; every k-th step, the exact ratio ‖W − Ŵ‖_F / ‖W − W_r‖_F of the
  # projection each layer would apply to its current W next (`_w_hat`).
  optimality = []
  ratio_fn = jax.jit(subspace.optimality_ratio, static_argnums=2)
  w_hat_fn = jax.jit(_w_hat, static_argnums=(1, 3))
  num_batches = train_images.shape[0] // batch
  for rank in config.optimality_ranks:
    for method, every in _fast_settings(config.methods, config.optimality_update_every):
      net = models.mlp(hidden, num_classes, project_rank=rank, projection_method=method,
                       projection_update_every=every)
      step = _step_fn(net, optimizer)
      state = train.commit(train.init_state(
          params, optimizer,
          model_state=models.projection_state(params, rank, len(hidden), method=method)))
      ratios = []
      for i in range(config.optimality_steps):
        start = (i % num_batches) * batch
        state = step(state, train_images[start:start + batch], train_labels[start:start + batch])
        if (i + 1) % config.optimality_every == 0:
          for layer in range(len(hidden)):
            name = f"linear_{layer}"
            w = state.params[name]["w"]
            w_hat = w_hat_fn(state.model_state[name], method, w, rank)
            ratios.append(float(ratio_fn(w, w_hat, rank)))
      refreshes = sum(int(state.model_state[f"linear_{layer}"][models.TRACKER_STATE[method]]
                          .refreshes)
                      for layer in range(len(hidden)))
      optimality.append({"rank": rank, "method": method, "update_every": every,
                         "max": max(ratios), "median": float(np.median(ratios)),
                         "measurements": len(ratios), "refreshes": refreshes})
      log(f"optimality rank {rank} {method} every {every}: max {max(ratios):.5f}, "
          f"median {np.median(ratios):.5f} over {len(ratios)} layer-steps, "
          f"{refreshes} refreshes")
  out["optimality"] = optimality

  out["parallel_ranks"] = _parallel_ranks(config, params, hidden, num_classes, train_images,
                                          train_labels, log)

  latency = []
  for size in config.latency_batch_sizes:
    x = jax.random.uniform(key, (size, input_dim))
    dense_fwd = train.measure_latency(jax.jit(dense.apply), params, x, repeats=config.repeats * 4)
    for rank in config.ranks:
      factorized = models.mlp(hidden, num_classes, ranks=rank)
      ms = train.measure_latency(jax.jit(factorized.apply), compression.compress(params, rank), x,
                                 repeats=config.repeats * 4)
      theory = sum(rank * (m + n) for m, n in shapes[:-1]) / sum(m * n for m, n in shapes[:-1])
      latency.append({"batch": size, "rank": rank, "dense_ms": dense_fwd, "factorized_ms": ms,
                      "ratio": ms / dense_fwd, "theoretical_ratio": theory})
      log(f"latency batch {size:>5} rank {rank:>4}: dense {dense_fwd:.3f} ms, factorized "
          f"{ms:.3f} ms, ratio {ms / dense_fwd:.3f} (theory {theory:.3f})")
  out["latency"] = latency

  out["exact_vs_fast"] = _exact_vs_fast(config, params, hidden, num_classes, train_images,
                                        train_labels, test_images, test_labels, log)
  io.atomic_write_json(os.path.join(config.workdir, "bench.json"), out)
  log(f"wrote {os.path.join(config.workdir, 'bench.json')}")
  return out


def _parallel_ranks(config, params, hidden, num_classes, images, labels, log) -> dict:
  """Factorized students of `config.ranks` for `parallel_steps` steps each: one by one, each
  with its own program (a notebook's loop), vs one program for all (factors zero-padded to the
  largest rank) run side by side (`vmap`) or member after member (`lax.map`). Seconds
  excluding compilation (reported apart), and the largest parameter difference to one by one."""
  optimizer = train.adam(1e-3)
  batch, steps = config.batch_size, config.parallel_steps
  ranks = list(config.ranks)
  sequential_s, sequential_compile_s, alone = 0.0, 0.0, []
  for rank in ranks:
    net = models.mlp(hidden, num_classes, ranks=rank)
    epoch = train.make_train_epoch(train.stateful_apply(net), optimizer, batch)
    state = train.commit(train.init_state(compression.compress(params, rank), optimizer))
    state, _, seconds, compile_s = _epoch_call(epoch, state, images, labels, steps, batch, config.seed)
    sequential_s += seconds
    sequential_compile_s += compile_s
    alone.append(state.params)
  out = {"ranks": ranks, "steps": steps, "sequential_s": sequential_s,
         "sequential_compile_s": sequential_compile_s}

  def padded(members_ranks, vectorize):
    """One program of the batch's largest rank trains `members_ranks` (factors zero-padded);
    returns (seconds, compile seconds, largest parameter difference to one by one)."""
    width = max(members_ranks)
    net = models.mlp(hidden, num_classes, ranks=width)
    epoch = rank_batch.batch_epoch(
        train.make_train_epoch(train.stateful_apply(net), optimizer, batch), vectorize=vectorize)
    states = rank_batch.stack([
        train.init_state(rank_batch.pad_factors(compression.compress(params, r), width), optimizer)
        for r in members_ranks])
    states, _, seconds, compile_s = _epoch_call(epoch, train.commit(states), images, labels,
                                                steps, batch, config.seed)
    members = rank_batch.unstack(states.params, len(members_ranks))
    difference = max(float(jnp.max(jnp.abs(a - b)))
                     for rank, p in zip(members_ranks, members)
                     for a, b in zip(jax.tree_util.tree_leaves(rank_batch.unpad_factors(p, rank)),
                                     jax.tree_util.tree_leaves(alone[ranks.index(rank)])))
    return seconds, compile_s, difference

  for name, vectorize in (("vmap", True), ("map", False)):
    seconds, compile_s, difference = padded(ranks, vectorize)
    out[f"{name}_s"], out[f"{name}_compile_s"] = seconds, compile_s
    out[f"{name}_ratio"] = seconds / sequential_s
    out[f"{name}_max_param_difference"] = difference
  # What the sweep does with `sweep.parallel_ranks` on this backend (`factorized_batches`): on a
  # CPU only ranks whose padding costs ≤ 10 % more share a program; on an accelerator all do.
  policy = ml_collections.ConfigDict({"sweep": {"parallel_ranks": True}})
  batches = sweep_lib.factorized_batches(policy, ranks)
  measured = [padded(members_ranks, sweep_lib.side_by_side(policy)) for members_ranks in batches]
  seconds_total = sum(seconds for seconds, _, _ in measured)
  compile_total = sum(compile_s for _, compile_s, _ in measured)
  difference = max(difference for _, _, difference in measured)
  out["sweep_batches"] = batches
  out["sweep_s"], out["sweep_compile_s"] = seconds_total, compile_total
  out["sweep_ratio"] = seconds_total / sequential_s
  out["sweep_max_param_difference"] = difference
  log(f"parallel ranks as the sweep batches them here ({batches}): {seconds_total:.2f} s = "
      f"{out['sweep_ratio']:.2f}× one by one (+{compile_total:.1f} s compiling), "
      f"max |Δparam| {difference:.1e}")
  log(f"parallel ranks {ranks}, {steps} steps each: one by one {sequential_s:.2f} s "
      f"(+{sequential_compile_s:.1f} s compiling); side by side (vmap) {out['vmap_s']:.2f} s = "
      f"{out['vmap_ratio']:.2f}× (+{out['vmap_compile_s']:.1f} s); member by member (lax.map) "
      f"{out['map_s']:.2f} s = {out['map_ratio']:.2f}× (+{out['map_compile_s']:.1f} s); "
      f"max |Δparam| vmap {out['vmap_max_param_difference']:.1e}, "
      f"map {out['map_max_param_difference']:.1e}")
  return out


def _exact_vs_fast(config, params, hidden, num_classes, train_images, train_labels,
                   test_images, test_labels, log) -> list:
  """Straight-through students trained `compare_steps` steps on the same batches with the exact
  projection and with each fast projection of `methods` refined every k-th step, k in
  `compare_update_every`: training wall time (compilation and evaluation apart) and the test
  accuracy of the exactly projected weights after every `compare_eval_every` steps; `accuracy`
  is the final one, `accuracy_last4` the mean of the last four (single steps are noisy: the
  straight-through students' accuracy moves by ±1 point from one evaluation to the next)."""
  optimizer = train.adam(1e-3)
  evaluate = train.make_evaluate(models.mlp(hidden, num_classes).apply)
  batch, chunk = config.batch_size, config.compare_eval_every
  order = train.epoch_order(config.seed, 1, train_images.shape[0])
  rows = []
  for rank in config.compare_ranks:
    project = jax.jit(lambda p, rank=rank: compression.project(p, rank))
    row = {"rank": rank, "steps": config.compare_steps, "eval_every": chunk}
    fast = _fast_settings(config.methods, config.compare_update_every)
    for method, every in [("exact", 1)] + fast:
      net = models.mlp(hidden, num_classes, project_rank=rank, projection_method=method,
                       projection_update_every=every)
      model_state = (models.projection_state(params, rank, len(hidden), method=method)
                     if method != "exact" else None)
      state = train.commit(train.init_state(params, optimizer,
                                            model_state=model_state))
      epoch = jax.jit(train.make_train_epoch(train.stateful_apply(net), optimizer, batch))
      seconds, accuracies = 0.0, []
      for start in range(0, config.compare_steps, chunk):
        chunk_order = jnp.asarray(order[start * batch:(start + chunk) * batch])
        arguments = (state, train_images, train_labels, chunk_order, None)
        if start == 0:
          epoch = epoch.lower(*arguments).compile()
        # The exact SVD of W is big: LAPACK gets every core there (`runtime`).
        threads = os.cpu_count() if method == "exact" else 1
        with runtime.lapack_threads(threads):
          begin = time.perf_counter()
          state, _ = jax.block_until_ready(epoch(*arguments))
          seconds += time.perf_counter() - begin
        accuracies.append(float(evaluate(project(state.params), test_images, test_labels)[0]))
      name = "exact" if method == "exact" else f"{method}_every{every}"
      row[f"{name}_s"], row[f"{name}_accuracies"] = seconds, accuracies
      row[f"{name}_accuracy"] = accuracies[-1]
      row[f"{name}_accuracy_last4"] = float(np.mean(accuracies[-4:]))
      if method != "exact":
        row[f"{name}_speedup"] = row["exact_s"] / seconds
        for which in ("accuracy", "accuracy_last4"):
          row[f"{name}_{which}_difference_points"] = 100 * (row[f"{name}_{which}"] -
                                                            row[f"exact_{which}"])
        log(f"exact vs {method} every {every}, rank {rank}, {config.compare_steps} steps: "
            f"{row['exact_s']:.1f} s vs {seconds:.1f} s = {row[f'{name}_speedup']:.1f}× faster; "
            f"test accuracy final {100 * row['exact_accuracy']:.2f} vs "
            f"{100 * row[f'{name}_accuracy']:.2f} % "
            f"({row[f'{name}_accuracy_difference_points']:+.2f} points), mean of the last 4 "
            f"evaluations {100 * row['exact_accuracy_last4']:.2f} vs "
            f"{100 * row[f'{name}_accuracy_last4']:.2f} % "
            f"({row[f'{name}_accuracy_last4_difference_points']:+.2f} points)")
    rows.append(row)
  return rows


if __name__ == "__main__":
  cli.run_app(run_bench)
