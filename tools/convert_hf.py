"""Hugging Face <-> mmjax model directories: LLaMA-family decoders (Llama, Mistral, Qwen2),
whole VLMs (LLaVA, Video-LLaVA) and vision towers (CLIP, SigLIP).

  python tools/convert_hf.py import --hf HF_DIR --out MMJAX_DIR [--peft PEFT_DIR] [--dtype bfloat16]
  python tools/convert_hf.py export --ckpt MMJAX_DIR --out HF_DIR [--adapter DIR] [--merge]
                                    [--architecture Qwen2ForCausalLM] [--dtype bfloat16] [--max-shard-mb 4096]

`import` reads config.json + (sharded) safetensors, and optionally a PEFT LoRA adapter, and
writes an mmjax model directory (see `mmjax.convert.model_dir`: model_config.json, Orbax
`params/`, optional `lora/`, tokenizer files in `hf_files/`).

`export` writes config.json + model.safetensors (+ the tokenizer files) that
`transformers.AutoModelForCausalLM.from_pretrained` loads. The adapter is `--adapter`
(an mmjax model directory with `lora/`, or a PEFT directory) or else the checkpoint's own
`lora/`; with `--merge` it is folded into the weights, otherwise it is written next to the
base model as a PEFT adapter in OUT/adapter. Torch is not needed.

The architecture is detected: an HF directory whose config.json is a
`LlavaForConditionalGeneration` or `VideoLlavaForConditionalGeneration` imports as an mmjax
VLM directory (`mmjax.convert.vlm`; the processor and tokenizer files are kept), and an
mmjax VLM directory (e.g. a run's WORKDIR/model) exports back to that class, its adapter
merged (`--merge`) or as a PEFT adapter in OUT/adapter that `peft.PeftModel.from_pretrained`
loads onto the exported base (`--adapter` is for LLaMA directories only).

  python tools/convert_hf.py import-vision --hf HF_DIR --out MMJAX_DIR [--dtype bfloat16]
  python tools/convert_hf.py export-vision --ckpt MMJAX_DIR --out HF_DIR [--architecture SiglipVisionModel]
                                           [--dtype bfloat16]

`import-vision` reads the vision tower of a CLIPVisionModel, CLIPModel, SiglipVisionModel or
SiglipModel directory into an mmjax vision directory (model_config.json with the ViTConfig,
Orbax `params/`, see `mmjax.convert.vision`); `export-vision` writes a CLIPVisionModel or
SiglipVisionModel directory that `transformers.AutoModel.from_pretrained` loads (an adapter
in the checkpoint's `lora/` is merged).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax.convert import llama as convert_llama  # noqa: E402
from mmjax.convert import model_dir  # noqa: E402
from mmjax.convert.common import read_json  # noqa: E402
from mmjax.convert import vision as convert_vision  # noqa: E402
from mmjax.convert import vlm as convert_vlm  # noqa: E402


def _import(args) -> None:
  hf = read_json(args.hf, "config.json")
  if convert_vlm.is_vlm(hf):
    if args.peft:
      raise ValueError("--peft is supported for LLaMA-family models only")
    cfg, params = convert_vlm.import_hf_vlm(args.hf, dtype=args.dtype)
    convert_vlm.save_dir(args.out, cfg, params, hf_architecture=convert_vlm.architecture_of(hf), hf_config=hf,
                         hf_dir=args.hf)
    print(f"wrote {args.out}: {convert_vlm.architecture_of(hf)}, language model {cfg.llm.n_layers} layers, "
          f"tower {cfg.vision.n_layers} layers")
    return
  cfg, params = convert_llama.import_hf(args.hf, dtype=args.dtype)
  lora = None
  if args.peft:
    cfg, lora = convert_llama.import_peft(args.peft, cfg, params, dtype="float32")
  hf = read_json(args.hf, "config.json")
  model_dir.save(args.out, cfg, params, lora, hf_architecture=convert_llama.architecture_of(hf), hf_config=hf,
                 hf_dir=args.hf)
  print(f"wrote {args.out}: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}"
        + (", with adapter" if lora is not None else ""))


def _load_adapter(path: str, cfg, params):
  if os.path.exists(os.path.join(path, "adapter_config.json")):
    return convert_llama.import_peft(path, cfg, params)
  acfg, _, lora, _ = model_dir.load(path)
  if lora is None:
    raise ValueError(f"--adapter {path}: neither a PEFT directory (adapter_config.json) nor an mmjax "
                     f"directory with lora/")
  return dataclasses.replace(cfg, lora_alpha=acfg.lora_alpha, lora_rslora=acfg.lora_rslora), lora


# config.json keys carried over from the imported model when the architecture is unchanged.
_CARRIED = ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")


_TEXT_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _export_vlm(args) -> None:
  cfg, params, lora, meta = convert_vlm.load_dir(args.ckpt)
  if args.adapter:
    raise ValueError("--adapter is supported for LLaMA-family directories only; a VLM directory's own lora/ is used")
  hf = meta.get("hf_config") or {}
  text = hf.get("text_config") or {}
  text_arch = _TEXT_ARCHS.get(text.get("model_type"), "Qwen2ForCausalLM" if cfg.llm.qkv_bias else "LlamaForCausalLM")
  extra = {k: text[k] for k in _CARRIED if k in text}
  dtype = args.dtype or cfg.llm.param_dtype
  max_bytes = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
  convert_vlm.export_hf_vlm(args.out, cfg, params, lora if args.merge else None, text_architecture=text_arch,
                            dtype=dtype, max_shard_bytes=max_bytes, text_extra=extra)
  if lora is not None and not args.merge:
    convert_vlm.export_peft(os.path.join(args.out, "adapter"), cfg, lora, base_model_name_or_path=os.path.abspath(args.out),
                            dtype=dtype)
  _copy_hf_files(args.ckpt, args.out)
  what = "merged adapter" if lora is not None and args.merge else (
      "adapter in adapter/" if lora is not None else "no adapter")
  print(f"wrote {args.out} as {convert_vlm.architecture_for(cfg)} ({dtype}, {what})")


def _copy_hf_files(ckpt: str, out: str) -> None:
  files = os.path.join(ckpt, "hf_files")
  if os.path.isdir(files):
    for name in os.listdir(files):
      shutil.copy(os.path.join(files, name), os.path.join(out, name))


def _export(args) -> None:
  if model_dir.read_meta(args.ckpt, fmt=None).get("format") == convert_vlm.FORMAT:
    return _export_vlm(args)
  cfg, params, lora, meta = model_dir.load(args.ckpt)
  if args.adapter:
    cfg, lora = _load_adapter(args.adapter, cfg, params)
  arch = args.architecture or meta.get("hf_architecture") or (
      "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")
  hf = meta.get("hf_config") or {}
  overrides = ({k: hf[k] for k in _CARRIED if k in hf}
               if convert_llama.architecture_of(hf) == arch else {}) if hf else {}
  dtype = args.dtype or cfg.param_dtype
  max_bytes = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
  convert_llama.export_hf(args.out, cfg, params, lora, merge=args.merge, architecture=arch, dtype=dtype,
                          max_shard_bytes=max_bytes, config_overrides=overrides)
  _copy_hf_files(args.ckpt, args.out)
  what = "merged adapter" if lora is not None and args.merge else (
      "adapter in adapter/" if lora is not None else "no adapter")
  print(f"wrote {args.out} as {arch} ({dtype}, {what})")


def _import_vision(args) -> None:
  cfg, params = convert_vision.import_hf_vision(args.hf, dtype=args.dtype)
  hf = read_json(args.hf, "config.json")
  arch = convert_vision.architecture_of(hf)
  convert_vision.save_dir(args.out, cfg, params, hf_architecture=arch, hf_config=hf)
  print(f"wrote {args.out}: {arch} vision tower, {cfg.n_layers} layers, d_model {cfg.d_model}")


def _export_vision(args) -> None:
  cfg, params, lora, meta = convert_vision.load_dir(args.ckpt)
  arch = args.architecture or {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}[
      convert_vision.family_of(cfg)]
  dtype = args.dtype or cfg.param_dtype
  convert_vision.export_hf_vision(args.out, cfg, params, lora, merge=True, architecture=arch, dtype=dtype)
  print(f"wrote {args.out} as {arch} ({dtype}" + (", merged adapter)" if lora is not None else ")"))


def main(argv=None) -> int:
  head, _, rest = __doc__.partition("\n\n")
  parser = argparse.ArgumentParser(description=head, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="Hugging Face directory -> mmjax model directory")
  imp.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
  imp.add_argument("--out", required=True, help="mmjax model directory to write")
  imp.add_argument("--peft", default="", help="optional PEFT LoRA directory to import as lora/")
  imp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="parameter (and compute) dtype")
  exp = sub.add_parser("export", help="mmjax model directory -> Hugging Face directory")
  exp.add_argument("--ckpt", required=True, help="mmjax model directory")
  exp.add_argument("--out", required=True, help="HF model directory to write")
  exp.add_argument("--adapter", default="", help="adapter: mmjax directory with lora/, or a PEFT directory")
  exp.add_argument("--merge", action="store_true", help="fold the adapter into the weights")
  exp.add_argument("--architecture", default="", choices=("",) + tuple(convert_llama.ARCHITECTURES),
                   help="HF class to write (default: the imported one)")
  exp.add_argument("--dtype", default="", choices=("", "float32", "bfloat16", "float16"),
                   help="safetensors dtype (default: the checkpoint's param dtype)")
  exp.add_argument("--max-shard-mb", type=float, default=0, help="shard files past this size (0 = one file)")
  imv = sub.add_parser("import-vision", help="Hugging Face CLIP / SigLIP directory -> mmjax vision directory")
  imv.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
  imv.add_argument("--out", required=True, help="mmjax vision directory to write")
  imv.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="parameter (and compute) dtype")
  exv = sub.add_parser("export-vision", help="mmjax vision directory -> Hugging Face vision model directory")
  exv.add_argument("--ckpt", required=True, help="mmjax vision directory")
  exv.add_argument("--out", required=True, help="HF model directory to write")
  exv.add_argument("--architecture", default="", choices=("",) + convert_vision.EXPORT_ARCHITECTURES,
                   help="HF class to write (default: from the tower's layout)")
  exv.add_argument("--dtype", default="", choices=("", "float32", "bfloat16", "float16"),
                   help="safetensors dtype (default: the checkpoint's param dtype)")
  args = parser.parse_args(argv)
  commands = {"import": _import, "export": _export, "import-vision": _import_vision,
              "export-vision": _export_vision}
  try:
    commands[args.command](args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
