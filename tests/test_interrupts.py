"""Nothing lost to a kill: SIGKILL / SIGTERM during start-up and during the final export,
damaged checkpoints (truncated or missing array file, truncated metadata), user errors that
end in one line and leave the workdir as it was, metrics.jsonl with each step once, and the
resolved config in WORKDIR/config.json."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, run_main, subprocess_env
from test_main import TINY, _trainable

# A real `python -m mmjax.main` process that signals itself at a chosen phase: 'startup' (as
# the stage's model is built, after config.json is written) or 'export' (after the final
# model's params are written, before the directory is complete).
_INTERRUPTED = """
import os, signal, sys
from mmjax import main
from mmjax.convert import model_dir
from mmjax.train import run
phase, sig = sys.argv[1], getattr(signal, sys.argv[2])
def hit(real):
  def wrapped(*a, **k):
    if phase == "export":
      real(*a, **k)
      os.kill(os.getpid(), sig)
      return
    os.kill(os.getpid(), sig)
    return real(*a, **k)
  return wrapped
if phase == "export":
  model_dir.save_variables = hit(model_dir.save_variables)
else:
  run.build = hit(run.build)
main.main(["mmjax.main"] + sys.argv[3:])
"""


def _interrupted(phase, sig, args):
  return subprocess.run([sys.executable, "-c", _INTERRUPTED, phase, sig, *args], cwd=ROOT, env=subprocess_env(1),
                        capture_output=True, text=True, timeout=600)


def _model(workdir):
  from mmjax.convert import model_dir
  _, params, lora, _ = model_dir.load(os.path.join(workdir, "model"))
  from flax import traverse_util
  flat = traverse_util.flatten_dict({"params": params, "lora": lora or {}}, sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def _rows(workdir):
  return [(r["split"], r["step"]) for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: 6 steps, checkpoints at 4 and 6."""
  d = tmp_path_factory.mktemp("reference")
  r = run_main(TINY + ["--workdir", str(d)])
  assert r.returncode == 0, r.stderr[-3000:]
  return d


@pytest.mark.parametrize("phase,sig", [("export", "SIGKILL"), ("export", "SIGTERM"), ("startup", "SIGTERM"),
                                       ("startup", "SIGINT")])
def test_interrupted_run_completes_on_rerun(reference, tmp_path, phase, sig):
  r = _interrupted(phase, sig, TINY + ["--workdir", str(tmp_path)])
  if sig == "SIGKILL":
    assert r.returncode == -signal.SIGKILL
  else:
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and f"stopped by {sig}" in lines[0], r.stderr
  assert not (tmp_path / "model").exists()  # never a half-written model under the final name
  if phase == "export":
    assert (tmp_path / "model.partial" / "params").exists()
  r = run_main(TINY + ["--workdir", str(tmp_path)])
  assert r.returncode == 0, r.stderr[-3000:]
  assert not (tmp_path / "model.partial").exists()
  want, got = _model(reference), _model(tmp_path)
  assert want.keys() == got.keys() and any(k.startswith("lora/") for k in got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  rows = _rows(tmp_path)
  assert len(rows) == len(set(rows)) and sorted(rows) == sorted(_rows(reference))  # each step once


def _damage(step_dir, how):
  state = os.path.join(step_dir, "state")
  arrays = [os.path.join(state, "ocdbt.process_0", "d", f) for f in os.listdir(os.path.join(state, "ocdbt.process_0", "d"))]
  biggest = max(arrays, key=os.path.getsize)
  if how == "array truncated":
    os.truncate(biggest, 100)
  elif how == "array deleted":
    os.remove(biggest)
  else:
    os.truncate(os.path.join(state, "_METADATA"), 50)


@pytest.mark.parametrize("how", ["array truncated", "array deleted", "metadata truncated"])
def test_damaged_newest_checkpoint_resumes_from_the_previous(reference, tmp_path, how):
  work = tmp_path / "w"
  shutil.copytree(reference, work)
  shutil.rmtree(work / "model")
  _damage(work / "checkpoints" / "6", how)
  r = run_main(TINY + ["--workdir", str(work)])
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "checkpoint" in lines[0] and "/checkpoints/6 cannot be read" in lines[0] \
      and "resuming from step 4" in lines[0], r.stderr
  assert "resumed from" in r.stdout and r.stdout.split("resumed from")[1].split()[0].endswith("/4")
  assert sorted(os.listdir(work / "checkpoints")) == ["4", "6", "6.damaged"]  # step 6 saved again, the damage kept
  a, b = _trainable(reference, 6), _trainable(work, 6)
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  want, got = _model(reference), _model(work)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  rows = _rows(work)
  assert len(rows) == len(set(rows)) and sorted(rows) == sorted(_rows(reference))


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(reference, tmp_path):
  work = tmp_path / "w"
  shutil.copytree(reference, work)
  shutil.rmtree(work / "model")
  _damage(work / "checkpoints" / "6", "array deleted")
  _damage(work / "checkpoints" / "4", "metadata truncated")
  before = sorted(os.listdir(work / "checkpoints"))
  for _ in range(2):  # and again: the rerun does not start from step 0 either
    r = run_main(TINY + ["--workdir", str(work)])
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "no checkpoint in" in lines[0] and "step 6:" in lines[0] and "step 4:" in lines[0], \
        r.stderr
    assert sorted(os.listdir(work / "checkpoints")) == before
  assert not (work / "model").exists()


def _bad_config(tmp_path):
  p = tmp_path / "bad_config.py"
  p.write_text("def get_config(arg=None):\n  raise ValueError('model size must be one of 7b, 13b')\n")
  return str(p)


USER_ERRORS = [
    (["--config", "configs/default.py:nonsense"], "config arg 'nonsense' is unknown; valid args:", 2),
    (["--config", "configs/default.py:steps=abc"], "config arg steps='abc' is not a valid int", 2),
    (["--config", "configs/no_such_config.py"], "config file 'configs/no_such_config.py' does not exist", 2),
    (["--config", "BAD"], "get_config raised ValueError: model size must be one of 7b, 13b", 2),
    (TINY + ["--config.steps=abc"], "--config.steps=abc", 2),
]


@pytest.mark.parametrize("args,message,code", USER_ERRORS)
def test_user_errors_are_one_line_and_keep_the_workdir(tmp_path, args, message, code):
  work = tmp_path / "w"
  work.mkdir()
  (work / "config.json").write_text('{"earlier": true}\n')
  (work / "notes.txt").write_text("mine\n")
  args = [_bad_config(tmp_path) if a == "BAD" else a for a in args]
  r = run_main(args + ["--workdir", str(work)])
  assert r.returncode == code, (r.stdout[-2000:], r.stderr[-2000:])
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
  assert sorted(os.listdir(work)) == ["config.json", "notes.txt"]
  assert (work / "config.json").read_text() == '{"earlier": true}\n'


def test_workdir_that_is_a_file_or_cannot_be_made(tmp_path):
  f = tmp_path / "a_file"
  f.write_text("keep me\n")
  for workdir, message in ((f, "is a file; give a directory"), (f / "sub", "cannot be written")):
    r = run_main(TINY + ["--workdir", str(workdir)])
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
  assert f.read_text() == "keep me\n"


def test_truncated_hf_checkpoint_is_one_line(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  d = tmp_path / "hf"
  d.mkdir()
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.train_from_iterator(["the cat sat on the mat"] * 4, trainers.BpeTrainer(
      vocab_size=80, show_progress=False, special_tokens=["<pad>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  t.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=t.get_vocab_size(), hidden_size=24, intermediate_size=38, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(d)
  weights = d / "model.safetensors"
  os.truncate(weights, os.path.getsize(weights) // 2)
  data = tmp_path / "train.jsonl"
  data.write_text("\n".join(json.dumps({"prompt": "the cat", "response": "sat on the mat"}) for _ in range(8)) + "\n")
  r = run_main(TINY + [f"--config.init_from_hf={d}", "--config.data.source=jsonl", f"--config.data.train_path={data}",
                       f"--config.data.eval_path={data}", f"--config.data.tokenizer={d}",
                       "--workdir", str(tmp_path / "w")])
  assert r.returncode in (1, 2), r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "model.safetensors is truncated" in lines[0], r.stderr


def test_config_json_is_written_and_earlier_ones_kept(tmp_path):
  r = run_main(TINY + ["--workdir", str(tmp_path)])
  assert r.returncode == 0, r.stderr[-2000:]
  first = json.loads((tmp_path / "config.json").read_text())
  assert first["steps"] == 6 and first["model"]["d_model"] == 24
  r = run_main(TINY[:1] + ["configs/default.py:steps=8"] + TINY[2:] + ["--workdir", str(tmp_path)])
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads((tmp_path / "config.json").read_text())["steps"] == 8
  assert json.loads((tmp_path / "config.1.json").read_text()) == first
  rows = _rows(tmp_path)
  assert len(rows) == len(set(rows))
  assert sorted(s for split, s in rows if split == "train") == list(range(1, 9))
