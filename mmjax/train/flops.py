"""Analytic training FLOPs, for TFLOP/s and MFU (families call these from `Family.flops`).

Per kernel of shape (d_in, d_out) applied to one token: forward 2*in*out, activation gradient
2*in*out, weight gradient 2*in*out only when the kernel trains (frozen weights need none);
LoRA adds 6*r*(in+out) per adapted kernel. Attention adds its score and value matmuls.
"""
from __future__ import annotations

import dataclasses

from flax import traverse_util

from mmjax import lora as lora_lib
from mmjax.train.state import is_trainable


def train_flops_per_token(model_cfg, seq_len: int, kernels: dict, trainable_kernels: set,
                          lora_shapes: dict) -> float:
  """Analytic FLOPs of one training step per token.

  kernels: path -> (d_in, d_out) of every matmul weight (embedding lookups excluded; a
  tied head counts once as a matmul). Forward 2*in*out; backward activation gradient
  2*in*out; weight gradient 2*in*out only for trained kernels (frozen weights need none).
  LoRA adds 6*r*(in+out) per adapted kernel. Causal attention: QK^T and AV, forward
  2*2*(T/2)*N*H per layer and twice that backward.
  """
  total = 0.0
  for path, (d_in, d_out) in kernels.items():
    mm = 2.0 * d_in * d_out
    total += mm * (2 + (path in trainable_kernels))
  for _, (d_in, d_out, r) in lora_shapes.items():
    total += 6.0 * r * (d_in + d_out)
  attn_fwd = 2 * 2 * (seq_len / 2) * model_cfg.n_heads * model_cfg.head_dim
  total += 3 * attn_fwd * model_cfg.n_layers
  return total


def _lora_targets(config, abstract_params) -> set:
  return set(lora_lib.target_paths(abstract_params, config.lora.targets)) if config.lora.targets else set()


def decoder_flops(model_cfg, config, abstract_params, patterns, visual_tokens, media=()) -> tuple[float, float]:
  """(per LM token, per example for the vision tower) of a decoder or a VLM (`model_cfg.llm`,
  `.vision`); `media` the batch's pixel fields (frames count the tower once per frame)."""
  flat = traverse_util.flatten_dict(abstract_params, sep="/")
  lm_cfg = getattr(model_cfg, "llm", model_cfg)
  lora_targets = _lora_targets(config, abstract_params)

  def count(prefix, seq_len, cfg):
    kernels = {"params/" + p: x.shape for p, x in flat.items()
               if p.startswith(prefix) and p.endswith("kernel") and len(x.shape) == 2}
    if getattr(cfg, "tie_embeddings", False):
      kernels["params/" + prefix + "embed/embedding"] = flat[prefix + "embed/embedding"].shape[::-1]
    trained = {p for p in kernels if is_trainable(p, patterns)}
    lora_shapes = {m: (*flat[m + "/kernel"].shape, config.lora.rank) for m in lora_targets if m.startswith(prefix)}
    return train_flops_per_token(cfg, seq_len, kernels, trained, lora_shapes)

  if visual_tokens is None:
    return count("", config.seq_len, lm_cfg), 0.0
  per_token = count("llm/", config.seq_len, lm_cfg)
  vcfg = model_cfg.vision
  patches = vcfg.num_patches(config.data.image_size) + int(vcfg.class_token)
  frames = config.data.video_frames if "frames" in media else 1
  # x2: bidirectional attention (count() halves for causal); the projector counts as a 0-layer tower
  per_patch = count("vision/", 2 * patches, vcfg) + count("projector/", 0, dataclasses.replace(vcfg, n_layers=0))
  return per_token, per_patch * patches * frames


def vit_heads_flops(cfg, config, abstract_params, patterns) -> float:
  """Analytic training FLOPs per image of a ViT with task heads: every kernel applied to the
  tokens it sees (tower: patches and class token; heads: patches, queries, mask pixels or
  caption tokens), forward + activation gradient + weight gradient when trained, LoRA
  factors, and the attention score and value matmuls. The tower's activation gradient is
  counted even in ViSFT stage 1, where autodiff skips it (nothing below it trains), so
  stage 1's TFLOP/s is an upper bound."""
  flat = traverse_util.flatten_dict(abstract_params, sep="/")
  lora_targets = _lora_targets(config, abstract_params)
  v = cfg.vision
  grid = config.data.image_size // v.patch_size
  patches = grid * grid
  q = cfg.detection.num_queries if cfg.detection is not None else 0
  hw = (grid * cfg.segmentation.upsample) ** 2 if cfg.segmentation is not None else 0
  length = config.seq_len

  def uses(path):  # tokens a head kernel is applied to
    if "/input_proj/" in path or "/cross_attn/k_proj/" in path or "/cross_attn/v_proj/" in path \
        or "/pixel_norm/" in path or "/pixel_proj/" in path:
      return patches
    if "/pixel_out/" in path:
      return hw
    return length if path.startswith("heads/caption/") else q

  total = 0.0
  for p, x in flat.items():
    if not (p.endswith("kernel") and len(x.shape) == 2):
      continue
    n = patches + int(v.class_token) if p.startswith("vision/") else uses(p)
    total += 2.0 * x.shape[0] * x.shape[1] * n * (2 + is_trainable("params/" + p, patterns))
    if p[:-len("/kernel")] in lora_targets:
      total += 6.0 * config.lora.rank * (x.shape[0] + x.shape[1]) * n
  tokens = patches + int(v.class_token)
  total += 3 * 2 * 2 * tokens * tokens * v.n_heads * v.head_dim * v.n_layers  # bidirectional tower attention
  for head, t in (("detection", q), ("caption", length)):
    c = getattr(cfg, head)
    if c is not None:
      width = c.n_heads * c.head_dim
      total += 3 * 2 * 2 * t * (t / (2 if head == "caption" else 1) + patches) * width * c.n_layers
  if cfg.segmentation is not None:
    total += 3 * 2 * q * hw * cfg.segmentation.mask_dim
  return total
