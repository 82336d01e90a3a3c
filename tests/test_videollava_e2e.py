"""A real round trip on CPU: a tiny random transformers Video-LLaVA with its tokenizer and CLIP
preprocessor saved locally, short video files written with PyAV plus images, LLaVA-format
data -> `python -m mmjax.main` runs directed fine-tuning (image tower, video tower and
language model, each on its own data) -> `tools/convert_hf.py export` -> transformers loads
the result with no missing or unexpected keys, and its greedy generation equals mmjax's
sampler token for token."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import ROOT, run_main  # noqa: E402
from mmjax import sample  # noqa: E402
from mmjax.convert import vlm as convert_vlm  # noqa: E402
from mmjax.data import media, pipeline, pixels, video  # noqa: E402
from mmjax.data.tokenizer import load_tokenizer  # noqa: E402
from mmjax.models.vlm import VLM  # noqa: E402

pytestmark = pytest.mark.slow

CAPTIONS = ["a red square moves left", "a blue circle", "the circle moves right", "a red square"]


def make_tiny_videollava(root) -> tuple[str, str]:
  """(model dir, data dir): a random Video-LLaVA (2-layer CLIP towers, a 2-layer GQA Llama),
  a BPE tokenizer with <image> / <video>, a CLIP preprocessor, and LLaVA-format data."""
  from PIL import Image
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  mdir, ddir = os.path.join(root, "model"), os.path.join(root, "data")
  os.makedirs(mdir), os.makedirs(ddir)
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=160, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=["<pad>", "<s>", "</s>", "<image>", "<video>"])
  t.train_from_iterator(CAPTIONS + ["what is in the video?", "describe the image."] * 4, trainer)
  t.save(os.path.join(mdir, "tokenizer.json"))
  json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
            open(os.path.join(mdir, "tokenizer_config.json"), "w"))
  torch.manual_seed(0)
  vc = transformers.CLIPVisionConfig(hidden_size=28, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=8)
  tc = transformers.LlamaConfig(vocab_size=t.get_vocab_size(), hidden_size=30, intermediate_size=50,
                                num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=6,
                                max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  cfg = transformers.VideoLlavaConfig(vision_config=vc, text_config=tc, image_token_index=t.token_to_id("<image>"),
                                      video_token_index=t.token_to_id("<video>"), image_seq_length=16,
                                      video_seq_length=2 * 17)
  transformers.VideoLlavaForConditionalGeneration(cfg).eval().save_pretrained(mdir)
  CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(mdir)
  rng = np.random.default_rng(0)
  images, videos = [], []
  for i, ext in enumerate((".mp4", ".webm", ".avi", ".mkv")):
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(os.path.join(ddir, f"img{i}.png"))
    images.append({"image": f"img{i}.png", "conversations": [
        {"from": "human", "value": "<image>\ndescribe the image."}, {"from": "gpt", "value": CAPTIONS[i]}]})
    video.write_video(os.path.join(ddir, f"vid{i}{ext}"), rng.integers(0, 256, (6, 36, 44, 3), dtype=np.uint8), fps=5)
    videos.append({"video": f"vid{i}{ext}", "conversations": [
        {"from": "human", "value": "what is in the video?\n<video>"}, {"from": "gpt", "value": CAPTIONS[i]}]})
  json.dump(images, open(os.path.join(ddir, "images.json"), "w"))
  json.dump(videos, open(os.path.join(ddir, "videos.json"), "w"))
  with open(os.path.join(ddir, "text.jsonl"), "w") as f:
    for c in CAPTIONS:
      f.write(json.dumps({"conversations": [{"from": "human", "value": "describe the image."},
                                            {"from": "gpt", "value": c}]}) + "\n")
  json.dump(videos + images, open(os.path.join(ddir, "eval.json"), "w"))
  return mdir, ddir


def test_directed_finetuning_of_videollava_round_trips_through_transformers(tmp_path):
  mdir, ddir = make_tiny_videollava(str(tmp_path / "src"))
  work = tmp_path / "run"
  arg = (f"hf={mdir},images={ddir}/images.json,videos={ddir}/videos.json,text={ddir}/text.jsonl,"
         f"eval={ddir}/eval.json,steps=6,frames=2,rank=4,batch=4,seq_len=96,dtype=float32,fsdp=1")
  r = run_main(["--config", f"configs/videollava_directed.py:{arg}", "--config.data.image_size=32",
                "--config.eval_batch_size=4", "--config.sample_eval.num_examples=4",
                "--config.sample_eval.max_new_tokens=8", "--config.optimizer.lr=0.02", "--config.log_every=1",
                "--workdir", str(work)])
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
  out = tmp_path / "hf"
  e = subprocess.run([sys.executable, "tools/convert_hf.py", "export", "--ckpt", str(work / "model"), "--out", str(out),
                      "--merge"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert e.returncode == 0, e.stderr[-2000:]
  hf, info = transformers.VideoLlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  hf.eval()

  # The trained model (base + adapter, not merged) through mmjax's sampler, on a held-out-style prompt.
  cfg, params, lora, _ = convert_vlm.load_dir(str(work / "model"))
  assert lora is not None and set(lora) == {"vision", "video_tower", "projector", "llm"}
  tok = load_tokenizer(mdir)
  record = {"video": os.path.join(ddir, "vid1.webm"),
            "messages": [{"role": "user", "content": "what is in the video?\n<video>"}]}
  visual = {"image": (cfg.image_token_id, 16), "video": (cfg.video_token_id, 34)}
  prompt = pipeline.prompt_ids(record, tok, visual)
  frames = media.load_frames(record, pixels.for_data(_Data(mdir)), n_frames=2)
  ours, n = sample.generate(VLM(cfg), {"params": params, "lora": lora}, [prompt], max_new_tokens=8,
                            stop_tokens=(tok.eos_id,), pad_id=tok.pad_id, images=np.zeros((1, 32, 32, 3), np.float32),
                            frames=frames[None])
  ours = [int(x) for x in np.asarray(ours)[0, :int(n[0])]]
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      pixel_values_videos=torch.tensor(frames.transpose(0, 3, 1, 2)[None]), max_new_tokens=8,
                      do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  ref = ref[0, len(prompt):].tolist()
  assert ours == ref[:len(ours)] and len(ours) == len(ref), (ours, ref)


class _Data(dict):
  """A data config with just the keys `pixels.for_data` reads."""

  def __init__(self, path):
    super().__init__(image_processor=path, image_size=32)
    self.image_size = 32
