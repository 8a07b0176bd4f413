"""User errors of the entry points: one line on stderr naming the field, exit status 2."""

import os
import subprocess
import sys

import pytest

from configs import digits
from experiments import cli
from lrnet import config as config_lib
from lrnet import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_entry_point(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> str:
  assert result.returncode == 2, result.stderr
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  for name in names:
    assert name in lines[0]
  return lines[0]


@pytest.mark.parametrize("override, unknown, known", [
    ("--config.sweep.rankz=(4,)", "sweep.rankz", "sweep.ranks"),
    ("--config.sweepp.ranks=(4,)", "sweepp.ranks", "sweep.ranks"),
    ("--config.seedd=1", "seedd", "seed"),
])
def test_a_misspelt_field_names_the_closest_known_one(override, unknown, known):
  result = run_entry_point("experiments.sweep", "--config=configs/digits.py", override)
  line = assert_one_line_error(result)
  assert line == f"error: unknown config field {unknown} (did you mean {known}?)"


def test_a_misspelt_field_given_with_a_space_separated_value():
  result = run_entry_point("experiments.sweep", "--config", "configs/digits.py",
                           "--config.sweep.rankz", "(4,)")
  assert_one_line_error(result, "sweep.rankz", "sweep.ranks")


def test_a_value_of_the_wrong_type_is_one_line():
  result = run_entry_point("experiments.sweep", "--config=configs/digits.py", "--config.seed=abc")
  assert_one_line_error(result, "config.seed")


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / "results.json"
  path.write_text("{}")
  result = run_entry_point("experiments.sweep", "--config=configs/digits.py",
                           f"--config.workdir={path}")
  assert_one_line_error(result, "workdir", str(path))


def test_check_workdir_accepts_an_existing_or_creatable_directory(tmp_path):
  config_lib.check_workdir(str(tmp_path))
  config_lib.check_workdir(str(tmp_path / "new" / "deeper"))
  assert list(tmp_path.iterdir()) == []  # creates nothing


def test_check_workdir_refuses_a_file_and_a_path_under_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("")
  with pytest.raises(config_lib.ConfigError, match=r"^config field workdir=.*file, not a direc"):
    config_lib.check_workdir(str(path))
  with pytest.raises(config_lib.ConfigError, match=r"^config field workdir=.* is a file$"):
    config_lib.check_workdir(str(path / "sub" / "dir"))
  assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_check_workdir_refuses_a_path_under_a_read_only_directory(tmp_path):
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  read_only.chmod(0o555)
  try:
    if os.access(read_only, os.W_OK):
      pytest.skip("running as root: a read-only directory is still writable, nothing to refuse")
    with pytest.raises(config_lib.ConfigError, match=r"^config field workdir=.*not writable"):
      config_lib.check_workdir(str(read_only / "workdir"))
    with pytest.raises(config_lib.ConfigError, match=r"^config field workdir=.*not writable"):
      config_lib.check_workdir(str(read_only))
  finally:
    read_only.chmod(0o755)


def test_validate_checks_the_workdir(tmp_path):
  config = digits.get_config()
  (tmp_path / "file").write_text("")
  config.workdir = str(tmp_path / "file")
  with pytest.raises(config_lib.ConfigError, match="workdir"):
    config_lib.validate(config)


def test_check_teacher_dir(tmp_path):
  config_lib.check_teacher_dir(None)
  (tmp_path / "models" / "teacher").mkdir(parents=True)
  config_lib.check_teacher_dir(str(tmp_path))
  for path in ("/nonexistent", str(tmp_path / "models")):
    with pytest.raises(config_lib.ConfigError,
                       match=r"^config field teacher_dir=.* models/teacher \(from python -m"):
      config_lib.check_teacher_dir(path)


@pytest.mark.parametrize("method", ["exact", "alternating"])
def test_validate_accepts_the_projection_methods(method, tmp_path):
  config = digits.get_config()
  config.workdir, config.projection.method = str(tmp_path), method
  config_lib.validate(config)


@pytest.mark.parametrize("method", ["streaming", "subspace"])
def test_a_removed_projection_method_is_one_line_naming_the_allowed_ones(method, tmp_path):
  config = digits.get_config()
  config.workdir, config.projection.method = str(tmp_path), method
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config)
  assert str(error.value) == (
      f"config field projection.method={method!r} is invalid: allowed: exact, alternating "
      "(streaming and subspace were removed)")


def test_a_non_finite_error_is_one_line(monkeypatch, capsys):
  monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # keep pytest's handlers
  monkeypatch.setattr(cli.logging, "set_verbosity", lambda level: None)

  def job():
    raise train.NonFiniteError("teacher: non-finite loss nan at step 3")

  with pytest.raises(SystemExit) as exit_info:
    cli.run_guarded(job)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: teacher: non-finite loss nan at step 3\n"


def _leaves(tree: dict, prefix: str = "") -> dict:
  return {name: value for key, value in tree.items()
          for name, value in (_leaves(value, f"{prefix}{key}.").items() if isinstance(value, dict)
                              else [(prefix + key, value)])}


@pytest.mark.parametrize("args, spec", [((), "configs/digits.py"),
                                        (("--config=configs/fashion_mnist_resnet.py",),
                                         "configs/fashion_mnist_resnet.py")])
def test_help_lists_every_field_of_the_given_config_with_its_value_and_meaning(args, spec):
  result = run_entry_point("experiments.sweep", "--help", *args)
  assert result.returncode == 0, result.stderr
  assert f"Fields of {spec} (set one with --config.FIELD=VALUE" in result.stdout
  lines = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
  fields = _leaves(cli.load_config(spec).to_dict())
  listed = {line.split(" = ")[0]: line for line in lines if " = " in line}
  assert set(listed) == set(fields)
  for field, value in fields.items():
    assert listed[field].startswith(f"{field} = {value!r}")
  meanings = {field: line.split("  # ", 1)[1] for field, line in listed.items() if "  # " in line}
  assert meanings["student.epochs"] == "at most; early stopping on validation accuracy"  # recipe's
  assert meanings["latency.batch_size"] == "examples per measured forward pass"  # not a recipe's
  if spec == "configs/digits.py":  # every field of the quick start's config has its meaning
    assert set(meanings) == set(fields)
