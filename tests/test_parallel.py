"""Tests for lrnet/parallel.py and `train.members_epoch` on a mesh.

Meshes of several devices run in one subprocess with four simulated CPU devices (XLA_FLAGS must
be set before JAX starts); each of its checks reports "ok" or its traceback to the test of the
same name. The rest runs here, on one device.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrnet import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# On four devices. Straight-through members (the tracked projection, a rank each, of a 16-32-10
# MLP) distil from the teacher, whose params every epoch takes as a shared argument.
FOUR_DEVICES = r'''
import json, sys, time, traceback
import haiku as hk, jax, jax.numpy as jnp, numpy as np, optax
import lrnet
from lrnet import losses, models, parallel, train

rng = np.random.default_rng(0)
images = jnp.asarray(rng.normal(size=(256, 16)).astype(np.float32))
labels = jnp.asarray(rng.integers(0, 10, 256).astype(np.int32))
order = jnp.asarray(train.epoch_order(0, 1, 256))
fn = models.mlp_fn(10, (32,))
dense = hk.without_apply_rng(hk.transform(fn))
teacher = dense.init(jax.random.PRNGKey(0), images[:1])
optimizer = optax.adam(1e-2)
student = lrnet.straight_through(fn, 8)
student_epoch = train.make_train_epoch(
    train.stateful_apply(student), optimizer, 32, teacher_apply=dense.apply,
    objective=losses.objective(10, distillation_weight=0.5, temperature=4.0))

def students(ranks):
  return train.stack([train.init_state(teacher, optimizer, model_state=lrnet.tracker_state(
      student, teacher, images[:1], rank=rank)) for rank in ranks])

def one_device(epoch, states, num_members, *shared):
  return train.members_epoch(epoch, num_members)(train.commit(states), images, labels, order,
                                                 *shared)

def on_mesh(epoch, states, num_members, spec, *shared, side_by_side=False):
  mesh = parallel.make_mesh(spec)
  epoch_fn = train.members_epoch(epoch, num_members, side_by_side, mesh)
  return epoch_fn(parallel.shard_members(states, mesh), images, labels, order, *shared)

def assert_close(a, b, tolerance):
  """Leaf by leaf: max |a - b| <= tolerance * max |b| (rounding, relative to the leaf's scale)."""
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    error, scale = np.abs(np.asarray(x) - np.asarray(y)).max(), np.abs(np.asarray(y)).max()
    assert error <= tolerance * scale, (error, scale)

def assert_bitwise(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

BASELINE = one_device(student_epoch, students([2, 4, 6, 8]), 4, teacher)  # lax.map

def members_bitwise():
  out = on_mesh(student_epoch, students([2, 4, 6, 8]), 4, {"members": -1}, teacher,
                side_by_side=True)
  w = out[0].params["linear_0"]["w"]
  assert w.sharding.spec == jax.sharding.PartitionSpec("members"), w.sharding
  assert [shard.data.shape[0] for shard in w.addressable_shards] == [1, 1, 1, 1]
  assert_bitwise(out, BASELINE)

def padding():
  mesh = parallel.make_mesh({"members": 4})
  try:
    train.members_epoch(student_epoch, 3, mesh=mesh)
    raise AssertionError("3 members on 4 devices were accepted")
  except ValueError as error:
    assert "pad" in str(error) and "\n" not in str(error), error
  padding = parallel.member_padding(3, mesh)
  assert padding == 1
  state, metrics = on_mesh(student_epoch, parallel.pad_members(students([2, 4, 6]), padding), 4,
                           {"members": 4}, teacher)
  assert_bitwise(train.unstack((state, metrics), 3), train.unstack(BASELINE, 3))
  copy, last = train.unstack((state, metrics), 4)[3:1:-1]  # the copy computes its original
  assert_bitwise(copy, last)

def data_parallel():
  epoch = train.make_train_epoch(train.stateful_apply(dense), optimizer, 32, ema_decay=0.9)
  fresh = lambda: train.stack([train.init_state(teacher, optimizer, ema=True)])
  expected = one_device(epoch, fresh(), 1)
  mesh = parallel.make_mesh({"data": -1})
  epoch_fn = train.members_epoch(epoch, 1, mesh=mesh)
  hlo = epoch_fn.lower(parallel.shard_members(fresh(), mesh), images, labels, order).compile().as_text()
  assert "all-reduce" in hlo and "f32[8,16]" in hlo  # a quarter batch per device, summed grads
  out = epoch_fn(parallel.shard_members(fresh(), mesh), images, labels, order)
  assert out[0].params["linear_0"]["w"].sharding.is_fully_replicated
  assert_close(out, expected, 1e-5)  # measured: 3e-7 of the scale

def members_and_data():
  expected = one_device(student_epoch, students([4, 8]), 2, teacher)
  out = on_mesh(student_epoch, students([4, 8]), 2, {"members": 2, "data": 2}, teacher)
  # Rounding of split batches; measured, of each leaf's scale: weights and Adam's moments 3e-5,
  # the tracked singular vectors (which rounding turns within near-equal pairs) 1.4e-4.
  (state, metrics), (expected_state, expected_metrics) = out, expected
  assert_close((state.params, state.opt_state, metrics),
               (expected_state.params, expected_state.opt_state, expected_metrics), 2e-4)
  assert_close(out, expected, 1e-3)

def uneven_batch():
  mesh = parallel.make_mesh({"data": -1})
  epoch = train.make_train_epoch(train.stateful_apply(dense), optimizer, 30)
  try:
    train.members_epoch(epoch, 1, mesh=mesh)(
        parallel.shard_members(train.stack([train.init_state(teacher, optimizer)]), mesh),
        images, labels, order)
    raise AssertionError("a batch of 30 was split over 4 devices")
  except ValueError as error:
    assert str(error) == ("a batch of 30 does not split over the 4 devices of the mesh's data "
                          "axis; use a multiple of 4"), error

def meshes():
  shape = lambda spec: dict(parallel.make_mesh(spec).shape)
  assert shape({"members": -1}) == {"members": 4, "data": 1}
  assert shape({"members": 2, "data": -1}) == {"members": 2, "data": 2}
  assert parallel.make_mesh({"data": 2}).devices.tolist() == [jax.devices()[:2]]
  mesh = parallel.make_mesh({"members": 2, "data": 2})
  alone = parallel.single_run(mesh)
  assert dict(alone.shape) == {"members": 1, "data": 4}
  assert set(alone.devices.flat) == set(mesh.devices.flat)
  assert parallel.describe(mesh) == {"platform": "cpu", "device_kind": "cpu", "processes": 1,
                                     "devices": 4, "mesh": {"members": 2, "data": 2}}
  try:
    parallel.make_mesh({"data": 8})
    raise AssertionError("a mesh of 8 devices on 4 was made")
  except ValueError as error:
    assert str(error) == ("config field mesh={'data': 8} is invalid: it needs 8 devices, there "
                          "are 4"), error

results = {}
for check in (meshes, members_bitwise, padding, data_parallel, members_and_data, uneven_batch):
  start = time.perf_counter()
  try:
    check()
    results[check.__name__] = "ok"
  except Exception:
    results[check.__name__] = traceback.format_exc()
  print(f"{check.__name__}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def four_devices():
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  result = subprocess.run([sys.executable, "-c", FOUR_DEVICES], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("check", [
    "members_bitwise",   # members on four devices equal member by member on one, bitwise
    "padding",           # three members padded to four devices equal the three, bitwise
    "data_parallel",     # a data-parallel epoch splits the batch and equals one device
    "members_and_data",  # both axes together equal one device
    "meshes",            # the meshes of four devices
    "uneven_batch",      # a batch that does not split over the data axis is one line
])
def test_on_four_devices(four_devices, check):
  assert four_devices[check] == "ok", four_devices[check]


@pytest.mark.parametrize("spec, message", [
    ({"model": 2}, "config field mesh has an unknown axis 'model' (axes: members, data)"),
    ({"data": 0}, "sizes are integers ≥ 1, one may be -1"),
    ({"data": -1, "members": -1}, "sizes are integers ≥ 1, one may be -1"),
    ({"data": True}, "sizes are integers ≥ 1, one may be -1"),
    ({"data": 2}, "config field mesh={'data': 2} is invalid: it needs 2 devices, there are 1"),
])
def test_an_invalid_mesh_is_one_line_naming_the_field(spec, message):
  with pytest.raises(ValueError) as error:
    parallel.make_mesh(spec)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_a_mesh_of_one_device_is_no_mesh():
  for spec in (None, {}, {"data": -1}, {"members": 1, "data": 1}):
    assert parallel.make_mesh(spec) is None
  assert parallel.single_run(None) is None
  assert parallel.describe(None) == {"platform": "cpu", "device_kind": "cpu", "processes": 1,
                                     "devices": 1, "mesh": None}


def test_padding_appends_copies_of_the_last_member():
  tree = {"w": jnp.arange(6.0).reshape(3, 2), "step": jnp.arange(3)}
  assert parallel.member_padding(3, None) == 0 and parallel.pad_members(tree, 0) is tree
  padded = parallel.pad_members(tree, 2)
  np.testing.assert_array_equal(padded["w"], [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
  np.testing.assert_array_equal(padded["step"], [0, 1, 2, 2, 2])


def test_check_batch_size_names_the_field():
  mesh = jax.sharding.AbstractMesh((1, 4), parallel.AXES)
  parallel.check_batch_size(32, mesh, "teacher.batch_size")
  parallel.check_batch_size(30, None, "teacher.batch_size")
  with pytest.raises(ValueError, match=r"^config field teacher.batch_size=30 is invalid: .* "
                                       r"multiple of 4$"):
    parallel.check_batch_size(30, mesh, "teacher.batch_size")


@pytest.mark.parametrize("env, several", [
    ({}, False),
    ({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "node1"}, False),
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "node[1-4]"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"TPU_WORKER_HOSTNAMES": "host0,host1"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
])
def test_several_processes_are_recognised_from_the_environment(monkeypatch, env, several):
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_STEP_NODELIST",
               "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert parallel._multi_process_environment() is several
  if not several:
    assert parallel.initialize_distributed() is False and parallel.is_main_process()


def test_without_a_mesh_the_epoch_is_unchanged():
  """members_epoch(mesh=None) is the plain jitted epoch: placed on the default device."""
  state = {"w": jnp.ones((2, 3))}
  placed = parallel.shard_members(state, None)
  assert placed["w"].committed and placed["w"].devices() == {jax.devices()[0]}
  assert parallel.replicate(state, None) is state


SWEEP_ON_FOUR_DEVICES = r'''
import json, sys
from lrnet import sweep
from tests.test_sweep import copy_teacher, small_config
root = sys.argv[1]
over = {"sweep.ranks": (2, 8), "sweep.kinds": ("straight_through", "factorized"),
        "teacher.batch_size": 32, "student.batch_size": 32, "student.epochs": 1}
one = sweep.run_sweep(small_config(f"{root}/one", **over), log=lambda line: None)
copy_teacher(f"{root}/one", f"{root}/members")  # the same teacher for both
members = sweep.run_sweep(small_config(f"{root}/members", **{**over, "mesh.members": -1}),
                          log=lambda line: None)
data = sweep.run_sweep(small_config(f"{root}/data", **{**over, "mesh.data": -1, "sweep.kinds": ()}),
                       log=lambda line: None)
accuracies = lambda r: [[e["straight_through_accuracy"], e["factorized_accuracy"]] for e in r["ranks"]]
print(json.dumps({"one": accuracies(one), "members": accuracies(members),
                  "teacher": [one["teacher"]["test_accuracy"], data["teacher"]["test_accuracy"]],
                  "devices": [one["devices"], members["devices"], data["devices"]]}))
'''


def test_the_digits_sweep_on_four_devices_equals_one_device(tmp_path):
  """Ranks across 4 devices (same teacher): every student's accuracy bitwise; a data-parallel
  teacher: the same test accuracy (its parameters differ by rounding, see the epoch tests)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  result = subprocess.run([sys.executable, "-c", SWEEP_ON_FOUR_DEVICES, str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.splitlines()[-1])
  assert out["members"] == out["one"]
  assert out["teacher"][0] == out["teacher"][1] > 0.8
  one, members, data = out["devices"]
  assert one["mesh"] is None and one["devices"] == 1  # no mesh: device 0 only
  assert members["mesh"] == {"members": 4, "data": 1} and data["mesh"] == {"members": 1, "data": 4}
