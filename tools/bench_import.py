"""Import benchmark: a randomly initialised LLaVA checkpoint of about 2 GB read into mmjax.

  python tools/bench_import.py [--dir /tmp/mmjax_bench_llava] [--dtype bfloat16] [--layers 12]

Writes (once) a LlavaForConditionalGeneration directory with random weights, tensor by tensor
(a CLIP ViT-L/14-336 tower, a LLaMA of width 2048 and `--layers` layers, vocabulary 32064:
about 1.05B parameters, 2.1 GB in bf16), then, in a fresh process, times
`mmjax.convert.vlm.import_hf_vlm` and reads the process's resident memory: its baseline
after JAX starts, after the import (the imported weights live in host memory on a CPU
backend), and the peak. The transient memory of the import is peak - baseline - the bytes
of the imported weights; the target is under 1.5 x the largest tensor + 200 MB (tensors are
streamed into place, never the whole checkpoint at once).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def write_checkpoint(path: str, dtype: str, layers: int) -> None:
  import numpy as np
  from mmjax.convert import vlm as convert_vlm
  from mmjax.convert import safetensors_io as stio
  from mmjax.files import atomic_write
  from mmjax.models.llama import LlamaConfig
  from mmjax.models.vit import CLIP_LAYOUT, ViTConfig
  from mmjax.models.vlm import VLMConfig
  vision = ViTConfig(**CLIP_LAYOUT, image_size=336, patch_size=14, d_model=1024, n_layers=24, n_heads=16, head_dim=64,
                     mlp_dim=4096, mlp="standard", layer_scale=None, attn_bias=True, mlp_bias=True)
  llm = LlamaConfig(vocab_size=32064, d_model=2048, n_layers=layers, n_heads=16, n_kv_heads=16, head_dim=128,
                    mlp_dim=5632)
  cfg = VLMConfig(vision=vision, llm=llm, projector="mlp2", image_token_id=32000, max_frames=0,
                  temporal_embedding=False, feature_layer=-2)
  rng = np.random.default_rng(0)
  np_dt = stio.np_dtype(dtype)
  entries = [stio.Entry(t.name, t.hf_shape, np_dt,
                        lambda t=t: (0.02 * rng.standard_normal(t.hf_shape, np.float32)).astype(np_dt))
             for t in convert_vlm.tensor_plan(cfg)]
  stio.write_dir(path, sorted(entries))
  atomic_write(os.path.join(path, "config.json"), json.dumps(convert_vlm.hf_vlm_config(cfg, dtype=dtype)))


def measure(path: str, dtype: str) -> dict:
  import jax
  import numpy as np
  from mmjax.convert import safetensors_io as stio
  from mmjax.convert import vlm as convert_vlm
  jax.devices()
  jax.numpy.zeros(1).block_until_ready()
  base = _rss_mb()
  with stio.open_dir(path) as reader:
    sizes = {n: int(np.prod(i.shape)) * stio.np_dtype(dtype).itemsize for n, i in reader.tensors.items()}
  t0 = time.perf_counter()
  _, params = convert_vlm.import_hf_vlm(path, dtype=dtype)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - t0
  after = _rss_mb()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  total = sum(sizes.values()) / 2**20
  largest = max(sizes.values()) / 2**20
  transient = peak - base - total
  return dict(seconds=round(seconds, 2), checkpoint_mb=round(total, 1), largest_tensor_mb=round(largest, 1),
              n_tensors=len(sizes), rss_baseline_mb=round(base, 1), rss_after_mb=round(after, 1),
              rss_peak_mb=round(peak, 1), transient_mb=round(transient, 1),
              target_mb=round(1.5 * largest + 200, 1), met=bool(transient < 1.5 * largest + 200))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dir", default="/tmp/mmjax_bench_llava")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the fresh child process
  args = p.parse_args(argv)
  if args.measure:
    print(json.dumps(measure(args.dir, args.dtype)))
    return 0
  if not os.path.exists(os.path.join(args.dir, "config.json")):
    t0 = time.perf_counter()
    write_checkpoint(args.dir, args.dtype, args.layers)
    print(f"wrote {args.dir} in {time.perf_counter() - t0:.1f}s", flush=True)
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  out = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--dtype", args.dtype, "--measure"],
                       capture_output=True, text=True, env=env)
  if out.returncode:
    print(out.stderr[-3000:], file=sys.stderr)
    return out.returncode
  r = json.loads(out.stdout.strip().splitlines()[-1])
  print(json.dumps(r, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
