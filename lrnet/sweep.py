"""The rank sweep: teacher → for every rank, truncated / straight-through / factorized accuracy.

Resumable by construction. In `workdir`:
  config.json                  the experiment this workdir belongs to
  checkpoints/<run>/<step>/    per-epoch training progress of an unfinished run (orbax)
  models/<run>/                final parameters of a finished run (orbax)
  runs/<run>.json              the finished run's numbers; a run with one is never redone
  metrics/<run>.jsonl, tensorboard/<run>/   per-epoch metrics
  results.json, results.csv, accuracy_vs_params.png, latency_vs_rank.png
Every file is written atomically and the results are rewritten after every finished run.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lrnet import checkpoint
from lrnet import compression as compress_lib
from lrnet import config as config_lib
from lrnet import data
from lrnet import io
from lrnet import metrics as metrics_lib
from lrnet import models
from lrnet import plots
from lrnet import rank_batch
from lrnet import svd
from lrnet import train

KINDS = config_lib.STUDENT_KINDS
CSV_FIELDS = ("rank", "params", "compression", "truncated_accuracy", "straight_through_accuracy",
              "factorized_accuracy", "latency_dense_ms", "latency_factorized_ms",
              "theoretical_latency_ratio", "error")
Log = Callable[[str], None]
PLOT_EVERY_SECS = 30.0


def _print(line: str) -> None:
  print(line, flush=True)


def rank_label(rank) -> str:
  """A file-name-safe label: 20 → '20', 'full' → 'full', 0.25 → 'f0.25'."""
  return f"f{rank}" if isinstance(rank, float) else str(rank)


class Experiment:
  """What every run of a sweep shares: config, data on the device, networks, workdir."""

  def __init__(self, config: ml_collections.ConfigDict, log: Log = _print):
    self.config = config
    self.log = log
    self.workdir = os.path.abspath(config.workdir)
    self.dataset = data.load_dataset(config.data.name, config.data.dir,
                                     val_fraction=config.data.val_fraction, seed=config.seed)
    split = lambda s: (jnp.asarray(s.images), jnp.asarray(s.labels))
    self.train = split(self.dataset.train)
    # Validation and test padded to one length (label -1: ignored by `train.make_evaluate`),
    # so that every evaluation function compiles once for both.
    length = max(self.dataset.val.labels.size, self.dataset.test.labels.size)
    self.val, self.test = (train.pad_split(*split(s), length)
                           for s in (self.dataset.val, self.dataset.test))
    self.hidden = tuple(config.model.hidden)
    self.num_classes = self.dataset.num_classes
    self.dense = models.mlp(self.hidden, self.num_classes)
    self.evaluate_dense = train.make_evaluate(self.dense.apply)
    self.teacher_params = None  # set once the teacher is trained or loaded
    self.cache = {}             # compiled student programs, shared by every rank

  def periodic_saver(self, checkpointer: checkpoint.Checkpointer) -> Callable[[int, Any], None]:
    """`save(step, tree)` that writes a checkpoint when `checkpoint_every_secs` have passed
    since the last one (0: every call). Resume then repeats at most that much training."""
    last = [time.perf_counter()]

    def save(step: int, tree) -> None:
      now = time.perf_counter()
      if now - last[0] >= self.config.checkpoint_every_secs:
        checkpointer.save(step, tree)
        last[0] = now
    return save

  def jitted(self, name: str, fn: Callable) -> Callable:
    """`jax.jit(fn)`, made once per `name` and reused (one compilation for every rank)."""
    if name not in self.cache:
      self.cache[name] = jax.jit(fn)
    return self.cache[name]

  def log_epoch(self, run: str, metrics: dict) -> None:
    self.log(f"[{run}] epoch {metrics['epoch']:3d}  loss {metrics['loss']:.4f}  "
             f"train {metrics['train_accuracy']:.4f}  val {metrics['val_accuracy']:.4f}  "
             f"({metrics['seconds']:.1f} s)")

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def init_dense(self):
    return self.dense.init(jax.random.PRNGKey(self.config.seed), self.train[0][:1])

  def accuracy(self, evaluate, params, split) -> float:
    return float(evaluate(params, *split)[0])

  def finished(self, run: str) -> Optional[dict]:
    path = self.path("runs", f"{run}.json")
    return io.read_json(path) if os.path.exists(path) else None

  def fit(self, run: str, params, apply_fn, validate, settings, seed_offset: int,
          apply_args: tuple = (), model_state=None, epoch_fn: Optional[Callable] = None):
    """Trains `params` (resuming from the run's last epoch checkpoint); returns final progress.

    `epoch_fn`: a jitted epoch of `apply_fn` shared with other runs (compiled once); None:
    one is built (and compiled) for this run.
    """
    optimizer = train.adam(settings.learning_rate)
    state = train.init_state(params, optimizer, model_state=model_state,
                             ema=settings.ema_decay > 0)
    progress = train.start_progress(state)
    # Not donating the state: donation was ruled out while chasing the batched straight-through
    # deadlock (BUILD_NOTES.md, known limits) and left off; it costs one extra state copy.
    if epoch_fn is None:
      epoch_fn = jax.jit(train.make_train_epoch(apply_fn, optimizer, settings.batch_size,
                                                ema_decay=settings.ema_decay))
    checkpointer = checkpoint.Checkpointer(self.path("checkpoints", run), max_to_keep=1)
    resumed = checkpointer.latest_step()
    if resumed is not None:
      progress, _ = checkpointer.restore(progress)
      self.log(f"[{run}] resuming after epoch {int(progress.epochs_done)}")
    writer = metrics_lib.MetricsWriter(self.workdir, run,
                                       resume_from_step=int(progress.state.step) if resumed is not None else None)
    saver = self.periodic_saver(checkpointer)

    def on_epoch(progress, metrics):
      saver(int(progress.state.step), progress)
      writer.write(metrics["step"], {k: v for k, v in metrics.items() if k != "step"})
      self.log_epoch(run, metrics)

    try:
      return train.fit(progress, epoch_fn, validate, *self.train, epochs=settings.epochs,
                       seed=self.config.seed + seed_offset, patience=settings.patience or None,
                       what=run, apply_args=apply_args, on_epoch=on_epoch)
    finally:
      writer.close()
      checkpointer.close()

  def finish(self, run: str, params, record: dict) -> dict:
    """Saves a finished run's parameters and numbers; drops its epoch checkpoints."""
    checkpoint.save_pytree(self.path("models", run), params, overwrite=True)
    os.makedirs(self.path("runs"), exist_ok=True)
    io.atomic_write_json(self.path("runs", f"{run}.json"), record)
    shutil.rmtree(self.path("checkpoints", run), ignore_errors=True)
    return record


def prepare_workdir(config: ml_collections.ConfigDict) -> None:
  """Creates the workdir, or checks that it belongs to this config.

  Raises:
    config_lib.ConfigError: the workdir holds another config's results and
      `config.overwrite` is False.
  """
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, "config.json")
  fields = config_lib.experiment_fields(config)
  if os.path.exists(config_path):
    previous = io.read_json(config_path)
    if previous != io.to_jsonable(fields):
      differing = _differing_fields(previous, io.to_jsonable(fields))
      if not config.overwrite:
        raise config_lib.ConfigError(
            f"workdir {workdir} holds results of a different config (differs in: "
            f"{', '.join(differing)}); use another --config.workdir or pass "
            f"--config.overwrite=True to replace them")
      for entry in ("checkpoints", "models", "runs", "metrics", "tensorboard", "results.json",
                    "results.csv", "accuracy_vs_params.png", "latency_vs_rank.png"):
        target = os.path.join(workdir, entry)
        if os.path.isdir(target):
          shutil.rmtree(target)
        elif os.path.exists(target):
          os.remove(target)
  io.atomic_write_json(config_path, fields)


def _differing_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
  keys = sorted(set(old) | set(new))
  out = []
  for key in keys:
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differing_fields(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}")
  return out


def run_teacher(exp: Experiment) -> tuple[Any, dict]:
  """Trains (or reloads) the dense teacher. Returns its params and its record."""
  run = "teacher"
  template = exp.init_dense()
  record = exp.finished(run)
  if record is not None:
    exp.log(f"[teacher] reusing the trained teacher in {exp.path('models', run)}")
    return checkpoint.load_pytree(exp.path("models", run), template), record
  validate = lambda p: exp.accuracy(exp.evaluate_dense, p, exp.val)
  progress = exp.fit(run, template, train.stateful_apply(exp.dense), validate, exp.config.teacher,
                     seed_offset=0)
  params = progress.best_params
  record = {"test_accuracy": exp.accuracy(exp.evaluate_dense, params, exp.test),
            "val_accuracy": float(progress.best_val_accuracy),
            "params": compress_lib.count_params(params),
            "epochs": int(progress.epochs_done), "best_epoch": int(progress.best_epoch),
            "seconds": float(progress.seconds)}
  exp.log(f"[teacher] test accuracy {record['test_accuracy']:.4f} (val {record['val_accuracy']:.4f}, "
          f"{record['epochs']} epochs, {record['seconds']:.1f} s)")
  return params, exp.finish(run, params, record)


def run_name(rank, kind: str) -> str:
  return f"rank_{rank_label(rank)}_{kind}"


class StraightThroughProgram(NamedTuple):
  """The compiled straight-through program shared by the integer ranks (`sweep.parallel_ranks`):
  a student projected at a traced rank, its subspaces tracked at `batch_width` + oversample."""
  net: Any            # models.mlp(..., project_rank=width): apply(params, state, x, rank)
  epoch_fn: Callable  # jitted train epoch; the rank is its last argument
  width: int


def straight_through_program(exp: Experiment) -> StraightThroughProgram:
  if "straight_through_program" not in exp.cache:
    settings, projection = exp.config.student, exp.config.projection
    width = batch_width(exp.config)
    net = models.mlp(exp.hidden, exp.num_classes, project_rank=width,
                     projection_method=projection.method,
                     projection_update_every=projection.update_every)
    epoch_fn = jax.jit(train.make_train_epoch(train.stateful_apply(net),
                                              train.adam(settings.learning_rate),
                                              settings.batch_size, ema_decay=settings.ema_decay))
    exp.cache["straight_through_program"] = StraightThroughProgram(net, epoch_fn, width)
  return exp.cache["straight_through_program"]


def _student_run(exp: Experiment, kind: str, rank, teacher_params, shared: bool = False) -> dict:
  """Trains one student of `kind` at `rank` from the teacher, or returns its finished record.

  With `shared` (straight-through, integer rank), through the program every integer rank uses
  (`straight_through_program`: one compilation; subspaces of `width + oversample` columns),
  else with a program of its own. (Factorized students of integer ranks train in batches.)
  """
  run = run_name(rank, kind)
  record = exp.finished(run)
  if record is not None:
    return record
  start = time.perf_counter()
  model_state, apply_args, epoch_fn = None, (), None
  if kind == "straight_through" and shared:
    program = straight_through_program(exp)
    net, epoch_fn, params = program.net, program.epoch_fn, teacher_params
    apply_args = (jnp.int32(rank),)
    if exp.config.projection.method != "exact":
      model_state = models.projection_state(teacher_params, program.width, len(exp.hidden),
                                            exp.config.projection.oversample,
                                            exp.config.projection.method)
    project = exp.jitted("project_masked", compress_lib.project_masked)
    evaluate = lambda p, split: exp.accuracy(exp.evaluate_dense, project(p, rank), split)
  elif kind == "straight_through":
    method = exp.config.projection.method
    net = models.mlp(exp.hidden, exp.num_classes, project_rank=rank, projection_method=method,
                     projection_update_every=exp.config.projection.update_every)
    params = teacher_params
    if method != "exact":
      model_state = models.projection_state(teacher_params, rank, len(exp.hidden),
                                            exp.config.projection.oversample, method)
    project = jax.jit(lambda p: compress_lib.project(p, rank))
    evaluate = lambda p, split: exp.accuracy(exp.evaluate_dense, project(p), split)
  else:
    net = models.mlp(exp.hidden, exp.num_classes, ranks=rank)
    params = compress_lib.compress(teacher_params, rank)
    evaluate_factorized = train.make_evaluate(net.apply)
    evaluate = lambda p, split: exp.accuracy(evaluate_factorized, p, split)
  try:
    progress = exp.fit(run, params, train.stateful_apply(net), lambda p: evaluate(p, exp.val),
                       exp.config.student, seed_offset=1, model_state=model_state,
                       apply_args=apply_args, epoch_fn=epoch_fn)
  except train.NonFiniteError as error:
    exp.log(f"[{run}] FAILED: {error}")
    return {"error": str(error)}  # not saved as finished: a later run may try again
  record = {"test_accuracy": evaluate(progress.best_params, exp.test),
            "val_accuracy": float(progress.best_val_accuracy),
            "epochs": int(progress.epochs_done), "best_epoch": int(progress.best_epoch),
            "seconds": time.perf_counter() - start}
  exp.log(f"[{run}] test accuracy {record['test_accuracy']:.4f} ({record['epochs']} epochs)")
  return exp.finish(run, progress.best_params, record)


def batch_width(config) -> Optional[int]:
  """The static width k shared by the integer-rank students: the largest integer rank."""
  ints = [r for r in config.sweep.ranks if config_lib.is_int(r)]
  return max(ints) if ints else None


class BatchProgram(NamedTuple):
  """A compiled student program of one width, mapped over a member axis."""
  epoch_fn: Callable  # rank_batch.batch_epoch(...)
  accuracy: Callable  # (stacked params, images, labels[, ranks]) -> test accuracies [n]


def side_by_side(config) -> bool:
  """Whether a factorized batch trains its members side by side (`vmap`) rather than member by
  member (`lax.map`) in its one program: with `sweep.parallel_ranks` on an accelerator. On a CPU
  one matmul already uses every core, and the benchmark measured vmap slower than lax.map there
  (10.9 vs 9.5 s for the reference ranks, BUILD_NOTES.md)."""
  return bool(config.sweep.parallel_ranks) and jax.default_backend() != "cpu"


def factorized_program(exp: Experiment, width: int) -> BatchProgram:
  """The (cached) factorized program of rank `width`, mapped over a member axis: each member's
  factors are zero-padded to `width` (`rank_batch.pad_factors`). With `sweep.parallel_ranks` one
  batch holds every integer rank (side by side where `side_by_side`); else every batch has one
  member at its own rank."""
  key = ("factorized_program", width)
  if key not in exp.cache:
    settings = exp.config.student
    net = models.mlp(exp.hidden, exp.num_classes, ranks=width)
    evaluate = train.make_evaluate(net.apply)
    exp.cache[key] = BatchProgram(
        epoch_fn=rank_batch.batch_epoch(train.make_train_epoch(
            train.stateful_apply(net), train.adam(settings.learning_rate), settings.batch_size,
            settings.ema_decay), vectorize=side_by_side(exp.config)),
        accuracy=jax.jit(jax.vmap(lambda p, x, y: evaluate(p, x, y)[0], in_axes=(0, None, None))))
  return exp.cache[key]


# On a CPU, a zero-padded batch may cost at most this much more matmul work than its members
# trained one by one at their own ranks.
CPU_PADDING_BUDGET = 1.1


def factorized_batches(config, ranks: list) -> list:
  """The integer `ranks` of the factorized students, grouped into batches of one program each.

  Without `sweep.parallel_ranks`, one rank per batch. With it on an accelerator, one batch of all
  ranks, trained side by side. With it on a CPU, where members of a batch run one after the
  other and padding makes each cost the batch's largest rank: ascending ranks grouped greedily
  while len(batch) · max(batch) ≤ CPU_PADDING_BUDGET · Σ batch (a factorized layer's FLOPs are
  proportional to its rank), so `parallel_ranks` never costs more than 1.1× the one-by-one
  training and still shares one compilation among ranks close together.
  """
  if not config.sweep.parallel_ranks:
    return [[rank] for rank in ranks]
  if side_by_side(config):
    return [list(ranks)] if ranks else []
  batches = []
  for rank in sorted(ranks):
    if batches and (len(batches[-1]) + 1) * rank <= CPU_PADDING_BUDGET * (sum(batches[-1]) + rank):
      batches[-1].append(rank)
    else:
      batches.append([rank])
  return batches


def straight_through_batch_program(exp: Experiment) -> BatchProgram:
  """The shared straight-through program (`straight_through_program`) mapped over a member
  axis: members train side by side (`vmap`), each at its own traced rank, the last argument of
  the epoch and of `accuracy` (validation of the exactly projected weights)."""
  if "straight_through_batch_program" not in exp.cache:
    settings = exp.config.student
    net = straight_through_program(exp).net
    evaluate = exp.evaluate_dense
    exp.cache["straight_through_batch_program"] = BatchProgram(
        epoch_fn=rank_batch.batch_epoch(train.make_train_epoch(
            train.stateful_apply(net), train.adam(settings.learning_rate), settings.batch_size,
            settings.ema_decay), vectorize=True),
        accuracy=jax.jit(jax.vmap(
            lambda p, x, y, r: evaluate(compress_lib.project_masked(p, r), x, y)[0],
            in_axes=(0, None, None, 0))))
  return exp.cache["straight_through_batch_program"]


def straight_through_batches(config, ranks: list) -> list:
  """The integer `ranks` of the straight-through students, grouped into batches trained side by
  side in one program: with `sweep.parallel_ranks` on an accelerator, one batch of all of them.

  On a CPU none: a vmapped straight-through epoch wedged XLA:CPU's Eigen thread pool (every
  worker idle, the epoch never done; BUILD_NOTES.md, known limits), and member by member would
  gain nothing there over the shared program one run at a time, which is what they use instead.
  """
  return [list(ranks)] if side_by_side(config) and ranks else []


def train_rank_batch(exp: Experiment, kind: str, ranks: list) -> dict:
  """Trains the `kind` students of integer `ranks` as one batch; returns {rank: record}.

  Factorized members are zero-padded to the largest rank (`factorized_program`); straight-through
  members all start from the teacher's weights and the shared program's subspaces, each projected
  at its own rank (`straight_through_batch_program`). Finished members are saved like single
  runs (models/<run>, runs/<run>.json); a member that hit NaN/Inf gets {"error": ...} and is not
  saved, so a later run retries it.
  """
  width = max(ranks)
  settings = exp.config.student
  names = [run_name(r, kind) for r in ranks]
  batch_run = f"{kind}_ranks_{'-'.join(rank_label(r) for r in ranks)}"
  start = time.perf_counter()
  optimizer = train.adam(settings.learning_rate)
  states = []
  if kind == "factorized":
    program, apply_args = factorized_program(exp, width), ()
    for rank in ranks:
      params = rank_batch.pad_factors(compress_lib.compress(exp.teacher_params, rank), width)
      states.append(train.init_state(params, optimizer, ema=settings.ema_decay > 0))
    accuracy = program.accuracy
    final_params = lambda params, rank: rank_batch.unpad_factors(params, rank)
  else:
    program = straight_through_batch_program(exp)
    member_ranks = jnp.asarray(ranks, jnp.int32)
    apply_args = (member_ranks,)
    model_state = None
    if exp.config.projection.method != "exact":
      model_state = models.projection_state(exp.teacher_params, straight_through_program(exp).width,
                                            len(exp.hidden), exp.config.projection.oversample,
                                            exp.config.projection.method)
    for _ in ranks:
      states.append(train.init_state(exp.teacher_params, optimizer, model_state=model_state,
                                     ema=settings.ema_decay > 0))
    accuracy = lambda params, images, labels: program.accuracy(params, images, labels,
                                                               member_ranks)
    final_params = lambda params, rank: params
  batch = rank_batch.start_batch(states)
  checkpointer = checkpoint.Checkpointer(exp.path("checkpoints", batch_run), max_to_keep=1)
  resumed = checkpointer.latest_step() is not None
  if resumed:
    batch, _ = checkpointer.restore(batch)
    exp.log(f"[{batch_run}] resuming after epoch {int(batch.epoch)}")
  steps = np.asarray(batch.progress.state.step)
  writers = [metrics_lib.MetricsWriter(exp.workdir, name,
                                       resume_from_step=int(steps[i]) if resumed else None)
             for i, name in enumerate(names)]
  saver = exp.periodic_saver(checkpointer)

  def on_epoch(batch, member_metrics):
    saver(int(batch.epoch), batch)
    for name, writer, metrics in zip(names, writers, member_metrics):
      if metrics is not None:
        writer.write(metrics["step"], {k: v for k, v in metrics.items() if k != "step"})
        exp.log_epoch(name, metrics)

  try:
    batch = rank_batch.fit_batch(
        batch, program.epoch_fn, lambda p: accuracy(p, *exp.val), *exp.train,
        epochs=settings.epochs, seed=exp.config.seed + 1, patience=settings.patience or None,
        apply_args=apply_args, on_epoch=on_epoch)
  finally:
    for writer in writers:
      writer.close()
    checkpointer.close()
  progress = batch.progress
  test_accuracy = np.asarray(accuracy(progress.best_params, *exp.test))
  seconds = time.perf_counter() - start
  records = {}
  for i, (rank, name, params) in enumerate(zip(ranks, names,
                                               rank_batch.unstack(progress.best_params, len(ranks)))):
    failed_step = int(batch.failed_step[i])
    if failed_step:
      message = rank_batch.failure_message(name, failed_step)
      exp.log(f"[{name}] FAILED: {message}")
      records[rank] = {"error": message}
      continue
    record = {"test_accuracy": float(test_accuracy[i]),
              "val_accuracy": float(progress.best_val_accuracy[i]),
              "epochs": int(progress.epochs_done[i]), "best_epoch": int(progress.best_epoch[i]),
              "seconds": seconds, "trained_with_ranks": list(ranks)}
    exp.log(f"[{name}] test accuracy {record['test_accuracy']:.4f} ({record['epochs']} epochs)")
    records[rank] = exp.finish(name, final_params(params, rank), record)
  shutil.rmtree(exp.path("checkpoints", batch_run), ignore_errors=True)
  return records


def train_students(exp: Experiment, kind: str, on_records: Callable[[dict], None]) -> None:
  """Every `kind` student of the sweep. Calls `on_records({rank: record})` as runs finish (or
  were finished before).

  Factorized students of integer ranks train in batches (`factorized_batches`), each in one call
  of one program zero-padded to its largest rank: with `sweep.parallel_ranks` all ranks side by
  side on an accelerator, and on a CPU only ranks close enough that padding costs ≤ 10 % more;
  else one by one, each at its own rank. Straight-through students of integer ranks with
  `sweep.parallel_ranks` share one compiled program: on an accelerator they train side by side
  in one call of it (`straight_through_batches`), on a CPU one by one through it
  (`_student_run`); without `parallel_ranks` each has its own program (subspaces of
  r + oversample columns, cheaper per step at small r).
  """
  batchable, done = [], {}
  for rank in exp.config.sweep.ranks:
    record = exp.finished(run_name(rank, kind))
    if record is not None:
      done[rank] = record
    elif config_lib.is_int(rank):
      batchable.append(rank)
  if kind == "factorized":
    batches = factorized_batches(exp.config, batchable)
  else:
    batches = straight_through_batches(exp.config, batchable)
  pending = [rank for ranks in batches for rank in ranks]
  if done:
    on_records(done)
  shared = exp.config.sweep.parallel_ranks
  for rank in exp.config.sweep.ranks:
    if rank not in done and rank not in pending:
      on_records({rank: _student_run(exp, kind, rank, exp.teacher_params,
                                     shared=shared and config_lib.is_int(rank))})
  for ranks in batches:
    on_records(train_rank_batch(exp, kind, ranks))


def rank_numbers(exp: Experiment, rank, teacher_params) -> dict:
  """What needs no training at `rank`: size, truncated accuracy, latency."""
  config = exp.config
  shapes = config_lib.hidden_layer_shapes(config)
  compressed = jax.eval_shape(lambda p: compress_lib.compress(p, rank), teacher_params)
  params = compress_lib.count_params(compressed)
  if config_lib.is_int(rank):
    projected = exp.jitted("project_masked", compress_lib.project_masked)(teacher_params, rank)
  else:
    projected = jax.jit(lambda p: compress_lib.project(p, rank))(teacher_params)
  truncated = exp.accuracy(exp.evaluate_dense, projected, exp.test)
  exp.log(f"[rank {rank}] truncated test accuracy {truncated:.4f}")
  entry = {"rank": rank, "params": params,
           "compression": compress_lib.count_params(teacher_params) / params,
           "truncated_accuracy": truncated,
           "straight_through_accuracy": None, "factorized_accuracy": None}
  factorized = models.mlp(exp.hidden, exp.num_classes, ranks=rank)
  batch = exp.test[0][:config.latency.batch_size]
  factorized_params = compress_lib.compress(teacher_params, rank)
  entry["latency_dense_ms"] = train.measure_latency(exp.jitted("dense", exp.dense.apply),
                                                    teacher_params, batch,
                                                    repeats=config.latency.repeats)
  entry["latency_factorized_ms"] = train.measure_latency(factorized.apply, factorized_params, batch,
                                                         repeats=config.latency.repeats)
  # Matmul FLOPs of the factorized hidden layers over the dense ones (the output layer is equal).
  layer_ranks = [svd.resolve_rank(shape, rank) for shape in shapes]
  dense_flops = sum(m * n for m, n in shapes)
  entry["theoretical_latency_ratio"] = sum(r * (m + n) for r, (m, n) in zip(layer_ranks, shapes)) / dense_flops
  return entry


def break_even_rank(config) -> float:
  """r at which r·(m + n) = m·n for the widest hidden layer: past it factorizing costs more."""
  m, n = max(config_lib.hidden_layer_shapes(config), key=lambda s: s[0] * s[1])
  return m * n / (m + n)


def write_results(exp: Experiment, results: dict, with_plots: bool = True) -> None:
  """results.json and results.csv, and with `with_plots` both plots (≈ 0.8 s), atomically."""
  io.atomic_write_json(exp.path("results.json"), results)
  rows = [{field: entry.get(field) for field in CSV_FIELDS} for entry in results["ranks"]]
  io.atomic_write_csv(exp.path("results.csv"), rows, CSV_FIELDS)
  if with_plots:
    plots.write_plots(results, exp.workdir, break_even_rank=break_even_rank(exp.config))


def format_table(results: dict) -> str:
  """The final results table for the terminal."""
  pct = lambda v: "   -  " if v is None else f"{100 * v:6.2f}"
  teacher = results["teacher"]
  lines = [f"{results['dataset']}: teacher test accuracy {pct(teacher['test_accuracy'])} %, "
           f"{teacher['params']:,} parameters",
           f"{'rank':>6} {'params':>10} {'compr.':>7} {'trunc %':>8} {'s-t %':>8} {'factor %':>8} "
           f"{'dense ms':>9} {'factor ms':>9}"]
  for e in results["ranks"]:
    lines.append(f"{str(e['rank']):>6} {e['params']:>10,} {e['compression']:>7.2f} "
                 f"{pct(e['truncated_accuracy']):>8} {pct(e.get('straight_through_accuracy')):>8} "
                 f"{pct(e.get('factorized_accuracy')):>8} {e['latency_dense_ms']:>9.3f} "
                 f"{e['latency_factorized_ms']:>9.3f}" + ("  FAILED: " + e["error"] if "error" in e else ""))
  return "\n".join(lines)


def run_sweep(config: ml_collections.ConfigDict, log: Log = _print) -> dict:
  """Runs (or resumes) the whole sweep of `config`; returns the results dict.

  Order: teacher; every rank's truncation, size and latency; the straight-through students;
  the factorized students. The results files are rewritten after each of these steps.

  Raises:
    config_lib.ConfigError: an invalid config or a workdir of another config.
    data.DataError: the dataset cannot be found or read.
  """
  config_lib.validate(config)
  prepare_workdir(config)
  exp = Experiment(config, log)
  log(f"{config.data.name}: {exp.dataset.train.labels.size} train / {exp.dataset.val.labels.size} val / "
      f"{exp.dataset.test.labels.size} test examples from {exp.dataset.source}; workdir {exp.workdir}")
  teacher_params, teacher = run_teacher(exp)
  exp.teacher_params = teacher_params
  results = {"dataset": config.data.name, "config": config_lib.experiment_fields(config),
             "teacher": {key: teacher[key] for key in ("test_accuracy", "val_accuracy", "params",
                                                      "epochs", "seconds")},
             "ranks": [rank_numbers(exp, rank, teacher_params) for rank in config.sweep.ranks]}
  write_results(exp, results)
  entries = dict(zip(config.sweep.ranks, results["ranks"]))
  # Plots are redrawn after a finished run only if PLOT_EVERY_SECS have passed since the last
  # drawing (≈ 0.8 s each; the quick start finishes runs every few seconds), and always once
  # every kind is done; results.json/csv after every run.
  last_plot = [time.perf_counter()]

  for kind in config.sweep.kinds:
    def on_records(records, kind=kind):
      for rank, record in records.items():
        entry = entries[rank]
        entry[f"{kind}_accuracy"] = record.get("test_accuracy")
        if "error" in record:
          entry["error"] = "; ".join(filter(None, [entry.get("error"), f"{kind}: {record['error']}"]))
      with_plots = time.perf_counter() - last_plot[0] >= PLOT_EVERY_SECS
      write_results(exp, results, with_plots=with_plots)
      if with_plots:
        last_plot[0] = time.perf_counter()
    train_students(exp, kind, on_records)
    write_results(exp, results)
    last_plot[0] = time.perf_counter()
  log(format_table(results))
  return results


def train_teacher_only(config: ml_collections.ConfigDict, log: Log = _print) -> dict:
  """Trains (or reloads) the teacher of `config` into its workdir; returns its record."""
  config_lib.validate(config)
  prepare_workdir(config)
  return run_teacher(Experiment(config, log))[1]
