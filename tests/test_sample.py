"""KV-cache sampler: exactness against full forward passes and transformers, sampling
controls, stop tokens, ragged prompts, sharding, and no recompiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding

from mmjax import lora as lora_lib
from mmjax import sample, sharding
from mmjax.convert import llama as conv
from mmjax.models.llama import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=61, d_model=22, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=6, mlp_dim=26,
                  rope_scaling=dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=2.0,
                                    original_max_position_embeddings=8))
PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]


@pytest.fixture(scope="module")
def variables():
  @jax.jit
  def init(rng):
    params = nn.meta.unbox(Llama(CFG).init(rng, jnp.zeros((1, 4), jnp.int32))["params"])
    params = jax.tree.map(lambda x: 4 * x, params)  # sharper logits: fewer near-ties in argmax
    ad = lora_lib.init(jax.random.key(1), params, r".*(q_proj|down_proj)", 3)
    ad = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape), ad)
    return {"params": params, "lora": ad}
  return init(jax.random.key(0))


N = 6  # max_new_tokens everywhere (and prompts padded to 7), so tests share compiled functions
WIDTH = 7


@jax.jit
def _full_forward(variables, tokens, length):
  """Logits at position length-1 of a full (uncached) forward pass over one right-padded row."""
  seg = (jnp.arange(tokens.shape[1]) < length).astype(jnp.int32)[None]
  return Llama(CFG).apply(variables, tokens, segment_ids=seg)[0, length - 1]


def _reference_greedy(variables, prompt, n):
  """Argmax of a full forward pass over the whole sequence, one token at a time."""
  seq = list(prompt)
  for _ in range(n):
    row = np.zeros((1, WIDTH + N), np.int32)
    row[0, : len(seq)] = seq
    seq.append(int(jnp.argmax(_full_forward(variables, row, len(seq)))))
  return seq[len(prompt):]


def test_greedy_equals_full_forward_argmax(variables):
  out, lengths = sample.generate(Llama(CFG), variables, PROMPTS, max_new_tokens=N)
  assert out.shape == (3, N) and out.dtype == jnp.int32
  np.testing.assert_array_equal(lengths, [N] * 3)
  for row, prompt in zip(np.asarray(out), PROMPTS):
    assert row.tolist() == _reference_greedy(variables, prompt, N)


def test_ragged_prompts_array_input_and_single_rows_agree(variables):
  model = Llama(CFG)
  batch, _ = sample.generate(model, variables, PROMPTS, max_new_tokens=N)
  tokens, lengths = sample.pad_prompts(PROMPTS, pad_id=0)
  assert tokens.shape == (3, WIDTH) and lengths.tolist() == [7, 2, 4]
  tokens[1, 2:] = 55  # whatever sits past a row's length is ignored
  arr, _ = sample.generate(model, variables, tokens, lengths=lengths, max_new_tokens=N)
  np.testing.assert_array_equal(arr, batch)
  for i, prompt in enumerate(PROMPTS):
    alone, _ = sample.generate(model, variables, [prompt], max_new_tokens=N, prompt_len=WIDTH)
    np.testing.assert_array_equal(alone[0], batch[i])


def test_stop_tokens_end_rows_with_padding(variables):
  model = Llama(CFG)
  free, _ = sample.generate(model, variables, PROMPTS, max_new_tokens=N)
  free = np.asarray(free)
  stop = int(free[0, 2])
  out, lengths = sample.generate(model, variables, PROMPTS, max_new_tokens=N, stop_tokens=(stop, 60), pad_id=-1)
  out, lengths = np.asarray(out), np.asarray(lengths)
  for r in range(3):
    hits = np.flatnonzero(np.isin(free[r], (stop, 60)))
    n = hits[0] + 1 if hits.size else N
    assert lengths[r] == n
    np.testing.assert_array_equal(out[r, :n], free[r, :n])
    assert (out[r, n:] == -1).all()
  assert lengths[0] <= 3


def test_sampling_reproducible_and_top_k_1_is_greedy(variables):
  model = Llama(CFG)
  kw = dict(max_new_tokens=N, temperature=1.5, rng=jax.random.key(7))
  a, _ = sample.generate(model, variables, PROMPTS, **kw)
  b, _ = sample.generate(model, variables, PROMPTS, **kw)
  np.testing.assert_array_equal(a, b)
  c, _ = sample.generate(model, variables, PROMPTS, **{**kw, "rng": jax.random.key(8)})
  assert not np.array_equal(a, c)
  greedy, _ = sample.generate(model, variables, PROMPTS, max_new_tokens=N)
  k1, _ = sample.generate(model, variables, PROMPTS, top_k=1, **kw)
  np.testing.assert_array_equal(k1, greedy)
  p0, _ = sample.generate(model, variables, PROMPTS, top_p=1e-6, **kw)  # only the top token survives
  np.testing.assert_array_equal(p0, greedy)
  wide, _ = sample.generate(model, variables, PROMPTS, top_k=CFG.vocab_size, **kw)  # no restriction
  np.testing.assert_array_equal(wide, a)


def test_top_k_and_top_p_restrict_the_draw():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))

  def draw(top_k=0, top_p=1.0, filtered=True):
    return np.asarray(sample._choose(logits, jax.random.key(0), jnp.float32(1.0), jnp.int32(top_k),
                                     jnp.float32(top_p), sample=True, filtered=filtered))

  assert set(draw(top_k=2).tolist()) == {0, 1}
  assert set(draw(top_p=0.7).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
  assert set(draw(top_k=3, top_p=0.9).tolist()) == {0, 1, 2}
  assert set(draw(top_k=3, top_p=0.6).tolist()) == {0, 1}
  for kw in (dict(filtered=False), dict(top_k=0, top_p=1.0)):
    counts = np.bincount(draw(**kw), minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_second_call_with_same_shapes_does_not_retrace(variables):
  model = Llama(CFG)
  kw = dict(max_new_tokens=N, temperature=0.9, top_k=5, top_p=0.8, stop_tokens=(1, 2))
  sample.generate(model, variables, PROMPTS, rng=jax.random.key(0), **kw)
  before = sample.trace_count()
  other = [[40, 41, 42], [43, 44, 45, 46, 47, 48, 49], [50]]  # same padded width 7
  sample.generate(model, variables, other, rng=jax.random.key(1), **{
      **kw, "temperature": 0.5, "top_k": 9, "top_p": 0.6, "stop_tokens": (3, 4, 5)})
  assert sample.trace_count() == before


def test_sharded_batch_matches_single_device(variables):
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  _, names = conv.param_specs(CFG)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  placed = {p: jax.device_put(x, NamedSharding(mesh, sharding.logical_to_spec(names[p], x.shape, mesh,
                                                                             sharding.DEFAULT_RULES)))
            for p, x in flat.items()}
  on_mesh = {"params": traverse_util.unflatten_dict(placed, sep="/"),
             "lora": jax.device_put(variables["lora"], NamedSharding(mesh, jax.sharding.PartitionSpec()))}
  want, want_len = sample.generate(Llama(CFG), variables, PROMPTS, max_new_tokens=N)
  got, got_len = sample.generate(Llama(CFG), on_mesh, PROMPTS, max_new_tokens=N, mesh=mesh)
  assert got.shape == (3, N)  # 3 rows padded to 4 for data x fsdp = 4, then cut
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_len, want_len)


def test_matches_transformers_greedy_generate(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=52, head_dim=10, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=76, num_hidden_layers=2,
                                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0, original_max_position_embeddings=16))
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.mul_(6.0)  # decisive argmaxes
  hf.save_pretrained(str(tmp_path))
  cfg, params = conv.import_hf(str(tmp_path))
  prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
  n = 9
  ours, _ = sample.generate(Llama(cfg), {"params": params}, prompts, max_new_tokens=n)
  ours = np.asarray(ours)
  stop = int(ours[1, 3])  # a token that stops at least one row early

  width = max(map(len, prompts))
  ids = np.zeros((3, width), np.int64)
  mask = np.zeros((3, width), np.int64)
  for i, p in enumerate(prompts):  # transformers wants left padding for generation
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  for stops in ((), (stop,)):
    got, lengths = sample.generate(Llama(cfg), {"params": params}, prompts, max_new_tokens=n, stop_tokens=stops)
    with torch.no_grad():
      ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n, do_sample=False,
                        pad_token_id=0, eos_token_id=list(stops) or None, min_new_tokens=0)
    ref = ref[:, width:].numpy()
    ref = np.pad(ref, ((0, 0), (0, n - ref.shape[1])))  # transformers stops once every row has
    np.testing.assert_array_equal(np.asarray(got), ref)
  assert np.asarray(lengths)[1] == 4


def test_vlm_greedy_with_images_equals_full_forward_argmax():
  """Image placeholders in the prompt are filled at prefill; the cached decode then equals
  re-running the whole VLM on the growing sequence."""
  from mmjax.models import vit, vlm
  llm = LlamaConfig(vocab_size=37, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=6, mlp_dim=30)
  cfg = vlm.VLMConfig(vision=vit.ViTConfig(image_size=16, patch_size=8, d_model=20, n_layers=1, n_heads=2,
                                           head_dim=10, mlp_dim=28),
                      llm=llm, image_token_id=5, max_frames=0)
  model = vlm.VLM(cfg)
  n_vis = vlm.num_visual_tokens(cfg, "image")
  prompts = [[1] + [5] * n_vis + [9, 12, 7], [1] + [5] * n_vis + [20]]
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  variables = {"params": nn.meta.unbox(model.init(jax.random.key(0), jnp.asarray([prompts[0]]))["params"])}
  out, _ = sample.generate(model, variables, prompts, max_new_tokens=5, images=images)
  for row, prompt in enumerate(prompts):
    seq = list(prompt)
    for _ in range(5):
      logits = model.apply(variables, jnp.asarray([seq]), images=images[row:row + 1])[0, -1]
      seq.append(int(jnp.argmax(logits.at[5].set(-jnp.inf))))  # the sampler never emits the placeholder
    assert list(np.asarray(out[row])) == seq[len(prompt):], row
  other, _ = sample.generate(model, variables, prompts, max_new_tokens=5, images=images[::-1])
  assert not np.array_equal(np.asarray(other), np.asarray(out))  # the images matter
