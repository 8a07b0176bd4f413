r"""Origin notebook 004's game: Hermione hides a rank r ∈ [1, 95] in a function; Harry, who may
only query it, must name r (≥ 95 % of the rounds right to win).

  python -m experiments.rank_game
  python -m experiments.rank_game --estimator=finite_differences --rounds=20 --verbose

Each round Hermione draws r = random.randint(1, 95), W₁ ∈ R^{r×100} and W₂ ∈ R^{100×r} with
entries uniform in [0, 100) (float32), and answers queries x ∈ R^100 with
f(x) = ‖sin(W₂ cos(W₁ x))‖²₂. Harry names `lrnet.rank_estimation.estimate_rank(f, 100, ...).rank`,
by autodiff gradients or by finite differences of f.

The draws follow the notebook's code: one ``jax.random.PRNGKey(seed)`` (713 in the notebook)
for the whole game, split once before W₁ and once before W₂ in every round. Chosen here where
the notebook leaves it open: its r came from Python's unseeded global ``random``, here from
``random.Random(seed)``; and it ran a 2020 JAX whose threefry generator was not yet
"partitionable", so the weights are drawn under ``jax.threefry_partitionable(False)`` (today's
default would give other numbers from the same key; the notebook prints no weights to check
against). Harry's query points come from ``PRNGKey(seed + 1)`` folded with the round index.
"""

import random
import time
from collections.abc import Callable
from typing import NamedTuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from lrnet import rank_estimation

DIM = 100          # length of Hermione's vectors
MAX_RANK = 95      # r ∈ [1, MAX_RANK]
WEIGHT_MAX = 100.  # entries uniform in [0, WEIGHT_MAX)
WIN_FRACTION = 0.95
ESTIMATORS = ("autodiff", "finite_differences")

_ROUNDS = flags.DEFINE_integer("rounds", 100, "Rounds to play.", lower_bound=1)
_SEED = flags.DEFINE_integer(
    "seed", 713, "Hermione's jax.random.PRNGKey(seed) (713 as in the notebook) and "
    "random.Random(seed) for her r; Harry's points use PRNGKey(seed + 1).", lower_bound=0)
_ESTIMATOR = flags.DEFINE_enum(
    "estimator", "autodiff", ESTIMATORS, "How Harry gets gradients of f.")
_VERBOSE = flags.DEFINE_boolean(
    "verbose", False, "Print every round: true r, Harry's answer, queries.")


class Round(NamedTuple):
  """One round of the game."""
  rank: int                   # Hermione's r
  answer: int | None          # Harry's r (None when the estimator refused to guess)
  queries: int                # queries of f (or of ∇f) Harry spent
  note: str                   # the estimator's refusal, if any


class GameResult(NamedTuple):
  """A whole game."""
  rounds: list[Round]
  seconds: float              # wall time of all rounds, Hermione's draws included

  @property
  def right(self) -> int:
    return sum(round_.answer == round_.rank for round_ in self.rounds)

  @property
  def won(self) -> bool:
    return self.right >= WIN_FRACTION * len(self.rounds)


def hermione_chooses(key: jax.Array, rng: random.Random
                     ) -> tuple[jax.Array, int, jax.Array, jax.Array]:
  """One round's secret, drawn as the notebook's `Game.hermione_chooses_r_and_W` (module
  docstring): (the key for the next round, r from `rng`, W₁ [r, 100], W₂ [100, r] float32)."""
  rank = rng.randint(1, MAX_RANK)
  with jax.threefry_partitionable(False):
    key, subkey = jax.random.split(key)
    w1 = jax.random.uniform(subkey, (rank, DIM), jnp.float32, minval=0., maxval=WEIGHT_MAX)
    key, subkey = jax.random.split(key)
    w2 = jax.random.uniform(subkey, (DIM, rank), jnp.float32, minval=0., maxval=WEIGHT_MAX)
  return key, rank, w1, w2


def hermione_function(w1: jax.Array, w2: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """f(x) = ‖sin(W₂ cos(W₁ x))‖²₂ for x [100] (the notebook's `hermione_computes_function`)."""
  return lambda x: jnp.sum(jnp.square(jnp.sin(w2 @ jnp.cos(w1 @ x))))


def play(rounds: int, seed: int, estimator: str,
         log: Callable[[str], None] = lambda _: None) -> GameResult:
  """Plays `rounds` rounds; `log` receives one line per round."""
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  key, rng, harry_key = jax.random.PRNGKey(seed), random.Random(seed), jax.random.PRNGKey(seed + 1)
  played, start = [], time.perf_counter()
  for index in range(rounds):
    key, rank, w1, w2 = hermione_chooses(key, rng)
    try:  # Harry's answer, from queries of f alone
      estimate = rank_estimation.estimate_rank(hermione_function(w1, w2), DIM,
                                               key=jax.random.fold_in(harry_key, index),
                                               differentiable=estimator == "autodiff")
      answer = Round(rank, estimate.rank, estimate.queries, "")
    except ValueError as error:  # the estimator refuses to guess
      answer = Round(rank, None, 0, str(error))
    played.append(answer)
    verdict = "right" if answer.answer == rank else "WRONG"
    log(f"round {index + 1:3d}: r = {rank:2d}, Harry says {answer.answer}, "
        f"{answer.queries} queries, {verdict}" + (f" ({answer.note})" if answer.note else ""))
  return GameResult(rounds=played, seconds=time.perf_counter() - start)


def summary(result: GameResult, estimator: str) -> str:
  """The lines printed at the end of a game."""
  rounds = len(result.rounds)
  queries = np.array([round_.queries for round_ in result.rounds])
  verdict = "well done" if result.won else "work a little more"
  return "\n".join([
      f"estimator: {estimator}",
      f"score: {result.right}/{rounds} right ({100 * result.right / rounds:.0f} %), "
      f"{verdict} (needed {WIN_FRACTION:.0%})",
      f"queries per round: mean {queries.mean():.0f}, min {queries.min()}, max {queries.max()}",
      f"wall time: {result.seconds:.1f} s ({result.seconds / rounds:.2f} s per round)"])


def main(argv: list[str]) -> None:
  """Plays the game the flags describe and prints the summary."""
  if len(argv) > 1:
    cli.exit_with(f"unexpected arguments: {argv[1:]}")
  log = (lambda line: print(line, flush=True)) if _VERBOSE.value else (lambda _: None)
  result = play(_ROUNDS.value, _SEED.value, _ESTIMATOR.value, log=log)
  print(summary(result, _ESTIMATOR.value), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
