"""ViSFT on shapes: a ViT improved through detection, segmentation and caption heads, with the
compute-matched controls and truly out-of-domain probes that tell whether stage 2 helps.

  python -m mmjax.main --config configs/shapes_visft.py --workdir /tmp/mmjax_visft
  python tools/seeds.py --config configs/shapes_visft.py --seeds 3 --workdir /tmp/visft_seeds
  python tools/visft_report.py --workdir /tmp/visft_seeds

Training images show 3 shapes (square, circle, triangle) in 4 colours (red, green, blue,
yellow), 1-3 objects on a dark background. Stages (a recipe, mmjax/recipes/stages.py), one
model `vision/` + `heads/` (mmjax/models/heads.py):
  pretrain     stands in for a pretrained CLIP-style tower (nothing can be downloaded): a random
               ViT learns image-level captions with the caption head, all weights trained,
               detection and segmentation losses off;
  heads        ViSFT stage 1: the tower is frozen; the detection, segmentation and caption
               heads train on all three tasks (trainable = params/heads/.*);
  lora         ViSFT stage 2: the heads are frozen; a LoRA (rank `lora_rank`, 64, alpha = rank) on
               the tower's attention and MLP trains through them on all task losses at
               `lora_lr` (trainable = lora/vision/.*).
Controls, each `lora_steps` steps more than `heads` (the same compute as `lora`; the LoRA ones
with its rank and learning rate):
  lora_caption stage 2 through the caption head alone (detection and segmentation weights 0);
  lora_detseg  stage 2 through the detection and segmentation heads alone (caption weight 0);
  lora_weights stage 2 with other task-loss weights (`weights`: detection-segmentation-caption);
  heads_long   stage 1 trained longer by the same steps (the tower stays the pretrained one);
  joint        one stage from `pretrain`: heads and the tower's LoRA trained together for
               heads_steps + lora_steps steps (single-stage joint tuning).
Before and after each stage the recipe reports in-domain box mAP@0.5 and mAP@[.5:.95], mask
IoU and caption metrics; probes on frozen tower features (mean patch token, ridge fits on
`probe` train images, scored on `probe_eval` held-out ones): on the training distribution (object
count, image-to-text retrieval) and on probe sets the tower never saw (`visft.probe_sets`):
  new_objects  one object of a shape (diamond, cross) and colour (purple, cyan, pink, white)
               absent from training: its shape and its colour;
  many         4-6 objects as well as 1-3 (training shows at most 3): the count;
  noise        the training concepts on a coloured-noise background: count and retrieval;
and `probe_ood_mean`, their mean (r1 for retrieval). The table is written as results.txt /
results.json / loss_curves.png with the merged tower (WORKDIR/vision); `tools/visft_report.py`
checks the paper's claims per seed and as mean ± sd over a `tools/seeds.py` run.

To start from a real tower instead of `pretrain`, set
`--config.init_vision_from_hf=/models/clip-vit-base-patch16 --config.stage_order="('heads','lora')"`
(see configs/clip_coco_visft.py for COCO on a GPU node).

Args: scale (float, multiplies all step counts; e.g. scale=0.02 for a smoke test),
pretrain_steps, heads_steps, lora_steps, lora_rank and lora_lr (stage 2's adapter and
learning rate, in lora, joint and every LoRA control), weights (lora_weights' task weights, dashes between
them), eval (held-out images for the task metrics), probe (train images the probes are fitted
on), probe_eval (held-out images each probe is scored on: 1024 puts a difference of 0.03 in a
three-seed mean outside two standard errors), ood (the out-of-domain probe sets; False for
data other than shapes), controls (add the controls), seed (the run seed and the generated
train/eval sets).
"""
import ml_collections

from mmjax.config import core, schema

TOWER_LORA = r"vision/layers_\d+/(self_attn/(q_proj|k_proj|v_proj|out_proj)|mlp/(fc1|fc2))"


TRAIN_SHAPES, TRAIN_COLOURS = ("square", "circle", "triangle"), ("red", "green", "blue", "yellow")
PROBE_SETS = {  # out of domain: what the tower never sees in training (mmjax/evals/visft.py)
    "new_objects": dict(data=dict(shapes=("diamond", "cross"), colours=("purple", "cyan", "pink", "white"),
                                  max_objects=1), labels=("shape", "colour")),
    "many": dict(data=dict(max_objects=6), labels=("count",)),
    "noise": dict(data=dict(background="noise"), labels=("count", "retrieval")),
}


def get_config(arg=None):
  args = core.parse_arg(arg, scale=1.0, pretrain_steps=300, heads_steps=300, lora_steps=200, lora_rank=64, lora_lr=1e-3,
                        weights="2-2-0.5",
                        eval=128, probe=512, probe_eval=1024, ood=True, controls=True, seed=0)
  try:
    w_det, w_seg, w_cap = (float(x) for x in str(args.weights).split("-"))
  except ValueError:
    raise core.ConfigError(f"config arg weights={args.weights!r} is not valid; expected three task weights "
                           "detection-segmentation-caption, e.g. 2-2-0.5") from None
  if not (args.lora_rank > 0 and args.lora_lr > 0):
    raise core.ConfigError(f"config args lora_rank={args.lora_rank!r}, lora_lr={args.lora_lr!r} are not valid; "
                           "stage 2's adapter rank must be a positive integer and its learning rate > 0")
  c = schema.base_config()
  c.objective = "visft"
  c.model.name = "visft"
  # 48x48 images in 8x8 patches: a 6x6 token grid, two tokens per side of a shapes grid cell.
  c.vision.update(image_size=48, patch_size=8, d_model=96, n_layers=4, n_heads=4, head_dim=24, mlp_dim=256,
                  class_token=True, pool="cls", post_norm="pooled", attention="xla")
  c.visft.update(d_model=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=128, num_queries=6, mask_dim=32,
                 mask_upsample=4, eval_examples=args.eval, probe_train_examples=args.probe,
                 probe_eval_examples=args.probe_eval, probe_sets=PROBE_SETS if args.ood else {})
  c.data.update(source="shapes", task="image_caption", tokenizer="builtin", image_size=48, max_objects=3,
                shapes=TRAIN_SHAPES, colours=TRAIN_COLOURS, num_train_examples=50_000, num_eval_examples=128)
  c.seq_len = 72  # a caption of three objects is ~65 characters
  c.batch_size = 32
  c.eval_batch_size = 64
  c.eval_every = 0
  c.eval_at_start = False  # every stage starts where another stage's evaluation ended (pretrain: a random init)
  c.log_every = 25
  c.checkpoint_every = 200
  c.lora.targets = ""
  c.optimizer.update(warmup_steps=20, schedule="cosine", clip_norm=1.0, weight_decay=0.0)
  steps = lambda n: max(int(n * args.scale), 2)
  stage2 = dict(steps=steps(args.lora_steps), trainable=("lora/vision/.*",), optimizer=dict(lr=float(args.lora_lr)),
                lora=dict(targets=TOWER_LORA, rank=args.lora_rank, alpha=float(args.lora_rank)))
  stages = {
      "pretrain": dict(
          steps=steps(args.pretrain_steps), trainable=("params/.*",), optimizer=dict(lr=1e-3),
          visft=dict(w_detection=0.0, w_segmentation=0.0, w_caption=1.0)),
      "heads": dict(
          steps=steps(args.heads_steps), trainable=("params/heads/.*",), optimizer=dict(lr=1e-3)),
      "lora": stage2,
  }
  order = ["pretrain", "heads", "lora"]
  if args.controls:
    stages.update(
        lora_caption=dict(stage2, init_from_stage="heads", visft=dict(w_detection=0.0, w_segmentation=0.0)),
        lora_detseg=dict(stage2, init_from_stage="heads", visft=dict(w_caption=0.0)),
        lora_weights=dict(stage2, init_from_stage="heads",
                          visft=dict(w_detection=w_det, w_segmentation=w_seg, w_caption=w_cap)),
        heads_long=dict(stages["heads"], steps=steps(args.lora_steps), init_from_stage="heads"),
        joint=dict(stage2, steps=steps(args.heads_steps) + steps(args.lora_steps), init_from_stage="pretrain",
                   trainable=("params/heads/.*", "lora/vision/.*")),
    )
    order += ["lora_caption", "lora_detseg", "lora_weights", "heads_long", "joint"]
  c.stage_order = tuple(order)
  c.stages = ml_collections.ConfigDict(stages)
  core.apply_seed(c, args.seed)
  return c
