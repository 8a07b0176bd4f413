"""Many devices and hosts. A mesh has the axes `AXES`: `members` splits the leading member axis
of a batch of runs (each device trains its share of the members, `train.members_epoch`), `data`
splits every training batch (parameters replicated; XLA reduces the gradients). No mesh (None)
is one device, exactly as without this module.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("members", "data")  # a mesh's axes, in this order
_AUTO = (AxisType.Auto,) * len(AXES)  # XLA places what the program does not constrain


def make_mesh(spec: Optional[Mapping[str, int]], field: str = "mesh") -> Optional[Mesh]:
  """The mesh of `spec` {axis: devices} over `AXES`: an absent axis has size 1, one size may be
  -1 (the devices the others leave). Fewer devices than there are: the first ones (one process
  only). None, {} or a mesh of one device: None, the one-device programs.

  Raises:
    ValueError: one line naming `field`: an unknown axis, a size that is not an integer ≥ 1 or
      one -1, or more devices than there are (or, with several processes, fewer).
  """
  if not spec:
    return None
  spec, count = dict(spec), jax.device_count()
  unknown = sorted(set(spec) - set(AXES))
  if unknown:
    raise ValueError(f"config field {field} has an unknown axis {unknown[0]!r} (axes: "
                     f"{', '.join(AXES)})")
  sizes = [spec.get(axis, 1) for axis in AXES]
  if (sizes.count(-1) > 1 or any(type(size) is not int or (size < 1 and size != -1)
                                 for size in sizes)):
    raise ValueError(f"config field {field}={spec} is invalid: sizes are integers ≥ 1, one may "
                     f"be -1 (every device left)")
  fixed = math.prod(size for size in sizes if size != -1)
  sizes = [max(count // fixed, 1) if size == -1 else size for size in sizes]
  total = math.prod(sizes)
  if total > count or (jax.process_count() > 1 and total != count):
    raise ValueError(f"config field {field}={spec} is invalid: it needs {total} devices, there "
                     f"are {count}{' (every process must take part)' if total < count else ''}")
  if total == 1:
    return None
  if total == count:  # topology-aware order (rings on TPUs)
    return jax.make_mesh(tuple(sizes), AXES, axis_types=_AUTO)
  return Mesh(np.array(jax.devices()[:total]).reshape(sizes), AXES, axis_types=_AUTO)


def axis_size(mesh: Optional[Mesh], axis: str) -> int:
  """Devices along `axis` of `mesh` (a Mesh or an abstract mesh); 1 without a mesh."""
  return 1 if mesh is None or axis not in mesh.axis_names else mesh.shape[axis]


def single_run(mesh: Optional[Mesh]) -> Optional[Mesh]:
  """The mesh for a lone run (a teacher, a rank trained alone): the same devices, all `data`."""
  if axis_size(mesh, "members") == 1:
    return mesh
  return Mesh(mesh.devices.reshape(1, -1), AXES, axis_types=_AUTO)


def member_padding(num_members: int, mesh: Optional[Mesh]) -> int:
  """How many members to add so that `num_members` divides over the `members` axis."""
  return -num_members % axis_size(mesh, "members")


def pad_members(tree: Any, padding: int) -> Any:
  """`tree` (a leading member axis on every leaf) with `padding` copies of its last member
  appended. Their results are to be dropped: `train.unstack(tree, n)` takes the first n."""
  if not padding:
    return tree
  return jax.tree_util.tree_map(
      lambda leaf: jnp.concatenate([leaf, jnp.repeat(leaf[-1:], padding, axis=0)]), tree)


def member_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (member) axis split over `members`, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec("members"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _put(leaf, sharding: NamedSharding):
  """`leaf` with `sharding`: as it is if it has it; with several processes from this host's
  copy of the value (the same on every host)."""
  if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
    return leaf
  if jax.process_count() == 1 or (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable):
    return jax.device_put(leaf, sharding)
  value = np.asarray(leaf)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def shard_members(tree: Any, mesh: Optional[Mesh]) -> Any:
  """`tree` where a members epoch on `mesh` takes and returns it: leaves with a leading member
  axis split over `members`, scalars replicated. Without a mesh: committed to the default
  device (`train.commit`)."""
  if mesh is None:
    return jax.device_put(tree, jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda leaf: _put(leaf, member_sharding(mesh) if np.ndim(leaf) else replicated(mesh)), tree)


def replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
  """`tree` whole on every device of `mesh` (e.g. the training split, once); as is without."""
  if mesh is None:
    return tree
  return jax.tree_util.tree_map(lambda leaf: _put(leaf, replicated(mesh)), tree)


def check_batch_size(batch_size: int, mesh, field: str) -> None:
  """A one-line ValueError naming the config `field` if `batch_size` does not split evenly over
  the `data` axis of `mesh`."""
  size = axis_size(mesh, "data")
  if batch_size % size:
    raise ValueError(f"config field {field}={batch_size} is invalid: each batch is split over "
                     f"the {size} devices of the mesh's data axis, so it must be a multiple of "
                     f"{size}")


def constrain_batch(tree: Any) -> Any:
  """In a traced step: the batch (leading axis of every leaf) split over the `data` axis of the
  mesh in context (`jax.set_mesh`, as `train.members_epoch` sets it); else unchanged.

  Raises:
    ValueError: the batch does not split evenly over the `data` axis.
  """
  mesh = jax.sharding.get_abstract_mesh()
  size = 1 if mesh.empty else axis_size(mesh, "data")
  if size == 1:
    return tree
  for leaf in jax.tree_util.tree_leaves(tree):
    if leaf.shape[0] % size:
      raise ValueError(f"a batch of {leaf.shape[0]} does not split over the {size} devices of "
                       f"the mesh's data axis; use a multiple of {size}")
  return jax.lax.with_sharding_constraint(tree, PartitionSpec("data"))


def _multi_process_environment() -> bool:
  """Whether this process is one of several: an explicit coordinator, or a Slurm, Open MPI or
  multi-host Cloud TPU job of more than one process (what `jax.distributed` detects)."""
  env = os.environ
  tpu_hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
  return bool(env.get("JAX_COORDINATOR_ADDRESS")
              or (int(env.get("SLURM_NTASKS") or 1) > 1 and "SLURM_STEP_NODELIST" in env)
              or int(env.get("OMPI_COMM_WORLD_SIZE") or 1) > 1
              or "," in tpu_hosts)


def initialize_distributed() -> bool:
  """Joins the other processes of a multi-process job (nothing in a single process) and returns
  whether it did; call it before anything else touches JAX. With JAX_COORDINATOR_ADDRESS
  (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID name the process count and
  this process; on Slurm, Open MPI and Cloud TPU JAX finds them."""
  if not _multi_process_environment():
    return False
  count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
  jax.distributed.initialize(num_processes=int(count) if count else None,
                             process_id=int(index) if index else None)
  return True


def is_main_process() -> bool:
  """Whether this process writes the files and logs (process 0)."""
  return jax.process_index() == 0


def describe(mesh: Optional[Mesh]) -> dict:
  """The devices of a run, for logs and results.json."""
  device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
  return {"platform": device.platform, "device_kind": device.device_kind,
          "processes": jax.process_count(), "devices": 1 if mesh is None else mesh.devices.size,
          "mesh": None if mesh is None else {axis: int(mesh.shape[axis]) for axis in AXES}}
