"""Directed domain fine-tuning on shapes: per-modality adapters, each on its own data, vs joint tuning.

  python -m mmjax.main --config configs/shapes_directed.py --workdir /tmp/mmjax_directed
  python -m mmjax.main --config configs/shapes_directed.py:mode=interleaved --workdir /tmp/mmjax_directed_mix

The target domain is timed step captions of short videos ("first a red circle appears at the
top left at frame 1, then the red circle moves to the center at frame 3."). Stages (a recipe,
mmjax/recipes/stages.py; groups and schedules in mmjax/train/groups.py):

  pretrain  all weights of a random ViT + projector + LLaMA learn to caption shapes *images*
            (a stand-in for a pretrained VLM; it has never seen a video);
  directed  from `pretrain`, three LoRA groups, each trained only on its own data set:
              image  the vision tower's adapter (lora/vision)  on image captions
              video  the video path: the projector's adapter, the temporal embedding and
                     the language model's attention adapters (how it reads the visual
                     tokens)  on videos with their timed captions
              text   the language model's MLP adapters  on the timed captions alone (no
                     pixels: text data for the language model)
            one stage per group in turn (mode=sequential, the default: stages image,
            text, video), or one stage `directed` interleaving them per step by
            `group_schedule` (mode=interleaved);
  joint     from `pretrain`, the same groups and data sets, interleaved per step, with
            `joint=True`: every step trains all adapters (the joint alternative, on equal
            steps and equal data; in mode=interleaved it differs from `directed` in that
            one switch only).

Every stage is scored on the same held-out timed video captions (config.data): exact match,
missing, hallucination, repetition and per-step `timing` (events stated in order with the
right frame). The recipe's table shows the base model (the `@start` row of the first
stage after pretrain), directed and joint; results.json and loss_curves.png go to the workdir.

Args: scale (multiplies step counts; scale=0.02 for a smoke test), mode (sequential |
interleaved), steps (directed steps per group; joint gets the same total), eval (held-out
videos captioned per evaluation), image/video/text (train set size of each group's data),
seed (the run seed and the generated train/eval sets; `tools/seeds.py` runs several seeds).
"""
import ml_collections

from mmjax.config import core, schema

ALL_PROJECTIONS = r".*(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2|linear_1|linear_2)"


def get_config(arg=None):
  args = core.parse_arg(arg, scale=1.0, mode="sequential", steps=100, eval=32,
                              image=5_000, video=5_000, text=5_000, seed=0)
  if args.mode not in ("interleaved", "sequential"):
    raise core.ConfigError(f"config arg mode={args.mode!r} is not valid; choose 'sequential' or 'interleaved'")
  c = schema.base_config()
  c.model.update(name="vlm", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=352)
  c.vision.update(image_size=48, patch_size=16, d_model=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=128)
  c.vlm.update(projector="mlp2", max_frames=4, temporal_pool=1)
  # The target: timed step captions of 4-frame videos with up to 3 events (eval data of every stage).
  c.data.update(source="shapes", task="video_caption", timed=True, tokenizer="builtin_words", image_size=48,
                max_objects=2, video_frames=4, max_events=3, num_train_examples=50_000, num_eval_examples=64)
  c.seq_len = 96  # 4 frames x 9 visual tokens + prompt + up to 3 timed clauses
  c.batch_size = 16
  c.eval_batch_size = 32
  c.eval_every = 0
  c.log_every = 25
  c.checkpoint_every = 100
  c.optimizer.update(warmup_steps=10, schedule="cosine", clip_norm=1.0, lr=2e-3)
  c.sample_eval.update(num_examples=args.eval, max_new_tokens=48, show=2)
  c.lora.update(targets=ALL_PROJECTIONS, rank=16, alpha=32.0)
  steps = lambda n: max(int(n * args.scale), 2)
  per_group = steps(args.steps)
  llm_attn = r"lora/llm/layers_\d+/attn/.*"  # how the language model reads the visual tokens
  llm_mlp = r"lora/llm/layers_\d+/mlp/.*"  # the language model's own computation
  groups = {
      "image": dict(trainable=("lora/vision/.*",), data=dict(task="image_caption", num_train_examples=args.image)),
      "video": dict(trainable=("params/projector/temporal_embedding", "lora/projector/.*", llm_attn),
                    data=dict(num_train_examples=args.video)),
      "text": dict(trainable=(llm_mlp,), data=dict(drop_media=True, num_train_examples=args.text)),
  }
  stages = {
      "pretrain": dict(steps=steps(600), seq_len=48, batch_size=32, trainable=("params/.*",), lora=dict(targets=""),
                       data=dict(task="image_caption"), optimizer=dict(lr=1e-3, warmup_steps=20),
                       sample_eval=dict(max_new_tokens=24)),
      "joint": dict(steps=3 * per_group, init_from_stage="pretrain", groups=groups, joint=True,
                    group_schedule="image,video,text"),
  }
  if args.mode == "interleaved":
    stages["directed"] = dict(steps=3 * per_group, init_from_stage="pretrain", groups=groups,
                              group_schedule="image,video,text")
    order = ("pretrain", "directed", "joint")
  else:  # one stage per group; each starts from the previous one with its adapter merged in
    for name in ("image", "text", "video"):  # the video path last, aligned to the adapted tower and language
      stages[name] = dict(steps=per_group, groups={name: groups[name]}, optimizer=dict(warmup_steps=5))
    stages["image"]["init_from_stage"] = "pretrain"
    order = ("pretrain", "image", "text", "video", "joint")
  c.stage_order = order
  c.stages = ml_collections.ConfigDict(stages)
  core.apply_seed(c, args.seed)
  return c
