"""Directed fine-tuning of Video-LLaVA-7B on one 8-GPU node: the image tower's adapter on an
image set, the video tower's (and the shared projector's) on a video set, the language
model's on text, each group its own data set, interleaved step by step; bf16, FSDP over 8.

  python -m mmjax.main --config configs/videollava_directed.py:hf=/models/Video-LLaVA-7B-hf,images=/data/images.json,videos=/data/videos.json,text=/data/text.jsonl,eval=/data/videos_val.json \\
      --workdir /ckpt/videollava_directed

Data are LLaVA-format `.json` lists or `.jsonl` files (`{"image": ..., "conversations":
[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}`, `"video"`
likewise; paths relative to `media_root`, else to the data file). The model directory is the
Hugging Face `VideoLlavaForConditionalGeneration` checkpoint: its config.json sets the two
towers, the projector, the language model and the `<image>` / `<video>` placeholders, its
tokenizer and `preprocessor_config.json` (the CLIP pixels) are used as they are. The run
ends with WORKDIR/model, which `tools/convert_hf.py export --ckpt WORKDIR/model --out DIR
[--merge]` writes back as Video-LLaVA (adapter merged, or as a PEFT adapter in DIR/adapter).

Args: hf, images, videos, text, eval (data files), media_root, steps (total; the groups take
turns), frames (per video), rank (LoRA), batch (global rows per step), seq_len, dtype
(bfloat16 | float32), fsdp (devices the weights are split over), schedule (group_schedule).
"""
import ml_collections

from mmjax.config import core, schema

TOWER = r"(vision|video_tower)/layers_\d+/(self_attn/(q_proj|k_proj|v_proj|out_proj)|mlp/(fc1|fc2))"
PROJECTOR = r"projector/linear_(1|2)"
LLM = r"llm/layers_\d+/(attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))"


def get_config(arg=None):
  args = core.parse_arg(arg, hf="", images="", videos="", text="", eval="", media_root="", steps=3000, frames=8,
                        rank=16, batch=32, seq_len=2560, dtype="bfloat16", fsdp=8, schedule="image,video,text")
  c = schema.base_config()
  c.model.update(name="vlm", dtype=args.dtype, param_dtype=args.dtype, remat="full" if args.dtype == "bfloat16"
                 else "none", logits_chunk=1024)  # the loss's fp32 logits 1024 positions at a time
  c.vision.update(dtype=args.dtype, param_dtype=args.dtype)
  c.init_from_hf = args.hf  # the whole VLM: towers, projector, language model
  c.data.update(source="jsonl", train_path=args.videos, eval_path=args.eval, tokenizer=args.hf,
                image_processor=args.hf, image_size=224, video_frames=args.frames, media=("images", "frames"),
                media_root=args.media_root, num_eval_examples=256)
  c.lora.update(targets=f"({TOWER}|{PROJECTOR}|{LLM})", rank=args.rank, alpha=2.0 * args.rank)
  c.groups = ml_collections.ConfigDict({
      "image": dict(trainable=(r"lora/vision/.*",), data=dict(train_path=args.images, media=("images",))),
      "video": dict(trainable=(r"lora/video_tower/.*", r"lora/projector/.*"),
                    data=dict(train_path=args.videos, media=("frames",))),
      "text": dict(trainable=(r"lora/llm/.*",), data=dict(train_path=args.text, drop_media=True)),
  })
  c.group_schedule = args.schedule
  c.seq_len = args.seq_len  # a video is 8 x 257 = 2056 placeholders, plus its conversation
  c.batch_size = args.batch
  c.grad_accum = 1
  c.steps = args.steps
  c.optimizer.update(lr=2e-4, warmup_steps=min(100, args.steps // 10), schedule="cosine", clip_norm=1.0)
  c.eval_every = 0
  c.eval_batch_size = max(8, args.fsdp)
  c.log_every = 10
  c.checkpoint_every = 500
  c.sample_eval.update(num_examples=64, max_new_tokens=128, show=2)
  c.mesh.update(data=1, fsdp=args.fsdp, tensor=1)
  c.reuse_host_memory = False  # a GPU host
  return c
