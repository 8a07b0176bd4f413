"""Compression of a parameter tree: factorize or project the selected dense and conv weights.

A parameter tree is any nesting of Mappings: Haiku's flat `{module: {param: array}}`, flax linen
variables (`{"params": {"Block_0": {"Dense_1": {"kernel", "bias"}}}, "batch_stats": ...}`) or a
pure-dict flax NNX state. A module is a Mapping node that directly holds a non-Mapping leaf,
named by the '/'-joined keys leading to it (`"params/Block_0/Dense_1"`; in a Haiku tree, its
key: `linear_0`), the names globs, rank dicts, decompositions and calibrations use.

A module is a candidate when it holds a weight `w` (or `kernel`) of 2 dims (a dense layer,
[m, n], y = x W + b) or 3–5 dims (a conv kernel [*spatial, c_in, c_out], seen as the matrix
[prod(spatial)·c_in, c_out]), or an embedding table `embeddings` (hk.Embed) or `embedding` (flax
nn.Embed) [vocab, d]; truncation acts on that matrix. Other leaves (biases, norm scales,
BatchNorm statistics) are left alone: compressed trees keep the input's nesting and Mapping
types, with every unselected leaf the same object.

By default every candidate except the output layer and embedding tables is selected, and never
one whose factorization at the requested rank would not be smaller (r·(m + n) ≥ m·n;
`summarize` says which), nor one the caller marks `unfactorizable` (`{name: reason}`: grouped,
depthwise or transposed convs, which look like conv weights). The output layer is found from
the shapes, not from the key order (which `tree_map`, optax and orbax sort: `linear_10` before
`linear_2`): the one 2-D `w`/`kernel` whose output width is no such weight's input width
(embeddings do not count; unfactorizable layers do when 2-D). Where the shapes do not single it
out (an autoencoder), a `ValueError` asks for `include`/`exclude`. Naming modules (`include`, or
a rank dict) selects them whatever the size, embeddings included; naming an unfactorizable one
(not excluded) is a `ValueError`.

`decompose` computes each selected weight's SVD once; `compress`, `project` and `summarize`
take it (`decompositions=`) so that a sweep over ranks does not repeat them.

Data-aware truncation (`calibration=`, from `lrnet.calibrate`): with C = S Sᵀ the damped second
moment of a layer's inputs (`Calibration.whitening`), the rank-r W′ minimising
‖Sᵀ(W − W′)‖_F = (E‖x(W − W′)‖² + λ‖W − W′‖²_F)^½ is W′ = S⁻ᵀ[SᵀW]_r: with SᵀW = U Σ Vᵀ, the
factors are S⁻ᵀU_r√Σ_r and √Σ_r V_rᵀ, and each dropped σ_i adds exactly σ_i² to
‖Sᵀ(W − W′)‖²_F. `decompose(..., calibration=)` stores this SVD as W = (S⁻ᵀU) Σ Vᵀ.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from lrnet import svd

Params = Mapping[str, Any]  # any nesting of Mappings (module docstring)
RankRule = Union[int, float, str, Callable[[Any], int], Mapping[str, Any]]
Patterns = Optional[Union[str, Iterable[str]]]
WEIGHT_NAMES = ("w", "kernel")
EMBEDDING_NAMES = ("embeddings", "embedding")


def _as_patterns(patterns: Patterns) -> Optional[list[str]]:
  return None if patterns is None else [patterns] if isinstance(patterns, str) else list(patterns)


def _matches(name: str, patterns: list[str]) -> bool:
  return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _name(path: tuple) -> str:
  return "/".join(str(key) for key in path)


def modules(params: Params) -> dict[str, Mapping]:
  """{name: node} of every module node (a Mapping directly holding a non-Mapping leaf), named by
  its '/'-joined path, depth first in the tree's order."""
  found = {}

  def visit(node: Mapping, path: tuple):
    if any(not isinstance(child, Mapping) for child in node.values()):
      found[_name(path)] = node
    for key, child in node.items():
      if isinstance(child, Mapping):
        visit(child, path + (key,))
  visit(params, ())
  return found


def replace_modules(params: Params, replacements: Mapping[str, Mapping]) -> Params:
  """`params` with the nodes named in `replacements` (module names) replaced by them.

  A replacement may be a plain dict: each replaced node and every node above it is rebuilt with
  the original node's type where its constructor takes a dict (dict, flax's FrozenDict), else as
  a dict; untouched subtrees and leaves are the same objects.
  """
  def rebuild(node, path):
    source = replacements.get(_name(path), node)
    children = {key: rebuild(child, path + (key,)) if isinstance(child, Mapping) else child
                for key, child in source.items()}
    if source is node and all(children[key] is node[key] for key in children):
      return node
    try:
      rebuilt = type(node)(children)
    except (TypeError, ValueError):
      return children
    return rebuilt if isinstance(rebuilt, Mapping) else children
  return rebuild(params, ())


def weight_name(leaves) -> Optional[str]:
  """The key of a module's matrix: a dense or conv weight (`w`/`kernel`, 2–5 dims) or an
  embedding table (`embeddings`/`embedding`, 2 dims); None if it has none."""
  if not isinstance(leaves, Mapping):
    return None
  for keys, ndims in ((WEIGHT_NAMES, (2, 3, 4, 5)), (EMBEDDING_NAMES, (2,))):
    for key in keys:
      if key in leaves and len(np.shape(leaves[key])) in ndims:
        return key
  return None


def matrix_shapes(params: Params) -> dict[str, tuple[int, int]]:
  """{candidate module: (m, n)}, the matrix view of its weight, in the tree's order."""
  shapes = {}
  for name, leaves in modules(params).items():
    if (key := weight_name(leaves)) is not None:
      *rows, n = np.shape(leaves[key])
      shapes[name] = (math.prod(rows), n)
  return shapes


def _is_embedding(leaves: Mapping) -> bool:
  return weight_name(leaves) in EMBEDDING_NAMES


def output_module(params: Params) -> Optional[str]:
  """The module with a 2-D `w`/`kernel` whose output feeds no other: its output width n is no
  such weight's input width m (embedding tables are not looked at; see the module docstring).
  None when no dense output is a sink but the tree holds an embedding table: a head tied to
  the embedding (a language model's logits x Eᵀ) has no weight of its own.

  Raises:
    ValueError: the shapes do not single one out.
  """
  nodes = modules(params)
  dense = {name: np.shape(leaves[key]) for name, leaves in nodes.items()
           if (key := weight_name(leaves)) in WEIGHT_NAMES and len(np.shape(leaves[key])) == 2}
  inputs = {m for m, _ in dense.values()}
  sinks = [name for name, (_, n) in dense.items() if n not in inputs]
  if not sinks and any(_is_embedding(leaves) for leaves in nodes.values()):
    return None
  if len(sinks) != 1:
    raise ValueError(f"cannot tell the output layer from the dense shapes {dense} (a layer whose "
                     f"output width is no layer's input width); pass include= or exclude= to "
                     f"choose the modules to compress")
  return sinks[0]


def compressible_modules(params: Params,
                         unfactorizable: Optional[Mapping[str, str]] = None) -> list[str]:
  """The default selection, in the tree's order: every candidate except the output layer,
  embedding tables and `unfactorizable` ones."""
  output, nodes = output_module(params), modules(params)
  return [name for name in matrix_shapes(params)
          if name != output and not _is_embedding(nodes[name])
          and name not in (unfactorizable or {})]


def select_ranks(params: Params, rank: RankRule, include: Patterns = None,
                 exclude: Patterns = None, *,
                 unfactorizable: Optional[Mapping[str, str]] = None) -> dict[str, int]:
  """`{module_name: rank}` in the tree's order: which modules are compressed, to which rank.

  Args:
    params: a parameter tree (arrays, or shapes such as `jax.ShapeDtypeStruct`s).
    rank: an int in `1..min(m, n)`; a float in (0, 1] (a fraction of `min(m, n)`, rounded up);
      `"full"`; a callable `matrix -> int` (e.g. `lrnet.svd.energy_rank(0.9)`, which needs the
      weights, not shapes); or a dict from module name to any of these, which selects exactly
      those modules.
    include: module-name glob patterns (`fnmatch`, e.g. `"params/Block_*/Dense_*"`) to select
      among the candidates, whatever their size; default: the module docstring's.
    exclude: glob patterns removed from the selection.
    unfactorizable: {module: reason} for weights that cannot be factorized (module docstring);
      `summarize` notes "not factorizable: reason".

  Raises:
    ValueError: an unknown module in a rank dict, a pattern that selects nothing, an empty
      selection, an unfactorizable module named (by the rank dict, or by `include` and not
      excluded), or a rank out of range (naming module, shape and allowed values).
  """
  shapes, nodes = matrix_shapes(params), modules(params)
  candidates = list(shapes)
  unfactorizable = unfactorizable or {}
  include, exclude = _as_patterns(include), _as_patterns(exclude)
  automatic = False
  if isinstance(rank, Mapping):
    if include is not None or exclude is not None:
      raise ValueError("rank given as a dict selects its modules itself: do not pass "
                       "include/exclude")
    unknown = [name for name in rank if name not in candidates]
    if unknown:
      raise ValueError(f"rank dict names modules without a dense or conv weight: {unknown}; "
                       f"allowed: {candidates}")
    rules = {name: rank[name] for name in candidates if name in rank}
  else:
    if include is None:
      selected, automatic = compressible_modules(params, unfactorizable), True
    else:
      selected = [name for name in candidates if _matches(name, include)]
      if not selected:
        raise ValueError(f"include={include} matches no module with a dense or conv weight; "
                         f"candidates: {candidates}")
    if exclude is not None:
      selected = [name for name in selected if not _matches(name, exclude)]
    rules = {name: rank for name in selected}
  for name in rules:
    if name in unfactorizable:
      raise ValueError(f"module {name!r} is not factorizable: {unfactorizable[name]}; "
                       f"leave it out of the rank dict or exclude it")

  ranks = {}
  for name, rule in rules.items():
    try:
      if callable(rule):
        rule = rule(_matrix(_weight(nodes[name])))
      ranks[name] = svd.resolve_rank(shapes[name], rule)
    except ValueError as error:
      raise ValueError(f"module {name!r}: {error}") from None
  if automatic:
    ranks = {name: r for name, r in ranks.items()  # only those the rank makes smaller
             if r * sum(shapes[name]) < math.prod(shapes[name])}
  if not ranks:
    raise ValueError(f"no module selected for compression (candidates: {candidates}, "
                     f"include={include}, exclude={exclude}, rank={rank!r}; by default a layer "
                     f"the rank would not make smaller is left out: name it to force it)")
  return ranks


def _matrix(weight) -> jax.Array:
  return jnp.reshape(weight, (-1, weight.shape[-1]))


def _weight(leaves: Mapping):
  return leaves[weight_name(leaves)]


class Decomposition(NamedTuple):
  """One weight's matrix view W = U diag(s) Vᵀ, truncated by keeping the leading r terms: its
  SVD, or calibrated the SVD SᵀW = U_w diag(s) Vᵀ stored with U = S⁻ᵀU_w (UᵀCU = I)."""
  u: jax.Array   # [m, p]
  s: jax.Array   # [p] descending
  vt: jax.Array  # [p, n]


@jax.jit
def _whitened_svd(matrix: jax.Array, root: jax.Array, inverse_root: jax.Array) -> Decomposition:
  """W [m, n] = (S⁻ᵀU) diag(s) Vᵀ from the SVD SᵀW = U diag(s) Vᵀ; S, S⁻¹ [m, m] symmetric."""
  u, s, vt = jnp.linalg.svd(jnp.matmul(root, matrix, precision=jax.lax.Precision.HIGHEST),
                            full_matrices=False)
  return Decomposition(jnp.matmul(inverse_root, u, precision=jax.lax.Precision.HIGHEST), s, vt)


def _with_decompositions(params: Params, names, decompositions: Optional[dict],
                         calibration) -> dict:
  """`decompositions`, plus the SVD (whitened with `calibration`) of each of `names` they lack."""
  decompositions, nodes = dict(decompositions or {}), modules(params)
  for name in names:
    if name not in decompositions:
      matrix = _matrix(_weight(nodes[name]))
      if calibration is None:
        decompositions[name] = Decomposition(*jnp.linalg.svd(matrix, full_matrices=False))
      else:
        root, inverse_root = calibration.whitening(name)
        decompositions[name] = _whitened_svd(matrix, root.astype(matrix.dtype),
                                             inverse_root.astype(matrix.dtype))
  return decompositions


def decompose(params: Params, include: Patterns = None, exclude: Patterns = None, *,
              calibration=None, unfactorizable: Optional[Mapping[str, str]] = None) -> dict:
  """{module: Decomposition} for every module `select_ranks(params, 1, ...)` selects: one SVD
  per weight (of SᵀW with `calibration`, a `lrnet.calibration.Calibration`; module docstring).
  ValueError: as `select_ranks`, or a selected module has no calibration statistics."""
  names = select_ranks(params, 1, include, exclude, unfactorizable=unfactorizable)
  return _with_decompositions(params, names, None, calibration)


def compress(params: Params, rank: RankRule, include: Patterns = None, exclude: Patterns = None,
             *, decompositions: Optional[dict] = None, calibration=None,
             unfactorizable: Optional[Mapping[str, str]] = None) -> Params:
  """Factorizes the selected weights: `{w, b}` → `{u, v, b}` with u v = truncate(w, r).

  A dense weight [m, n] (or an embedding table [vocab, d]) gives u [m, r], v [r, n]; a conv
  kernel [*spatial, c_in, c_out] gives u [*spatial, c_in, r] (a conv to r channels) and
  v [r, c_out] (a 1×1 conv): the parameters of `lrnet.factorized(fn, rank, ...)`. Singular
  values are split √s on each side.

  Args:
    params: a parameter tree; `rank`, `include`, `exclude`, `unfactorizable`: see `select_ranks`.
    decompositions: from `decompose`, to reuse SVDs; used as they are.
    calibration: a `lrnet.calibration.Calibration`: truncate data-aware (module docstring)
      every selected module that `decompositions` lacks.

  Returns:
    The tree with every selected module's weight replaced by `u` and `v` (module docstring).

  Raises:
    ValueError: as `select_ranks`; a selected module without calibration statistics.
  """
  ranks = select_ranks(params, rank, include, exclude, unfactorizable=unfactorizable)
  decompositions = _with_decompositions(params, ranks, decompositions, calibration)
  nodes, replacements = modules(params), {}
  for name, r in ranks.items():
    key = weight_name(nodes[name])
    u, s, vt = decompositions[name]
    root_s = jnp.sqrt(s[:r])
    rest = {k: value for k, value in nodes[name].items() if k != key}
    replacements[name] = {"u": (u[:, :r] * root_s).reshape(nodes[name][key].shape[:-1] + (r,)),
                          "v": root_s[:, None] * vt[:r], **rest}
  return replace_modules(params, replacements)


def replace_weights(params: Params, weights: Mapping[str, Any]) -> Params:
  """`params` with the weight leaf (`weight_name`) of each module in `weights` replaced."""
  nodes = modules(params)
  return replace_modules(params, {name: {**nodes[name], weight_name(nodes[name]): weight}
                                  for name, weight in weights.items()})


def project(params: Params, rank: RankRule, include: Patterns = None, exclude: Patterns = None,
            *, decompositions: Optional[dict] = None, calibration=None,
            unfactorizable: Optional[Mapping[str, str]] = None) -> Params:
  """The same tree (nesting, types, shapes) with each selected weight replaced by its rank-r
  truncation (an embedding table truncated likewise); other arguments as in `compress`."""
  ranks = select_ranks(params, rank, include, exclude, unfactorizable=unfactorizable)
  decompositions = _with_decompositions(params, ranks, decompositions, calibration)
  nodes, weights = modules(params), {}
  for name, r in ranks.items():
    u, s, vt = decompositions[name]
    weights[name] = ((u[:, :r] * s[:r]) @ vt[:r]).reshape(_weight(nodes[name]).shape)
  return replace_weights(params, weights)


def project_masked(params: Params, ranks: Mapping[str, Any]) -> Params:
  """`project` at integer ranks that may be traced (e.g. `vmap` over ranks): one compiled
  function for every rank. `ranks`: {module: rank}; no range check is possible on a traced rank
  (see `svd.truncate_masked`)."""
  weights = {name: _weight(leaves) for name, leaves in modules(params).items() if name in ranks}
  return replace_weights(params, {
      name: svd.truncate_masked(_matrix(weight), ranks[name]).reshape(weight.shape)
      for name, weight in weights.items()})


def _factorized_modules(params: Params) -> dict[str, Mapping]:
  return {name: leaves for name, leaves in modules(params).items() if "u" in leaves}


def pad_factors(params: Params, width: Mapping[str, int]) -> Params:
  """Every factorized module (`u` [..., r], `v` [r, n]) zero-padded to rank `width[module]`: a
  zero column of U meets a zero row of V, so the function is unchanged, the padding gets exactly
  zero gradients, and Adam's update 0 / (√0 + ε) keeps it zero.

  Raises:
    ValueError: a module's rank exceeds its width.
  """
  def pad(name, leaves):
    rank, target = leaves["u"].shape[-1], width[name]
    if rank > target:
      raise ValueError(f"pad_factors: module {name!r} has rank {rank} > width {target}")
    u_padding = [(0, 0)] * (leaves["u"].ndim - 1) + [(0, target - rank)]
    return {**leaves, "u": jnp.pad(leaves["u"], u_padding),
            "v": jnp.pad(leaves["v"], ((0, target - rank), (0, 0)))}
  return replace_modules(params, {name: pad(name, leaves)
                                  for name, leaves in _factorized_modules(params).items()})


def unpad_factors(params: Params, ranks: Mapping[str, int]) -> Params:
  """The first `ranks[module]` factor columns of every `u` and rows of every `v` (inverse of
  `pad_factors`)."""
  return replace_modules(params, {
      name: {**leaves, "u": leaves["u"][..., :ranks[name]], "v": leaves["v"][:ranks[name], :]}
      for name, leaves in _factorized_modules(params).items()})


def count_params(tree) -> int:
  """Total number of scalars in the leaves of `tree`."""
  return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))


class LayerSummary(NamedTuple):
  """One module of a compression summary. FLOPs count multiply + add of the matmul or conv, per
  example for a dense layer and per output position for a conv layer (`per`)."""
  name: str
  shape: tuple          # the weight's shape, or () for a module without one
  rank: Optional[int]   # None: kept as it is
  dense_params: int     # parameters of the module's own leaves as it is
  compressed_params: int
  dense_flops: int      # 2·m·n for the matrix view [m, n]
  compressed_flops: int  # 2·r·(m + n) when factorized
  per: str              # "example", "output position" (conv), "token" (embedding), or ""
  note: str             # why a candidate stays dense, if it does


def summarize(params: Params, rank: RankRule, include: Patterns = None, exclude: Patterns = None,
              *, decompositions: Optional[dict] = None, calibration=None,
              unfactorizable: Optional[Mapping[str, str]] = None) -> list[LayerSummary]:
  """Per-module parameter and FLOP counts of `compress(params, rank, ...)` against `params`:
  one row per module node, named by its path, in the tree's order."""
  del decompositions, calibration  # the counts need shapes only
  unfactorizable = unfactorizable or {}
  ranks = select_ranks(params, rank, include, exclude, unfactorizable=unfactorizable)
  shapes = matrix_shapes(params)
  automatic = include is None and not isinstance(rank, Mapping)
  output = output_module(params) if automatic else None
  rows = []
  for name, leaves in modules(params).items():
    dense_params = count_params([leaf for leaf in leaves.values()
                                 if not isinstance(leaf, Mapping)])  # children have own rows
    if name not in shapes:
      rows.append(LayerSummary(name, (), None, dense_params, dense_params, 0, 0, "", ""))
      continue
    (m, n), weight_shape, r = shapes[name], np.shape(_weight(leaves)), ranks.get(name)
    if _is_embedding(leaves):  # a lookup costs no FLOPs; factorized, one row of u times v
      per, dense_flops, compressed_flops = "token", 0, 2 * (r or 0) * n
    else:
      per = "output position" if len(weight_shape) > 2 else "example"
      dense_flops, compressed_flops = 2 * m * n, 2 * (r or 0) * (m + n)
    if r is None:
      compressed_params, compressed_flops = dense_params, dense_flops
      note = (f"not factorizable: {unfactorizable[name]}" if name in unfactorizable
              else "output layer" if name == output
              else "" if not automatic  # a candidate the caller left out
              else "embedding table: compressed only when named" if _is_embedding(leaves)
              else "kept dense: this rank would not make it smaller")
    else:
      compressed_params, note = dense_params - m * n + r * (m + n), ""
    rows.append(LayerSummary(name, weight_shape, r, dense_params, compressed_params, dense_flops,
                             compressed_flops, per, note))
  return rows


def format_summary(rows: list[LayerSummary]) -> str:
  """A plain-text table of a summary, with totals. Conv FLOPs are per output position (marked
  `/pos`), embedding FLOPs per token (`/tok`): the totals add per-example FLOPs of dense layers
  only."""
  def line(name, shape, rank, params, compressed, flops, compressed_flops, end):
    return (f"{name:<24} {shape:>14} {rank:>6} {params:>12,} {compressed:>12,} "
            f"{flops / 1e6:>9.3f} {compressed_flops / 1e6:>9.3f}{end}")

  header = (f"{'module':<24} {'shape':>14} {'rank':>6} {'params':>12} {'compressed':>12} "
            f"{'MFLOP':>9} {'MFLOP c.':>9}")
  lines = [header, "-" * len(header)]
  for row in rows:
    end = {"output position": "/pos", "token": "/tok"}.get(row.per, "")
    lines.append(line(row.name, "x".join(str(d) for d in row.shape) or "-",
                      "-" if row.rank is None else str(row.rank), row.dense_params,
                      row.compressed_params, row.dense_flops, row.compressed_flops,
                      end + (f"  ({row.note})" if row.note else "")))
  dense, compressed = sum(r.dense_params for r in rows), sum(r.compressed_params for r in rows)
  per_example = [r for r in rows if r.per == "example"]
  lines += ["-" * len(header),
            line("total", "", "", dense, compressed, sum(r.dense_flops for r in per_example),
                 sum(r.compressed_flops for r in per_example), f"   x{dense / compressed:.2f}")]
  return "\n".join(lines)
