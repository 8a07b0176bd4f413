"""Compression of any Haiku parameter tree: factorize or project selected weight matrices.

A Haiku parameter tree maps module names to `{param_name: array}`. A module is a candidate
when it holds a 2-D `w` (a linear layer, `w` [m, n] with y = x W + b). By default every
candidate except the output layer is selected. The output layer is found from the shapes, not
from the tree's key order (which `tree_map`, optax and orbax sort: `linear_10` before
`linear_2`): it is the one candidate whose output width is no candidate's input width, i.e.
whose output feeds no other layer. Where the shapes do not single it out (e.g. an autoencoder
whose output width is its input width), `include`/`exclude` must say what to compress.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from lrnet import svd

Params = Mapping[str, Mapping[str, Any]]
RankRule = Union[int, float, str, Callable[[Any], int], Mapping[str, Any]]
Patterns = Optional[Union[str, Iterable[str]]]


def _as_patterns(patterns: Patterns) -> Optional[list[str]]:
  if patterns is None:
    return None
  if isinstance(patterns, str):
    return [patterns]
  return list(patterns)


def _matches(name: str, patterns: list[str]) -> bool:
  return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def candidate_modules(params: Params) -> list[str]:
  """Names of modules holding a 2-D `w`, in the tree's order."""
  return [name for name, leaves in params.items()
          if isinstance(leaves, Mapping) and "w" in leaves and np.ndim(leaves["w"]) == 2]


def output_module(params: Params) -> str:
  """The candidate whose output feeds no other candidate: its output width n is no candidate's
  input width m (see the module docstring).

  Raises:
    ValueError: no candidate, or the shapes do not single one out.
  """
  candidates = candidate_modules(params)
  inputs = {np.shape(params[name]["w"])[0] for name in candidates}
  sinks = [name for name in candidates if np.shape(params[name]["w"])[1] not in inputs]
  if len(sinks) != 1:
    shapes = {name: tuple(np.shape(params[name]["w"])) for name in candidates}
    raise ValueError(f"cannot tell the output layer from the shapes {shapes} (a layer whose "
                     f"output width is no layer's input width); pass include= or exclude= to "
                     f"choose the modules to compress")
  return sinks[0]


def select_ranks(params: Params, rank: RankRule, include: Patterns = None,
                 exclude: Patterns = None) -> dict[str, int]:
  """Resolves which modules are compressed, and to which integer rank.

  Args:
    params: a Haiku parameter tree.
    rank: an int in `1..min(m, n)`; a float in (0, 1] (a fraction of `min(m, n)`,
      rounded up); `"full"`; a callable `w -> int` (e.g. `lrnet.energy_rank(0.9)`); or a
      dict from module name to any of these, which selects exactly those modules.
    include: module-name glob patterns (`fnmatch`, e.g. `"linear_*"`) to select among the
      candidates; default: every candidate but the last.
    exclude: glob patterns removed from the selection.

  Returns:
    `{module_name: rank}` in the tree's order.

  Raises:
    ValueError: an unknown or non-matrix module in a rank dict, a pattern that selects
      nothing, or a rank out of range (naming module, shape and allowed values).
  """
  candidates = candidate_modules(params)
  include, exclude = _as_patterns(include), _as_patterns(exclude)
  if isinstance(rank, Mapping):
    if include is not None or exclude is not None:
      raise ValueError("rank given as a dict selects its modules itself: do not pass include/exclude")
    unknown = [name for name in rank if name not in candidates]
    if unknown:
      raise ValueError(
          f"rank dict names modules without a 2-D weight 'w': {unknown}; "
          f"allowed: {candidates}")
    rules = {name: rank[name] for name in candidates if name in rank}
  else:
    if include is None:
      output = output_module(params)
      selected = [name for name in candidates if name != output]
    else:
      selected = [name for name in candidates if _matches(name, include)]
      if not selected:
        raise ValueError(f"include={include} matches no module with a 2-D weight; candidates: {candidates}")
    if exclude is not None:
      selected = [name for name in selected if not _matches(name, exclude)]
    rules = {name: rank for name in selected}
  if not rules:
    raise ValueError(f"no module selected for compression (candidates with a 2-D weight 'w': "
                     f"{candidates}, include={include}, exclude={exclude})")

  ranks = {}
  for name, rule in rules.items():
    w = params[name]["w"]
    try:
      ranks[name] = svd.resolve_rank(w.shape, rule(w) if callable(rule) else rule)
    except ValueError as error:
      raise ValueError(f"module {name!r}: {error}") from None
  return ranks


def compress(params: Params, rank: RankRule, include: Patterns = None,
             exclude: Patterns = None) -> dict:
  """Factorizes the selected weights: `{w, b}` → `{u, v, b}` with u @ v = truncate(w, r).

  For the `lrnet.models.mlp` networks, `compress(params, r)` has the tree structure and
  shapes of `mlp(..., ranks=r).init`, and the factorized network computes exactly what the
  dense network computes with `project(params, r)`.

  Args:
    params: a Haiku parameter tree; see `select_ranks` for `rank`, `include`, `exclude`.

  Returns:
    A new tree: every selected module's `w` replaced by `u` [m, r] and `v` [r, n]
    (singular values split √s on each side); every other leaf returned untouched.
  """
  ranks = select_ranks(params, rank, include, exclude)
  compressed = {}
  for name, leaves in params.items():
    if name in ranks:
      u, v = svd.factorize(leaves["w"], ranks[name])
      rest = {key: value for key, value in leaves.items() if key != "w"}
      compressed[name] = {"u": u, "v": v, **rest}
    else:
      compressed[name] = leaves
  return compressed


def project(params: Params, rank: RankRule, include: Patterns = None,
            exclude: Patterns = None) -> dict:
  """The same tree with each selected `w` replaced by `truncate(w, r)` (same shapes)."""
  ranks = select_ranks(params, rank, include, exclude)
  return {name: ({**leaves, "w": svd.truncate(leaves["w"], ranks[name])} if name in ranks else leaves)
          for name, leaves in params.items()}


def pad_factors(params: Params, width: int) -> dict:
  """Every factorized module (`u` [m, r], `v` [r, n]) zero-padded to rank `width`: a zero
  column of U meets a zero row of V, so the function is unchanged, the padding gets exactly
  zero gradients, and Adam's update 0 / (√0 + ε) keeps it zero.

  Raises:
    ValueError: a module's rank exceeds `width`.
  """
  def pad(leaves):
    if not isinstance(leaves, Mapping) or "u" not in leaves:
      return leaves
    rank = leaves["u"].shape[1]
    if rank > width:
      raise ValueError(f"pad_factors: a module has rank {rank} > width {width}")
    return {**leaves, "u": jnp.pad(leaves["u"], ((0, 0), (0, width - rank))),
            "v": jnp.pad(leaves["v"], ((0, width - rank), (0, 0)))}
  return {name: pad(leaves) for name, leaves in params.items()}


def unpad_factors(params: Params, rank: int) -> dict:
  """The first `rank` columns of every `u` and rows of every `v` (inverse of `pad_factors`)."""
  def cut(leaves):
    if not isinstance(leaves, Mapping) or "u" not in leaves:
      return leaves
    return {**leaves, "u": leaves["u"][:, :rank], "v": leaves["v"][:rank, :]}
  return {name: cut(leaves) for name, leaves in params.items()}


def project_masked(params: Params, rank, include: Patterns = None,
                   exclude: Patterns = None) -> dict:
  """`project` at one integer rank that may be traced (e.g. `vmap` over ranks): one compiled
  function for every rank. Selects modules like `project`; no range check is possible on a
  traced rank (see `svd.truncate_masked`)."""
  selected = select_ranks(params, 1, include, exclude)
  return {name: ({**leaves, "w": svd.truncate_masked(leaves["w"], rank)} if name in selected
                 else leaves)
          for name, leaves in params.items()}


def count_params(tree) -> int:
  """Total number of scalars in the leaves of `tree`."""
  return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))


class LayerSummary(NamedTuple):
  """One module of a compression summary. FLOPs count multiply + add of the matmul per example."""
  name: str
  shape: tuple          # (m, n) of w, or the shapes of the module's leaves if not a matrix
  rank: Optional[int]   # None: kept as it is
  dense_params: int     # parameters of the module as it is
  compressed_params: int
  dense_flops: int      # 2·m·n per example (0 for non-matrix modules)
  compressed_flops: int  # 2·r·(m + n) per example when factorized


def summarize(params: Params, rank: RankRule, include: Patterns = None,
              exclude: Patterns = None) -> list[LayerSummary]:
  """Per-module parameter and FLOP counts of `compress(params, rank, ...)` against `params`."""
  ranks = select_ranks(params, rank, include, exclude)
  rows = []
  for name, leaves in params.items():
    dense_params = count_params(leaves)
    w = leaves.get("w") if isinstance(leaves, Mapping) else None
    is_matrix = w is not None and np.ndim(w) == 2
    m, n = (w.shape if is_matrix else (0, 0))
    dense_flops = 2 * m * n
    r = ranks.get(name)
    if r is None:
      rows.append(LayerSummary(name, tuple(w.shape) if is_matrix else (), None,
                               dense_params, dense_params, dense_flops, dense_flops))
    else:
      compressed = dense_params - m * n + r * (m + n)
      rows.append(LayerSummary(name, (m, n), r, dense_params, compressed, dense_flops,
                               2 * r * (m + n)))
  return rows


def compression_ratio(rows: list[LayerSummary]) -> float:
  """Dense parameters / compressed parameters of a summary."""
  return sum(row.dense_params for row in rows) / sum(row.compressed_params for row in rows)


def format_summary(rows: list[LayerSummary]) -> str:
  """A plain-text table of a summary, with totals."""
  header = f"{'module':<24} {'shape':>12} {'rank':>6} {'params':>12} {'compressed':>12} {'MFLOP':>9} {'MFLOP c.':>9}"
  lines = [header, "-" * len(header)]
  for row in rows:
    shape = "x".join(str(d) for d in row.shape) if row.shape else "-"
    rank = "-" if row.rank is None else str(row.rank)
    lines.append(f"{row.name:<24} {shape:>12} {rank:>6} {row.dense_params:>12,} "
                 f"{row.compressed_params:>12,} {row.dense_flops / 1e6:>9.3f} "
                 f"{row.compressed_flops / 1e6:>9.3f}")
  dense = sum(r.dense_params for r in rows)
  compressed = sum(r.compressed_params for r in rows)
  lines.append("-" * len(header))
  lines.append(f"{'total':<24} {'':>12} {'':>6} {dense:>12,} {compressed:>12,} "
               f"{sum(r.dense_flops for r in rows) / 1e6:>9.3f} "
               f"{sum(r.compressed_flops for r in rows) / 1e6:>9.3f}   x{dense / compressed:.2f}")
  return "\n".join(lines)
