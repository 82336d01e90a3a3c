"""Whole Hugging Face VLMs in and out: LLaVA and Video-LLaVA (two towers) against transformers,
with odd dimensions, GQA, feature layers (negative, and a list), both select strategies,
placeholders in mid-text, padded rows, and images and videos in one batch."""
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmjax.convert import vlm as convert_vlm  # noqa: E402
from mmjax.models.vlm import VLM  # noqa: E402

IMG, VID, VOCAB = 101, 102, 103


def _configs(vision_layers=3):
  vc = transformers.CLIPVisionConfig(hidden_size=28, intermediate_size=44, num_hidden_layers=vision_layers,
                                     num_attention_heads=4, image_size=32, patch_size=8)
  tc = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=30, intermediate_size=50, num_hidden_layers=2,
                                num_attention_heads=6, num_key_value_heads=2, head_dim=6, rms_norm_eps=1e-5,
                                tie_word_embeddings=False)
  return vc, tc


def _save(model, path):
  model.save_pretrained(path)
  return str(path)


@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory):
  torch.manual_seed(0)
  out = {}
  for name, layer, strategy in (("neg", -2, "default"), ("list", [-3, -1], "full")):
    vc, tc = _configs()
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMG,
                                   image_seq_length=16 if strategy == "default" else 17,
                                   vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    out[name] = _save(transformers.LlavaForConditionalGeneration(cfg).eval(), tmp_path_factory.mktemp(name))
  # a SigLIP tower (no class token: the 'full' strategy) under a Qwen2 language model (q/k/v biases)
  vc = transformers.SiglipVisionConfig(hidden_size=28, intermediate_size=44, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=32, patch_size=8)
  tc = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=36, intermediate_size=50, num_hidden_layers=2,
                                num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False)
  cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMG, image_seq_length=16,
                                 vision_feature_layer=-1, vision_feature_select_strategy="full")
  out["siglip"] = _save(transformers.LlavaForConditionalGeneration(cfg).eval(), tmp_path_factory.mktemp("siglip"))
  vc, tc = _configs()
  cfg = transformers.VideoLlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMG, video_token_index=VID,
                                      image_seq_length=16, video_seq_length=2 * 17)
  out["video"] = _save(transformers.VideoLlavaForConditionalGeneration(cfg).eval(), tmp_path_factory.mktemp("video"))
  return out


def _rows(prompts, length):
  """Right-padded token rows, segment ids (0 on padding) and positions."""
  tokens = np.zeros((len(prompts), length), np.int32)
  seg = np.zeros_like(tokens)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
    seg[i, :len(p)] = 1
  pos = np.where(seg > 0, np.arange(length)[None], 0).astype(np.int32)
  return tokens, seg, pos


def _hf_logits(model, tokens, seg, **pixels):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(seg),
                **{k: torch.tensor(v) for k, v in pixels.items()})
  return out.logits.float().numpy()


def _compare(ours, ref, seg):
  real = seg > 0
  np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["neg", "list", "siglip"])
def test_llava_logits_match_transformers(llava_dirs, name):
  path = llava_dirs[name]
  cfg, params = convert_vlm.import_hf_vlm(path)
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
  n = convert_vlm.vlm_lib.num_visual_tokens(cfg, "image")
  assert n == {"neg": 16, "list": 17, "siglip": 16}[name]
  rng = np.random.default_rng(1)
  # row 0: text, the image in mid-text, more text; row 1: the image first, shorter (padded)
  prompts = [[1, 7, 8] + [IMG] * n + [9, 10, 11, 12], [1] + [IMG] * n + [13, 14]]
  tokens, seg, pos = _rows(prompts, n + 9)
  pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  ref = _hf_logits(hf, tokens, seg, pixel_values=pixels)
  logits = VLM(cfg).apply({"params": params}, tokens, pos, seg, images=pixels.transpose(0, 2, 3, 1))
  _compare(logits, ref, seg)


def test_video_llava_images_and_videos_in_one_batch(llava_dirs):
  path = llava_dirs["video"]
  cfg, params = convert_vlm.import_hf_vlm(path)
  assert cfg.video_tower and cfg.max_frames == 2 and set(params) == {"vision", "video_tower", "projector", "llm"}
  hf = transformers.VideoLlavaForConditionalGeneration.from_pretrained(path).eval()
  n_img = convert_vlm.vlm_lib.num_visual_tokens(cfg, "image")
  n_vid = convert_vlm.vlm_lib.num_visual_tokens(cfg, "video")
  assert (n_img, n_vid) == (16, 34)
  rng = np.random.default_rng(2)
  # row 0: an image mid-text; row 1: a video; row 2: text only (padded)
  prompts = [[1, 5] + [IMG] * n_img + [6, 7], [1] + [VID] * n_vid + [8, 9, 10], [1, 11, 12, 13]]
  tokens, seg, pos = _rows(prompts, n_vid + 4)
  image = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
  video = rng.normal(size=(1, 2, 3, 32, 32)).astype(np.float32)
  ref = _hf_logits(hf, tokens, seg, pixel_values=image, pixel_values_videos=video)
  images = np.zeros((3, 32, 32, 3), np.float32)
  images[0] = image[0].transpose(1, 2, 0)
  frames = np.zeros((3, 2, 32, 32, 3), np.float32)
  frames[1] = video[0].transpose(0, 2, 3, 1)
  logits = VLM(cfg).apply({"params": params}, tokens, pos, seg, images=images, frames=frames)
  _compare(logits, ref, seg)


def test_export_round_trips_and_loads_without_warnings(llava_dirs, tmp_path):
  for name, cls in (("list", transformers.LlavaForConditionalGeneration),
                    ("video", transformers.VideoLlavaForConditionalGeneration)):
    cfg, params = convert_vlm.import_hf_vlm(llava_dirs[name])
    params = jax.tree.map(lambda x: x * 1.01, params)  # not the file's values
    out = str(tmp_path / name)
    convert_vlm.export_hf_vlm(out, cfg, params)
    again_cfg, again = convert_vlm.import_hf_vlm(out)
    assert again_cfg == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, again)
    hf, info = cls.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = json.load(open(os.path.join(llava_dirs[name], "config.json")))
    got = json.load(open(os.path.join(out, "config.json")))
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "image_token_index", "image_seq_length"):
      assert got[key] == ref[key], key


def test_peft_export_of_a_vlm_adapter_loads_in_peft(llava_dirs, tmp_path):
  peft = pytest.importorskip("peft")
  from mmjax import lora as lora_lib
  path = llava_dirs["video"]
  cfg, params = convert_vlm.import_hf_vlm(path)
  targets = r"(vision|video_tower)/layers_\d+/self_attn/q_proj|projector/linear_1|llm/layers_\d+/attn/(q|v)_proj"
  lora = lora_lib.init(jax.random.key(3), params, targets, 4)
  lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), lora)  # b != 0
  convert_vlm.export_peft(str(tmp_path / "adapter"), cfg, lora, base_model_name_or_path=path)
  base = transformers.VideoLlavaForConditionalGeneration.from_pretrained(path).eval()
  model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  n_vid = convert_vlm.vlm_lib.num_visual_tokens(cfg, "video")
  tokens, seg, pos = _rows([[1, 5] + [VID] * n_vid + [6, 7]], n_vid + 4)
  video = np.random.default_rng(5).normal(size=(1, 2, 3, 32, 32)).astype(np.float32)
  ref = _hf_logits(model, tokens, seg, pixel_values_videos=video)
  logits = VLM(cfg).apply({"params": params, "lora": lora}, tokens, pos, seg,
                          images=np.zeros((1, 32, 32, 3), np.float32), frames=video.transpose(0, 1, 3, 4, 2))
  _compare(logits, ref, seg)
  plain = VLM(cfg).apply({"params": params}, tokens, pos, seg, images=np.zeros((1, 32, 32, 3), np.float32),
                         frames=video.transpose(0, 1, 3, 4, 2))
  assert np.abs(np.asarray(plain) - ref).max() > 1e-3  # the adapter changes the logits


def test_bad_vlm_checkpoints_are_one_line_errors(llava_dirs, tmp_path):
  import shutil
  from safetensors.numpy import load_file, save_file
  bad = tmp_path / "bad"
  shutil.copytree(llava_dirs["neg"], bad)
  tensors = load_file(str(bad / "model.safetensors"))
  name = "multi_modal_projector.linear_1.weight"
  tensors[name] = tensors[name][:, :-1]
  save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"tensor 'multi_modal_projector.linear_1.weight' has shape \(30, 27\)") as e:
    convert_vlm.import_hf_vlm(str(bad))
  assert "\n" not in str(e.value)
  cfg = json.load(open(bad / "config.json"))
  cfg["projector_hidden_act"] = "mish"
  json.dump(cfg, open(bad / "config.json", "w"))
  with pytest.raises(ValueError, match=r"config.json projector_hidden_act='mish' is not supported"):
    convert_vlm.import_hf_vlm(str(bad))
