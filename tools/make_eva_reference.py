"""Writes the timm reference outputs the EVA tower tests compare with (tests/data/eva/).

  python tools/make_eva_reference.py [--out tests/data/eva]

Run it where timm imports (timm needs torchvision, which does not load beside the CPU build
of torch the test extra pins, so CI cannot run timm itself): e.g. a fresh virtualenv with
`pip install timm safetensors numpy`. For each tiny EVA variant below it builds the timm
model with random weights (seeded; biases, norms and layer scales perturbed so every
tensor matters), and saves a directory as timm's hub layout has it: config.json
({"architecture", "model_args"}) and model.safetensors (timm's state dict), plus
reference.npz with input images [N, H, W, C] and timm's `forward_features` tokens and
pre-logits pooled features in float32. `tests/test_eva.py` reads the directories with
`mmjax.convert.eva` and checks mmjax's tower against these outputs to 1e-4.
"""
from __future__ import annotations

import argparse
import json
import os

VARIANTS = {
    # EVA-02-CLIP layout: separate q/k/v, SwiGLU with sub-LN, attention sub-LN, 2-D RoPE, token pool, layer scale
    "eva02_clip": ("eva02_base_patch16_clip_224", dict(img_size=28, patch_size=7, embed_dim=48, depth=2, num_heads=4,
                                                       init_values=0.1)),
    # EVA-02 (MIM) layout: fused qkv, fused SwiGLU fc1 without sub-LN, 2-D RoPE, average pool + fc_norm
    "eva02_mim": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7, embed_dim=48, depth=2, num_heads=4)),
    # EVA-CLIP g layout: fused qkv, GELU MLP of ratio 6144 / 1408, no RoPE, token pool
    "eva_g_clip": ("eva_giant_patch14_clip_224", dict(img_size=28, patch_size=7, embed_dim=40, depth=2, num_heads=4)),
}


def main(argv=None) -> int:
  import numpy as np
  import timm
  import torch
  from safetensors.torch import save_file

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                               "tests", "data", "eva"))
  args = p.parse_args(argv)
  for i, (name, (arch, model_args)) in enumerate(VARIANTS.items()):
    torch.manual_seed(i)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **model_args).eval()
    with torch.no_grad():
      for n, t in model.named_parameters():
        t.add_(0.05 * torch.randn_like(t))  # biases, norms and layer scales away from their init
    out = os.path.join(args.out, name)
    os.makedirs(out, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    json.dump({"architecture": arch, "model_args": model_args, "num_classes": 0}, open(os.path.join(out, "config.json"), "w"),
              indent=1)
    images = np.random.default_rng(i).normal(size=(2, model_args["img_size"], model_args["img_size"], 3)).astype(np.float32)
    with torch.no_grad():
      x = torch.tensor(images.transpose(0, 3, 1, 2))
      tokens = model.forward_features(x)
      pooled = model.forward_head(tokens, pre_logits=True)
    np.savez(os.path.join(out, "reference.npz"), images=images, tokens=tokens.numpy().astype(np.float32),
             pooled=pooled.numpy().astype(np.float32), timm_version=np.array(timm.__version__))
    print(f"wrote {out}: {arch} {model_args}, tokens {tuple(tokens.shape)}, pooled {tuple(pooled.shape)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
