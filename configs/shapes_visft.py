"""ViSFT on shapes: a ViT improved through detection, segmentation and caption heads.

  python -m mmjax.main --config configs/shapes_visft.py --workdir /tmp/mmjax_visft

Stages (a recipe, mmjax/recipes/stages.py), one model `vision/` + `heads/` (mmjax/models/heads.py):
  pretrain  stands in for a pretrained CLIP-style tower (nothing can be downloaded): a random
            ViT learns image-level captions with the caption head, all weights trained,
            detection and segmentation losses off;
  heads     ViSFT stage 1: the tower is frozen; the detection, segmentation and caption
            heads train on all three tasks (trainable = params/heads/.*);
  lora      ViSFT stage 2: the heads are frozen; a rank-64 LoRA on the tower's attention and
            MLP trains through them on all task losses (trainable = lora/vision/.*).
Before and after each stage the recipe reports in-domain box mAP@0.5 and mAP@[.5:.95], mask
IoU and caption metrics, and out-of-domain probes on frozen tower features (object count
classification, image-to-text retrieval), then prints a table and writes results.json,
loss_curves.png and the merged tower (WORKDIR/vision, an mmjax vision directory).

To start from a real tower instead of `pretrain`, set
`--config.init_vision_from_hf=/models/clip-vit-base-patch16 --config.stage_order="('heads','lora')"`
(see configs/clip_coco_visft.py for COCO on a GPU node).

Args: scale (float, multiplies all step counts; e.g. scale=0.02 for a smoke test),
eval (held-out images for the task metrics), probe (train images the probes are fitted on),
seed (the run seed and the generated train/eval sets; `tools/seeds.py` runs several seeds).
"""
import ml_collections

from mmjax.config import core, schema

TOWER_LORA = r"vision/layers_\d+/(self_attn/(q_proj|k_proj|v_proj|out_proj)|mlp/(fc1|fc2))"


def get_config(arg=None):
  args = core.parse_arg(arg, scale=1.0, eval=128, probe=512, seed=0)
  c = schema.base_config()
  c.objective = "visft"
  c.model.name = "visft"
  # 48x48 images in 8x8 patches: a 6x6 token grid, two tokens per side of a shapes grid cell.
  c.vision.update(image_size=48, patch_size=8, d_model=96, n_layers=4, n_heads=4, head_dim=24, mlp_dim=256,
                  class_token=True, pool="cls", post_norm="pooled", attention="xla")
  c.visft.update(d_model=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=128, num_queries=6, mask_dim=32,
                 mask_upsample=4, eval_examples=args.eval, probe_train_examples=args.probe,
                 probe_eval_examples=256)
  c.data.update(source="shapes", task="image_caption", tokenizer="builtin", image_size=48, max_objects=3,
                num_train_examples=50_000, num_eval_examples=128)
  c.seq_len = 72  # a caption of three objects is ~65 characters
  c.batch_size = 32
  c.eval_batch_size = 64
  c.eval_every = 0
  c.log_every = 25
  c.checkpoint_every = 200
  c.lora.targets = ""
  c.optimizer.update(warmup_steps=20, schedule="cosine", clip_norm=1.0, weight_decay=0.0)
  steps = lambda n: max(int(n * args.scale), 2)
  c.stage_order = ("pretrain", "heads", "lora")
  c.stages = ml_collections.ConfigDict({
      "pretrain": dict(
          steps=steps(300), trainable=("params/.*",), optimizer=dict(lr=1e-3),
          visft=dict(w_detection=0.0, w_segmentation=0.0, w_caption=1.0)),
      "heads": dict(
          steps=steps(300), trainable=("params/heads/.*",), optimizer=dict(lr=1e-3)),
      "lora": dict(
          steps=steps(200), trainable=("lora/vision/.*",), optimizer=dict(lr=1e-3),
          lora=dict(targets=TOWER_LORA, rank=64, alpha=64.0)),
  })
  core.apply_seed(c, args.seed)
  return c
