"""Directed domain fine-tuning on shapes videos: separate adapters for the image tower, the video
path and the language model, each on its own small data set, against tuning on the full video set.

  python -m mmjax.main --config configs/shapes_directed.py --workdir /tmp/mmjax_directed
  python tools/seeds.py --config configs/shapes_directed.py --seeds 3 --workdir /tmp/directed_seeds
  python tools/directed_report.py --workdir /tmp/directed_seeds

The target domain is timed step captions of 4-frame videos ("first a cyan diamond appears at
the top left at frame 1, then the cyan diamond moves to the center at frame 3.") in which
new concepts appear: the shape `diamond` and the colours `purple` and `cyan`, which the
pre-trained model has never seen or named (about half the target objects carry one). It is
scored on `eval` held-out target videos by the global error rate `error` = missing +
hallucinated events over true events (per caption; `micro_error` summed over captions;
`error_se` its standard error), exact match, repetition and per-step `timing`.

Stages (a recipe, mmjax/recipes/stages.py; groups and schedules in mmjax/train/groups.py):

  pretrain  all weights of a random ViT + projector + LLaMA caption shapes images and timed
            shapes videos of the *old* concepts only (3 shapes, 4 colours), the two data sets
            interleaved step by step: a stand-in for a pre-trained video LLM. One tower sees
            both images and frames.
  full      from `pretrain`, the two-tower model (`vlm.video_tower`: the video tower starts as
            a copy of the image tower, as Video-LLaVA's does from its image encoder) tunes the
            video path's adapters (video tower, projector, language model, and the temporal
            embedding) on the **full** target video set (`videos`): the paper's baseline.
  small     the same on the small video set: the first `video_share` (24%) of those videos.
  directed  from `pretrain`, three groups, each trained only on its own data set, interleaved
            by `schedule`:
              image  the image tower's and the shared projector's adapters (lora/vision,
                     lora/projector)  on target-concept image captions, `image_share` (2.5%)
                     of the full video set's size; the projector is the one part the images
                     and the videos share, so it is how image data reaches the video path
              video  the video tower's adapter, the temporal embedding and the language
                     model's attention adapters  on the small video set
              text   the language model's MLP adapters  on `text` target captions without
                     pixels (text data for the language model)
  joint     from `pretrain`, exactly the directed groups, data and schedule with `joint=True`:
            every step trains every adapter (the joint alternative on the directed data).

Every arm trains `steps` steps at batch 16 (equal steps); a data set smaller than its steps need
is repeated (the small video set about 10 times, the image set about 20). `mode=sequential`
trains the directed groups one after another instead (stages directed_image, directed_text,
then directed: the video path last, each with a third of the steps and the earlier ones'
adapters merged). The table (results.txt / results.json / loss_curves.png) has every arm and
the base (the `pretrain` row: the arms start from it); it is marked INVALID unless the full
arm lowers the base's `error` by 0.15 (`config.headroom`). `tools/directed_report.py` gives
the paper's comparisons per seed and as mean ± sd over the seeds of a `tools/seeds.py` run.

Args: scale (multiplies step counts; scale=0.02 for a smoke test), steps (per arm), videos
(full video set), video_share, image_share (of the full video set's size), text (text set
size), schedule (directed's and joint's group_schedule with dashes for commas:
image-video:2-text trains image 1, video 2, text 1 step per cycle; a group left out never
trains), mode (interleaved | sequential), eval (held-out target videos), pretrain (steps),
shared (the directed video group trains the whole video path, as the video-only arms do: it
shares the projector's adapter with the image group and the language model's MLP adapters
with the text group), small_lacks (a new concept, e.g. `cyan`, left out of the small video set:
the `small` arm's and the directed / joint video group's videos are drawn without it, while the
image set, the text and the full video set keep it, so the images teach something the small
video set cannot; default "" keeps every concept), seed (the run seed and the generated train /
eval sets).
"""
import ml_collections

from mmjax.config import core, schema

ALL_PROJECTIONS = r".*(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2|linear_1|linear_2)"
OLD_SHAPES, OLD_COLOURS = ("square", "circle", "triangle"), ("red", "green", "blue", "yellow")
NEW_SHAPES, NEW_COLOURS = ("diamond",), ("purple", "cyan")
TARGET = dict(shapes=OLD_SHAPES + NEW_SHAPES, colours=OLD_COLOURS + NEW_COLOURS)
# What each group trains: regexes over the variable paths (mmjax/models/vlm.py).
IMAGE_PATH = (r"lora/vision/.*", r"lora/projector/.*")
VIDEO_PATH = (r"lora/video_tower/.*", r"params/projector/temporal_embedding", r"lora/llm/layers_\d+/attn/.*")
TEXT_PATH = (r"lora/llm/layers_\d+/mlp/.*",)
VIDEO_ONLY = (r"lora/video_tower/.*", r"params/projector/temporal_embedding", r"lora/projector/.*", r"lora/llm/.*")


def set_sizes(videos: int, video_share: float, image_share: float) -> dict:
  """The arms' data set sizes: {"full": videos, "small": videos * video_share, "images":
  videos * image_share}, each at least 1."""
  return dict(full=videos, small=max(1, round(videos * video_share)), images=max(1, round(videos * image_share)))


def small_video_data(lacks: str) -> dict:
  """The small video set's data overrides: without the new concept `lacks` ("" = none left out)."""
  if not lacks:
    return {}
  if lacks not in NEW_SHAPES + NEW_COLOURS:
    raise core.ConfigError(f"config arg small_lacks={lacks!r} is not valid; choose one of the new concepts "
                           f"{NEW_SHAPES + NEW_COLOURS} or '' (none left out)")
  key = "shapes" if lacks in NEW_SHAPES else "colours"
  return {key: tuple(x for x in TARGET[key] if x != lacks)}


def get_config(arg=None):
  args = core.parse_arg(arg, scale=1.0, steps=300, videos=2000, video_share=0.24, image_share=0.025, text=2000,
                        schedule="image-video:2-text", mode="interleaved", eval=1500, pretrain=800, shared=False,
                        small_lacks="", seed=0)
  if args.mode not in ("interleaved", "sequential"):
    raise core.ConfigError(f"config arg mode={args.mode!r} is not valid; choose 'interleaved' or 'sequential'")
  if not 0 < args.video_share <= 1 or not 0 < args.image_share <= 1:
    raise core.ConfigError(f"config args video_share={args.video_share!r} and image_share={args.image_share!r} "
                           "must be fractions in (0, 1]")
  sizes = set_sizes(args.videos, args.video_share, args.image_share)
  small_data = small_video_data(args.small_lacks)
  schedule = args.schedule.replace("-", ",")  # config args are comma-separated: the arg's items use dashes
  c = schema.base_config()
  c.model.update(name="vlm", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=352)
  c.vision.update(image_size=48, patch_size=16, d_model=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=128)
  c.vlm.update(projector="mlp2", max_frames=4, temporal_pool=1, video_tower=True)
  # The target: timed step captions of 4-frame videos with up to 3 events, new concepts included
  # (every stage's eval data; the groups' data override it for training).
  c.data.update(source="shapes", task="video_caption", timed=True, tokenizer="builtin_words", image_size=48,
                max_objects=2, video_frames=4, max_events=3, num_train_examples=sizes["full"],
                num_eval_examples=args.eval, **TARGET)
  c.seq_len = 96  # 4 frames x 9 visual tokens + prompt + up to 3 timed clauses
  c.batch_size = 16
  c.eval_batch_size = 64
  c.eval_every = 0
  c.log_every = 25
  c.checkpoint_every = 100
  c.optimizer.update(warmup_steps=10, schedule="cosine", clip_norm=1.0, lr=2e-3)
  c.sample_eval.update(num_examples=args.eval, max_new_tokens=48, show=2)
  c.lora.update(targets=ALL_PROJECTIONS, rank=16, alpha=32.0)
  steps = lambda n: max(int(n * args.scale), 2)
  old = dict(shapes=OLD_SHAPES, colours=OLD_COLOURS, num_train_examples=50_000)
  video = lambda n: dict(num_train_examples=n)  # the first n target videos of the train split
  directed_groups = {
      "image": dict(trainable=IMAGE_PATH, data=dict(task="image_caption", num_train_examples=sizes["images"])),
      "video": dict(trainable=VIDEO_ONLY if args.shared else VIDEO_PATH, data=dict(video(sizes["small"]), **small_data)),
      "text": dict(trainable=TEXT_PATH, data=dict(drop_media=True, num_train_examples=args.text)),
  }
  arm = dict(steps=steps(args.steps), init_from_stage="pretrain")
  stages = {
      "pretrain": dict(steps=steps(args.pretrain), batch_size=32, trainable=("params/.*",), lora=dict(targets=""),
                       eval_at_start=False,
                       vlm=dict(video_tower=False), optimizer=dict(lr=1e-3, warmup_steps=20),
                       groups=dict(images=dict(trainable=("params/.*",), data=dict(old, task="image_caption")),
                                   videos=dict(trainable=("params/.*",), data=old)),
                       group_schedule="images,videos"),
      "full": dict(arm, groups=dict(video=dict(trainable=VIDEO_ONLY, data=video(sizes["full"])))),
      "small": dict(arm, groups=dict(video=dict(trainable=VIDEO_ONLY, data=dict(video(sizes["small"]), **small_data)))),
      "joint": dict(arm, groups=directed_groups, group_schedule=schedule, joint=True),
  }
  if args.mode == "interleaved":
    stages["directed"] = dict(arm, groups=directed_groups, group_schedule=schedule)
    order = ("pretrain", "full", "small", "directed", "joint")
  else:  # one group per stage, each from the previous one with its adapter merged; the video path last
    third = max(steps(args.steps) // 3, 1)
    stages["directed_image"] = dict(arm, steps=third, groups={"image": directed_groups["image"]})
    stages["directed_text"] = dict(steps=third, groups={"text": directed_groups["text"]})
    stages["directed"] = dict(steps=max(steps(args.steps) - 2 * third, 1), groups={"video": directed_groups["video"]})
    order = ("pretrain", "full", "small", "directed_image", "directed_text", "directed", "joint")
  c.stage_order = order
  c.stages = ml_collections.ConfigDict(stages)
  # Valid only if the full video set can teach the target: the full arm must lower the base's
  # global error by 0.15, else the table is marked INVALID (no room for the arms to differ).
  c.headroom.update(metric="error", floor="pretrain", ceiling="full", min=0.15, lower_is_better=True)
  core.apply_seed(c, args.seed)
  return c
