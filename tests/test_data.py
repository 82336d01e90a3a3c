"""Data: tokenizers, record sources, Grain pipeline (determinism, resume, sharding, packing)."""
import json
import os
import sys
import types

import numpy as np
import pytest

from mmjax.data import catalog, pipeline, sources, tokenizer as tokenizer_lib

SEQ = 40


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_tokenizer("builtin")


def _cfg(**kw):
  cfg = catalog.default_data_config()
  cfg.update(kw)
  return cfg


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                  for x, y in zip(a, b))


# ----------------------------------------------------------------------------- tokenizers


def test_builtin_tokenizer_round_trip(tok):
  assert tok.vocab_size < 64 and tok.pad_id == 0 and tok.bos_id is not None and tok.eos_id is not None
  text = "reverse ab3x = x3ba, add 12+7 =19."
  ids = tok.encode(text)
  assert len(ids) == len(text) and tok.decode(ids) == text
  assert max(ids) < tok.vocab_size and tok.pad_id not in ids
  assert tok.encode("A") == [tok.unk_id]
  ids, mask = tok.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
  assert tok.decode(ids) == "user: hi\nassistant: yo\n"
  assert tok.decode([i for i, m in zip(ids, mask) if m]) == "yo\n"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  t.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world, how are you?"] * 4, trainer)
  d = tmp_path_factory.mktemp("hf_tok")
  t.save(str(d / "tokenizer.json"))
  template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
  (d / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": template,
      "tokenizer_class": "PreTrainedTokenizerFast"}))
  return str(d)


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "fox?"},
            {"role": "assistant", "content": "lazy dog"}]


def test_builtin_word_tokenizer_is_lossless_and_short():
  from mmjax.data import shapes
  words = tokenizer_lib.load_tokenizer("builtin_words")
  chars = tokenizer_lib.load_tokenizer("builtin")
  assert words.vocab_size > chars.vocab_size and words.image_id == chars.image_id
  for text in ("a small white circle at the bottom right.", "how many circles are there?", "x=3+4 zebra, big",
               "first a red circle appears at the top at frame 2, then the red circle disappears from the top.",
               "", "  double  spaces\nnewline"):
    ids = words.encode(text)
    assert words.decode(ids) == text
  # characters keep their ids; a grammar word is one id, its leading space included
  assert words.encode("zebra") == chars.encode("zebra")
  assert len(words.encode(" circle")) == 1 and len(words.encode("circle")) == 1
  cap = shapes.ShapesSource("image_caption", 1)[0]["caption"]
  assert len(words.encode(cap)) <= len(cap.split()) + cap.count(".")


def test_hf_tokenizer_round_trip(hf_dir):
  t = tokenizer_lib.load_tokenizer(hf_dir)
  assert (t.pad_id, t.bos_id, t.eos_id, t.vocab_size) == (0, 1, 2, 300)
  text = "Hello there, the quick fox! ünïcode"
  assert t.decode(t.encode(text)) == text
  assert t.bos_id not in t.encode(text)


def test_hf_chat_template_matches_transformers(hf_dir):
  t = tokenizer_lib.load_tokenizer(hf_dir)
  ids, mask = t.encode_chat(MESSAGES)
  # Assistant spans: the content and the end-of-turn marker, never the role header.
  masked = [i for i, m in zip(ids, mask) if m]
  im_end = t.encode("<|im_end|>")
  assert masked == t.encode("hi there") + im_end + t.encode("\n") + t.encode("lazy dog") + im_end + t.encode("\n")
  transformers = pytest.importorskip("transformers")
  ref = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
  assert t.render_chat(MESSAGES) == ref.apply_chat_template(MESSAGES, tokenize=False)
  assert t.render_chat(MESSAGES[:2], add_generation_prompt=True) == ref.apply_chat_template(
      MESSAGES[:2], tokenize=False, add_generation_prompt=True)
  assert ids == ref(ref.apply_chat_template(MESSAGES, tokenize=False), add_special_tokens=False)["input_ids"]


def test_hf_tokenizer_without_template_uses_fallback(hf_dir, tmp_path):
  d = tmp_path / "plain"
  d.mkdir()
  (d / "tokenizer.json").write_text(open(os.path.join(hf_dir, "tokenizer.json")).read())
  (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  t = tokenizer_lib.load_tokenizer(str(d))
  assert t.bos_id is None and t.pad_id == t.eos_id
  ids, mask = t.encode_chat(MESSAGES[1:3])
  assert t.decode(ids) == "user: hello\nassistant: hi there\n"
  assert t.decode([i for i, m in zip(ids, mask) if m]) == "hi there\n"


def test_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist") as e:
    tokenizer_lib.load_tokenizer(str(tmp_path / "nope"))
  assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match="has no tokenizer.json"):
    tokenizer_lib.load_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- records


def test_jsonl_formats_loss_masks(tmp_path, tok):
  path = _write_jsonl(tmp_path / "d.jsonl", [
      {"text": "abc"}, "", {"prompt": "add 1+2 =", "response": "3"},
      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
  src = sources.JsonlSource(path)
  assert len(src) == 3  # the blank line is skipped
  text, pr, chat = (pipeline.tokenize_record(src[i], tok, SEQ) for i in range(3))
  for b in (text, pr, chat):
    n = int(b["segment_ids"].sum())
    assert b["tokens"][0] == tok.bos_id and b["targets"][n - 1] == tok.eos_id
    np.testing.assert_array_equal(b["targets"][:n - 1], b["tokens"][1:n])
    np.testing.assert_array_equal(b["positions"][:n], np.arange(n))
    assert not b["loss_mask"][n:].any() and not b["positions"][n:].any() and (b["tokens"][n:] == tok.pad_id).all()
  # text: every target, eos included
  np.testing.assert_array_equal(text["loss_mask"], (np.arange(SEQ) < 4).astype(np.int32))
  assert tok.decode(text["targets"][text["loss_mask"] == 1]) == "abc"
  # prompt/response: the response and the eos only
  assert tok.decode(pr["targets"][pr["loss_mask"] == 1]) == "3" and pr["loss_mask"].sum() == 2
  assert tok.decode(pr["tokens"][pr["segment_ids"] == 1]) == "add 1+2 =3"
  # messages: assistant content (and the eos)
  assert tok.decode(chat["targets"][chat["loss_mask"] == 1]) == "yo\n"
  assert chat["targets"][chat["loss_mask"] == 1][-1] == tok.eos_id


def test_prompt_ids_prefix_the_training_tokens(tok, hf_dir):
  for t in (tok, tokenizer_lib.load_tokenizer(hf_dir)):
    for record in ({"prompt": "reverse ab3 =", "response": "3ba"}, {"messages": MESSAGES}):
      p = pipeline.prompt_ids(record, t)
      b = pipeline.tokenize_record(record, t, 128)
      np.testing.assert_array_equal(b["tokens"][:len(p)], p)
      assert b["loss_mask"][len(p) - 2] == 0 and b["loss_mask"][len(p) - 1] == 1  # answer starts here


def test_truncation(tok):
  b = pipeline.tokenize_record({"text": "x" * 100}, tok, 16)
  assert all(v.shape == (16,) and v.dtype == np.int32 for v in b.values())
  assert b["segment_ids"].all() and b["loss_mask"].all() and tok.eos_id not in b["targets"]


def test_jsonl_malformed_lines_name_file_and_line(tmp_path):
  path = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "", "{not json", {"question": "?"}])
  src = sources.JsonlSource(path)
  assert src[0] == {"text": "ok"}
  with pytest.raises(sources.RecordError, match=r"bad\.jsonl:3: not valid JSON") as e:
    src[1]
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"bad\.jsonl:4: .*expected 'text'"):
    src[2]


def test_missing_files_are_named(tmp_path):
  missing = str(tmp_path / "missing.jsonl")
  with pytest.raises(ValueError, match="missing.jsonl does not exist"):
    sources.JsonlSource(missing)
  with pytest.raises(ValueError, match=r"data\.train_path=.*missing\.jsonl.*does not exist"):
    catalog.validate_data_config(_cfg(source="jsonl", train_path=missing))
  with pytest.raises(ValueError, match=r"data\.source='csv'.*generated, jsonl"):
    catalog.validate_data_config(_cfg(source="csv"))
  with pytest.raises(ValueError, match=r"data\.task='nope'.*reverse"):
    catalog.validate_data_config(_cfg(task="nope"))


def test_arrayrecord_round_trip(tmp_path, tok):
  rows = [{"text": "hello"}, {"prompt": "p =", "response": "r"}, {"messages": MESSAGES[1:3]}]
  path = str(tmp_path / "d.array_record")
  assert sources.write_arrayrecord(rows, path) == 3
  src = sources.ArrayRecordSource(path)
  assert [src[i] for i in range(len(src))] == rows
  it = pipeline.make_train_iterator(_cfg(source="arrayrecord", train_path=path, shuffle=False),
                                    global_batch=3, seq_len=SEQ, seed=0, tokenizer=tok)
  b = next(it)
  assert tok.decode(b["tokens"][0][b["segment_ids"][0] == 1]) == "hello"


def test_tfds_source(monkeypatch):
  if "tensorflow_datasets" not in sys.modules:
    try:
      import tensorflow_datasets  # noqa: F401
    except ImportError:
      with pytest.raises(ValueError, match="pip install"):
        sources.TfdsSource("mnist", "train")
  # The feature mapping, against a stand-in for `tfds.data_source`.
  fake = types.ModuleType("tensorflow_datasets")
  fake.data_source = lambda name, split, data_dir: [{"q": np.array(b"2+2="), "a": b"4", "id": 3}]
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  src = sources.TfdsSource("toy", "train", prompt_key="q", response_key="a")
  assert len(src) == 1 and src[0] == {"prompt": "2+2=", "response": "4"}


# ----------------------------------------------------------------------------- generated tasks


def test_generated_tasks_are_deterministic_and_correct():
  for name in sources.GENERATED_TASKS:
    a, b = sources.GeneratedTask(name, 50, seed=0), sources.GeneratedTask(name, 50, seed=0)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert [a[i] for i in range(50)] != [sources.GeneratedTask(name, 50, seed=1)[i] for i in range(50)]
    for i in range(50):
      r = a[i]
      task, arg, eq = r["prompt"].split(" ")
      assert task == name and eq == "="
      want = {"reverse": lambda: arg[::-1], "copy": lambda: arg, "sort": lambda: "".join(sorted(arg)),
              "add": lambda: str(sum(int(x) for x in arg.split("+")))}[name]()
      assert r["response"] == want


def test_generated_eval_prompts_never_in_train():
  train = {sources.GeneratedTask("add", 2000, seed=0)[i]["prompt"] for i in range(2000)}
  evals = {sources.GeneratedTask("add", 300, seed=1, split="eval")[i]["prompt"] for i in range(300)}
  assert len(train) > 1000 and len(evals) > 100 and not train & evals


# ----------------------------------------------------------------------------- pipeline


def test_batch_layout(tok):
  it = pipeline.make_train_iterator(_cfg(), global_batch=6, seq_len=SEQ, seed=0, tokenizer=tok)
  b = next(it)
  assert set(b) == set(pipeline.FIELDS)
  assert all(v.shape == (6, SEQ) and v.dtype == np.int32 for v in b.values())


def test_order_is_a_function_of_the_seed(tok):
  make = lambda seed: pipeline.make_train_iterator(_cfg(), global_batch=4, seq_len=SEQ, seed=seed, tokenizer=tok)
  assert _equal(_take(make(1), 3), _take(make(1), 3))
  assert not _equal(_take(make(1), 3), _take(make(2), 3))


def test_epochs_are_reshuffled(tok):
  cfg = _cfg(num_train_examples=8)
  rows = [r for b in _take(pipeline.make_train_iterator(cfg, global_batch=4, seq_len=SEQ, seed=0,
                                                          tokenizer=tok), 4) for r in b["tokens"]]
  first, second = [tuple(r) for r in rows[:8]], [tuple(r) for r in rows[8:]]
  assert sorted(first) == sorted(second) and first != second and len(set(first)) == 8


@pytest.mark.parametrize("packing", [False, True])
def test_exact_resume(tok, packing):
  make = lambda: pipeline.make_train_iterator(_cfg(packing=packing), global_batch=4, seq_len=SEQ, seed=3,
                                              tokenizer=tok)
  it = make()
  _take(it, 5)
  state = it.get_state()
  want = _take(it, 4)
  fresh = make()
  fresh.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip
  assert _equal(_take(fresh, 4), want)


def test_process_shares_partition_the_global_batch(tok):
  kw = dict(global_batch=6, seq_len=SEQ, seed=5, tokenizer=tok)
  whole = _take(pipeline.make_train_iterator(_cfg(), **kw), 3)
  parts = [_take(pipeline.make_train_iterator(_cfg(), process_index=p, process_count=2, **kw), 3)
           for p in range(2)]
  for step in range(3):
    a, b = parts[0][step], parts[1][step]
    assert a["tokens"].shape == (3, SEQ)
    assert not {tuple(r) for r in a["tokens"]} & {tuple(r) for r in b["tokens"]}
    for k in pipeline.FIELDS:  # process p holds rows p, p+2, p+4 of the global batch
      np.testing.assert_array_equal(whole[step][k][0::2], a[k])
      np.testing.assert_array_equal(whole[step][k][1::2], b[k])
  with pytest.raises(ValueError, match="multiple of the process count"):
    pipeline.make_train_iterator(_cfg(), process_index=0, process_count=4, **kw)


def test_packing_keeps_examples_apart(tok):
  it = pipeline.make_train_iterator(_cfg(packing=True), global_batch=4, seq_len=64, seed=0, tokenizer=tok)
  n_segments = 0
  for b in _take(it, 3):
    for row in range(4):
      seg, pos = b["segment_ids"][row], b["positions"][row]
      ids = [s for s in np.unique(seg) if s]
      assert ids == list(range(1, len(ids) + 1))
      n_segments += len(ids)
      for s in ids:
        idx = np.flatnonzero(seg == s)
        assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # positions restart
        toks, tgts = b["tokens"][row][idx], b["targets"][row][idx]
        assert toks[0] == tok.bos_id and tgts[-1] == tok.eos_id and tok.bos_id not in toks[1:]
        np.testing.assert_array_equal(tgts[:-1], toks[1:])  # no target crosses into another example
        prompt, response = tok.decode(toks[1:]).split("=")
        assert response == prompt.split(" ")[1][::-1]
      assert not b["loss_mask"][row][seg == 0].any() and not pos[seg == 0].any()
  assert n_segments > 2 * 12  # rows really hold several examples


def test_eval_batches(tok):
  cfg = _cfg(num_eval_examples=10)
  whole = pipeline.make_eval_batches(cfg, batch=4, seq_len=SEQ, tokenizer=tok)
  assert len(whole) == 3 and all(b["tokens"].shape == (4, SEQ) for b in whole)
  assert [int(b["loss_mask"].any(axis=1).sum()) for b in whole] == [4, 4, 2]
  assert whole[-1]["segment_ids"][2:, 0].all()  # filler rows are real sequences with no loss
  parts = [pipeline.make_eval_batches(cfg, batch=4, seq_len=SEQ, tokenizer=tok, process_index=p,
                                      process_count=2) for p in range(2)]
  for i, b in enumerate(whole):
    np.testing.assert_array_equal(b["tokens"][0::2], parts[0][i]["tokens"])
    np.testing.assert_array_equal(b["tokens"][1::2], parts[1][i]["tokens"])
  assert pipeline.make_eval_batches(_cfg(num_eval_examples=0), batch=4, seq_len=SEQ, tokenizer=tok) == []


def test_iterator_checkpoints_with_orbax(tmp_path, tok):
  grain = pytest.importorskip("grain")
  ocp = pytest.importorskip("orbax.checkpoint")
  make = lambda: pipeline.make_train_iterator(_cfg(packing=True), global_batch=2, seq_len=SEQ, seed=1,
                                              tokenizer=tok)
  it = make()
  _take(it, 3)
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(str(tmp_path), options=options, item_names=("data",)) as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  want = _take(it, 3)
  fresh = make()
  with ocp.CheckpointManager(str(tmp_path), options=options, item_names=("data",)) as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert _equal(_take(fresh, 3), want)


def test_jsonl_records_with_image_paths_feed_a_vlm_batch(tmp_path):
  from PIL import Image
  from mmjax.data import pipeline
  rng = np.random.default_rng(0)
  pixels = [rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8) for _ in range(3)]
  (tmp_path / "img").mkdir()
  for i, p in enumerate(pixels):
    Image.fromarray(p).save(tmp_path / "img" / f"{i}.png")
  lines = [{"prompt": "describe.", "response": f"picture {i}", "image": f"img/{i}.png"} for i in range(3)]
  lines.append({"prompt": "describe.", "response": "a clip", "image": ["img/0.png", "img/1.png"]})
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  src = sources.JsonlSource(str(path))
  assert src[1]["image"] == str(tmp_path / "img" / "1.png") and src[3]["frames"][1].endswith("1.png")
  tok = tokenizer_lib.load_tokenizer("builtin")
  row = pipeline.tokenize_record(src[2], tok, 32, {"image": 4, "video": 8}, image_size=16)
  want = np.asarray(Image.fromarray(pixels[2]).resize((16, 16), Image.BICUBIC), np.float32) / 127.5 - 1
  np.testing.assert_allclose(row["images"], want, atol=1e-6)
  assert (row["tokens"][1:5] == tok.image_id).all() and row["loss_mask"][:5].sum() == 0
  video = pipeline.tokenize_record(src[3], tok, 32, {"image": 4, "video": 8}, image_size=16)
  assert video["frames"].shape == (2, 16, 16, 3) and (video["tokens"][1:9] == tok.image_id).all()
  # a missing image file is a one-line error with the file and line
  path.write_text(json.dumps({"prompt": "p", "response": "r", "image": "img/9.png"}) + "\n")
  with pytest.raises(sources.RecordError, match=r"train.jsonl:1: 'image' names .*img/9.png, which does not exist"):
    sources.JsonlSource(str(path))[0]


def test_tfds_image_text_records(monkeypatch):
  fake = types.ModuleType("tensorflow_datasets")
  img = np.zeros((8, 6, 3), np.uint8)
  img[..., 0] = 200
  fake.data_source = lambda name, split, data_dir: [{"image": img, "caption": b"a red image", "q": b"describe"}]
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  src = sources.TfdsSource("toy_captions", "train", prompt_key="q", response_key="caption", image_key="image")
  rec = src[0]
  assert rec["prompt"] == "describe" and rec["response"] == "a red image" and rec["image"].shape == (8, 6, 3)
  from mmjax.data import media
  px = media.load_image(rec["image"], 4)
  assert px.shape == (4, 4, 3) and np.allclose(px[..., 0], 200 / 127.5 - 1, atol=0.02)
  fake.data_source = lambda name, split, data_dir: [{"image": np.zeros((2, 2, 5)), "q": b"x", "caption": b"y"}]
  with pytest.raises(sources.RecordError, match=r"tfds toy_captions\[train\] #0: 'image' has shape \(2, 2, 5\)"):
    sources.TfdsSource("toy_captions", "train", prompt_key="q", response_key="caption")[0]
