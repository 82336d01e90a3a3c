"""Multimodal demo: a tiny VLM pre-trained to caption shapes images, then LoRA-tuned to caption videos.

  python -m mmjax.main --config configs/shapes_vlm.py --workdir /tmp/mmjax_vlm

Stages (a recipe, mmjax/recipes/stages.py):
  pretrain  all weights of a randomly initialised ViT + projector + LLaMA learn to caption
            shapes images ("a large red circle at the top left. ...") — no pretrained
            weights can be downloaded, so this stands in for a pretrained VLM;
  finetune  LoRA on every projection of the tower, projector and language model learns a
            different task: step-by-step captions of short videos ("first a red circle
            appears at the top left, then the red circle moves to the center, ...").
Text goes through the `builtin_words` tokenizer (one token per word of the shapes grammar).
Before and after each stage, greedy captions of held-out examples are scored by atomic
facts (exact match, missing, hallucination, repetition); the recipe prints a table, a few
captions next to the truth, and writes results.json and loss_curves.png in the workdir.

Args: scale (float, multiplies all step counts; e.g. scale=0.05 for a smoke test),
eval (held-out examples captioned per evaluation),
seed (the run seed and the generated train/eval sets; `tools/seeds.py` runs several seeds).
"""
import ml_collections

from mmjax.config import core, schema

ALL_PROJECTIONS = r".*(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2|linear_1|linear_2)"


def get_config(arg=None):
  args = core.parse_arg(arg, scale=1.0, eval=32, seed=0)
  c = schema.base_config()
  c.model.update(name="vlm", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=352)
  # 48x48 images in 16x16 patches: one visual token per cell of the shapes 3x3 grid.
  c.vision.update(image_size=48, patch_size=16, d_model=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=128)
  c.vlm.update(projector="mlp2", max_frames=4, temporal_pool=1)
  c.data.update(source="shapes", tokenizer="builtin_words", image_size=48, max_objects=2, video_frames=4,
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
          steps=steps(600), seq_len=48, trainable=("params/.*",), lora=dict(targets=""),
          data=dict(task="image_caption"), optimizer=dict(lr=1e-3),
          sample_eval=dict(num_examples=args.eval, max_new_tokens=24, show=3)),
      "finetune": dict(  # 4 frames x 9 visual tokens + prompt + a caption of <= 4 events fit in 96
          steps=steps(300), seq_len=96, batch_size=16, trainable=("lora/.*",),
          lora=dict(targets=ALL_PROJECTIONS, rank=16, alpha=32.0),
          data=dict(task="video_caption"), optimizer=dict(lr=2e-3),
          sample_eval=dict(num_examples=args.eval, max_new_tokens=56, show=3)),
  })
  core.apply_seed(c, args.seed)
  return c
