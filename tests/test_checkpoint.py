"""Tests for lrnet/checkpoint.py: exact round trips, retention, atomicity."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import logging as absl_logging

from lrnet import checkpoint

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TrainState(NamedTuple):
  params: hk.Params        # haiku MLP params
  opt_state: Any           # optax chain(clip, adam) state
  net_state: hk.State      # haiku state dict (e.g. batch-norm statistics)
  step: int                # Python int
  loss_scale: np.float32   # numpy scalar
  lr: float                # Python float
  np_rng: np.ndarray       # numpy MT19937 key, uint32[624]
  rng: jax.Array           # jax PRNG key, uint32[2]


@jax.jit
def _train_one_step(seed: int):
  """Haiku MLP params and optax state after one real (non-trivial) update."""
  net = hk.without_apply_rng(hk.transform(
      lambda x: hk.nets.MLP([32, 16, 10])(x)))
  params = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, 20)))
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  opt_state = optimizer.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5 + seed), params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _make_state(seed: int) -> TrainState:
  params, opt_state = _train_one_step(seed)
  net_state = {"batch_norm/~/mean_ema": {
      "average": jnp.arange(10, dtype=jnp.bfloat16) * seed,
      "counter": jnp.array(seed, dtype=jnp.int32)}}
  return TrainState(
      params=params, opt_state=opt_state, net_state=net_state,
      step=100 + seed, loss_scale=np.float32(2.0 ** -seed), lr=0.1 * seed,
      np_rng=np.random.RandomState(seed).get_state()[1],
      rng=jax.random.PRNGKey(seed + 1))


def _assert_identical(actual, expected):
  """Same structure (incl. NamedTuple types), leaf types, dtypes and values."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    if isinstance(want, jax.Array):
      assert isinstance(got, jax.Array)
    else:
      assert type(got) is type(want), (type(got), type(want))
    assert np.asarray(got).dtype == np.asarray(want).dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_round_trip_is_exact(tmp_path):
  saved = _make_state(seed=1)
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(7, saved, metadata={"epoch": np.int64(3), "note": "teacher"})
    restored, metadata = ckpt.restore(_make_state(seed=2))
  _assert_identical(restored, saved)
  assert isinstance(restored.opt_state[1][0], optax.ScaleByAdamState)
  assert metadata == {"epoch": 3, "note": "teacher"}


def test_keeps_last_steps_and_restores_a_chosen_one(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  assert ckpt.latest_step() is None
  with pytest.raises(FileNotFoundError):
    ckpt.restore(_make_state(0))
  for step in range(4):
    ckpt.save(step, _make_state(seed=step), metadata={"step": step})
  assert ckpt.steps() == [2, 3]
  assert ckpt.latest_step() == 3
  assert sorted(os.listdir(tmp_path)) == ["2", "3"]
  state, metadata = ckpt.restore(_make_state(0), step=2)
  _assert_identical(state, _make_state(seed=2))
  assert metadata == {"step": 2}
  with pytest.raises(FileNotFoundError):
    ckpt.restore(_make_state(0), step=1)
  with pytest.raises(Exception, match="already exists"):
    ckpt.save(3, _make_state(0))
  ckpt.close()
  # A new Checkpointer (e.g. a resumed process) sees the same steps.
  with checkpoint.Checkpointer(tmp_path) as reopened:
    assert reopened.latest_step() == 3
    _assert_identical(reopened.restore(_make_state(0))[0], _make_state(3))


def test_mismatched_target_raises(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(0, {"w": np.ones(3), "b": 1})
    with pytest.raises(ValueError):
      ckpt.restore({"w": np.ones(3)})
    with pytest.raises(ValueError):
      ckpt.restore({"w": np.ones(4), "b": 1})


def test_leftover_tmp_dir_is_ignored_and_cleaned(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _make_state(1))
    # What a save killed half-way leaves behind.
    leftover = tmp_path / "5.orbax-checkpoint-tmp"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "junk").write_bytes(b"\x00" * 10)
    assert ckpt.latest_step() == 1
    assert ckpt.steps() == [1]
    _assert_identical(ckpt.restore(_make_state(0))[0], _make_state(1))
  with checkpoint.Checkpointer(tmp_path) as reopened:
    assert reopened.latest_step() == 1
    reopened.save(2, _make_state(2))  # orbax removes leftovers before saving
    assert not leftover.exists()
    assert reopened.steps() == [1, 2]


_KILLED_SAVE_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from orbax.checkpoint._src.path import async_path
    from lrnet import checkpoint

    directory = sys.argv[1]
    ckpt = checkpoint.Checkpointer(directory)
    ckpt.save(1, {"w": np.full(1000, 1.0)})
    original_rename = async_path.rename

    async def rename_then_die(src, dst):
      # Everything of step 2 is written; die just before it is committed.
      if os.path.basename(str(dst)) == "2":
        os.kill(os.getpid(), signal.SIGKILL)
      return await original_rename(src, dst)

    async_path.rename = rename_then_die
    ckpt.save(2, {"w": np.full(1000, 2.0)})
""")


def test_killed_save_is_never_the_latest(tmp_path):
  directory = tmp_path / "ckpt"
  result = subprocess.run(
      [sys.executable, "-c", _KILLED_SAVE_SCRIPT, str(directory)],
      cwd=_REPO_ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": _REPO_ROOT})
  assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
  assert "2.orbax-checkpoint-tmp" in os.listdir(directory)  # died mid-save
  with checkpoint.Checkpointer(directory) as ckpt:
    assert ckpt.latest_step() == 1
    state, _ = ckpt.restore({"w": np.zeros(1000)})
  np.testing.assert_array_equal(state["w"], np.full(1000, 1.0))


def test_save_and_load_pytree(tmp_path):
  path = tmp_path / "teacher_params"
  params = _make_state(3).params
  checkpoint.save_pytree(path, params)
  _assert_identical(checkpoint.load_pytree(path, _make_state(0).params), params)
  with pytest.raises(FileExistsError):
    checkpoint.save_pytree(path, params)
  checkpoint.save_pytree(path, _make_state(4).params, overwrite=True)
  _assert_identical(checkpoint.load_pytree(path, params), _make_state(4).params)
  assert sorted(os.listdir(tmp_path)) == ["teacher_params"]  # no tmp dirs
  with pytest.raises(FileNotFoundError):
    checkpoint.load_pytree(tmp_path / "missing", params)


def test_failed_overwrite_keeps_old_pytree(tmp_path, monkeypatch):
  path = tmp_path / "teacher_params"
  params = _make_state(3).params
  checkpoint.save_pytree(path, params)
  original_save = checkpoint._save_standard

  def save_then_fail(new_path, tree):
    original_save(new_path, tree)  # the new tree is complete...
    raise KeyboardInterrupt  # ...but the process is interrupted

  monkeypatch.setattr(checkpoint, "_save_standard", save_then_fail)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save_pytree(path, _make_state(4).params, overwrite=True)
  monkeypatch.setattr(checkpoint.os, "rename",
                      _fail_swapping_in(os.rename, path))
  monkeypatch.setattr(checkpoint, "_save_standard", original_save)
  with pytest.raises(OSError, match="second rename"):
    checkpoint.save_pytree(path, _make_state(4).params, overwrite=True)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["teacher_params"]
  _assert_identical(checkpoint.load_pytree(path, params), params)


def _fail_swapping_in(rename, path):
  """os.rename that fails when the new tree is renamed onto `path`."""

  def rename_or_fail(src, dst):
    if (os.fspath(dst) == os.fspath(path)
        and os.path.basename(src).startswith(".tmp-")):
      raise OSError("second rename failed")
    return rename(src, dst)
  return rename_or_fail


def test_restore_into_abstract_target(tmp_path):
  state = _make_state(1)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(0, state.params)
    restored, _ = ckpt.restore(jax.eval_shape(lambda: state.params))
  _assert_identical(restored, state.params)


def test_orbax_info_logs_are_hidden_but_warnings_kept(tmp_path, caplog):
  previous = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    with caplog.at_level(logging.INFO):
      with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"w": np.ones(3)})
        ckpt.restore({"w": np.ones(3)})
      absl_logging.info("user line")
  finally:
    absl_logging.set_verbosity(previous)
  messages = [record.getMessage() for record in caplog.records]
  assert "user line" in messages
  assert not [r for r in caplog.records if "orbax" in r.pathname]
  warning = logging.LogRecord("absl", logging.WARNING,
                              "/x/orbax/checkpoint/y.py", 1, "w", None, None)
  info = logging.LogRecord("absl", logging.INFO,
                           "/x/orbax/checkpoint/y.py", 1, "i", None, None)
  assert checkpoint.ORBAX_INFO_FILTER.filter(warning)
  assert not checkpoint.ORBAX_INFO_FILTER.filter(info)
