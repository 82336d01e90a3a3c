"""Llama-3-8B LoRA SFT on one 8-GPU node: bf16 compute, parameters sharded (FSDP) over 8.

  python -m mmjax.main --config configs/llama3_8b_lora.py:hf=/path/to/Meta-Llama-3-8B-Instruct,data=/path/train.jsonl \
      --workdir /checkpoints/llama3_8b_lora

Needs a local Hugging Face checkpoint directory (`hf=`) and a JSONL file (`data=`, with
`{"messages": [...]}` or `{"prompt": ..., "response": ...}` rows); the tokenizer is read
from the same directory. On CPU CI this config is only checked abstractly (eval_shape).
"""
from mmjax.config import core, schema


def get_config(arg=None):
  args = core.parse_arg(arg, hf="", data="", steps=1000)
  c = schema.base_config()
  c.model.update(
      vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
      mlp_dim=14336, rope_theta=500000.0, norm_eps=1e-5, dtype="bfloat16", param_dtype="bfloat16",
      remat="dots_no_batch", attention="auto",
      logits_chunk=512)  # the loss's fp32 logits 512 positions at a time: 0.26 GB per row, not 2.1 GB
  c.model.rope_scaling.update(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)
  c.init_from_hf = args.hf
  c.lora.update(rank=16, alpha=32.0, dropout=0.05)
  c.trainable = ("lora/.*",)
  c.data.source = "jsonl"
  c.data.train_path = args.data
  c.data.tokenizer = args.hf
  c.data.packing = True
  c.seq_len = 4096
  c.batch_size = 32
  c.grad_accum = 2
  c.steps = args.steps
  c.optimizer.update(lr=2e-4, warmup_steps=50, schedule="cosine", weight_decay=0.0)
  c.mesh.update(data=1, fsdp=8, tensor=1)
  c.eval_every = 200
  c.eval_batch_size = 32
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  return c
