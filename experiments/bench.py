r"""Benchmark of the lean core in one run: straight-through vs dense train steps, the alternating
tracker's optimality and SVD fallbacks over real Adam steps, factorized vs dense inference.

  python -m experiments.bench --config=configs/bench.py --config.workdir=/tmp/lrnet_bench

Students start from a trained network, where the projection is used: models/teacher of
`teacher_dir`, else the MLP trained `pretrain_steps` Adam steps on `data_name` here (a random
initialisation has a flat spectrum, the tracker's worst case). Prints a table and writes
`bench.json` (atomically) into the workdir: machine {platform, jax, backend, device_kind,
cpu_count}; config (as run); data (the data set and its source); start (where the students'
parameters come from); matmul_gflops (float32 1024² matmul throughput);

  dense_step: {ms, gflops}: the dense Adam step (median of its interleaved blocks) and the
    FLOP rate it achieves (3 products per layer: forward and two backward)
  train_steps: [{method, rank, ms, ratio}]: straight-through step; ratio = its time / the dense
    step's, both summed over blocks run in turn
  optimality: {max, refreshes, tracker_calls, ranks: [{rank, steps, max, median, measurements,
    refreshes}]}: ρ = ‖W − Ŵ‖_F / ‖W − W_r‖_F (≥ 1, 1 optimal) of the Ŵ each layer of an
    alternating student would apply next (`next_projection`), every `optimality_every` of
    `optimality_steps` Adam steps; refreshes: tracker calls replaced by an exact SVD
  latency: [{batch, rank, dense_ms, factorized_ms, ratio, theoretical_ratio}]: median forward
    times; theoretical_ratio = Σ r(m + n) / Σ m·n over the factorized (hidden) layers
"""

import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli
from lrnet import checkpoint
from lrnet import compression
from lrnet import config as config_lib
from lrnet import data
from lrnet import io
from lrnet import models
from lrnet import runtime
from lrnet import students
from lrnet import tracker
from lrnet import train

RANK_FIELDS = ("ranks", "exact_ranks", "optimality_ranks")


def validate(config) -> None:
  """One-line `ConfigError`s naming the field, teacher_dir first (ranks: `check_ranks`)."""
  config_lib.check_teacher_dir(config.teacher_dir)
  config_lib.check_workdir(config.workdir)
  for field in ("batch_size", "block_steps", "repeats", "exact_repeats", "optimality_steps",
                "optimality_every", "input_dim", "num_classes"):
    config_lib.check_positive_int(config, field)
  config_lib._positive_float(config, "learning_rate")
  config_lib.check_positive_int(config, "pretrain_steps", allow_zero=True)
  if config.optimality_every > config.optimality_steps:
    raise config_lib.ConfigError(f"config field optimality_every={config.optimality_every!r} is "
                                 f"invalid: must be <= optimality_steps={config.optimality_steps}")
  if config.data_name not in data.DATASETS + ("random",):
    config_lib._fail("data_name", config.data_name, f"allowed: {', '.join(data.DATASETS)}, random")
  for field in ("hidden", "latency_batch_sizes") + RANK_FIELDS:
    values = config[field]
    if not isinstance(values, (tuple, list)) or not values or not all(
        config_lib.is_int(v) and v >= 1 for v in values):
      config_lib._fail(field, values, "must be a non-empty tuple of integers >= 1")


def check_ranks(config, hidden_shapes) -> None:
  """One-line `ConfigError` unless every rank makes every hidden layer [m, n] smaller,
  r·(m + n) < m·n: only then is each one factorized and projected
  (`lrnet.compression.select_ranks`)."""
  max_rank = min((m * n - 1) // (m + n) for m, n in hidden_shapes)
  for field in RANK_FIELDS:
    if max(config[field]) > max_rank:
      config_lib._fail(field, config[field], f"ranks must be in 1..{max_rank} (r·(m + n) < m·n "
                                             f"for every hidden layer {hidden_shapes})")


def _load_data(config):
  """(train images [N, d], labels [N], num_classes, description): `data_name` from
  `lrnet.data`, or "random": 20 batches of uniform random images of `input_dim` pixels."""
  if config.data_name == "random":
    key = jax.random.PRNGKey(config.seed + 1)
    n = 20 * config.batch_size
    return (jax.random.uniform(key, (n, config.input_dim)),
            jax.random.randint(key, (n,), 0, config.num_classes), config.num_classes, "random")
  dataset = data.load_dataset(config.data_name, config.data_dir, seed=config.seed)
  images = dataset.train.images.reshape(dataset.train.images.shape[0], -1)
  return (jnp.asarray(images), jnp.asarray(dataset.train.labels), dataset.num_classes,
          f"{config.data_name} ({dataset.source})")


def _order(seed: int, steps: int, batch: int, num_examples: int) -> jax.Array:
  """Example indices of `steps` batches, [steps·batch]: the seeded shuffles, epoch after epoch."""
  epochs = -(-steps * batch // num_examples)
  order = np.concatenate([train.epoch_order(seed, e, num_examples) for e in range(1, epochs + 1)])
  return jnp.asarray(order[:steps * batch])


def _start_params(config, dense, optimizer, images, labels):
  """(params, description): the teacher of `teacher_dir`, or `pretrain_steps` Adam steps."""
  params = dense.init(jax.random.PRNGKey(config.seed), images[:1])
  if config.teacher_dir is not None:
    path = os.path.join(config.teacher_dir, "models", "teacher")
    return checkpoint.load_pytree(path, params), f"teacher from {config.teacher_dir}"
  if not config.pretrain_steps:
    return params, "random initialisation"
  epoch = jax.jit(train.make_train_epoch(train.stateful_apply(dense), optimizer, config.batch_size))
  order = _order(config.seed, config.pretrain_steps, config.batch_size, labels.shape[0])
  state, metrics = epoch(train.init_state(params, optimizer), images, labels, order)
  if not np.isfinite(np.asarray(metrics["loss"])).all():
    raise train.NonFiniteError("pretraining diverged: lower learning_rate")
  return state.params, f"{config.pretrain_steps} Adam steps on {config.data_name}"


def _block_timer(net, params, model_state, optimizer, images, labels, order, batch, warmup=True):
  """A function timing one block of Adam steps of `net` (one jitted `lax.scan` over `order`)
  in seconds; the state advances from block to block, so tracker calls count as in training.
  Compiled, and with `warmup` run once, before it is returned."""
  state = train.commit(train.init_state(params, optimizer, model_state))
  epoch = jax.jit(train.make_train_epoch(train.stateful_apply(net), optimizer, batch)).lower(
      state, images, labels, order).compile()

  def run() -> float:
    nonlocal state
    start = time.perf_counter()
    state = jax.block_until_ready(epoch(state, images, labels, order)[0])
    return time.perf_counter() - start

  if warmup:
    run()
  return run


def _train_steps(config, params, hidden, num_classes, optimizer, images, labels, log):
  """(rows of `train_steps`, dense step ms): alternating at `ranks`, exact at `exact_ranks`."""
  batch, steps = config.batch_size, config.block_steps
  order = _order(config.seed, steps, batch, labels.shape[0])
  timer = functools.partial(_block_timer, optimizer=optimizer, images=images, labels=labels,
                            order=order, batch=batch)
  run_dense = timer(models.mlp(hidden, num_classes), params, None)
  dense_times, rows = [], []
  settings = [("alternating", rank, config.repeats) for rank in config.ranks]
  settings += [("exact", rank, config.exact_repeats) for rank in config.exact_ranks]
  for method, rank, blocks in settings:
    net = models.mlp(hidden, num_classes, project_rank=rank, projection_method=method)
    model_state = students.tracker_state(net, params, images[:1])
    # An exact block is seconds long: first-call overheads vanish in it, no warm-up needed.
    run_student = timer(net, params, model_state, warmup=method != "exact")
    # Dense and student blocks in turn keep the ratio honest on a machine whose speed drifts:
    # alone and first, the dense step ran 20–30 % slow on the shared 2-core CPU (BUILD_NOTES.md).
    dense_s, student_s = zip(*[(run_dense(), run_student()) for _ in range(blocks)])
    dense_times += dense_s
    rows.append({"method": method, "rank": rank, "ms": sum(student_s) / (blocks * steps) * 1e3,
                 "ratio": sum(student_s) / sum(dense_s)})
    log(f"train step {method} rank {rank}: {rows[-1]['ratio']:.2f}× dense")
  return rows, float(np.median(dense_times)) / steps * 1e3


@functools.partial(jax.jit, static_argnums=2)
def next_projection(w: jax.Array, layer_state: tracker.TrackerState, rank: int) -> jax.Array:
  """Ŵ [m, n]: the rank-r projection an alternating layer whose tracker state is `layer_state`
  applies to its weight `w` [m, n] on its next call. `tracker.project` is pure: the state it
  returns is dropped, so the student's own state does not advance."""
  _, left, right = tracker.project(w, layer_state, rank)
  return tracker.leading_rows(left, rank).T @ right


def _optimality(config, params, hidden, num_classes, optimizer, images, labels, log) -> dict:
  """The `optimality` section: alternating students trained from `params`, one jitted step
  per call, ρ of every hidden layer's next projection every `optimality_every` steps."""
  batch, steps = config.batch_size, config.optimality_steps
  order = _order(config.seed, steps, batch, labels.shape[0])
  entries = []
  for rank in config.optimality_ranks:
    net = models.mlp(hidden, num_classes, project_rank=rank)
    step = jax.jit(train.make_train_epoch(train.stateful_apply(net), optimizer, batch))
    optimality = jax.jit(lambda w, layer_state: tracker.optimality_ratio(
        w, next_projection(w, layer_state, rank), rank))
    state = train.commit(train.init_state(
        params, optimizer, students.tracker_state(net, params, images[:1])))
    ratios, layers = [], [f"linear_{layer}" for layer in range(len(hidden))]
    for i in range(steps):
      state, _ = step(state, images, labels, order[i * batch:(i + 1) * batch])
      if (i + 1) % config.optimality_every == 0:
        ratios += [float(optimality(state.params[layer]["w"], state.model_state[layer]["tracker"]))
                   for layer in layers]
    refreshes = sum(int(state.model_state[layer]["tracker"].refreshes) for layer in layers)
    entries.append({"rank": rank, "steps": steps, "max": max(ratios),
                    "median": float(np.median(ratios)), "measurements": len(ratios),
                    "refreshes": refreshes})
    log(f"optimality rank {rank}: max ρ {entries[-1]['max']:.6f}, {refreshes} refreshes")
  return {"max": max(entry["max"] for entry in entries),
          "refreshes": sum(entry["refreshes"] for entry in entries),
          "tracker_calls": steps * len(hidden) * len(entries), "ranks": entries}


def _latency(config, params, hidden, num_classes, shapes) -> list:
  """The `latency` section: dense vs factorized forward at every batch size and rank."""
  dense, rows = models.mlp(hidden, num_classes), []
  hidden_shapes = shapes[:-1]  # the output layer stays dense
  for size in config.latency_batch_sizes:
    x = jax.random.uniform(jax.random.PRNGKey(config.seed), (size, shapes[0][0]))
    dense_ms = train.measure_latency(dense.apply, params, x, repeats=4 * config.repeats)  # jits
    for rank in config.ranks:
      ms = train.measure_latency(models.mlp(hidden, num_classes, ranks=rank).apply,
                                 compression.compress(params, rank), x, repeats=4 * config.repeats)
      theory = sum(rank * (m + n) for m, n in hidden_shapes) / sum(m * n for m, n in hidden_shapes)
      rows.append({"batch": size, "rank": rank, "dense_ms": dense_ms, "factorized_ms": ms,
                   "ratio": ms / dense_ms, "theoretical_ratio": theory})
  return rows


def _matmul_gflops(repeats: int) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (1024, 1024))
  ms = train.measure_latency(jax.jit(lambda a: a @ a), a, repeats=max(4 * repeats, 10))
  return 2 * 1024**3 / (ms * 1e-3) / 1e9


def format_table(out: dict) -> str:
  """The results of `run_bench` as a plain-text table."""
  machine, dense, optimality = out["machine"], out["dense_step"], out["optimality"]
  lines = [
      f"machine: {machine['platform']}, jax {machine['jax']} on {machine['backend']} "
      f"({machine['device_kind']}), {machine['cpu_count']} CPUs",
      f"start: {out['start']}; data: {out['data']}",
      f"matmul 1024²: {out['matmul_gflops']:.1f} GFLOP/s; dense train step {dense['ms']:.2f} ms "
      f"= {dense['gflops']:.1f} GFLOP/s ({100 * dense['gflops'] / out['matmul_gflops']:.0f} % "
      "of matmul)",
      "", "train step, straight-through vs dense (interleaved blocks, ratio of sums)",
      f"  {'method':<12}{'rank':>6}{'ms/step':>10}{'× dense':>9}"]
  lines += [f"  {row['method']:<12}{row['rank']:>6}{row['ms']:>10.2f}{row['ratio']:>9.2f}"
            for row in out["train_steps"]]
  lines += ["", f"SVD REFRESHES of the alternating tracker: {optimality['refreshes']} of "
                f"{optimality['tracker_calls']} calls; max optimality ρ {optimality['max']:.6f}",
            f"  {'rank':>6}{'steps':>7}{'max ρ':>11}{'median ρ':>11}{'measured':>10}"
            f"{'refreshes':>11}"]
  lines += [f"  {e['rank']:>6}{e['steps']:>7}{e['max']:>11.6f}{e['median']:>11.6f}"
            f"{e['measurements']:>10}{e['refreshes']:>11}" for e in optimality["ranks"]]
  lines += ["", "inference, factorized vs dense (median forward)",
            f"  {'batch':>6}{'rank':>6}{'dense ms':>10}{'fact. ms':>10}{'ratio':>8}{'theory':>8}"]
  lines += [f"  {r['batch']:>6}{r['rank']:>6}{r['dense_ms']:>10.3f}{r['factorized_ms']:>10.3f}"
            f"{r['ratio']:>8.3f}{r['theoretical_ratio']:>8.3f}" for r in out["latency"]]
  return "\n".join(lines)


def run_bench(config, log=print) -> dict:
  """Every section of the module docstring; returns what it writes to bench.json."""
  validate(config)
  # One LAPACK thread throughout, the exact SVDs included, as `experiments.sweep` trains: on
  # the shared 2-core CPU a second thread made a 1024² SVD 4–5× slower (0.5 s vs 2.2 s).
  runtime.limit_lapack_threads(1)
  images, labels, num_classes, source = _load_data(config)
  hidden = tuple(config.hidden)
  widths = [images.shape[1], *hidden, num_classes]
  shapes = list(zip(widths[:-1], widths[1:]))
  check_ranks(config, shapes[:-1])
  dense, optimizer = models.mlp(hidden, num_classes), optax.adam(config.learning_rate)
  out = {"machine": {"platform": platform.platform(), "jax": jax.__version__,
                     "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                     "cpu_count": os.cpu_count()},
         "config": config.to_dict(), "data": source}
  params, out["start"] = _start_params(config, dense, optimizer, images, labels)
  log(f"start: {out['start']}; data: {source}")
  out["matmul_gflops"] = _matmul_gflops(config.repeats)
  sections = (params, hidden, num_classes, optimizer, images, labels, log)
  out["train_steps"], dense_ms = _train_steps(config, *sections)
  step_flops = 3 * 2 * config.batch_size * sum(m * n for m, n in shapes)
  out["dense_step"] = {"ms": dense_ms, "gflops": step_flops / (dense_ms * 1e-3) / 1e9}
  out["optimality"] = _optimality(config, *sections)
  out["latency"] = _latency(config, params, hidden, num_classes, shapes)
  os.makedirs(config.workdir, exist_ok=True)
  path = os.path.join(config.workdir, "bench.json")
  io.atomic_write_json(path, out)
  log(format_table(out))
  log(f"wrote {path}")
  return out


if __name__ == "__main__":
  cli.run_app(run_bench)
