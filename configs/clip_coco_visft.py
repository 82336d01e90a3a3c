"""ViSFT of a CLIP ViT-L/14-336 tower on COCO, one 8-GPU node (bf16 compute, FSDP over 8).

  python -m mmjax.main --config configs/clip_coco_visft.py:hf=/models/clip-vit-large-patch14-336,coco=/data/coco \
      --workdir /checkpoints/clip_visft

Needs a local Hugging Face CLIP (or CLIPVisionModel) directory (`hf=`; its tokenizer.json is
the caption tokenizer unless `tokenizer=` names another) and COCO 2017 under `coco=`:
annotations/instances_{train,val}2017.json, annotations/captions_{train,val}2017.json,
train2017/ and val2017/. Stage `heads` trains the detection (100 queries, 80 classes),
segmentation and caption heads on the frozen tower; stage `lora` trains a rank-64 LoRA on
the tower's attention and MLP through the frozen heads. The run ends by writing
WORKDIR/vision (mmjax) and WORKDIR/vision_hf (a CLIPVisionModel directory, adapter merged).
A SigLIP directory works the same way (its MAP head stays frozen: it is not on the task path).
On CPU CI this config is only checked abstractly (eval_shape on 8 fake devices).
"""
import ml_collections

from mmjax.config import core, schema

TOWER_LORA = r"vision/layers_\d+/(self_attn/(q_proj|k_proj|v_proj|out_proj)|mlp/(fc1|fc2))"


def get_config(arg=None):
  args = core.parse_arg(arg, hf="", coco="", tokenizer="", heads_steps=20000, lora_steps=20000)
  c = schema.base_config()
  c.objective = "visft"
  c.model.name = "visft"
  c.model.update(dtype="bfloat16", param_dtype="float32")  # the heads' numerics
  c.init_vision_from_hf = args.hf
  c.vision.update(dtype="bfloat16", param_dtype="float32", remat="dots_no_batch", attention="auto")
  c.visft.update(d_model=256, n_layers=6, n_heads=8, head_dim=32, mlp_dim=2048, num_queries=100,
                 num_classes=80, mask_dim=256, mask_upsample=4, eval_examples=5000,
                 probe_train_examples=10000, probe_eval_examples=5000)
  c.data.update(source="coco", coco_root=args.coco, train_split="train2017", eval_split="val2017",
                tokenizer=args.tokenizer or args.hf, image_size=336, max_objects=50, num_eval_examples=5000,
                worker_count=8)
  c.seq_len = 40  # caption tokens
  c.batch_size = 64
  c.eval_batch_size = 64
  c.eval_every = 0
  c.log_every = 50
  c.checkpoint_every = 1000
  c.mesh.update(data=1, fsdp=8, tensor=1)
  c.lora.targets = ""
  c.optimizer.update(warmup_steps=1000, schedule="cosine", clip_norm=0.1, weight_decay=1e-4)
  c.stage_order = ("heads", "lora")
  c.stages = ml_collections.ConfigDict({
      "heads": dict(steps=args.heads_steps, trainable=("params/heads/.*",), optimizer=dict(lr=1e-4)),
      "lora": dict(steps=args.lora_steps, trainable=("lora/vision/.*",), optimizer=dict(lr=1e-4),
                   lora=dict(targets=TOWER_LORA, rank=64, alpha=64.0)),
  })
  return c
