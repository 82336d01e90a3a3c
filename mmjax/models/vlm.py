"""Vision-language model: a ViT tower, a projector and a LLaMA-style decoder (LLaVA layout).

Variables: `params` and, optionally, `lora`, with top-level parts so that trainable and LoRA
target regexes pick each on its own (`vision/.*`, `video_tower/.*`, `projector/.*`, `llm/.*`):

  vision/...                       a `mmjax.models.vit.ViT`: the image tower (also the video
                                   tower when there is no separate one)
  video_tower/...                  a second ViT for video frames (`video_tower=True`, as
                                   Video-LLaVA's `video_tower`; its `image_tower` is `vision/`)
  projector/{linear_1, linear_2?}  tower features -> LM width ('linear' or 'mlp2'; names as HF
                                   LLaVA's `multi_modal_projector`), shared by images and videos
  projector/temporal_embedding     [max_frames, D_feature] learned per-frame embedding, zero-init
                                   so a tower+projector trained on images reads frames unchanged
                                   (`temporal_embedding=True`; Video-LLaVA has none)
  llm/...                          a `mmjax.models.llama.Llama`

Tower features: the tower's output tokens, or its hidden states at `feature_layer` (HF
`vision_feature_layer`: an index, or a tuple of indices whose states are concatenated along
the feature axis); `feature` 'patches' drops the class token (HF select strategy 'default'),
'all' keeps it ('full'), 'pooled' takes one token per image. Frames use `video_feature`
(default `feature`; Video-LLaVA keeps every token of a frame: 'all').

Media enter the token sequence at placeholders: a row holds `num_visual_tokens(cfg, kind)`
placeholders per image or video, in order. With `video_token_id` (Video-LLaVA), image
features fill the `image_token_id` positions and video features the `video_token_id`
positions; without it both use `image_token_id`, images first, then videos. Rows without
media hold no placeholders (the towers still run on whatever fills their media slots;
fixed shapes, nothing is spliced), so one batch may mix text-only, image and video rows.
Splicing is a cumulative-sum gather (`splice`), so shapes are static and it jits once.

Shapes: images [B, H, W, C] or [B, M, H, W, C] (M images per row); frames [B, T, H, W, C] or
[B, M, T, H, W, C] (M videos of T frames per row), T <= max_frames (when there is a temporal
embedding) and divisible by `temporal_pool`. A video contributes (T / temporal_pool) *
tokens-per-frame tokens, in frame-major order; each group of `temporal_pool` consecutive
frames is averaged after the temporal embedding is added.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmjax.models import layers
from mmjax.models.llama import Llama, LlamaConfig
from mmjax.models.vit import ViT, ViTConfig


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """Model config of the VLM (not the run config)."""
  vision: ViTConfig = dataclasses.field(default_factory=ViTConfig)
  llm: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
  projector: str = "mlp2"  # 'linear' or 'mlp2' (linear_1, GELU, linear_2)
  projector_hidden: int | None = None  # width of mlp2's hidden layer; None = llm.d_model
  image_token_id: int = 255  # placeholder token; must be < llm.vocab_size
  max_frames: int = 8  # rows of the temporal embedding (frames per video at most); 0 = no video input
  temporal_pool: int = 1  # average frames over time in groups of this many
  feature: str = "patches"  # 'patches' (tokens without the class token), 'all' (with it), 'pooled' (1 per frame)
  feature_layer: int | tuple[int, ...] | None = None  # None: the tower's `tokens`; an int (or a tuple,
  #   concatenated) indexes its hidden states like HF `vision_feature_layer` (0 = embeddings, -1 = last block)
  video_token_id: int | None = None  # placeholder of video tokens; None = image_token_id (images, then videos)
  video_tower: bool = False  # frames go through a separate tower `video_tower/` (Video-LLaVA)
  video_feature: str | None = None  # `feature` of frames; None = `feature`
  temporal_embedding: bool = True  # add a learned per-frame embedding to frame features
  projector_act: str = "gelu"  # a key of PROJECTOR_ACTS (HF projector_hidden_act)
  projector_bias: bool = True  # HF multimodal_projector_bias

  def __post_init__(self):
    if isinstance(self.feature_layer, list):
      object.__setattr__(self, "feature_layer", tuple(self.feature_layer))
    if self.projector not in ("linear", "mlp2"):
      raise ValueError(f"vlm.projector={self.projector!r} is not one of ('linear', 'mlp2')")
    if self.projector_act not in PROJECTOR_ACTS:
      raise ValueError(f"vlm.projector_act={self.projector_act!r} is not one of {tuple(PROJECTOR_ACTS)}")
    for key in ("feature", "video_feature"):
      value = getattr(self, key)
      if value not in ("patches", "all", "pooled") and not (key == "video_feature" and value is None):
        raise ValueError(f"vlm.{key}={value!r} is not one of ('patches', 'all', 'pooled')")
    if "pooled" in (self.feature, self.video_feature) and (self.vision.pool == "none" or self.feature_layer is not None):
      raise ValueError("vlm.feature='pooled' needs vision.pool != 'none' and feature_layer=None")
    for key in ("image_token_id", "video_token_id"):
      value = getattr(self, key)
      if value is not None and not 0 <= value < self.llm.vocab_size:
        raise ValueError(f"vlm.{key}={value} is outside the vocabulary [0, {self.llm.vocab_size})")
    if self.temporal_pool < 1 or (self.max_frames and self.max_frames % self.temporal_pool):
      raise ValueError(f"vlm.temporal_pool={self.temporal_pool} must be >= 1 and divide "
                       f"max_frames={self.max_frames}")
    n = self.vision.n_layers
    if any(not -(n + 1) <= layer <= n for layer in self.feature_layers):
      raise ValueError(f"vlm.feature_layer={self.feature_layer} is out of range for {n} vision layers")

  @property
  def feature_layers(self) -> tuple[int, ...]:
    """The hidden-state indices whose features are concatenated (() = the tower's output)."""
    if self.feature_layer is None:
      return ()
    return tuple(self.feature_layer) if isinstance(self.feature_layer, (tuple, list)) else (self.feature_layer,)

  @property
  def feature_dim(self) -> int:
    """Width of the tower features the projector reads."""
    return self.vision.d_model * max(len(self.feature_layers), 1)

  @property
  def placeholder_ids(self) -> tuple[int, ...]:
    """Token ids the model replaces with visual features (never generated)."""
    return tuple(i for i in (self.image_token_id, self.video_token_id) if i is not None)

  @classmethod
  def from_dict(cls, d) -> "VLMConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in dict(d).items() if k in fields}
    if not isinstance(d.get("vision", ViTConfig()), ViTConfig):
      d["vision"] = ViTConfig.from_dict(d["vision"])
    if not isinstance(d.get("llm", LlamaConfig()), LlamaConfig):
      d["llm"] = LlamaConfig.from_dict(d["llm"])
    if isinstance(d.get("feature_layer"), list):
      d["feature_layer"] = tuple(d["feature_layer"])
    return cls(**d)


PROJECTOR_ACTS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf), HF 'gelu'
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # HF 'gelu_pytorch_tanh' / 'gelu_new'
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def tokens_per_frame(cfg: VLMConfig, image_size: int | tuple[int, int] | None = None, kind: str = "image") -> int:
  """Visual tokens one image (or one video frame, before temporal pooling: kind='video') contributes."""
  feature = cfg.feature if kind == "image" or cfg.video_feature is None else cfg.video_feature
  if feature == "pooled":
    return 1
  n = cfg.vision.num_patches(image_size)
  return n + int(feature == "all" and cfg.vision.class_token)


def num_visual_tokens(cfg: VLMConfig, kind: str = "image", n_frames: int | None = None,
                      image_size: int | tuple[int, int] | None = None) -> int:
  """Placeholders one image (`kind='image'`) or one video of `n_frames` frames (default
  `max_frames`; `kind='video'`) takes in the token sequence, for images of `image_size`
  (default the tower's)."""
  if kind not in ("image", "video"):
    raise ValueError(f"kind={kind!r} is not 'image' or 'video'")
  per = tokens_per_frame(cfg, image_size, kind)
  if kind == "image":
    return per
  t = cfg.max_frames if n_frames is None else n_frames
  return (t // cfg.temporal_pool) * per


def splice(x: jax.Array, tokens: jax.Array, visual: jax.Array, token_id: int) -> jax.Array:
  """Puts visual embeddings at placeholder positions.

  x: [B, T, D] token embeddings; tokens: [B, T]; visual: [B, M, D]. The k-th placeholder
  (tokens == token_id) of row b gets visual[b, k]; other positions keep x. Placeholders beyond
  M reuse the last row of `visual` (a data error the pipeline must not produce).
  """
  is_media = tokens == token_id
  idx = jnp.clip(jnp.cumsum(is_media, axis=1) - 1, 0, visual.shape[1] - 1)
  gathered = jnp.take_along_axis(visual, idx[..., None], axis=1)  # [B, T, D]
  return jnp.where(is_media[..., None], gathered.astype(x.dtype), x)


class Projector(nn.Module):
  """Vision features [..., D_vision] -> LM embeddings [..., D]; holds the temporal embedding."""
  cfg: VLMConfig

  def setup(self):
    c, lc = self.cfg, self.cfg.llm
    if c.max_frames and c.temporal_embedding:
      self.temporal_embedding = self.param(
          "temporal_embedding", nn.with_logical_partitioning(nn.initializers.zeros, ("frames", "embed")),
          (c.max_frames, c.feature_dim), lc.weight_dtype)
    if c.projector == "mlp2":
      self.linear_1 = lc.dense(c.projector_hidden or lc.d_model, ("embed", "mlp"), "linear_1", use_bias=c.projector_bias)
      self.linear_2 = lc.dense(lc.d_model, ("mlp", "embed"), "linear_2", use_bias=c.projector_bias)
    else:
      self.linear_1 = lc.dense(lc.d_model, ("embed", "mlp"), "linear_1", use_bias=c.projector_bias)

  def __call__(self, x, deterministic=True):
    h = self.linear_1(x, deterministic)
    if self.cfg.projector == "mlp2":
      h = self.linear_2(PROJECTOR_ACTS[self.cfg.projector_act](h), deterministic)
    return h

  def add_time(self, x):
    """x: [N, T, P, D_feature] per-frame features -> x + temporal_embedding[t] (unchanged without one)."""
    if not (self.cfg.max_frames and self.cfg.temporal_embedding):
      return x
    t = x.shape[1]
    return x + self.temporal_embedding[:t].astype(x.dtype)[None, :, None, :]


class VLM(nn.Module):
  """Tower + projector + decoder. `__call__` returns logits [B, T, V] (float32).

  The decoder interface of `Llama` (`embed_tokens`, `hidden`, `logits`) is passed through, and
  `embed(tokens, images, frames)` gives the spliced input embeddings, so a sampler written for
  `Llama` prefills with media by calling `embed` then `hidden`/`logits` with caches.
  """
  cfg: VLMConfig

  def setup(self):
    self.vision = ViT(self.cfg.vision)
    if self.cfg.video_tower:
      self.video_tower = ViT(self.cfg.vision)
    self.projector = Projector(self.cfg)
    self.llm = Llama(self.cfg.llm)

  # -- vision side ---------------------------------------------------------------------------
  def _features(self, tower, images, feature, deterministic):
    c = self.cfg
    out = tower(images, deterministic, return_hidden=bool(c.feature_layers))
    if feature == "pooled":
      return out["pooled"][:, None]
    fs = [out["hidden"][i] for i in c.feature_layers] or [out["tokens"]]
    if feature == "patches" and c.vision.class_token:
      fs = [f[:, 1:] for f in fs]
    return fs[0] if len(fs) == 1 else jnp.concatenate(fs, axis=-1)

  def frame_features(self, images, deterministic=True):
    """Images [N, H, W, C] -> tower features [N, tokens_per_frame, D_feature] (by `feature`,
    `feature_layer`)."""
    return self._features(self.vision, images, self.cfg.feature, deterministic)

  def video_frame_features(self, frames, deterministic=True):
    """Video frames [N, H, W, C] -> features of the video tower (by `video_feature`)."""
    c = self.cfg
    tower = self.video_tower if c.video_tower else self.vision
    return self._features(tower, frames, c.video_feature or c.feature, deterministic)

  def mean_features(self, pixels):
    """Images [N, H, W, C] or frames [N, T, H, W, C] -> the mean of their tower features over
    tokens (and frames): float32 [N, D_feature] (selection embeddings, probes)."""
    if pixels.ndim == 5:
      n, t = pixels.shape[:2]
      f = self.video_frame_features(pixels.reshape(n * t, *pixels.shape[2:]))
      f = f.reshape(n, -1, f.shape[-1])
    else:
      f = self.frame_features(pixels)
    return jnp.mean(f.astype(jnp.float32), axis=1)

  def encode_images(self, images, deterministic=True):
    """[B, (M,) H, W, C] -> projected [B, M * tokens_per_frame, D]."""
    if images.ndim == 4:
      images = images[:, None]
    b, m = images.shape[:2]
    f = self.frame_features(images.reshape(b * m, *images.shape[2:]), deterministic)
    return self.projector(f, deterministic).reshape(b, -1, self.cfg.llm.d_model)

  def encode_frames(self, frames, deterministic=True):
    """[B, (M,) T, H, W, C] -> projected [B, M * (T / temporal_pool) * tokens_per_frame, D]."""
    c = self.cfg
    if frames.ndim == 5:
      frames = frames[:, None]
    b, m, t = frames.shape[:3]
    if not c.max_frames or t > c.max_frames or t % c.temporal_pool:
      raise ValueError(f"frames have T={t}; need T <= max_frames={c.max_frames} and divisible by "
                       f"temporal_pool={c.temporal_pool}")
    f = self.video_frame_features(frames.reshape(b * m * t, *frames.shape[3:]), deterministic)
    f = self.projector.add_time(f.reshape(b * m, t, *f.shape[1:]))  # [BM, T, P, D_feature]
    k = c.temporal_pool
    if k > 1:
      f32 = f.astype(jnp.float32).reshape(b * m, t // k, k, *f.shape[2:])
      f = jnp.mean(f32, axis=2).astype(f.dtype)
    return self.projector(f, deterministic).reshape(b, -1, c.llm.d_model)

  def visual_embeddings(self, images=None, frames=None, deterministic=True):
    """Projected media of each row, images then videos: [B, M_total, D], or None."""
    parts = []
    if images is not None:
      parts.append(self.encode_images(images, deterministic))
    if frames is not None:
      parts.append(self.encode_frames(frames, deterministic))
    if not parts:
      return None
    return nn.with_logical_constraint(jnp.concatenate(parts, axis=1), layers.ACT_BTD)

  # -- language side -------------------------------------------------------------------------
  def embed(self, tokens, images=None, frames=None, deterministic=True):
    """tokens [B, T] (+ media) -> input embeddings [B, T, D] with media at the placeholders."""
    c = self.cfg
    x = self.llm.embed_tokens(tokens)
    if images is None and frames is None and self.is_initializing():
      # `init(rng, tokens)` alone still creates the towers' and the projector's parameters.
      v = c.vision
      dummy = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), c.vision.compute_dtype)
      self.encode_images(dummy)
      if c.video_tower:
        self.video_tower(dummy)
    if c.video_token_id is None or c.video_token_id == c.image_token_id:
      visual = self.visual_embeddings(images, frames, deterministic)
      return x if visual is None else splice(x, tokens, visual, c.image_token_id)
    for pixels, encode, token_id in ((images, self.encode_images, c.image_token_id),
                                     (frames, self.encode_frames, c.video_token_id)):
      if pixels is not None:
        visual = nn.with_logical_constraint(encode(pixels, deterministic), layers.ACT_BTD)
        x = splice(x, tokens, visual, token_id)
    return x

  def embed_tokens(self, tokens):
    return self.llm.embed_tokens(tokens)

  def hidden(self, x, positions, mask, deterministic=True, caches=None):
    return self.llm.hidden(x, positions, mask, deterministic, caches)

  def logits(self, h):
    return self.llm.logits(h)

  def __call__(self, tokens, positions=None, segment_ids=None, images=None, frames=None, deterministic=True,
               return_hidden=False):
    """tokens, positions, segment_ids: [B, T] int32 (segment 0 = padding); media as in the
    module docstring -> logits [B, T, V] float32 (`return_hidden`: the final normed hidden
    states [B, T, D] instead; `logits` maps them)."""
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    c = self.cfg.llm
    mask = layers.attention_inputs(segment_ids, c.attention, c.compute_dtype, c.packed_rows)
    x = self.embed(tokens, images, frames, deterministic)
    h, _ = self.llm.hidden(x, positions, mask, deterministic, causal=True)
    return h if return_hidden else self.llm.logits(h)
