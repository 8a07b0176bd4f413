"""The rank sweep: teacher → for every rank and budget, truncated (plain and whitened),
straight-through, factorized and equal-size dense-control accuracy.

Resumable by construction. In `workdir`:
  config.json                  the config of the latest sweep in this workdir
  checkpoints/<run>-<hash>/    per-epoch progress of an unfinished run or batch of runs (orbax)
  models/<run>/                final parameters of a finished run (orbax)
  runs/<run>.json              the finished run's numbers and fingerprint
  metrics/<run>.jsonl, tensorboard/<run>/   per-epoch metrics
  results.json, results.csv, accuracy_vs_params.png, latency_vs_rank.png
Every file is written atomically and the results are rewritten after every finished run.

A run's fingerprint holds the config fields its result depends on (the teacher's and a dense
control's: seed, data, model, teacher; a student's: those, `student`, `truncation`, `calibration`,
`allocation` and, straight-through, `projection`), so a sweep with more ranks or kinds reuses the
teacher and every finished run; a finished run whose fingerprint differs is refused unless
`overwrite` (then it is trained again).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lrnet import allocation
from lrnet import calibration as calibration_lib
from lrnet import checkpoint
from lrnet import compression as compress_lib
from lrnet import config as config_lib
from lrnet import data
from lrnet import io
from lrnet import losses
from lrnet import metrics as metrics_lib
from lrnet import models
from lrnet import parallel
from lrnet import plots
from lrnet import spectra as spectra_lib
from lrnet import students
from lrnet import svd
from lrnet import text
from lrnet import tracker as tracker_lib
from lrnet import train

# What each sweep point reports for every kind: `<kind>_accuracy` and `<kind>_loss` (mean test
# cross-entropy, nats per label: per byte for text), over seeds their means with `_accuracy_sd`
# and `_loss_sd`, and `_accuracy_se`, the test set's binomial standard error (`kind_numbers`).
RESULT_KINDS = ("truncated", "whitened_truncated", "straight_through", "factorized",
                "dense_control", "dense_control_long")
# The dense controls and the recipe each trains with: the students' (an equal training budget)
# or the teacher's.
DENSE_CONTROLS = {"dense_control": "student", "dense_control_long": "teacher"}
METRICS = ("accuracy", "loss", "accuracy_se", "accuracy_sd", "loss_sd")
CSV_FIELDS = (("rank", "budget", "params", "compression")
              + tuple(f"{kind}_{metric}" for kind in RESULT_KINDS for metric in METRICS)
              + ("dense_control_params", "dense_control_long_params", "latency_factorized_ms",
                 "theoretical_latency_ratio", "error"))
Log = Callable[[str], None]
_print: Log = functools.partial(print, flush=True)
PLOT_EVERY_SECS = 30.0
SILENT_SECS = 10.0  # a sweep that logged nothing this long says where it is (`heartbeat`)
WRITES = ("results.csv", plots.ACCURACY_FILE, plots.COST_FILE, plots.LATENCY_FILE,
          spectra_lib.SPECTRUM_JSON, spectra_lib.SPECTRUM_PNG, "config.json", "runs/", "models/",
          "metrics/", "tensorboard/")  # besides results.json: the final line names them


class Budget(NamedTuple):
  """A sweep point whose per-layer ranks `lrnet.allocate_ranks` chooses: a fraction of the
  compressed layers' dense weights (`sweep.budgets`)."""
  fraction: float


def sweep_points(config) -> list:
  """Every point of a sweep: the ranks, then the budgets."""
  return list(config.sweep.ranks) + [Budget(b) for b in config.sweep.budgets]


def rank_label(rank) -> str:
  """A file-name-safe label: 20 → '20', 'full' → 'full', 0.25 → 'f0.25', Budget(0.05) → 'b0.05'."""
  if isinstance(rank, Budget):
    return f"b{rank.fraction}"
  return f"f{rank}" if isinstance(rank, float) else str(rank)


def run_name(rank, kind: str, seed: int = 0) -> str:
  """'rank_8_factorized'; for the `seed`-th repetition (`sweep.seeds`) 'rank_8_factorized_seed1'."""
  return f"rank_{rank_label(rank)}_{kind}" + (f"_seed{seed}" if seed else "")


def seed_runs(config) -> list:
  """(run, kind, point, seed) of every student and control of the sweep, in training order."""
  return [(run_name(point, kind, seed), kind, point, seed) for kind in config.sweep.kinds
          for seed in range(config.sweep.seeds) for point in sweep_points(config)]


def fingerprint(config: ml_collections.ConfigDict, kind: Optional[str] = None) -> dict:
  """The config fields the teacher (`kind` None) or a student of `kind` depends on."""
  fields = config_lib.experiment_fields(config)
  keys = ["seed", "data", "model", DENSE_CONTROLS.get(kind, "teacher")]
  if kind is not None and kind not in DENSE_CONTROLS:
    keys += ["student", "truncation", "calibration", "allocation"]
    if kind == "straight_through":
      keys.append("projection")
  return {key: fields[key] for key in keys}


def _digest(fields: dict) -> str:
  return hashlib.sha256(io.dumps_json(fields).encode()).hexdigest()[:10]


def loops_slow(params) -> bool:
  """Whether `params` hold a conv kernel and run on a CPU: XLA:CPU runs convolutions inside
  loops ≈ 18× slower than outside (BUILD_NOTES.md), so such a network trains one step per call
  (`train.in_calls`) and evaluates without loops."""
  return jax.default_backend() == "cpu" and any(
      leaf.ndim > 2 for leaf in jax.tree_util.tree_leaves(params))


def eval_apply(fn: Callable) -> Callable:
  """`(tree, images, state) -> logits` of the dense network `fn` in evaluation: no rng, the
  Haiku state (BatchNorm statistics) read and not updated. `tree`: its parameters."""
  net = hk.transform_with_state(fn)
  return lambda params, images, state: net.apply(params, state, None, images)[0]


class Experiment:
  """What every run of a sweep shares: config, data on the device, networks, workdir, compiled
  programs, and where the sweep is (its plan, progress and deferred interrupts, mutated as it
  goes). What the teacher gives every point is a `Teacher`, passed explicitly."""

  def __init__(self, config: ml_collections.ConfigDict, dataset: data.Dataset, log: Log = _print):
    self.config, self.dataset, self._log = config, dataset, log
    self.workdir = os.path.abspath(config.workdir)
    split = lambda s: (jnp.asarray(s.images), jnp.asarray(s.labels))
    self.mesh = parallel.make_mesh(config.mesh.to_dict())  # None: one device
    self.train = parallel.replicate(split(dataset.train), self.mesh)  # placed once
    # Validation and test padded to one length (label -1: ignored by `train.make_evaluate`),
    # so that every evaluation function compiles once for both.
    length = max(len(dataset.val.labels), len(dataset.test.labels))
    self.val, self.test = (train.pad_split(*split(s), length) for s in (dataset.val, dataset.test))
    self.num_classes = dataset.num_classes
    self.fn = models.network(config.model, self.num_classes)
    self.train_fn, self.eval_fn = models.modes(self.fn)
    self.example = self.train[0][:1]  # input shapes select the layers of the student networks
    network = students.inspect_network(self.train_fn, self.example)
    # The compressed layers: `sweep.include` (default: every dense and conv layer but the output
    # layer and those that cannot be factorized, e.g. depthwise convs), less `sweep.exclude`.
    include, exclude = (tuple(config.get("sweep", {}).get(field, ())) for field in
                        ("include", "exclude"))  # a distillation config has no sweep group
    try:
      selected = compress_lib.select_ranks(network.params, 1, include or None, exclude or None,
                                           unfactorizable=network.unfactorizable)
    except ValueError as error:
      raise config_lib.ConfigError(
          f"config fields sweep.include={include} / sweep.exclude={exclude} are invalid: "
          f"{' '.join(str(error).split())}") from None
    shapes = compress_lib.matrix_shapes(network.params)
    self.layers = {name: shapes[name] for name in selected}
    self.unroll = loops_slow(network.params)
    self.evaluate_dense = train.make_evaluate(eval_apply(self.eval_fn), unroll=self.unroll)
    self.cache = {}             # compiled programs, shared by every rank
    self.places = {}            # {run: "3/14 rank 8 factorized"}: its place in the plan (`plan`)
    self.epochs_left = 0        # member epochs the plan has still to train (`time_left`)
    self.epochs_done = 0        # ... and has trained since
    self.latencies = {}         # forward latencies measured before (`known_latencies`)
    self.doing = "starting"     # where the sweep is, for `heartbeat`
    self.started = self.last_line = time.perf_counter()  # the plan's start, the last line's time
    self.interrupted = []       # signals deferred to the end of the epoch (`deferred_interrupts`)

  def log(self, line: str) -> None:
    self.last_line = time.perf_counter()
    self._log(line)

  def where(self, runs: list) -> str:
    """'[3/14 rank 8 factorized]': the runs' places in the plan (their names outside a sweep)."""
    return f"[{', '.join(self.places.get(run, run) for run in runs)}]"

  def latency(self, key: str, measure: Callable[[], float]) -> float:
    """A forward latency in ms: as measured before for `key` (`known_latencies`), else measured."""
    return self.latencies[key] if key in self.latencies else measure()

  def time_left(self) -> str:
    """'; sweep ≈ 40 s left': the member epochs left × the sweep's seconds per epoch so far."""
    if not (self.places and self.epochs_done):
      return ""
    left = self.epochs_left * (time.perf_counter() - self.started) / self.epochs_done
    return f"; sweep ≈ {left:.0f} s left" if left < 120 else f"; sweep ≈ {left / 60:.0f} min left"

  def optimizer(self, settings):
    """The optimizer of a run's recipe (`teacher` or `student` section)."""
    return train.optimizer(settings, self.train[1].shape[0] // settings.batch_size)

  def members_epoch(self, apply_fn: Callable, settings, num_members: int,
                    side_by_side: bool = False, distill: bool = False, seed: Optional[int] = None,
                    objective=None, teacher_apply=None, unroll: Optional[bool] = None,
                    with_rng: bool = True) -> Callable:
    """The jitted epoch of `num_members` members of `apply_fn(params, state, rng, images)`
    trained with `settings`' recipe (`train.members_epoch`; one step per call with `unroll`,
    default `self.unroll`), augmentation and dropout drawn from `seed` (default `config.seed`).
    With `distill`, the student's distillation from the teacher, whose `{"params", "state"}` the
    epoch then takes last. An `objective` and `teacher_apply` (`train.make_train_epoch`'s)
    replace the recipe's and `distill`'s."""
    if objective is None:
      weight = settings.distillation.weight if distill else 0.0
      objective = losses.objective(self.num_classes, smoothing=settings.label_smoothing,
                                   distillation_weight=weight,
                                   temperature=settings.distillation.temperature if weight else 1.0)
      teacher = eval_apply(self.eval_fn)
      teacher_apply = ((lambda tree, x: teacher(tree["params"], x, tree["state"])) if weight
                       else None)
    unroll = self.unroll if unroll is None else unroll
    epoch = train.make_train_epoch(
        apply_fn, self.optimizer(settings), settings.batch_size, settings.ema_decay,
        objective=objective, teacher_apply=teacher_apply, shift=settings.shift, flip=settings.flip,
        seed=self.config.seed if seed is None else seed, unroll=unroll, with_rng=with_rng)
    members = train.members_epoch(epoch, num_members, side_by_side, self.mesh_for(num_members))
    return train.in_calls(members, settings.batch_size, 1) if unroll else members

  def mesh_for(self, num_members: int):
    """A batch splits its members over the mesh; a lone run uses every device for its batch."""
    return self.mesh if num_members > 1 else parallel.single_run(self.mesh)

  def uniform_ranks(self, rank) -> dict:
    """{module: int} of a uniform rank (int, fraction or "full") at every compressed layer."""
    return {name: svd.resolve_rank(shape, rank) for name, shape in self.layers.items()}

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def cached(self, key, build: Callable[[], Any]) -> Any:
    if key not in self.cache:
      self.cache[key] = build()
    return self.cache[key]

  def finished(self, run: str) -> Optional[dict]:
    path = self.path("runs", f"{run}.json")
    return io.read_json(path) if os.path.exists(path) else None

  def finish(self, run: str, params, record: dict) -> dict:
    """Saves a finished run's parameters and numbers."""
    checkpoint.save_pytree(self.path("models", run), params, overwrite=True)
    if parallel.is_main_process():
      os.makedirs(self.path("runs"), exist_ok=True)
      io.atomic_write_json(self.path("runs", f"{run}.json"), record)
    return record


class Teacher(NamedTuple):
  """The trained teacher and what every sweep point derives from it (`prepare_teacher`)."""
  params: Any
  state: dict           # its Haiku state (BatchNorm statistics; {} if none)
  decompositions: dict  # its SVDs, one per compressed layer
  whitened: dict        # ... of SᵀW: whitened by the layer inputs' statistics
  allocated: dict       # {budget fraction: {module: rank}}

  def ranks(self, exp: Experiment, point) -> dict:
    """A sweep point's ranks, resolved: {module: int}, every compressed layer for a rank, the
    allocated ones for a `Budget` (the others stay dense)."""
    return self.allocated[point.fraction] if isinstance(point, Budget) else exp.uniform_ranks(point)


@contextlib.contextmanager
def deferred_interrupts(exp: Experiment):
  """Inside, SIGINT and SIGTERM are noted in `exp.interrupted` rather than stopping the process
  at once, so that the epoch in training ends and is saved first (`train_members`); a second
  one stops at once. Signal handlers live in the main thread: elsewhere nothing changes."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def note(signum, _frame):
    name = signal.Signals(signum).name
    if exp.interrupted:
      raise KeyboardInterrupt(f"{name} again: stopped at once, losing the epoch in training; "
                              "the last checkpoint and every finished run are kept")
    exp.interrupted.append(name)
  previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def heartbeat(exp: Experiment, silent_secs: float = SILENT_SECS):
  """Inside, a thread logs where the sweep is (`exp.doing`) when nothing was logged for
  `silent_secs`, and at once when an interrupt waits for the epoch to end."""
  done, told = threading.Event(), [0]

  def beat():
    while not done.wait(0.5):
      silent = time.perf_counter() - exp.last_line
      if len(exp.interrupted) > told[0]:
        told[0] = len(exp.interrupted)
        exp.log(f"{exp.interrupted[-1]}: stopping once {exp.doing} is trained and saved "
                "(again: stop at once, losing it)")
      elif silent >= silent_secs:
        exp.log(f"{exp.doing} ({silent:.0f} s without output)")
  thread = threading.Thread(target=beat, daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()


def plan(exp: Experiment) -> str:
  """Numbers the sweep's runs in training order (`exp.places`), counts the epochs they may
  train (`exp.epochs_left`) and says what will run, in one line."""
  config = exp.config
  name = lambda point: f"budget {point.fraction}" if isinstance(point, Budget) else f"rank {point}"
  runs = [("teacher", "teacher", config.teacher.epochs)] + [
      (run, f"{name(point)} {kind}" + (f" seed {seed}" if seed else ""),
       config[DENSE_CONTROLS.get(kind, "student")].epochs)
      for run, kind, point, seed in seed_runs(config)]
  for i, (run, label, _) in enumerate(runs):
    exp.places[run] = f"{i + 1}/{len(runs)} {label}"
  exp.started = time.perf_counter()
  finished = [exp.finished(run) is not None for run, _, _ in runs]
  reused = [label for (_, label, _), done in zip(runs, finished) if done]
  exp.epochs_left = sum(epochs for (_, _, epochs), done in zip(runs, finished) if not done)
  students = f"{', '.join(config.sweep.kinds)} at" if config.sweep.kinds else "truncation only at"
  at = f"ranks {', '.join(map(str, config.sweep.ranks))}" + (
      f" and budgets {', '.join(map(str, config.sweep.budgets))}" if config.sweep.budgets else "")
  seeds = f" × {config.sweep.seeds} seeds" if config.sweep.seeds > 1 else ""
  return (f"plan: {len(runs)} runs: the teacher, then {students} {at}{seeds}; "
          + (f"reusing {len(reused)} finished: {', '.join(reused)}" if reused
             else "none finished before"))


def known_latencies(exp: Experiment) -> dict:
  """The forward latencies (ms) results.json in the workdir holds for this network, its
  compressed layers, the latency settings and these devices: {"teacher": ms, `_digest` of a
  point's layer ranks: ms}; {} with `latency.remeasure`. A rerun then rewrites them unchanged."""
  path = exp.path("results.json")
  if exp.config.latency.get("remeasure") or not os.path.exists(path):
    return {}
  old = io.read_json(path)
  new = io.to_jsonable({"config": config_lib.experiment_fields(exp.config),
                        "devices": parallel.describe(exp.mesh),
                        "layers": [{"name": n, "shape": list(s)} for n, s in exp.layers.items()]})
  if (old.get("devices") != new["devices"] or old.get("layers") != new["layers"]
      or any(old["config"].get(key) != new["config"][key] for key in ("data", "model", "latency"))):
    return {}
  ranks = lambda entry: entry.get("layer_ranks") or exp.uniform_ranks(entry["rank"])
  return {"teacher": old["teacher"]["latency_ms"],
          **{_digest(ranks(entry)): entry["latency_factorized_ms"]
             for entry in old["ranks"] + old.get("budgets", [])}}


class Members(NamedTuple):
  """One batch of runs trained together by `train.fit` (a single run is a batch of one)."""
  names: list           # run names, one per member
  states: list          # initial `train.TrainState` per member
  epoch_fn: Callable    # from `train.members_epoch`
  evaluate: Callable    # (stacked {"params", "state"}, images, labels) -> (accuracies, losses), [n]
  final_params: Callable  # (member {"params", "state"}, index) -> what to save
  epoch_args: tuple = ()  # passed on to every epoch_fn call (a distilling batch's teacher)
  step_flops: Optional[float] = None  # one member's training step (`step_flops`)


def step_flops(apply_fn: Callable, state: train.TrainState, images, extra_forward=None) -> float:
  """Estimated FLOPs of one training step on the batch `images`: XLA's cost analysis of the
  lowered (not compiled) gradient of `apply_fn(params, model_state, rng, images)`'s logits —
  forward, backward and whatever the forward does besides (a straight-through student's
  trackers, less their rarely taken refresh: `tracker.refresh_left_out`; of two branches the
  analysis counts the costlier) — plus `extra_forward(images)`'s (a distilling teacher), Adam's
  updates left out."""
  def loss(params):
    return jnp.sum(apply_fn(params, state.model_state, jax.random.PRNGKey(0), images)[0])
  with tracker_lib.refresh_left_out():
    flops = jax.jit(jax.grad(loss)).lower(state.params).cost_analysis().get("flops", 0.0)
  if extra_forward is not None:
    flops += jax.jit(extra_forward).lower(images).cost_analysis().get("flops", 0.0)
  return float(flops)


def cost(record: dict) -> dict:
  """A run record's cost: optimizer steps, epochs, examples seen, wall seconds, training FLOPs."""
  return {key: record.get(key) for key in ("steps", "epochs", "examples", "seconds", "train_flops")}


def train_members(exp: Experiment, members: Members, settings, seed: int,
                  fingerprint_fields: dict) -> list:
  """Trains a batch (resuming from its checkpoint); returns per member (record, params) or
  ({"error": ...}, None) for a member whose loss or parameters stopped being finite."""
  names, count, where = members.names, len(members.names), exp.where(members.names)
  # A batch padded for the mesh holds copies: another padding must not restore its checkpoint.
  suffix = f"-x{len(members.states)}" if len(members.states) != count else ""
  checkpoint_dir = exp.path("checkpoints",
                            f"{'+'.join(names)}-{_digest(fingerprint_fields)}{suffix}")
  start = time.perf_counter()
  progress = train.start_progress(members.states, train.evaluated_with_state)
  checkpointer = checkpoint.Checkpointer(checkpoint_dir, max_to_keep=1)
  resumed = checkpointer.latest_step() is not None
  if resumed:
    progress, _ = checkpointer.restore(progress)
    exp.log(f"{where} resuming after epoch {int(progress.epoch)}")
  exp.epochs_left -= int(progress.epoch) * count
  doing = lambda progress: f"{where} epoch {int(progress.epoch) + 1} of {settings.epochs}"
  exp.doing = doing(progress)
  writers = [metrics_lib.MetricsWriter(exp.workdir, name,
                                       resume_from_step=int(step) if resumed else None)
             for name, step in zip(names, np.asarray(progress.state.step))]
  last_save = [time.perf_counter(), None]  # time and epoch of the last checkpoint

  def save(progress):
    """Checkpoints once `checkpoint_every_secs` passed since the last one (0: every epoch; a
    resume repeats at most that much training); with an interrupt deferred at once, and stops."""
    epoch, now = int(progress.epoch), time.perf_counter()
    if epoch != last_save[1] and (
        exp.interrupted or now - last_save[0] >= exp.config.checkpoint_every_secs):
      checkpointer.save(epoch, progress)
      last_save[:] = now, epoch
    if exp.interrupted:
      raise KeyboardInterrupt(f"{exp.interrupted[0]} during {where}: saved it after epoch "
                              f"{epoch} of {settings.epochs} in {checkpoint_dir}")

  def on_epoch(progress, member_metrics):
    exp.epochs_left, exp.epochs_done = exp.epochs_left - count, exp.epochs_done + count
    for name, writer, metrics in zip(names, writers, member_metrics):
      if metrics is not None:
        writer.write(metrics["step"], {k: v for k, v in metrics.items() if k != "step"})
        exp.log(f"{exp.where([name])} epoch {metrics['epoch']:3d}  loss {metrics['loss']:.4f}  "
                f"train {metrics['train_accuracy']:.4f}  val {metrics['val_accuracy']:.4f}  "
                f"({metrics['seconds']:.1f} s{exp.time_left()})")
    exp.doing = doing(progress)
    save(progress)

  try:
    with deferred_interrupts(exp):
      progress = train.fit(progress, members.epoch_fn, lambda p: members.evaluate(p, *exp.val)[0],
                           *exp.train, epochs=settings.epochs, seed=seed,
                           patience=settings.patience or None, on_epoch=on_epoch,
                           epoch_args=members.epoch_args, mesh=exp.mesh_for(len(members.states)),
                           evaluated=train.evaluated_with_state)
      if exp.interrupted:  # after the last epoch's `on_epoch`
        save(progress)
  finally:
    for writer in writers:
      writer.close()
    checkpointer.close()
  exp.epochs_left -= (settings.epochs - int(progress.epoch)) * count  # stopped early
  exp.doing = f"{where} testing"
  test_accuracy, test_loss = map(np.asarray, members.evaluate(progress.best_params, *exp.test))
  seconds, steps = time.perf_counter() - start, np.asarray(progress.state.step)
  outcomes = []
  for i, (name, params) in enumerate(zip(names, train.unstack(progress.best_params, count))):
    failed_step, step = int(progress.failed_step[i]), int(steps[i])
    if failed_step:
      message = f"{name}: non-finite loss or parameters at step {failed_step}"
      exp.log(f"[{name}] FAILED: {message}")
      outcomes.append(({"error": message}, None))
      continue
    record = {"test_accuracy": float(test_accuracy[i]), "test_loss": float(test_loss[i]),
              "val_accuracy": float(progress.best_val_accuracy[i]),
              "epochs": int(progress.epochs_done[i]), "best_epoch": int(progress.best_epoch[i]),
              "steps": step, "examples": step * settings.batch_size,
              "train_flops": None if members.step_flops is None else step * members.step_flops,
              "seconds": seconds, "trained_with": list(names), "fingerprint": fingerprint_fields}
    outcomes.append((record, members.final_params(params, i)))
  shutil.rmtree(checkpoint_dir, ignore_errors=True)
  return outcomes


def _evaluate_members(evaluate: Callable, unroll: bool = False) -> Callable:
  """(stacked params, images, labels, *member args) → (accuracies [n], mean losses [n]), member
  by member (`lax.map`, or with `unroll` one copy per member: see `Experiment.unroll`)."""
  def members(params, images, labels, *args):
    member = lambda m: evaluate(m[0], images, labels, *m[1])
    if not unroll:
      return jax.lax.map(member, (params, args))
    n = jax.tree_util.tree_leaves(params)[0].shape[0]
    outcomes = [member(tree) for tree in train.unstack((params, args), n)]
    return tuple(jnp.stack(values) for values in zip(*outcomes))
  return jax.jit(members)


def saved(params, state, kept) -> Any:
  """What a finished network saves: its parameters, with the Haiku state of the modules in
  `kept` when there are any (`{"params", "state"}`: a student's less its trackers)."""
  return {"params": params, "state": {name: state[name] for name in kept}} if kept else params


def train_lone(exp: Experiment, run: str, params, state: dict, members: Callable[[], Members],
               settings, seed: int, fields: dict) -> tuple:
  """Trains (or reloads) the lone network `run` of initial `params` and Haiku `state`: a batch of
  one (`members()`, built only when trained; its `final_params` the member's {"params", "state"})
  with the recipe `settings` and shuffling `seed`, then logged and saved (`saved`: with its state
  if `state` has any) with its parameter count. Returns (params, state, record), or (None, None,
  record with "error") if its loss or parameters stopped being finite."""
  record = exp.finished(run)
  if record is not None:
    if run not in exp.places:  # else the plan listed it
      exp.log(f"[{run}] reusing the trained {run} in {exp.path('models', run)}")
    tree = checkpoint.load_pytree(exp.path("models", run), saved(params, state, state))
    return (*((tree["params"], tree["state"]) if state else (tree, {})), record)
  [(record, tree)] = train_members(exp, members(), settings, seed, fields)
  if tree is None:
    return None, None, record
  record["params"] = compress_lib.count_params(tree["params"])
  exp.log(f"{exp.where([run])} test accuracy {record['test_accuracy']:.4f} (val "
          f"{record['val_accuracy']:.4f}, {record['epochs']} epochs, {record['seconds']:.1f} s)")
  exp.finish(run, saved(tree["params"], tree["state"], state), record)
  return tree["params"], tree["state"], record


def train_dense(exp: Experiment, run: str, fn: Callable, seed: int, fields: dict,
                settings=None) -> tuple:
  """Trains (or reloads) a dense network `fn` from scratch with the recipe `settings` (a config
  section; default the teacher's), initialised, shuffled and augmented by `seed`; returns
  `train_lone`'s (params, state, record)."""
  train_fn, eval_fn = models.modes(fn)
  net = hk.transform_with_state(train_fn)
  params, state = net.init(jax.random.PRNGKey(seed), exp.example)
  settings = settings or exp.config.teacher

  def members():
    start = train.init_state(params, exp.optimizer(settings), model_state=state,
                             ema=settings.ema_decay > 0)
    evaluate = (exp.evaluate_dense if fn is exp.fn
                else train.make_evaluate(eval_apply(eval_fn), unroll=exp.unroll))
    return Members([run], [start], exp.members_epoch(net.apply, settings, 1, seed=seed),
                   _evaluate_members(lambda tree, x, y: evaluate(tree["params"], x, y,
                                                                 tree["state"]), exp.unroll),
                   lambda tree, _: tree,
                   step_flops=step_flops(net.apply, start, exp.train[0][:settings.batch_size]))
  return train_lone(exp, run, params, state, members, settings, seed, fields)


def run_teacher(exp: Experiment) -> tuple[Any, dict, dict]:
  """Trains (or reloads) the dense teacher; returns its params, Haiku state and record. Raises
  train.NonFiniteError if its loss or parameters stopped being finite."""
  params, state, record = train_dense(exp, "teacher", exp.fn, exp.config.seed,
                                      fingerprint(exp.config))
  if params is None:
    raise train.NonFiniteError(f"the teacher diverged ({record['error']}); lower "
                               f"teacher.learning_rate or check the data")
  return params, state, record


def run_dense_control(exp: Experiment, teacher: Teacher, rank, kind: str, seed: int = 0) -> dict:
  """The dense control `kind` of `rank`: the widest network of the teacher's depth with at most
  the factorized student's parameters (`models.dense_control`), trained from scratch with the
  recipe `DENSE_CONTROLS[kind]` names, seed `config.seed + seed`."""
  run = run_name(rank, kind, seed)
  max_params = sum(row.compressed_params
                   for row in compress_lib.summarize(teacher.params, teacher.ranks(exp, rank)))
  try:
    model, params = models.dense_control(exp.config.model, exp.num_classes, exp.example, max_params)
  except ValueError as error:  # e.g. fixed conv layers larger than the student
    exp.log(f"[{run}] not trained: {error}")
    return {"error": str(error)}
  _, _, record = train_dense(exp, run, models.network(model, exp.num_classes),
                             exp.config.seed + seed, fingerprint(exp.config, kind),
                             exp.config[DENSE_CONTROLS[kind]])
  return {**record, "params": params}


def side_by_side(config) -> bool:
  """Whether a batch of several ranks trains side by side (`vmap`) rather than member by member
  (`lax.map`): on accelerators. On a CPU a vmapped straight-through epoch wedges XLA:CPU's
  Eigen thread pool, and one matmul already uses every core."""
  return jax.default_backend() != "cpu"


def rank_batches(config, ranks: list) -> list:
  """`ranks` grouped into batches of one program each: with `sweep.parallel_ranks` every integer
  rank in one batch; fractions and "full" (different ranks per layer) one by one."""
  if not config.sweep.parallel_ranks:
    return [[rank] for rank in ranks]
  integers = [rank for rank in ranks if config_lib.is_int(rank)]
  return ([integers] if integers else []) + [[rank] for rank in ranks if rank not in integers]


def student_members(exp: Experiment, teacher: Teacher, kind: str, ranks: list,
                    seed: int = 0) -> Members:
  """The `kind` students of `ranks` as one batch, all starting from the teacher, augmented and
  dropped out by `config.seed + seed` (shuffled by `train_students`). A batch of several ranks
  shares one program of the largest rank: factorized members have their factors zero-padded to
  it (a zero column of U meets a zero row of V, so both gradients and Adam's updates are exactly
  zero and the member stays a rank-r network); straight-through members project to their own
  rank, held in their state, each tracking its own r + oversample pairs padded to a common size
  (`lrnet.tracker_state`). Either way a member computes what it would alone."""
  config, settings, teacher_state = exp.config, exp.config.student, teacher.state
  width = max(ranks)  # the largest (a lone rank may be a fraction, "full" or a `Budget`)
  width_ranks = teacher.ranks(exp, width)
  # Padded with copies of the last rank to a multiple of the mesh's members axis (results dropped).
  padding = parallel.member_padding(len(ranks), exp.mesh) if len(ranks) > 1 else 0
  member_ranks = [teacher.ranks(exp, r) for r in list(ranks) + [ranks[-1]] * padding]
  optimizer, distill = exp.optimizer(settings), settings.distillation.weight > 0
  init = lambda params, state: train.init_state(params, optimizer, model_state=state,
                                                ema=settings.ema_decay > 0)
  if kind == "factorized":
    net = students.factorized(exp.train_fn, width_ranks, with_state=True, apply_rng=True)
    twin = students.factorized(exp.eval_fn, width_ranks, with_state=True)
    start = teacher.whitened if config.truncation == "whitened" else teacher.decompositions
    states = [init(compress_lib.pad_factors(compress_lib.compress(
        teacher.params, member, decompositions=start), width_ranks), teacher_state)
              for member in member_ranks]
    evaluate = train.make_evaluate(lambda params, x, state: twin.apply(params, state, x)[0],
                                   unroll=exp.unroll)
    evaluate_tree = lambda tree, x, y: evaluate(tree["params"], x, y, tree["state"])
    final_params = lambda tree, i: saved(compress_lib.unpad_factors(
        tree["params"], member_ranks[i]), tree["state"], teacher_state)
    stacked_ranks = ()
  else:
    net = students.straight_through(exp.train_fn, width_ranks, method=config.projection.method,
                                    oversample=config.projection.oversample, apply_rng=True)
    # From the teacher's weights (their projection is its truncation), or from its whitened
    # truncation (already of rank r).
    starts = [teacher.params if config.truncation == "svd" else compress_lib.project(
        teacher.params, member, decompositions=teacher.whitened) for member in member_ranks]
    states = [init(start, students.tracker_state(net, start, exp.example, rank=member,
                                                 state=teacher_state))
              for start, member in zip(starts, member_ranks)]
    # The reported student is its weights truncated exactly at its own ranks.
    evaluate_tree = lambda tree, x, y, r: exp.evaluate_dense(
        compress_lib.project_masked(tree["params"], r), x, y,
        {name: tree["state"][name] for name in teacher_state})
    final_params = lambda tree, i: saved(tree["params"], tree["state"], teacher_state)
    stacked_ranks = ({name: jnp.asarray([member[name] for member in member_ranks], jnp.int32)
                      for name in width_ranks},)
  key = (kind, rank_label(width), len(member_ranks))
  epoch_fn = exp.cached(("epoch", seed) + key, lambda: exp.members_epoch(
      net.apply, settings, len(member_ranks), side_by_side(config), distill=distill,
      seed=config.seed + seed))
  teacher_forward = ((lambda x: eval_apply(exp.eval_fn)(teacher.params, x, teacher_state))
                     if distill else None)
  evaluate_members, flops = exp.cached(("evaluate",) + key, lambda: (
      _evaluate_members(evaluate_tree, exp.unroll),
      step_flops(net.apply, states[0], exp.train[0][:settings.batch_size], teacher_forward)))
  return Members([run_name(r, kind, seed) for r in ranks], states, epoch_fn,
                 lambda tree, x, y: evaluate_members(tree, x, y, *stacked_ranks), final_params,
                 ({"params": teacher.params, "state": teacher_state},) if distill else (), flops)


def train_students(exp: Experiment, teacher: Teacher, kind: str, seed: int) -> Iterator[dict]:
  """Every `kind` student (or control) of the sweep's `seed`-th repetition, in `rank_batches`.
  Yields `{rank: record}` as runs finish (first those finished before)."""
  before = {rank: exp.finished(run_name(rank, kind, seed)) for rank in sweep_points(exp.config)}
  pending = [rank for rank, record in before.items() if record is None]
  if len(pending) < len(before):
    yield {rank: record for rank, record in before.items() if record is not None}
  if kind in DENSE_CONTROLS:
    for rank in pending:
      yield {rank: run_dense_control(exp, teacher, rank, kind, seed)}
    return
  for ranks in rank_batches(exp.config, pending):
    outcomes = train_members(exp, student_members(exp, teacher, kind, ranks, seed),
                             exp.config.student, exp.config.seed + 1 + seed,
                             fingerprint(exp.config, kind))
    for rank, (record, params) in zip(ranks, outcomes):
      if params is not None:
        name = run_name(rank, kind, seed)
        exp.log(f"{exp.where([name])} test accuracy {record['test_accuracy']:.4f} "
                f"({record['epochs']} epochs)")
        exp.finish(name, params, record)
    yield {rank: record for rank, (record, _) in zip(ranks, outcomes)}


def _differing_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differing_fields(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}")
  return out


def standard_error(accuracy: Optional[float], num_labels: int) -> Optional[float]:
  """The binomial standard error √(p(1 − p)/n) of an accuracy p measured on n test labels."""
  return None if accuracy is None else math.sqrt(accuracy * (1 - accuracy) / num_labels)


def kind_numbers(kind: str, records: list, num_labels: int) -> dict:
  """A sweep point's `<kind>_*` numbers from its runs, one per seed (`sweep.seeds`): the mean
  test accuracy and loss of the runs that finished, their sample standard deviations over seeds
  (None for one seed), the mean accuracy's binomial standard error on the `num_labels` test
  labels, how many seeds finished, the cost of one run (`cost`) and a control's parameters."""
  finished = [record for record in records if "error" not in record]
  numbers = {}
  for metric in ("accuracy", "loss"):
    values = [record[f"test_{metric}"] for record in finished]
    numbers[f"{kind}_{metric}"] = float(np.mean(values)) if values else None
    numbers[f"{kind}_{metric}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
  numbers[f"{kind}_accuracy_se"] = standard_error(numbers[f"{kind}_accuracy"], num_labels)
  numbers[f"{kind}_seeds"] = len(finished)
  numbers[f"{kind}_cost"] = cost(records[0])
  if kind in DENSE_CONTROLS:
    numbers[f"{kind}_params"] = records[0].get("params")
  return numbers


def rank_numbers(exp: Experiment, teacher: Teacher, rank) -> dict:
  """What needs no training at `rank`: size, truncated accuracy, factorized latency."""
  config, ranks, num_labels = exp.config, teacher.ranks(exp, rank), exp.dataset.test.labels.size
  rows = compress_lib.summarize(teacher.params, ranks)
  params = sum(row.compressed_params for row in rows)
  truncated, whitened = (tuple(map(float, exp.evaluate_dense(compress_lib.project(
      teacher.params, ranks, decompositions=decompositions), *exp.test, teacher.state)))
                         for decompositions in (teacher.decompositions, teacher.whitened))
  exp.log(f"[{run_name(rank, 'truncated')}] test accuracy {truncated[0]:.4f} (loss "
          f"{truncated[1]:.4f}), whitened {whitened[0]:.4f} (loss {whitened[1]:.4f})")
  factorized = students.factorized(exp.eval_fn, ranks, with_state=True)
  compressed = compress_lib.compress(teacher.params, ranks, decompositions=teacher.decompositions)
  numbers = {**({"budget": rank.fraction, "layer_ranks": ranks} if isinstance(rank, Budget)
                else {"rank": rank}),
             "params": params, "compression": compress_lib.count_params(teacher.params) / params,
             **{f"{kind}_{metric}": None for kind in RESULT_KINDS for metric in METRICS},
             "dense_control_params": None, "dense_control_long_params": None,
             "latency_factorized_ms": exp.latency(_digest(ranks), lambda: train.measure_latency(
                 lambda p, s, x: factorized.apply(p, s, x)[0], compressed, teacher.state,
                 exp.test[0][:config.latency.batch_size], repeats=config.latency.repeats)),
             # Matmul FLOPs of the factorized network over the dense one (conv layers per output
             # position: exact for the whole network only when they share one output size).
             "theoretical_latency_ratio": (sum(row.compressed_flops for row in rows)
                                           / sum(row.dense_flops for row in rows))}
  for kind, (accuracy, loss) in (("truncated", truncated), ("whitened_truncated", whitened)):
    numbers.update({f"{kind}_accuracy": accuracy, f"{kind}_loss": loss,
                    f"{kind}_accuracy_se": standard_error(accuracy, num_labels)})
  return numbers


def prepare_teacher(exp: Experiment, params, state: dict) -> Teacher:
  """The teacher with its decompositions: plain SVDs, whitened ones (`lrnet.calibrate` on
  `calibration.examples` training examples), and the ranks `lrnet.allocate_ranks` gives each
  budget (criterion `allocation.criterion`, the loss the validation split's, whitened with
  `truncation` whitened)."""
  config, layers = exp.config, list(exp.layers)
  decompositions = compress_lib.decompose(params, include=layers)
  order = train.epoch_order(config.seed, 0, exp.train[1].shape[0])[:config.calibration.examples]
  images = jnp.asarray(exp.dataset.train.images[order])  # on the default device, like the params
  batches = [images[i:i + 500] for i in range(0, images.shape[0], 500)]
  statistics = calibration_lib.calibrate(exp.eval_fn, params, batches, include=layers,
                                         damping=config.calibration.damping, state=state or None)
  whitened = compress_lib.decompose(params, include=layers, calibration=statistics)
  allocated = {}
  if config.sweep.budgets:
    greedy = config.allocation.criterion == "greedy"
    for fraction, ranks in zip(config.sweep.budgets, allocation.allocate_ranks(
        params, list(config.sweep.budgets), include=layers, criterion=config.allocation.criterion,
        calibration=statistics if config.truncation == "whitened" else None,
        loss=(lambda p: exp.evaluate_dense(p, *exp.val, state)[1]) if greedy else None)):
      allocated[fraction] = ranks
      exp.log(f"[budget {fraction}] allocated ranks {ranks}")
  return Teacher(params, state, decompositions, whitened, allocated)


def write_results(exp: Experiment, results: dict, with_plots: bool = True) -> None:
  """results.json and results.csv, and with `with_plots` both plots (≈ 0.8 s), atomically;
  by process 0 only."""
  if not parallel.is_main_process():
    return
  io.atomic_write_json(exp.path("results.json"), results)
  teacher = {**results["teacher"], "rank": "teacher", "compression": 1.0}
  fields = CSV_FIELDS + ("test_accuracy", "test_loss", "latency_ms")
  rows = [{field: entry.get(field) for field in fields}
          for entry in [teacher] + results["ranks"] + results["budgets"]]
  io.atomic_write_csv(exp.path("results.csv"), rows, fields)
  if with_plots:
    plots.write_plots(results, exp.workdir)


def format_table(results: dict, workdir: str) -> str:
  """The final results table for the terminal, and where the results went."""
  is_text, teacher = plots.is_text(results), results["teacher"]
  scale, digits, unit = (1.0, 3, "bits/byte") if is_text else (100.0, 2, "accuracy %")

  def show(entry, kind):
    """`entry`'s `kind`: `plots.score` ± `plots.spread`; "-" where not measured."""
    value, spread = (f(results, entry, f"{kind}_accuracy") for f in (plots.score, plots.spread))
    spread = "" if spread is None else f"±{spread * scale:.{digits}f}"
    return "-" if value is None else f"{value * scale:.{digits}f}{spread}"
  value = f"{plots.score(results, teacher, 'test_accuracy') * scale:.{digits}f}"
  teacher_score = f"{value} bits per byte" if is_text else f"accuracy {value} %"
  heads = [("rank", "parameters", "smaller", "truncated", "whitened", "straight-", "factorized",
            "dense", "dense ctrl.", "factorized"),
           ("", "", "by", "", "truncated", "through", "", "control", "teacher rec.", "forward ms"),
           ("", "", "") + (unit,) * len(RESULT_KINDS)]
  widths = (6, 12, 9) + (13,) * len(RESULT_KINDS) + (12,)
  lines = [f"{results['dataset']}: teacher test {teacher_score}, "
           f"{teacher['params']:,} parameters, forward {teacher['latency_ms']:.3f} ms"]
  lines += ["".join(f"{text:>{width}}" for text, width in zip(row, widths)) for row in heads]
  for e in results["ranks"] + results.get("budgets", []):
    point = str(e["rank"]) if "rank" in e else f"b{e['budget']}"
    values = "".join(f"{show(e, kind):>13}" for kind in RESULT_KINDS)
    lines.append(f"{point:>6} {e['params']:>11,} {e['compression']:>7.1f}x{values} "
                 f"{e['latency_factorized_ms']:>11.3f}"
                 + ("  FAILED: " + e["error"] if "error" in e else ""))
  seeds = results["config"]["sweep"].get("seeds", 1)
  if seeds > 1:
    lines.append(f"±: the standard deviation over {seeds} seeds"
                 + ("" if is_text else " (truncation: the binomial standard error)"))
  elif not is_text:
    lines.append(f"±: the binomial standard error √(p(1−p)/n) on the n = "
                 f"{results['test_labels']:,} test labels")
  if results.get("budgets"):
    lines.append("budgets (bF: a fraction F of the compressed layers' weights), ranks per layer: "
                 + "; ".join(f"b{e['budget']} {e['layer_ranks']}" for e in results["budgets"]))
  lines.append(f"results: {os.path.join(workdir, 'results.json')}, and in that directory "
               f"{', '.join(WRITES)}")
  return "\n".join(lines)


def load_data(config: ml_collections.ConfigDict) -> data.Dataset:
  """The dataset of a config's `data` group: images (`lrnet.data`) or text (`lrnet.text`).
  Raises data.DataError if it cannot be found or read, config_lib.ConfigError if a teacher or
  student batch is larger than its training split."""
  if config.data.name == text.NAME:
    dataset = text.load_text(config.data.path, config.data.max_bytes, config.data.context,
                             config.data.val_fraction)
  else:
    dataset = data.load_dataset(config.data.name, config.data.dir,
                                val_fraction=config.data.val_fraction, seed=config.seed)
  for run in ("teacher", "student"):
    if config[run].batch_size > len(dataset.train.labels):
      raise config_lib.ConfigError(
          f"config field {run}.batch_size={config[run].batch_size} is invalid: larger than the "
          f"{len(dataset.train.labels)} training examples of {config.data.name}")
  return dataset


def open_experiment(config: ml_collections.ConfigDict, log: Log = _print) -> Experiment:
  """Validates `config`, loads its data, and only then prepares the workdir: a failed start
  writes nothing. Raises config_lib.ConfigError (an invalid config, or finished runs of other
  settings) or data.DataError (the dataset cannot be found or read)."""
  if not parallel.is_main_process():  # several processes: process 0 logs and writes
    log = lambda line: None
  config_lib.validate(config)
  dataset = load_data(config)
  try:
    mesh = parallel.make_mesh(config.mesh.to_dict())
    lone = parallel.single_run(mesh)  # the teacher, dense controls, ranks trained alone
    parallel.check_batch_size(config.teacher.batch_size, lone, "teacher.batch_size")
    alone = any(len(batch) == 1 for batch in rank_batches(config, sweep_points(config)))
    parallel.check_batch_size(config.student.batch_size, lone if alone else mesh,
                              "student.batch_size")
  except ValueError as error:
    raise config_lib.ConfigError(str(error)) from None
  exp = Experiment(config, dataset, log)
  for rank in config.sweep.ranks:
    config_lib.check_rank_value(rank, list(exp.layers.values()), "sweep.ranks")
  prepare_workdir(exp, {"teacher": fingerprint(config), **{
      run: fingerprint(config, kind) for run, kind, _, _ in seed_runs(config)}})
  log(f"devices: {parallel.describe(exp.mesh)}")
  return exp


def prepare_workdir(exp: Experiment, expected: dict) -> None:
  """Refuses finished runs in the workdir trained under other settings than `expected`
  ({run: fingerprint}), or with `overwrite` removes them (all of them when the teacher differs:
  every student depends on it); then writes config.json and logs the data trained on. Raises
  config_lib.ConfigError naming the runs and the differing fields, or an unwritable workdir."""
  config, dataset, workdir = exp.config, exp.dataset, exp.workdir
  stale = {}
  for run, fields in io.to_jsonable(expected).items():
    record = exp.finished(run)
    if record is not None and record.get("fingerprint") != fields:
      stale[run] = _differing_fields(record.get("fingerprint") or {}, fields)
  if stale and not config.overwrite:
    run, fields = next(iter(stale.items()))
    raise config_lib.ConfigError(
        f"workdir {workdir} holds {len(stale)} finished run(s) trained with other settings "
        f"(e.g. {run}: {', '.join(fields) or 'no fingerprint'}); use another --config.workdir or "
        f"pass --config.overwrite=True to retrain them")
  if "teacher" in stale:
    for entry in ("runs", "models", "checkpoints", "metrics", "tensorboard"):
      shutil.rmtree(exp.path(entry), ignore_errors=True)
  else:
    for run in stale:
      os.remove(exp.path("runs", f"{run}.json"))
      shutil.rmtree(exp.path("models", run), ignore_errors=True)
  try:
    os.makedirs(workdir, exist_ok=True)
    io.atomic_write_json(exp.path("config.json"), config_lib.experiment_fields(config))
  except OSError as error:
    raise config_lib.ConfigError(f"config field workdir={config.workdir!r} is invalid: "
                                 f"{error.strerror or error}") from None
  exp.log(f"{config.data.name}: {len(dataset.train.labels)} train / {len(dataset.val.labels)} "
          f"val / {len(dataset.test.labels)} test examples from {dataset.source}; workdir "
          f"{workdir}")


def run_sweep(config: ml_collections.ConfigDict, log: Log = _print) -> dict:
  """Runs (or resumes) the whole sweep of `config`; returns the results dict.

  Raises:
    config_lib.ConfigError, data.DataError: see `open_experiment`.
    train.NonFiniteError: the teacher diverged.
    KeyboardInterrupt: SIGINT or SIGTERM; a run in training saves its epoch first and says so.
  """
  exp = open_experiment(config, log)
  exp.latencies = known_latencies(exp)  # before results.json is rewritten
  exp.log(plan(exp))
  with heartbeat(exp):
    params, state, record = run_teacher(exp)
    exp.doing = "calibrating the whitened truncation, allocating the budgets' ranks"
    teacher = prepare_teacher(exp, params, state)
    write_spectra(exp, teacher)
    exp.doing = "truncating and timing every rank and budget"
    results = untrained_results(exp, teacher, record)
    write_results(exp, results)
    train_kinds(exp, teacher, results)
    exp.log(format_table(results, exp.workdir))
    return results


def write_spectra(exp: Experiment, teacher: Teacher) -> None:
  """The teacher's layer spectra: logged, written, and plotted with the swept ranks marked."""
  spectra = spectra_lib.layer_spectra({name: teacher.params[name] for name in exp.layers})
  io.atomic_write_json(exp.path(spectra_lib.SPECTRUM_JSON), spectra)
  points = [teacher.ranks(exp, point) for point in sweep_points(exp.config)]
  swept = {name: sorted({ranks[name] for ranks in points if name in ranks}) for name in exp.layers}
  io.atomic_savefig(plots.plot_teacher_spectrum(spectra, exp.config.data.name, swept),
                    exp.path(spectra_lib.SPECTRUM_PNG), dpi=150)
  exp.log(spectra_lib.format_spectra(spectra))


def untrained_results(exp: Experiment, teacher: Teacher, record: dict) -> dict:
  """results.json before any student: the teacher's numbers and cost, the compressed layers,
  and every point's `rank_numbers`."""
  config, num_labels = exp.config, exp.dataset.test.labels.size
  batch = exp.test[0][:config.latency.batch_size]
  return {"dataset": config.data.name, "config": config_lib.experiment_fields(config),
          "devices": parallel.describe(exp.mesh), "test_labels": int(num_labels),
          "teacher": {**{key: record.get(key) for key in ("test_accuracy", "test_loss",
                                                          "val_accuracy", "params")},
                      "test_accuracy_se": standard_error(record["test_accuracy"], num_labels),
                      **cost(record),
                      "latency_ms": exp.latency("teacher", lambda: train.measure_latency(
                          eval_apply(exp.eval_fn), teacher.params, batch, teacher.state,
                          repeats=config.latency.repeats))},
          "layers": [{"name": name, "shape": list(shape)} for name, shape in exp.layers.items()],
          "ranks": [rank_numbers(exp, teacher, rank) for rank in config.sweep.ranks],
          "budgets": [rank_numbers(exp, teacher, Budget(b)) for b in config.sweep.budgets]}


def train_kinds(exp: Experiment, teacher: Teacher, results: dict) -> None:
  """Trains every kind of `sweep.kinds` at every point, seed by seed, into `results` (each
  entry's `kind_numbers` over the seeds so far), rewriting results.json and the CSV after every
  run and the plots at most every PLOT_EVERY_SECS (≈ 0.8 s a drawing) and after every kind."""
  config, num_labels = exp.config, exp.dataset.test.labels.size
  entries = dict(zip(sweep_points(config), results["ranks"] + results["budgets"]))
  runs, errors = {}, {}  # {(kind, point): [record per seed so far]}, {point: [failure]}
  last_plot = time.perf_counter()
  for kind in config.sweep.kinds:
    for seed in range(config.sweep.seeds):
      for records in train_students(exp, teacher, kind, seed):
        for point, record in records.items():
          runs.setdefault((kind, point), []).append(record)
          entries[point].update(kind_numbers(kind, runs[kind, point], num_labels))
          if "error" in record:
            errors.setdefault(point, []).append(f"{kind}: {record['error']}")
            entries[point]["error"] = "; ".join(errors[point])
        with_plots = time.perf_counter() - last_plot >= PLOT_EVERY_SECS
        write_results(exp, results, with_plots=with_plots)
        last_plot = time.perf_counter() if with_plots else last_plot
    write_results(exp, results)
    last_plot = time.perf_counter()


def train_teacher_only(config: ml_collections.ConfigDict, log: Log = _print) -> dict:
  """Trains (or reloads) the teacher of `config` into its workdir; returns its record."""
  exp = open_experiment(config, log)
  with heartbeat(exp):
    return run_teacher(exp)[2]
