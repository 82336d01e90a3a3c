"""Default job: LoRA SFT of a tiny LLaMA on the built-in generated 'reverse' task, 2 CPU cores, ~2 min.

  python -m mmjax.main --config configs/default.py --workdir /tmp/mmjax_default

Args (`--config configs/default.py:steps=50,task=add`): steps, task (reverse|add|sort).
The base model is randomly initialised (no downloads), so the adapters do all the
learning; eval loss and answer-token accuracy are printed before and after.
"""
from mmjax.config import core, schema


def get_config(arg=None):
  args = core.parse_arg(arg, steps=600, task="reverse")
  c = schema.base_config()
  c.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=352)
  c.lora.update(rank=16, alpha=32.0)
  c.trainable = ("lora/.*",)
  c.data.source = "generated"
  c.data.task = args.task
  c.data.tokenizer = "builtin"
  c.seq_len = 32
  c.batch_size = 32
  c.steps = args.steps
  c.optimizer.update(lr=3e-3, warmup_steps=20, schedule="cosine")
  c.eval_every = 200
  c.eval_batch_size = 64
  c.log_every = 20
  c.checkpoint_every = 200
  c.sample_eval.update(num_examples=64, max_new_tokens=12, show=3)
  return c
