"""ViSFT heads: shapes, dtypes, parameter paths and logical names, caption causality and
greedy decoding, a few training steps of the detection head, and the stage-1 / stage-2
trainable splits."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

from mmjax import boxes as det
from mmjax import losses as loss_lib
from mmjax import lora
from mmjax.data.shapes import ShapesConfig, ShapesSource
from mmjax.models import heads
from mmjax.models.vit import ViTConfig
from mmjax.train.state import merge_trees, split

# Odd, distinct widths so a transposed axis fails loudly.
VIT = dict(image_size=32, patch_size=8, d_model=24, n_layers=1, n_heads=2, head_dim=12, mlp_dim=40)
DETECTION = dict(d_model=20, n_layers=1, n_heads=2, head_dim=10, mlp_dim=36, num_queries=7, num_classes=3)
CAPTION = dict(d_model=16, n_layers=1, n_heads=2, head_dim=8, mlp_dim=28, vocab_size=45, max_len=11)
VISION_LORA = r"vision/layers_\d+/(self_attn/(q|k|v|out)_proj|mlp/fc\d)"


def make_config(dtype="float32", detection=True, segmentation=True, caption=True, upsample=4):
  return heads.VisionTaskConfig(
      vision=ViTConfig(**VIT, dtype=dtype),
      detection=heads.DetectionConfig(**DETECTION, dtype=dtype) if detection else None,
      segmentation=heads.SegmentationConfig(mask_dim=12, upsample=upsample, dtype=dtype) if segmentation else None,
      caption=heads.CaptionConfig(**CAPTION, dtype=dtype) if caption else None)


def images_of(n, seed=0):
  src = ShapesSource("image_caption", n, seed=seed, cfg=ShapesConfig(max_objects=3))
  ex = [src[i] for i in range(n)]
  return jnp.asarray(np.stack([e["image"] for e in ex]).astype(np.float32) / 127.5 - 1.0), ex


@pytest.fixture(scope="module")
def model_and_vars():
  """The full model (all heads, masks at the image size), its boxed variables (from a jitted
  init) and a jitted apply shared by the tests (compiles dominate their time on CPU)."""
  model = heads.VisionTaskModel(make_config(upsample=8))
  # An rbg key: XLA compiles its random bits much faster than threefry, and init is most of
  # the compile time here.
  boxed = jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((2, 32, 32, 3)))
  return model, boxed, jax.jit(model.apply)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_shapes_and_dtypes(dtype):
  model = heads.VisionTaskModel(make_config(dtype, upsample=8))
  imgs = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((3, 9), jnp.int32)
  variables = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), imgs))
  out = jax.eval_shape(model.apply, variables, imgs, text)
  assert out["detection"]["logits"].shape == (3, 7, 4) and out["detection"]["logits"].dtype == jnp.float32
  assert out["detection"]["boxes"].shape == (3, 7, 4) and out["detection"]["boxes"].dtype == jnp.float32
  assert out["detection"]["queries"].shape == (3, 7, 20) and out["detection"]["queries"].dtype == jnp.dtype(dtype)
  assert out["masks"].shape == (3, 7, 32, 32) and out["masks"].dtype == jnp.float32  # 4x4 grid * 8
  assert out["caption"].shape == (3, 9, 45) and out["caption"].dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))  # param dtype stays float32
  # Images of another size: the grid follows, masks too.
  out = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 48, 40, 3), jnp.float32),
                       jax.ShapeDtypeStruct((1, 2), jnp.int32))
  assert out["masks"].shape == (1, 7, 48, 40)


def test_outputs_are_finite_and_boxes_in_range(model_and_vars):
  _, boxed, apply = model_and_vars
  imgs, _ = images_of(2)
  out = apply(nn.meta.unbox(boxed), imgs, jnp.zeros((2, 10), jnp.int32))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out))
  b = np.asarray(out["detection"]["boxes"])
  assert (b >= 0).all() and (b <= 1).all()


def test_param_paths_and_logical_names(model_and_vars):
  _, boxed, _ = model_and_vars
  flat = traverse_util.flatten_dict(boxed, sep="/", is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
  paths = list(flat)
  assert all(re.fullmatch(r"params/(vision|heads/(detection|segmentation|caption))/.*", p) for p in paths), paths
  for part in ("vision", "heads/detection", "heads/segmentation", "heads/caption"):
    assert any(p.startswith(f"params/{part}/") for p in paths), part
  for p, leaf in flat.items():
    assert isinstance(leaf, nn.LogicallyPartitioned) and len(leaf.names) == leaf.value.ndim, p
  for p in ("params/heads/detection/query_embed", "params/heads/detection/class_head/kernel",
            "params/heads/detection/layers_0/cross_attn/q_proj/kernel", "params/heads/segmentation/pixel_proj/kernel",
            "params/heads/caption/embed/embedding", "params/heads/caption/lm_head/kernel"):
    assert p in flat, p
  assert flat["params/heads/detection/query_embed"].value.shape == (7, 20)
  assert flat["params/heads/caption/lm_head/kernel"].names == ("embed", "vocab")


def test_config_validation():
  with pytest.raises(ValueError, match="segmentation needs the detection head"):
    make_config(detection=False)
  with pytest.raises(ValueError, match="dtype"):
    heads.DetectionConfig(dtype="float8")
  cfg = heads.VisionTaskConfig.from_dict(dict(vision=VIT, detection=DETECTION, segmentation=None, caption=CAPTION))
  assert cfg.detection.num_queries == 7 and cfg.segmentation is None and cfg.caption.vocab_size == 45


def test_caption_is_causal_and_greedy_matches_teacher_forcing(model_and_vars):
  model, boxed, apply = model_and_vars
  variables = nn.meta.unbox(boxed)
  imgs, _ = images_of(2)
  text = jax.random.randint(jax.random.key(1), (2, 10), 0, 45)
  a = apply(variables, imgs, text)["caption"]
  b = apply(variables, imgs, text.at[:, 5].set((text[:, 5] + 1) % 45))["caption"]
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert not np.allclose(a[:, 5:], b[:, 5:])
  with pytest.raises(ValueError, match="max_len"):
    jax.eval_shape(model.apply, variables, imgs, jnp.zeros((2, 12), jnp.int32))

  bos, eos, pad = 1, 2, 0
  decode = jax.jit(lambda v, x: heads.greedy_caption(model, v, x, bos_id=bos, eos_id=eos, pad_id=pad, max_len=10))
  out = np.asarray(decode(variables, imgs))
  assert out.shape == (2, 10) and out.dtype == np.int32
  # Teacher forcing on bos + decoded tokens picks the decoded tokens again (up to the first eos).
  full = jnp.concatenate([jnp.full((2, 1), bos, jnp.int32), jnp.asarray(out)], axis=1)[:, :10]
  again = np.asarray(jnp.argmax(apply(variables, imgs, full)["caption"], axis=-1))
  for i in range(2):
    n = int(np.argmax(out[i] == eos)) + 1 if (out[i] == eos).any() else 10
    np.testing.assert_array_equal(again[i, :n], out[i, :n])
    assert (out[i, n:] == pad).all()


def test_detection_head_trains_on_shapes_with_frozen_vit(model_and_vars):
  model, boxed, _ = model_and_vars
  imgs, ex = images_of(8)
  t = {k: jnp.asarray(v) for k, v in det.pad_targets(ex, 3, masks=False).items()}
  variables = nn.meta.unbox(boxed)
  trainable, frozen = split(variables, ["params/heads/detection/.*"])
  assert set(trainable["params"]) == {"heads"} and set(trainable["params"]["heads"]) == {"detection"}
  tx = optax.adam(3e-3)

  def loss_fn(tr):
    out = model.apply(merge_trees(tr, frozen), imgs)["detection"]  # unused masks are compiled away
    cost = det.matching_cost(out["logits"], out["boxes"], t["tgt_classes"], t["tgt_boxes"])
    idx, matched = det.hungarian_match_jax(cost, t["tgt_valid"])
    return loss_lib.detr_loss(out["logits"], out["boxes"], t["tgt_classes"], t["tgt_boxes"], t["tgt_valid"],
                            idx, matched)["loss"]

  @jax.jit
  def step(tr, opt):
    loss, g = jax.value_and_grad(loss_fn)(tr)
    upd, opt = tx.update(g, opt, tr)
    return optax.apply_updates(tr, upd), opt, loss

  opt = tx.init(trainable)
  losses = []
  for _ in range(6):  # the 6th call reports the loss after 5 updates
    trainable, opt, loss = step(trainable, opt)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] * 0.9, losses
  # The frozen tower was never touched.
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), frozen["params"]["vision"],
                                   variables["params"]["vision"]))


def test_visft_trainable_splits(model_and_vars):
  model, boxed, _ = model_and_vars
  params = nn.meta.unbox(boxed)["params"]
  adapters = lora.init(jax.random.key(1), params, VISION_LORA, rank=4)
  assert set(adapters) == {"vision"}
  variables = {"params": params, "lora": adapters}
  flat = traverse_util.flatten_dict(variables, sep="/")

  # Stage 1: every head leaf, nothing of the tower or the adapters.
  tr1, _ = split(variables, ["params/heads/.*"])
  got1 = set(traverse_util.flatten_dict(tr1, sep="/"))
  assert got1 == {p for p in flat if p.startswith("params/heads/")}

  # Stage 2: the tower's adapters only; heads (and the base tower) frozen.
  tr2, fr2 = split(variables, ["lora/vision/.*"])
  got2 = set(traverse_util.flatten_dict(tr2, sep="/"))
  assert got2 == {p for p in flat if p.startswith("lora/")} and got2

  imgs, ex = images_of(2)
  t = {k: jnp.asarray(v) for k, v in det.pad_targets(ex, 3).items()}
  text = jnp.zeros((2, 6), jnp.int32)
  assert len(got2) == 2 * len(lora.target_paths(params, VISION_LORA)) == 2 * 6  # q, k, v, out, fc1, fc2

  def loss_fn(var):
    out = model.apply(var, imgs, text)
    d = out["detection"]
    idx, matched = det.hungarian_match_jax(
        det.matching_cost(d["logits"], d["boxes"], t["tgt_classes"], t["tgt_boxes"]), t["tgt_valid"])
    l = loss_lib.detr_loss(d["logits"], d["boxes"], t["tgt_classes"], t["tgt_boxes"], t["tgt_valid"], idx, matched)["loss"]
    l = l + loss_lib.mask_loss(out["masks"], t["tgt_masks"], t["tgt_valid"], idx, matched)["loss"]
    return l + jnp.mean(out["caption"] ** 2)

  g2 = jax.jit(jax.grad(lambda tr: loss_fn(merge_trees(tr, fr2))))(tr2)
  assert set(traverse_util.flatten_dict(g2, sep="/")) == got2  # no gradient leaves for heads
  gb = [np.abs(np.asarray(x)).max() for p, x in traverse_util.flatten_dict(g2, sep="/").items() if p.endswith("/b")]
  assert min(gb) > 0  # every adapter's b gets signal through the frozen heads


def test_sharded_on_8_devices_matches_one_device(model_and_vars):
  """Params sharded by their logical names over (data 2, fsdp 2, tensor 2), batch over
  data x fsdp, matching per shard: same outputs and matching as on one device."""
  from mmjax import sharding as sh
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (fake) devices")
  model, boxed, _ = model_and_vars
  variables = nn.meta.unbox(boxed)
  imgs, ex = images_of(4)
  t = {k: jnp.asarray(v) for k, v in det.pad_targets(ex, 3, masks=False).items()}
  text = jnp.asarray(np.random.default_rng(0).integers(0, 45, (4, 10)), jnp.int32)
  rules = sh.DEFAULT_RULES
  mesh = sh.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])

  def fwd(v, imgs, text, t, match_mesh):
    with nn.logical_axis_rules(rules):
      out = model.apply(v, imgs, text)
    d = out["detection"]
    cost = det.matching_cost(d["logits"], d["boxes"], t["tgt_classes"], t["tgt_boxes"])
    return out, det.hungarian_match_jax(cost, t["tgt_valid"], *match_mesh)

  want = jax.jit(fwd, static_argnums=4)(variables, imgs, text, t, ())
  shardings = sh.tree_shardings(jax.eval_shape(lambda: variables), sh.logical_axes_tree(boxed), mesh, rules)
  put = lambda x: jax.device_put(x, sh.batch_sharding(mesh, rules, x.ndim))
  with jax.set_mesh(mesh):
    got = jax.jit(fwd, static_argnums=4)(jax.device_put(variables, shardings), put(imgs), put(text),
                                         jax.tree.map(put, t), (mesh, ("data", "fsdp")))
  assert got[0]["masks"].sharding.spec[0] == ("data", "fsdp")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-4, atol=2e-5)
