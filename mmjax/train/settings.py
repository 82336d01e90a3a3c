"""The run keys the loop and the train step own: what trains, the optimizer, batch and step
counts, evaluation, checkpointing and the device mesh. `config_dict()` gives them with their
defaults (one comment per field); `validate(config, env)` checks them, the mesh and batch
arithmetic included."""
from __future__ import annotations

import ml_collections

from mmjax.config.core import ConfigError, check_choice, check_positive, check_regex
from mmjax.sharding import DEFAULT_RULES, mesh_shape, rules_from_config

SCHEDULES = ("cosine", "linear", "constant", "step")
STORE_DTYPES = ("float32", "bfloat16", "")  # '' = as the params
POSITIVE = ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "checkpoint_every",
            "keep_checkpoints", "eval_batch_size", "lora.rank", "optimizer.lr")


def config_dict() -> dict:
  return dict(
      seed=0,  # init, dropout and data order all derive from it
      objective="sft",  # the loss: a name in mmjax/objectives/registry.py ('sft', 'dpo', 'visft')
      lora=ml_collections.ConfigDict(dict(
          targets=r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",  # regex over module paths; '' = none
          rank=8,
          alpha=16.0,
          dropout=0.0,
          rslora=False,  # scale alpha/sqrt(rank) instead of alpha/rank
          dtype="float32",  # the adapter's stored dtype, whatever the base's param_dtype; its matmul runs in
          #                   model.dtype. '' = the base kernel's dtype
      )),
      trainable=("lora/.*",),  # regexes (full match) over variable paths such as 'params/lm_head/kernel'
      optimizer=ml_collections.ConfigDict(dict(
          lr=1e-3, b1=0.9, b2=0.999, eps=1e-8,
          weight_decay=0.0,
          decay_mask=r".*/(kernel|a|b)",  # regex over trainable paths that get weight decay
          schedule="cosine",  # 'cosine', 'linear', 'constant' or 'step' after warmup
          warmup_steps=10,
          end_lr_fraction=0.1,  # final lr = lr * end_lr_fraction (cosine, linear)
          step_every=0,  # 'step': the lr is multiplied by step_rate every step_every steps after warmup
          step_rate=0.5,
          clip_norm=1.0,  # global-norm clipping; 0 = off
          moment_dtype="float32",  # AdamW's moments (and the update) in this dtype whatever the trainable
          #                          params' dtype; '' = the params' own dtype
      )),
      seq_len=64,  # tokens per row
      batch_size=16,  # global batch (rows per optimizer step, all hosts together)
      grad_accum=1,  # micro-batches per step; the loss is normalised over all of them
      steps=100,  # optimizer steps
      eval_every=50,  # 0 = only before and after training
      eval_at_start=True,  # evaluate before the first step (False: a recipe's from-scratch stage, whose
      #                      random start says nothing)
      eval_batch_size=32,
      log_every=10,
      checkpoint_every=50,  # also saved at the end and on SIGTERM/SIGINT
      keep_checkpoints=2,
      sample_eval=ml_collections.ConfigDict(dict(
          num_examples=0,  # held-out prompts answered greedily before and after each stage; 0 = off
          max_new_tokens=64,
          show=3,  # print this many answers next to the truth after training
      )),
      mesh=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),  # one axis may be -1
      rules=tuple((k, v) for k, v in DEFAULT_RULES),  # logical axis -> mesh axes
      peak_tflops_per_device=0.0,  # for MFU; 0 = look up the device in the peak table
      reuse_host_memory=True,  # on CPU hosts: glibc keeps freed host memory for the next step instead of
      #                          re-faulting XLA:CPU's per-step buffer (mmjax/runtime.py; ~20% on CPU)
  )


def validate(config, env) -> None:
  check_choice("optimizer.schedule", config.optimizer.schedule, SCHEDULES)
  check_positive(config, *POSITIVE)
  if config.optimizer.schedule == "step" and (config.optimizer.step_every <= 0 or not 0 < config.optimizer.step_rate <= 1):
    raise ConfigError(f"config.optimizer.schedule='step' needs optimizer.step_every > 0 and optimizer.step_rate in "
                      f"(0, 1]; got step_every={config.optimizer.step_every!r}, "
                      f"step_rate={config.optimizer.step_rate!r}")
  check_choice("lora.dtype", config.lora.dtype, STORE_DTYPES)
  check_choice("optimizer.moment_dtype", config.optimizer.moment_dtype, STORE_DTYPES)
  if not 0.0 <= config.lora.dropout < 1.0:
    raise ConfigError(f"config.lora.dropout={config.lora.dropout!r} must be in [0, 1)")
  for key, pattern in (("lora.targets", config.lora.targets), ("optimizer.decay_mask", config.optimizer.decay_mask)):
    check_regex(key, pattern)
  for pattern in config.trainable:
    check_regex("trainable", pattern)
  _check_mesh_and_batch(config, env)


def data_parallel_size(config, n_devices: int) -> int:
  """Devices the batch is split over: the product of the mesh axes of the `act_batch` rule."""
  try:
    shape = mesh_shape(config.mesh, n_devices)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  sizes = dict(zip(("data", "fsdp", "tensor"), shape))
  axes = dict(rules_from_config(config.rules)).get("act_batch") or ()
  dp = 1
  for a in (axes,) if isinstance(axes, str) else axes:
    dp *= sizes[a]
  return dp


def _check_mesh_and_batch(config, env) -> None:
  dp = data_parallel_size(config, env.n_devices)
  need = dp * config.grad_accum
  if config.batch_size % need:
    raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by the data-parallel size "
                      f"{dp} x config.grad_accum={config.grad_accum} = {need}")
  if config.eval_batch_size % (dp * env.process_count):
    raise ConfigError(f"config.eval_batch_size={config.eval_batch_size} must be divisible by the data-parallel "
                      f"size {dp} and the process count {env.process_count}")
  if config.batch_size % env.process_count:
    raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by the process count "
                      f"{env.process_count}")
