"""`python -m mmjax.main` end to end: metrics, checkpoints, exact resume after SIGKILL,
clean stop on SIGTERM, bad input, non-finite loss, and two processes on 127.0.0.1."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, run_main, subprocess_env

TINY = ["--config", "configs/default.py:steps=6", "--config.model.d_model=24", "--config.model.n_layers=2",
        "--config.model.n_heads=4", "--config.model.n_kv_heads=2", "--config.model.head_dim=6",
        "--config.model.mlp_dim=30", "--config.seq_len=24", "--config.batch_size=8", "--config.eval_batch_size=8",
        "--config.data.num_eval_examples=16", "--config.log_every=1", "--config.checkpoint_every=2",
        "--config.eval_every=0"]


def _train_rows(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  by_step = {}
  for r in rows:
    if r["split"] == "train":
      by_step[r["step"]] = r  # a resumed run rewrites the steps after its checkpoint
  return by_step


def _trainable(workdir, step):
  """The saved trainable leaves of a checkpoint, read back with Orbax (no state needed)."""
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  tree = ocp.StandardCheckpointer().restore(path)
  return {k: np.asarray(v) for k, v in _flatten(tree["trainable"]).items()}


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def test_end_to_end_writes_metrics_tensorboard_and_checkpoints(tmp_path):
  r = run_main(TINY + ["--workdir", str(tmp_path)], env={"JAX_COMPILATION_CACHE_DIR": ""})  # not the suite's cache
  assert r.returncode == 0, r.stderr[-3000:]
  rows = _train_rows(tmp_path)
  assert sorted(rows) == [1, 2, 3, 4, 5, 6]
  for key in ("loss", "grad_norm", "lr", "step_time_s", "tokens_per_s", "tflops_per_s"):
    assert np.isfinite(rows[6][key]), key
  assert "eval at step 0" in r.stdout and "eval at step 6" in r.stdout
  assert os.listdir(tmp_path / "tb")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]  # keep_checkpoints=2
  assert set(_trainable(tmp_path, 6)) and all(k.startswith("lora/") for k in _trainable(tmp_path, 6))
  assert os.listdir(tmp_path / "compile_cache")  # by default the run's compiled steps, for its next stage or rerun


def test_exact_resume_after_sigkill(tmp_path):
  args = TINY[:1] + ["configs/default.py:steps=40"] + TINY[2:] + ["--config.checkpoint_every=5",
                                                                  "--config.model.d_model=64", "--config.seq_len=64"]
  ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
  r = run_main(args + ["--workdir", str(ref_dir)])
  assert r.returncode == 0, r.stderr[-3000:]

  env = subprocess_env(1)
  p = subprocess.Popen([sys.executable, "-m", "mmjax.main", *args, "--workdir", str(kill_dir)], cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = kill_dir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None:
    if ckpts.exists() and any(d.isdigit() for d in os.listdir(ckpts)):
      break
    time.sleep(0.01)
  p.send_signal(signal.SIGKILL)
  p.wait()
  saved = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  assert saved and saved[-1] < 40, f"run finished before it could be killed: {saved}"

  r = run_main(args + ["--workdir", str(kill_dir)])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout
  ref, resumed = _train_rows(ref_dir), _train_rows(kill_dir)
  assert sorted(resumed) == list(range(1, 41))
  for step in range(1, 41):
    assert resumed[step]["loss"] == ref[step]["loss"], step  # bitwise: same floats
  a, b = _trainable(ref_dir, 40), _trainable(kill_dir, 40)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  args = TINY[:1] + ["configs/default.py:steps=100000"] + TINY[2:] + ["--config.checkpoint_every=100000"]
  env = subprocess_env(1)
  p = subprocess.Popen([sys.executable, "-m", "mmjax.main", *args, "--workdir", str(tmp_path)], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline:
    if (tmp_path / "metrics.jsonl").exists() and len(_train_rows(tmp_path)) >= 3:
      break
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-3000:]
  assert "stopped by signal" in out
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert len(saved) == 1 and saved[0] >= 3


BAD = [
    (["--config.foo=1"], "unknown config key 'foo'"),
    (["--config.model.dtype=fp8"], "config.model.dtype='fp8' is not valid"),
    (["--config.mesh.data=3"], "multiplies to 3"),
    (["--config.batch_size=7"], "config.batch_size=7 must be divisible"),
    (["--config.lora.targets=.*nothing"], "config.lora.targets='.*nothing' matches no module"),
    (["--config.trainable=('nope/.*',)"], "config.trainable entry 'nope/.*' matches no variable"),
    (["--config.optimizer.schedule=stair"], "config.optimizer.schedule='stair' is not valid"),
    (["--config.data.source=jsonl", "--config.data.train_path=/no/such.jsonl"], "/no/such.jsonl"),
    (["--config.steps=abc"], "--config.steps=abc"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_config_is_one_line_exit_2(tmp_path, extra, message):
  devices = 2 if "--config.batch_size=7" in extra or "--config.mesh.data=3" in extra else 1
  r = run_main(TINY + extra + ["--workdir", str(tmp_path)], devices=devices)
  assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0], r.stderr
  assert "Traceback" not in r.stderr


def test_malformed_jsonl_line_names_the_line(tmp_path):
  data = tmp_path / "train.jsonl"
  rows = [json.dumps({"prompt": "reverse ab =", "response": "ba"})] * 4
  rows.insert(2, '{"prompt": "oops"')
  data.write_text("\n".join(rows) + "\n")
  r = run_main(TINY + ["--config.data.source=jsonl", f"--config.data.train_path={data}",
                       f"--config.data.eval_path={data}", "--workdir", str(tmp_path / "w")])
  assert r.returncode in (1, 2)
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and f"{data}:3:" in lines[0], r.stderr  # file:line: message


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
  r = run_main(TINY + ["--config.optimizer.lr=1e30", "--config.optimizer.clip_norm=0.0",
                       "--config.optimizer.warmup_steps=0", "--config.checkpoint_every=1",
                       "--workdir", str(tmp_path)])
  assert r.returncode == 1, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "non-finite loss" in lines[0] and "last good checkpoint" in lines[0], r.stderr
  bad_step = int(lines[0].split(" at step ")[1].split(";")[0])
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved and saved[-1] == bad_step - 1
  assert _trainable(tmp_path, saved[-1])  # intact and readable


def test_two_processes_match_one_process(tmp_path):
  args = TINY + ["--config.mesh.data=2"]
  single = run_main(args + ["--workdir", str(tmp_path / "one")], devices=2)
  assert single.returncode == 0, single.stderr[-3000:]
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import local as launcher
  code = launcher.launch(2, args + ["--workdir", str(tmp_path / "two")], devices_per_process=1,
                         log_dir=str(tmp_path / "logs"), timeout=600)
  logs = "".join(open(tmp_path / "logs" / f).read() for f in os.listdir(tmp_path / "logs"))
  assert code == 0, logs[-3000:]
  one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
  assert sorted(two) == sorted(one)
  for step in one:
    np.testing.assert_allclose(two[step]["loss"], one[step]["loss"], rtol=1e-6)
