"""Tests for lrnet/__init__.py: the front door's tour runs as written, and names what it exports."""

import doctest
import inspect

import lrnet


def test_the_docstring_example_runs_and_prints_what_it_says():
  result = doctest.testmod(lrnet, verbose=False)
  assert result.attempted >= 5 and result.failed == 0


def test_the_front_door_exports_what_all_names_and_no_internals():
  functions = {name for name, value in vars(lrnet).items()
               if not name.startswith("_") and not inspect.ismodule(value)}
  assert functions == {name for name in lrnet.__all__
                       if not inspect.ismodule(getattr(lrnet, name))}
  assert {"models", "losses", "tracker"} <= set(lrnet.__all__)
