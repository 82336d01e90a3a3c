"""The README's two set-up commands exist, and CI runs the test one verbatim."""
import os

from helpers import ROOT


def _commands():
  text = open(os.path.join(ROOT, "README.md")).read()
  block = text.split("```bash", 1)[1].split("```", 1)[0]
  return [l for l in block.strip().splitlines() if l and not l.startswith("#")]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
  run, test = _commands()
  assert "python -m mmjax.main --config configs/" in run and "pip install" in run
  assert "pytest" in test and "pip install" in test
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert test in ci
