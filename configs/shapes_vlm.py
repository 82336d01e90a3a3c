"""Multimodal demo: a tiny VLM pre-trained on shapes questions (VQA), then LoRA-tuned to caption images.

  python -m mmjax.main --config configs/shapes_vlm.py --workdir /tmp/mmjax_vlm

Stages (a recipe, mmjax/train/stages.py):
  pretrain  all weights of a randomly initialised ViT + projector + LLaMA learn to answer
            questions about shapes images ("what colour is the square?" -> "red") — no
            pretrained weights can be downloaded, so this stands in for a pretrained VLM;
  finetune  LoRA on every projection of the tower, projector and language model learns a
            different task: full captions ("a large red circle at the top left. ...").
Before and after each stage, greedy captions of held-out examples are scored by atomic
facts (exact match, missing, hallucination, repetition); the recipe prints a table, a few
captions next to the truth, and writes results.json and loss_curves.png in the workdir.

Args: scale (float, multiplies all step counts; e.g. scale=0.05 for a smoke test),
eval (held-out examples captioned per evaluation).
"""
import ml_collections

from mmjax import config_lib

ALL_PROJECTIONS = r".*(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2|linear_1|linear_2)"


def get_config(arg=None):
  args = config_lib.parse_arg(arg, scale=1.0, eval=32)
  c = config_lib.base_config()
  c.model.update(name="vlm", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=352)
  # 48x48 images in 16x16 patches: one visual token per cell of the shapes 3x3 grid.
  c.vision.update(image_size=48, patch_size=16, d_model=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=128)
  c.vlm.update(projector="mlp2", max_frames=4, temporal_pool=1)
  c.data.update(source="shapes", tokenizer="builtin", image_size=48, max_objects=2, video_frames=4,
                num_train_examples=50_000, num_eval_examples=64)
  c.batch_size = 32
  c.eval_batch_size = 32
  c.eval_every = 0
  c.log_every = 50
  c.checkpoint_every = 200
  c.optimizer.update(warmup_steps=20, schedule="cosine", clip_norm=1.0)
  steps = lambda n: max(int(n * args.scale), 2)
  c.stage_order = ("pretrain", "finetune")
  c.stages = ml_collections.ConfigDict({
      "pretrain": dict(
          steps=steps(600), seq_len=64, trainable=("params/.*",), lora=dict(targets=""),
          data=dict(task="vqa"), optimizer=dict(lr=1e-3),
          sample_eval=dict(num_examples=args.eval, max_new_tokens=16, show=3)),
      "finetune": dict(
          steps=steps(200), seq_len=96, batch_size=16, trainable=("lora/.*",),
          lora=dict(targets=ALL_PROJECTIONS, rank=16, alpha=32.0),
          data=dict(task="image_caption"), optimizer=dict(lr=2e-3),
          sample_eval=dict(num_examples=args.eval, max_new_tokens=90, show=3)),
  })
  return c
