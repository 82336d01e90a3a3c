"""Real VLM data: each tower's pixels, video files, LLaVA-format conversations with markers,
mixed media batches, YouCook2-style timed steps, and one-line errors naming FILE:LINE."""
import json

import numpy as np
import pytest
from PIL import Image

from mmjax.data import pipeline, pixels, sources, steps, video
from mmjax.data.tokenizer import load_tokenizer

TOK = load_tokenizer("builtin")
VISUAL = {"image": (TOK.image_id, 4), "video": (TOK.video_id, 6)}


# ------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("shape", [(50, 70, 3), (90, 30, 3), (20, 25, 3), (36, 36, 3)])
def test_pixels_equal_transformers_image_processors(shape):
  pytest.importorskip("transformers")
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
  img = np.random.default_rng(sum(shape)).integers(0, 256, size=shape, dtype=np.uint8)
  for proc in (CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36}),
               SiglipImageProcessorPil(size={"height": 32, "width": 32})):
    ref = proc(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = pixels.Pixels.from_hf(proc.to_dict())(img)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_pixels_from_a_directory_and_bad_settings(tmp_path):
  cfg = {"do_resize": True, "size": {"shortest_edge": 8}, "do_center_crop": True, "crop_size": 8,
         "image_mean": 0.5, "image_std": 0.5}
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))

  class Data(dict):
    image_size = 8
  d = Data(image_processor=str(tmp_path))
  assert pixels.for_data(d).size == (8, 8) and pixels.for_data(d).mean == (0.5, 0.5, 0.5)
  with pytest.raises(ValueError, match=r"size=\{'shortest_edge': 8, 'longest_edge': 9\} is not supported"):
    pixels.Pixels.from_hf(dict(cfg, size={"shortest_edge": 8, "longest_edge": 9}))
  with pytest.raises(ValueError, match="needs a centre crop"):
    pixels.Pixels.from_hf(dict(cfg, do_center_crop=False))
  builtin = pixels.Pixels.builtin_scaling(4)
  np.testing.assert_allclose(builtin(np.full((4, 4, 3), 255, np.uint8)), 1.0)


# ------------------------------------------------------------------------- video files


def _clip(n=12, h=24, w=32):
  """Frames whose brightness tells their index: frame i is 20 * i (+ a gradient)."""
  grad = np.linspace(0, 10, w)[None, :, None]
  return np.stack([np.clip(20 * i + grad + np.zeros((h, w, 3)), 0, 255).astype(np.uint8) for i in range(n)])


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".avi", ".mkv"])
def test_video_files_decode_to_the_sampled_frames(tmp_path, ext):
  frames = _clip()
  path = video.write_video(str(tmp_path / f"v{ext}"), frames, fps=10)
  for n, fps, want in ((4, 0.0, video.uniform_indices(12, 4)), (5, 5.0, video.rate_indices(12, 5, 10.0, 5.0))):
    got = video.read_frames(path, n, fps)
    assert got.shape == (n, 24, 32, 3) and got.dtype == np.uint8
    np.testing.assert_allclose(got.astype(float), frames[want].astype(float), atol=12)  # codec tolerance
  assert video.uniform_indices(12, 4) == [0, 3, 6, 9] and video.rate_indices(12, 5, 10.0, 5.0) == [0, 2, 4, 6, 8]
  assert video.rate_indices(4, 5, 10.0, 5.0) == [0, 2, 3, 3, 3]  # shorter than n / fps: the last repeats


def test_bad_video_files_are_one_line_errors(tmp_path):
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"not a video at all" * 10)
  with pytest.raises(ValueError, match=r"video .*bad.mp4: cannot be decoded") as e:
    video.read_frames(str(bad), 2)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"video .*gone.mp4 does not exist"):
    video.read_frames(str(tmp_path / "gone.mp4"), 2)


# ------------------------------------------------------------------------- LLaVA-format records


@pytest.fixture
def llava_files(tmp_path):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "a.png")
  video.write_video(str(tmp_path / "v.mp4"), _clip(6, 16, 16), fps=5)
  records = [
      {"image": "a.png", "conversations": [{"from": "human", "value": "what <image> is this?"},
                                           {"from": "gpt", "value": "a cat"}, {"from": "human", "value": "sure?"},
                                           {"from": "gpt", "value": "yes"}]},
      {"video": "v.mp4", "conversations": [{"from": "human", "value": "describe"}, {"from": "gpt", "value": "ok"}]},
      {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
  ]
  (tmp_path / "d.json").write_text(json.dumps(records))
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
  return tmp_path


def test_llava_conversations_expand_markers_in_place_with_loss_on_answers(llava_files):
  for name in ("d.json", "d.jsonl"):
    src = sources.JsonlSource(str(llava_files / name))
    rec = src[0]
    assert rec["messages"][0] == {"role": "user", "content": "what <image> is this?"} and "image" in rec
    assert rec.where.endswith("d.json record 0" if name == "d.json" else "d.jsonl:1")
    row = pipeline.tokenize_record(rec, TOK, 96, VISUAL, image_size=8, media_fields=("images", "frames"),
                                   n_frames=3)
    tokens = list(row["tokens"])
    start = tokens.index(TOK.image_id)
    assert tokens[start:start + 4] == [TOK.image_id] * 4 and tokens.count(TOK.image_id) == 4
    assert TOK.decode(tokens[1:start]).endswith("what ")  # the image sits where the marker stood
    # loss only on the assistant turns' text (and their turn ends)
    learned = TOK.decode([t for t, m in zip(row["targets"], row["loss_mask"]) if m])
    assert learned == "a cat\nyes\n" and row["images"].shape == (8, 8, 3) and not row["frames"].any()
    vid = pipeline.tokenize_record(src[1], TOK, 96, VISUAL, image_size=8, media_fields=("images", "frames"),
                                   n_frames=3)
    assert list(vid["tokens"][1:7]) == [TOK.video_id] * 6  # no marker: the placeholders go first
    assert vid["frames"].shape == (3, 8, 8, 3) and vid["frames"].any() and not vid["images"].any()
    text = pipeline.tokenize_record(src[2], TOK, 96, VISUAL, image_size=8, media_fields=("images", "frames"),
                                    n_frames=3)
    assert TOK.image_id not in text["tokens"] and not text["images"].any() and not text["frames"].any()


def test_one_batch_mixes_text_image_and_video_records(llava_files):
  from mmjax.data import catalog
  d = catalog.default_data_config()
  d.update(source="jsonl", train_path=str(llava_files / "d.json"), image_size=8, video_frames=3, shuffle=False)
  it = pipeline.make_train_iterator(d, global_batch=3, seq_len=64, seed=0, tokenizer=TOK, visual_tokens=VISUAL,
                                    media_fields=("images", "frames"))
  b = next(it)
  assert b["images"].shape == (3, 8, 8, 3) and b["frames"].shape == (3, 3, 8, 8, 3)
  assert [bool(b["images"][i].any()) for i in range(3)] == [True, False, False]
  assert [bool(b["frames"][i].any()) for i in range(3)] == [False, True, False]


def test_bad_records_are_one_line_errors_with_file_and_line(llava_files):
  def rows(*recs):
    (llava_files / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return sources.JsonlSource(str(llava_files / "bad.jsonl"))

  conv = [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "x"}]
  src = rows({"text": "fine"}, {"image": "a.png", "conversations": conv})
  with pytest.raises(sources.RecordError, match=r"bad.jsonl:2: the text has 2 <image> markers but the record has one"):
    pipeline.tokenize_record(src[1], TOK, 96, VISUAL, image_size=8)
  src = rows({"conversations": [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "x"}]})
  with pytest.raises(sources.RecordError, match=r"bad.jsonl:1: the text has a visual marker .* no image or video"):
    pipeline.tokenize_record(src[0], TOK, 96, VISUAL, image_size=8)
  with pytest.raises(sources.RecordError, match=r"bad.jsonl:1: record has keys \['foo'\]; expected 'text'"):
    rows({"foo": 1})[0]
  with pytest.raises(sources.RecordError, match=r"bad.jsonl:1: 'video' names .*missing.mp4, which does not exist"):
    rows({"video": "missing.mp4", "conversations": conv})[0]
  with pytest.raises(sources.RecordError, match=r"bad.jsonl:1: 'conversations' has no 'gpt' turn"):
    rows({"conversations": [{"from": "human", "value": "hi"}]})[0]
  (llava_files / "broken.mp4").write_bytes(b"junk" * 50)
  src = rows({"text": "x"}, {"video": "broken.mp4", "conversations": conv[1:] * 2})
  with pytest.raises(sources.RecordError, match=r"bad.jsonl:2: video .*broken.mp4: cannot be decoded") as e:
    pipeline.tokenize_record(src[1], TOK, 96, VISUAL, image_size=8, n_frames=2)
  assert "\n" not in str(e.value)
  with pytest.raises(sources.RecordError, match=r"a .json data file must hold a list"):
    (llava_files / "obj.json").write_text("{}")
    sources.JsonlSource(str(llava_files / "obj.json"))


# ------------------------------------------------------------------------- timed steps


def test_youcook2_segments_become_timed_step_captions(tmp_path):
  video.write_video(str(tmp_path / "cook.mp4"), _clip(20, 16, 16), fps=10)  # 2 seconds
  raw = {"video": "cook.mp4", "duration": 10.0,
         "annotations": [{"segment": [6.0, 9.5], "sentence": "add the sauce"},
                         {"segment": [0.5, 2.0], "sentence": "cut the onion"}]}
  rec = sources.to_record(raw, "yc.json record 0", base_dir=str(tmp_path), video_frames=5)
  assert rec["prompt"] == steps.STEP_PROMPT and rec["video"].endswith("cook.mp4")
  assert rec["response"] == "frames 1-1: cut the onion\nframes 4-5: add the sauce"  # 5 frames of 2 s each
  assert rec["steps"] == [(1, 1, "cut the onion"), (4, 5, "add the sauce")]
  assert steps.step_metrics(rec["response"], rec["steps"]) == {"step_tiou": 1.0, "step_count_error": 0.0}
  m = steps.step_metrics("frames 1-2: cut\nnonsense\n", rec["steps"])
  assert m == {"step_tiou": pytest.approx((1 / 2 + 0) / 2), "step_count_error": 0.5}
  no_duration = sources.to_record(dict(raw, duration=None), "yc", base_dir=str(tmp_path), video_frames=5)
  # the 2 s video from its metadata: 0.4 s a frame; a step past the end is clipped to the last frame
  assert no_duration["steps"] == [(2, 5, "cut the onion"), (5, 5, "add the sauce")]
  with pytest.raises(sources.RecordError, match=r"yc.json record 0: segments\[0\] has segment \[3.0, 1.0\]"):
    sources.to_record(dict(raw, annotations=[{"segment": [3, 1], "sentence": "x"}]), "yc.json record 0",
                      base_dir=str(tmp_path), video_frames=5)
  from mmjax.evals import generation
  out = generation.score([rec], [rec["response"]])
  assert out["step_tiou"] == 1.0 and out["gen_exact_match"] == 1.0
