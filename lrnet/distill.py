"""Subclass distillation (Müller et al., 2020; origin notebook 003): a teacher with a subclass
head, then one MLP student trained from the same initialisation three ways.

With k = `model.subclasses` outputs per class (`losses.collapse` gives the class logits) the
teacher's logits t minimise CE(collapse(t), y) + β · diversity_τ(t) (`teacher.diversity`), and
the student's logits s (`student.hidden`, k outputs per class too) minimise

  alone:         CE(collapse(s), y)
  soft_targets:  (1 − w) · CE(collapse(s), y) + w · T² · KL(collapse(t)_T ‖ collapse(s)_T)
  subclass:      (1 − w) · CE(collapse(s), y) + w · T² · KL(t_T ‖ s_T)

(`losses.objective`; x_T = softmax(x / T), w and T from `student.distillation`).

The workdir is laid out as the sweep's (runs/, models/, checkpoints/, metrics/, config.json):
a rerun reuses finished runs and resumes an unfinished one. results.json, rewritten atomically
after every run:
  {"dataset", "source", "subclasses", "config", "devices",
   "runs": {run: {"test_accuracy", "val_accuracy", "params", "epochs", "best_epoch",
                  "seconds", ...} or {"error"}}}
with runs "teacher", "student_alone", "student_soft_targets", "student_subclass".
"""

from __future__ import annotations

import os

import haiku as hk
import jax
import ml_collections
import numpy as np

from lrnet import config as config_lib
from lrnet import data
from lrnet import io
from lrnet import losses
from lrnet import models
from lrnet import parallel
from lrnet import sweep
from lrnet import train

METHODS = ("alone", "soft_targets", "subclass")
RUNS = ("teacher",) + tuple(f"student_{method}" for method in METHODS)


def _check_choice(config, field: str, allowed) -> None:
  value = config_lib._get(config, field)
  if value not in allowed:
    config_lib._fail(field, value, f"allowed: {', '.join(map(str, allowed))}")


def validate_distill(config: ml_collections.ConfigDict) -> None:
  """Checks every field of a distillation config; raises config_lib.ConfigError (one line) at
  the first invalid one."""
  config_lib.check_workdir_and_seed(config)
  if not isinstance(config_lib._get(config, "overwrite"), bool):
    config_lib._fail("overwrite", config.overwrite, "must be True or False")
  config_lib._non_negative(config, "checkpoint_every_secs")
  _check_choice(config, "data.name", data.DATASETS)
  data_dir = config_lib._get(config, "data.dir")
  if data_dir is not None and not isinstance(data_dir, str):
    config_lib._fail("data.dir", data_dir, "must be a directory path or None")
  config_lib._unit_interval(config, "data.val_fraction", closed_low=False)
  _check_choice(config, "model.name", tuple(models.NETWORKS))
  config_lib.check_positive_int(config, "model.subclasses")
  widths = {"cnn": "channels", "mlp": "hidden", "convnet": "dense"}.get(config.model.name)
  if widths in config.model:
    config_lib.check_widths(config, f"model.{widths}", example="(784, 784)")
  config_lib.check_widths(config, "student.hidden", example="(784, 784)")
  for run in ("teacher", "student"):
    config_lib.check_recipe(config, run)
  config_lib._non_negative(config, "teacher.diversity.weight")
  config_lib._positive_float(config, "teacher.diversity.temperature")
  config_lib._check_number(config, "student.distillation.weight", lambda weight: 0 < weight <= 1,
                           "must be in (0, 1]")
  config_lib._positive_float(config, "student.distillation.temperature")
  config_lib.check_mesh(config)


def fingerprint(config: ml_collections.ConfigDict, run: str) -> dict:
  """The config fields a run's result depends on (a student's: the teacher's too)."""
  fields = config_lib.experiment_fields(config)
  keys = ["seed", "data", "model", "teacher"] + (["student"] if run != "teacher" else [])
  return {**{key: fields[key] for key in keys}, "run": run}


def _dropout_apply(net: hk.Transformed) -> train.ApplyFn:
  """The stateful training apply of `net` whose model state is a PRNG key [2] uint32, split
  every step: dropout acts in training only (evaluation applies `net` without a key)."""
  def apply(params, key, images):
    key, step_key = jax.random.split(key)
    return net.apply(params, step_key, images), key
  return apply


def train_run(exp: sweep.Experiment, run: str, net: hk.Transformed, settings,
              objective: losses.Objective, seed: int, teacher=None) -> tuple:
  """Trains (or reloads) the network `run` of the workdir from scratch with the recipe
  `settings` (`teacher` or `student` section) and `objective`, chosen on validation. `net`:
  `apply(params, rng, images) -> logits` [batch, classes · k]; `seed`: initialisation, dropout
  and shuffling; `teacher`: (net, params) of the teacher the objective distils, or None.
  Returns `sweep.train_lone`'s (params, state, record); the state, its dropout key, is not saved.
  """
  template = net.init(jax.random.PRNGKey(seed), exp.example)

  def members():
    teacher_apply = None if teacher is None else lambda params, x: teacher[0].apply(params, None, x)
    slow = sweep.loops_slow(template)
    epoch_fn = exp.members_epoch(
        _dropout_apply(net), settings, 1, seed=seed, objective=objective,
        teacher_apply=teacher_apply, with_rng=False,
        unroll=slow or (teacher is not None and sweep.loops_slow(teacher[1])))
    evaluate = train.make_evaluate(
        lambda params, x: losses.collapse(net.apply(params, None, x), exp.num_classes), unroll=slow)
    state = train.init_state(template, exp.optimizer(settings),
                             model_state=jax.random.PRNGKey(seed + 1), ema=settings.ema_decay > 0)
    flops = sweep.step_flops(lambda params, _, rng, x: (net.apply(params, rng, x), None), state,
                             exp.train[0][:settings.batch_size],
                             None if teacher is None else lambda x: teacher_apply(teacher[1], x))
    # A batch of one, evaluated without a loop over members.
    evaluate_members = sweep._evaluate_members(lambda tree, x, y: evaluate(tree["params"], x, y),
                                               unroll=True)
    return sweep.Members([run], [state], epoch_fn, evaluate_members, lambda tree, _: tree,
                         () if teacher is None else (teacher[1],), flops)
  return sweep.train_lone(exp, run, template, {}, members, settings, seed,
                          fingerprint(exp.config, run))


def open_experiment(config: ml_collections.ConfigDict, log: sweep.Log) -> sweep.Experiment:
  """Validates `config` and loads its data; only then prepares the workdir (a failed start
  writes nothing). Raises config_lib.ConfigError or data.DataError: an invalid config or
  missing data."""
  validate_distill(config)
  dataset = sweep.load_data(config)  # data.name is an image dataset (`validate_distill`)
  example = dataset.train.images[:1]
  with np.errstate(divide="ignore"):  # Haiku's init scale of a layer without inputs
    shapes = jax.eval_shape(hk.transform(models.network(config.model, 1)).init,
                            jax.random.PRNGKey(0), example)
  if any(0 in leaf.shape for leaf in jax.tree_util.tree_leaves(shapes)):
    config_lib._fail("model.name", config.model.name, f"its layers leave no features of the "
                     f"{'×'.join(map(str, example.shape[1:3]))} images of {config.data.name}")
  try:
    exp = sweep.Experiment(config, dataset, log)
  except ValueError as error:  # the mesh
    raise config_lib.ConfigError(str(error)) from None
  sweep.prepare_workdir(exp, {run: fingerprint(config, run) for run in RUNS})
  return exp


def run_distill(config: ml_collections.ConfigDict, log: sweep.Log = sweep._print) -> dict:
  """Trains (or resumes) the teacher and the three students of `config`; returns results.json's
  dict (module docstring).

  Raises:
    config_lib.ConfigError, data.DataError: see `open_experiment`.
    train.NonFiniteError: the teacher diverged.
  """
  exp = open_experiment(config, log)
  classes, k = exp.num_classes, config.model.subclasses
  teacher = hk.transform(models.network(config.model, classes * k))
  student = hk.transform(models.mlp_fn(classes * k, config.student.hidden))
  results = {"dataset": config.data.name, "source": exp.dataset.source, "subclasses": k,
             "config": config_lib.experiment_fields(config), "devices": parallel.describe(exp.mesh),
             "runs": {}}

  def save():
    if parallel.is_main_process():
      io.atomic_write_json(exp.path("results.json"), results)

  diversity = config.teacher.diversity
  teacher_params, _, results["runs"]["teacher"] = train_run(
      exp, "teacher", teacher, config.teacher,
      losses.objective(classes, smoothing=config.teacher.label_smoothing,
                       diversity_weight=diversity.weight,
                       diversity_temperature=diversity.temperature), config.seed)
  save()
  if teacher_params is None:
    raise train.NonFiniteError(f"the teacher diverged ({results['runs']['teacher']['error']}); "
                               f"lower teacher.learning_rate or teacher.diversity.weight")
  distillation = config.student.distillation
  for method in METHODS:
    objective = losses.objective(
        classes, smoothing=config.student.label_smoothing,
        distillation_weight=0.0 if method == "alone" else distillation.weight,
        temperature=distillation.temperature, distill_subclasses=method == "subclass")
    _, _, results["runs"][f"student_{method}"] = train_run(
        exp, f"student_{method}", student, config.student, objective, config.seed + 1,
        teacher=None if method == "alone" else (teacher, teacher_params))
    save()
  log(format_table(results, exp.workdir))
  return results


def format_table(results: dict, workdir: str) -> str:
  """The results table for the terminal."""
  lines = [f"{results['dataset']}: subclass distillation, {results['subclasses']} subclasses "
           f"per class",
           f"{'run':<22} {'test acc %':>10} {'val acc %':>10} {'params':>10} {'epochs':>7} "
           f"{'seconds':>8}"]
  for run, r in results["runs"].items():
    lines.append(f"{run:<22} FAILED: {r['error']}" if "error" in r else
                 f"{run:<22} {100 * r['test_accuracy']:>10.2f} {100 * r['val_accuracy']:>10.2f} "
                 f"{r['params']:>10,} {r['epochs']:>7} {r['seconds']:>8.1f}")
  lines.append(f"results: {os.path.join(workdir, 'results.json')}")
  return "\n".join(lines)
