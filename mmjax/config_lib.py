"""The run-config schema, the arg parser for `get_config(arg)` and validation.

Every config file under `configs/` starts from `base_config()` and changes fields; no
config may add keys the schema lacks. `validate(config, n_devices)` runs before anything
is compiled and raises `ConfigError` with one line naming the key, the value and what
would be valid.
"""
from __future__ import annotations

import dataclasses
import re

import ml_collections

from mmjax.models import llama
from mmjax.sharding import DEFAULT_RULES


class ConfigError(ValueError):
  """A bad config value; the message is one line."""


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,key2=value2' config args (big_vision style) over typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"config arg {key!r} is unknown; valid args: {', '.join(sorted(defaults))}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("1", "true", "yes", "")
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ConfigError(f"config arg {key}={value!r} is not a valid {kind.__name__}") from None
  return out


def model_config_dict(**overrides) -> ml_collections.ConfigDict:
  """`config.model`: the fields of `LlamaConfig`, plus `name` and a flat llama3 rope scaling."""
  fields = {f.name: f.default for f in dataclasses.fields(llama.LlamaConfig)}
  for name in ("rope_scaling", "lora_alpha", "lora_rslora", "lora_dropout"):  # lora_* come from config.lora
    fields.pop(name)
  fields.update(
      name="llama",  # model family
      vocab_size=-1,  # -1: take the tokenizer's vocabulary size
      rope_scaling=ml_collections.ConfigDict(dict(
          type="none",  # 'none' or 'llama3'
          factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=8192)),
  )
  cfg = ml_collections.ConfigDict(fields)
  cfg.update(overrides)
  return cfg


def llama_config(model_cfg, vocab_size: int | None = None, lora_cfg=None) -> llama.LlamaConfig:
  """The model's own config from `config.model` (and the LoRA scale settings)."""
  d = model_cfg.to_dict()
  rs = d.pop("rope_scaling")
  d["rope_scaling"] = None if rs["type"] == "none" else {k: v for k, v in rs.items() if k != "type"}
  if d["vocab_size"] == -1:
    d["vocab_size"] = vocab_size
  if lora_cfg is not None:
    d.update(lora_alpha=lora_cfg.alpha, lora_rslora=lora_cfg.rslora, lora_dropout=lora_cfg.dropout)
  return llama.LlamaConfig.from_dict(d)


def vision_config_dict(**overrides) -> ml_collections.ConfigDict:
  """`config.vision`: the fields of `ViTConfig` (used when `model.name == 'vlm'`)."""
  from mmjax.models import vit
  fields = {f.name: f.default for f in dataclasses.fields(vit.ViTConfig)}
  for name in ("lora_alpha", "lora_rslora", "lora_dropout"):  # these come from config.lora
    fields.pop(name)
  fields["layer_scale"] = 0.0  # 0 = off
  cfg = ml_collections.ConfigDict(fields)
  cfg.update(overrides)
  return cfg


def vlm_config_dict(**overrides) -> ml_collections.ConfigDict:
  """`config.vlm`: how the tower feeds the language model (used when `model.name == 'vlm'`)."""
  cfg = ml_collections.ConfigDict(dict(
      projector="mlp2",  # 'linear' or 'mlp2' (linear, GELU, linear)
      projector_hidden=0,  # mlp2 hidden width; 0 = the language model's d_model
      max_frames=8,  # frames per video the temporal embedding covers
      temporal_pool=1,  # average frames over time in groups of this many
      feature="patches",  # 'patches', 'all' (with the class token) or 'pooled' (one token per frame)
      feature_layer=ml_collections.config_dict.placeholder(int),  # None: the tower's output; int: a hidden state (HF vision_feature_layer)
  ))
  cfg.update(overrides)
  return cfg


def hf_llama_config(config):
  """The decoder config of `config.init_from_hf`'s config.json; the run config keeps the
  numerics and memory settings (dtype, param_dtype, remat, attention) and the LoRA scale."""
  from mmjax.convert import llama as convert_llama
  try:
    hf = convert_llama.read_json(config.init_from_hf, "config.json")
    cfg = convert_llama.config_from_hf(hf)
  except ValueError as e:
    raise ConfigError(f"config.init_from_hf={config.init_from_hf!r}: {e}") from None
  m = config.model
  return dataclasses.replace(cfg, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=m.attention,
                             lora_alpha=config.lora.alpha, lora_rslora=config.lora.rslora,
                             lora_dropout=config.lora.dropout)


def vit_config(config):
  """The vision tower's `ViTConfig`: from `config.vision`, or from the config.json of
  `config.init_vision_from_hf` (a CLIP / SigLIP directory), keeping the run's numerics and
  memory settings (dtype, param_dtype, remat, attention) and the LoRA scale."""
  from mmjax.models import vit
  lora = dict(lora_alpha=config.lora.alpha, lora_rslora=config.lora.rslora, lora_dropout=config.lora.dropout)
  if config.init_vision_from_hf:
    from mmjax.convert import llama as convert_llama
    from mmjax.convert import vision as convert_vision
    try:
      cfg = convert_vision.vit_config_from_hf(convert_llama.read_json(config.init_vision_from_hf, "config.json"))
    except ValueError as e:
      raise ConfigError(f"config.init_vision_from_hf={config.init_vision_from_hf!r}: {e}") from None
    v = config.vision
    return dataclasses.replace(cfg, dtype=v.dtype, param_dtype=v.param_dtype, remat=v.remat, attention=v.attention,
                               **lora)
  v = config.vision.to_dict()
  v["layer_scale"] = v["layer_scale"] or None
  v.update(lora)
  return vit.ViTConfig.from_dict(v)


def model_from_config(config, tokenizer):
  """(model module, model config, visual token counts) from the run config.

  `visual_tokens` maps 'image'/'video' to placeholder counts for the data pipeline
  (None for text-only models and the ViSFT model).
  """
  from mmjax.models.llama import Llama
  if config.model.name == "visft":
    from mmjax.models import heads
    from mmjax.train import visft
    cfg = visft.task_config(config, tokenizer)
    return heads.VisionTaskModel(cfg), cfg, None
  if config.init_from_hf:
    llm = hf_llama_config(config)
  else:
    llm = llama_config(config.model, tokenizer.vocab_size, config.lora)
  if config.model.name == "llama":
    return Llama(llm), llm, None
  from mmjax.models import vlm
  if getattr(tokenizer, "image_id", None) is None:
    raise ConfigError(f"config.data.tokenizer={config.data.tokenizer!r} has no '<image>' token, which a VLM needs")
  x = config.vlm
  cfg = vlm.VLMConfig(
      vision=vit_config(config), llm=llm, projector=x.projector,
      projector_hidden=x.projector_hidden or None, image_token_id=tokenizer.image_id,
      max_frames=x.max_frames, temporal_pool=x.temporal_pool, feature=x.feature, feature_layer=x.feature_layer)
  size = config.data.image_size
  visual = {"image": vlm.num_visual_tokens(cfg, "image", image_size=size)}
  if cfg.max_frames:
    visual["video"] = vlm.num_visual_tokens(cfg, "video", n_frames=config.data.video_frames, image_size=size)
  return vlm.VLM(cfg), cfg, visual


def media_fields(config) -> tuple[str, ...]:
  """Batch fields with pixels that the objective feeds the model."""
  if config.model.name != "vlm" or config.data.drop_media:
    return ()
  d = config.data
  if d.source == "shapes" and (d.task == "video_caption" or (d.task == "pool" and dict(
      tuple(p) for p in d.pool_mix).get("video_caption", 0) > 0)):
    return ("frames",)
  return ("images",)


def base_config() -> ml_collections.ConfigDict:
  """Every key a run config may have, with its default. One comment per field."""
  from mmjax.data.pipeline import default_data_config

  c = ml_collections.ConfigDict()
  c.seed = 0  # init, dropout and data order all derive from it
  c.objective = "sft"  # the loss: 'sft', 'dpo' or 'visft'
  c.model = model_config_dict()
  c.vision = vision_config_dict()  # the vision tower, when model.name == 'vlm'
  c.vlm = vlm_config_dict()
  c.init_from_hf = ""  # a local HF LLaMA/Mistral/Qwen2 directory: its config.json replaces the model
  #                      sizes in config.model (dtype/remat/attention stay) and its weights the init
  c.init_vision_from_hf = ""  # a local HF CLIP / SigLIP directory: its vision tower replaces config.vision's
  #                             sizes and init (VLM and ViSFT; dtype/remat/attention stay)
  c.visft = visft_config_dict()  # ViSFT heads and task weights (model.name / objective 'visft')
  c.lora = ml_collections.ConfigDict(dict(
      targets=r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",  # regex over module paths; '' = none
      rank=8,
      alpha=16.0,
      dropout=0.0,
      rslora=False,  # scale alpha/sqrt(rank) instead of alpha/rank
  ))
  c.trainable = ("lora/.*",)  # regexes (full match) over variable paths such as 'params/lm_head/kernel'
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-3, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0,
      decay_mask=r".*/(kernel|a|b)",  # regex over trainable paths that get weight decay
      schedule="cosine",  # 'cosine', 'linear' or 'constant' after warmup
      warmup_steps=10,
      end_lr_fraction=0.1,  # final lr = lr * end_lr_fraction
      clip_norm=1.0,  # global-norm clipping; 0 = off
  ))
  c.data = default_data_config()
  c.seq_len = 64  # tokens per row
  c.batch_size = 16  # global batch (rows per optimizer step, all hosts together)
  c.grad_accum = 1  # micro-batches per step; the loss is normalised over all of them
  c.steps = 100  # optimizer steps
  c.eval_every = 50  # 0 = only before and after training
  c.eval_batch_size = 32
  c.log_every = 10
  c.checkpoint_every = 50  # also saved at the end and on SIGTERM/SIGINT
  c.keep_checkpoints = 2
  c.sample_eval = ml_collections.ConfigDict(dict(
      num_examples=0,  # held-out prompts answered greedily before and after each stage; 0 = off
      max_new_tokens=64,
      show=3,  # print this many answers next to the truth after training
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # one axis may be -1
  c.rules = tuple((k, v) for k, v in DEFAULT_RULES)  # logical axis -> mesh axes
  c.peak_tflops_per_device = 0.0  # for MFU; 0 = look up the device in the peak table
  c.reuse_host_memory = True  # glibc keeps freed host memory for the next step instead of
  #                             re-faulting XLA:CPU's per-step buffer (mmjax/runtime.py; ~20% on CPU)
  # Recipes (mmjax/train/stages.py): stage_order names the stages; stages.NAME holds the keys
  # that stage changes. Empty = the config itself is the only stage.
  c.stage_order = ()
  c.stages = ml_collections.ConfigDict()
  c.init_from_stage = ""  # start from this earlier stage's result instead of the previous one
  c.dpo = dpo_config_dict()  # preference optimisation (objective 'dpo'), see mmjax/train/dpo.py
  c.distill_from_stage = ""  # rebirth: SFT on this earlier stage's own greedy answers (generated once)
  c.distill_examples = 256  # train prompts answered for distill_from_stage
  # Directed fine-tuning (mmjax/train/groups.py): groups.NAME = dict(trainable=(regexes,),
  # data=dict(data overrides)); each step trains one group's leaves on its own data.
  c.groups = ml_collections.ConfigDict()
  c.group_schedule = ""  # 'NAME' or 'NAME:K' items, cycled; '' = each group once per cycle
  c.joint = False  # every step trains all groups' leaves (the joint baseline, same data schedule)
  c.select = select_config_dict()  # error-driven data selection from a pool, see mmjax/select/recipe.py
  return c


def select_config_dict() -> ml_collections.ConfigDict:
  from mmjax.select import recipe
  return recipe.config_dict()


def visft_config_dict() -> ml_collections.ConfigDict:
  """`config.visft`, see `mmjax.train.visft.config_dict`."""
  from mmjax.train import visft
  return visft.config_dict()


def dpo_config_dict() -> ml_collections.ConfigDict:
  """`config.dpo`: the DPO objective and where its pairs come from."""
  return ml_collections.ConfigDict(dict(
      beta=0.1,  # KL strength; rewards are beta * (policy - reference) log-prob
      loss_type="sigmoid",  # sigmoid | hinge | ipo | robust | bco_pair | apo_zero
      label_smoothing=0.0,  # sigmoid / robust; robust needs [0, 0.5)
      gt_weight=0.0,  # weight of the SFT (NLL) term on the ground-truth response (TRL's rpo_alpha)
      reference="adapter_base",  # 'adapter_base' (the policy without its adapter), 'precomputed' (log-probs
      #                            stored with the pairs) or 'copy' (full-parameter training: a separate copy)
      ref_update_every=0,  # 'copy': refresh the copy with the policy every K steps; 0 = keep the stage's start
      ref_ema=0.0,  # 'copy': instead move it each step as ref <- ref_ema * ref + (1 - ref_ema) * policy; 0 = off
      online=False,  # sample pairs from the stage's starting policy (else data.train_path holds pairs)
      num_prompts=64,  # online: train prompts sampled per round
      num_candidates=4,  # online: candidates sampled per prompt
      temperature=1.0,  # online: sampling temperature
      top_k=0,  # online: 0 = no top-k filter
      max_new_tokens=64,  # online: candidate length limit
      scorer="shapes_caption",  # online: how candidates are scored (lower is better); see dpo.SCORERS
  ))


CHOICES = {
    "objective": ("sft", "dpo", "visft"),
    "dpo.loss_type": ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "apo_zero"),
    "dpo.reference": ("adapter_base", "precomputed", "copy"),
    "model.name": ("llama", "vlm", "visft"),
    "vlm.projector": ("linear", "mlp2"),
    "vlm.feature": ("patches", "all", "pooled"),
    "model.dtype": tuple(llama.DTYPES),
    "model.param_dtype": tuple(llama.DTYPES),
    "model.remat": tuple(llama.REMAT_POLICIES),
    "model.attention": ("auto", "xla", "cudnn"),
    "model.rope_scaling.type": ("none", "llama3"),
    "optimizer.schedule": ("cosine", "linear", "constant"),
}
POSITIVE = ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "checkpoint_every",
            "keep_checkpoints", "eval_batch_size", "lora.rank", "optimizer.lr")


def _walk(cfg, prefix=""):
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if path in ("stages", "groups", "select.pool"):  # whole stage configs; groups.validate; select_recipe.validate
      continue
    if isinstance(value, ml_collections.ConfigDict):
      yield from _walk(value, path + ".")
    else:
      yield path, value


def _get(cfg, path):
  for k in path.split("."):
    cfg = cfg[k]
  return cfg


def _type_ok(want, value) -> bool:
  if isinstance(want, bool):
    return isinstance(value, bool)
  if isinstance(want, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(want, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(want, str):
    return isinstance(value, str)
  if isinstance(want, (tuple, list)):
    return isinstance(value, (tuple, list))
  return True


def explain_override_error(argv) -> str | None:
  """Names the first `--config.KEY=...` override whose KEY the schema lacks, if any."""
  known = dict(_walk(base_config()))
  prefixes = {p.rsplit(".", 1)[0] for p in known if "." in p}
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    if path.startswith("stages."):
      stage = path.split(".")[1]
      return (f"config key {path!r} does not exist: a stage override can only change keys the config file "
              f"sets for stage {stage!r}; set the key for every stage with --config.{'.'.join(path.split('.')[2:])} "
              f"or add it to config.stages.{stage} in the config file")
    if path not in known and path not in prefixes:
      parent = path.rpartition(".")[0]
      siblings = sorted({p[len(parent) + 1:].split(".")[0] if parent else p.split(".")[0]
                         for p in known if not parent or p.startswith(parent + ".")})
      return (f"unknown config key {path!r}; valid keys{' under ' + repr(parent) if parent else ''}: "
              f"{', '.join(siblings)}")
  return None


def check_schema(config, schema) -> None:
  """Unknown keys and wrong types, against `base_config()`."""
  known = dict(_walk(schema))
  for path, value in _walk(config):
    if path not in known:
      parent = path.rpartition(".")[0]
      siblings = sorted(p.rpartition(".")[2] for p in known if p.rpartition(".")[0] == parent)
      raise ConfigError(f"unknown config key {path!r}; valid keys{' under ' + repr(parent) if parent else ''}: "
                        f"{', '.join(siblings)}")
    want = known[path]
    if want is None or value is None:
      continue
    if not _type_ok(want, value):
      raise ConfigError(f"config.{path}={value!r} has type {type(value).__name__}; "
                        f"expected {type(want).__name__} (like the default {want!r})")


def validate(config, n_devices: int, process_count: int = 1, abstract_params=None) -> None:
  """Checks the config (and each stage's config) before any compile. Raises ConfigError (one line)."""
  check_schema(config, base_config())
  if config.stage_order:
    from mmjax.train.stages import stage_config
    missing = [n for n in config.stage_order if n not in config.stages]
    if missing:  # stages may define more than stage_order runs (e.g. to run a prefix)
      raise ConfigError(f"config.stage_order names {', '.join(map(repr, missing))}, which config.stages "
                        f"does not define; defined: {', '.join(config.stages) or 'none'}")
    for k, name in enumerate(config.stage_order):
      try:
        stage = stage_config(config, name)
      except (KeyError, AttributeError) as e:
        raise ConfigError(f"config.stages.{name} sets an unknown key {e}; stage keys are run-config keys") from None
      try:
        _validate_one(stage, n_devices, process_count, abstract_params, config.stage_order[:k])
      except ConfigError as e:
        raise ConfigError(f"stage {name!r}: {e}") from None
    return
  _validate_one(config, n_devices, process_count, abstract_params)


def _validate_one(config, n_devices, process_count, abstract_params, stage_names=()) -> None:
  check_schema(config, base_config())
  for path, options in CHOICES.items():
    value = _get(config, path)
    if value not in options:
      raise ConfigError(f"config.{path}={value!r} is not valid; choose one of {', '.join(map(repr, options))}")
  for path in POSITIVE:
    value = _get(config, path)
    if not value > 0:
      raise ConfigError(f"config.{path}={value!r} must be > 0")
  if config.objective == "dpo":
    _validate_dpo(config)
  if (config.objective == "visft") != (config.model.name == "visft"):
    raise ConfigError(f"config.objective={config.objective!r} with config.model.name={config.model.name!r}: "
                      "the 'visft' objective and the 'visft' model (a ViT with task heads) go together")
  if config.objective == "visft":
    from mmjax.train import visft
    visft.validate(config)
  if not 0.0 <= config.lora.dropout < 1.0:
    raise ConfigError(f"config.lora.dropout={config.lora.dropout!r} must be in [0, 1)")
  m = config.model
  if config.model.name != "visft" and m.n_heads % m.n_kv_heads:
    raise ConfigError(f"config.model.n_heads={m.n_heads} must be a multiple of config.model.n_kv_heads={m.n_kv_heads}")
  if m.head_dim % 2:
    raise ConfigError(f"config.model.head_dim={m.head_dim} must be even (rotary embeddings rotate pairs)")
  for regex_key in ("lora.targets", "optimizer.decay_mask"):
    _check_regex(regex_key, _get(config, regex_key))
  for pattern in config.trainable:
    _check_regex("trainable", pattern)
  from mmjax.train import groups
  try:
    groups.validate(config, set(base_config().data.keys()))
  except groups.GroupError as e:
    raise ConfigError(str(e)) from None
  from mmjax.select import recipe as select_recipe
  try:
    select_recipe.validate(config, stage_names)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for name in groups.names(config):  # each group's data must be valid data in its own right
    try:
      from mmjax.data.pipeline import validate_data_config
      validate_data_config(groups.data_config(config, name))
    except ValueError as e:
      raise ConfigError(f"config.groups.{name}: {e}") from None

  from mmjax.sharding import mesh_shape, rules_from_config
  try:
    shape = mesh_shape(config.mesh, n_devices)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  sizes = dict(zip(("data", "fsdp", "tensor"), shape))
  rules = dict(rules_from_config(config.rules))
  batch_axes = rules.get("act_batch") or ()
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
  dp = 1
  for a in batch_axes:
    dp *= sizes[a]
  need = dp * config.grad_accum
  if config.batch_size % need:
    raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by the data-parallel size "
                      f"{dp} x config.grad_accum={config.grad_accum} = {need}")
  if config.eval_batch_size % (dp * process_count):
    raise ConfigError(f"config.eval_batch_size={config.eval_batch_size} must be divisible by the data-parallel "
                      f"size {dp} and the process count {process_count}")
  if config.batch_size % process_count:
    raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by the process count {process_count}")
  if abstract_params is not None:
    check_targets(config, abstract_params)


def _validate_dpo(config) -> None:
  d = config.dpo
  if not d.beta > 0:
    raise ConfigError(f"config.dpo.beta={d.beta!r} must be > 0")
  if not 0.0 <= d.label_smoothing < 0.5:
    raise ConfigError(f"config.dpo.label_smoothing={d.label_smoothing!r} must be in [0, 0.5)")
  if d.gt_weight < 0:
    raise ConfigError(f"config.dpo.gt_weight={d.gt_weight!r} must be >= 0")
  if d.reference == "adapter_base" and not config.lora.targets:
    raise ConfigError("config.dpo.reference='adapter_base' needs an adapter (config.lora.targets is empty); "
                      "use reference='copy' or 'precomputed' for full-parameter training")
  if d.reference == "copy" and config.lora.targets:
    raise ConfigError(f"config.dpo.reference='copy' keeps a second copy of the weights for full-parameter "
                      f"training, but config.lora.targets={config.lora.targets!r} adds an adapter; use "
                      "reference='adapter_base' with LoRA, or set lora.targets=''")
  if not 0.0 <= d.ref_ema < 1.0:
    raise ConfigError(f"config.dpo.ref_ema={d.ref_ema!r} must be in [0, 1)")
  if d.ref_update_every < 0:
    raise ConfigError(f"config.dpo.ref_update_every={d.ref_update_every!r} must be >= 0")
  if d.ref_ema > 0 and d.ref_update_every > 0:
    raise ConfigError(f"config.dpo.ref_ema={d.ref_ema!r} and config.dpo.ref_update_every={d.ref_update_every!r} "
                      "both move the reference; set one of them to 0")
  if d.reference != "copy" and (d.ref_ema > 0 or d.ref_update_every > 0):
    raise ConfigError(f"config.dpo.ref_ema / ref_update_every move a reference copy, but config.dpo.reference="
                      f"{d.reference!r}; use reference='copy'")
  if d.online:
    for key in ("num_prompts", "num_candidates", "max_new_tokens"):
      if not d[key] > 0:
        raise ConfigError(f"config.dpo.{key}={d[key]!r} must be > 0")
    if d.num_candidates < 2:
      raise ConfigError(f"config.dpo.num_candidates={d.num_candidates!r} must be >= 2 to form pairs")
    if not d.temperature > 0:
      raise ConfigError(f"config.dpo.temperature={d.temperature!r} must be > 0 to sample distinct candidates")
  elif config.data.source != "jsonl":
    raise ConfigError(f"config.objective='dpo' with config.dpo.online=False reads pairs from JSONL; "
                      f"config.data.source={config.data.source!r} must be 'jsonl'")


def _check_regex(key, pattern):
  try:
    re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"config.{key}={pattern!r} is not a valid regex ({e})") from None


def check_targets(config, abstract_params) -> None:
  """LoRA targets and trainable regexes must each match something."""
  from flax import traverse_util
  from mmjax import lora
  from mmjax.train.state import is_trainable
  if config.lora.targets:
    if not lora.target_paths(abstract_params, config.lora.targets):
      modules = sorted({p.rsplit("/", 1)[0] for p in traverse_util.flatten_dict(abstract_params, sep="/")
                        if p.endswith("/kernel")})
      examples = ", ".join(modules[:6])
      raise ConfigError(f"config.lora.targets={config.lora.targets!r} matches no module; module paths look like: {examples}")
  paths = ["params/" + p for p in traverse_util.flatten_dict(abstract_params, sep="/")]
  if config.lora.targets:
    paths += ["lora/" + m + "/" + x for m in lora.target_paths(abstract_params, config.lora.targets) for x in "ab"]
  owners = [("config.trainable", config.trainable)] if not config.groups else \
      [(f"config.groups.{n}.trainable", g.trainable) for n, g in config.groups.items()]
  for owner, patterns in owners:
    for pattern in patterns:
      if not any(is_trainable(p, [pattern]) for p in paths):
        raise ConfigError(f"{owner} entry {pattern!r} matches no variable; paths look like: "
                          f"{', '.join(paths[:3])}, ..., {paths[-1]}")
