"""Multi-round DPO on shapes image captions: SFT -> R online DPO rounds -> rebirth SFT.

  python -m mmjax.main --config configs/shapes_mrdpo.py --workdir /tmp/mmjax_mrdpo

Stages (a recipe, mmjax/recipes/stages.py), with the tiny VLM of configs/shapes_vlm.py:
  sft        all weights of a random ViT + projector + LLaMA learn to caption shapes images
             ("a large red circle at the top left. ..."), briefly, so captions still miss
             and invent objects;
  dpo_1..R   one DPO round each: at the start, the round's policy (the previous stage with
             its adapter merged in) samples `cands` captions for `prompts` train images;
             each is scored by atomic facts (missing + hallucination + repetition), the
             best and worst per image become a pair (ties skipped), written once to
             stages/dpo_r/pairs.jsonl; then a fresh LoRA adapter trains on the pairs with
             the sigmoid loss plus a ground-truth SFT term (dpo.gt_weight). The reference
             is the policy without its adapter (adapter_base), i.e. the merged previous
             round, so each round's first-step DPO loss is log 2;
  rebirth    SFT from the `sft` weights (fresh adapter) on the final DPO policy's own greedy
             captions of `distill` train images (generated once, stages/rebirth/distill.jsonl).
After every stage, greedy captions of held-out images are scored (exact match, missing,
hallucination, repetition); the recipe prints a table per stage (with each round's
first-step DPO loss), and writes results.json and loss_curves.png in the workdir.

Args: scale (multiplies step counts and prompt counts; scale=0.05 for a smoke test),
rounds (R), eval (held-out images captioned per evaluation), prompts (per round),
cands (candidates per prompt), temperature (candidate sampling), dpo_steps (per round),
distill (rebirth prompts),
seed (the run seed and the generated train/eval sets; `tools/seeds.py` runs several seeds).
"""
import ml_collections

from mmjax.config import core, schema

ALL_PROJECTIONS = r".*(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2|linear_1|linear_2)"


def get_config(arg=None):
  args = core.parse_arg(arg, scale=1.0, rounds=3, eval=256, prompts=256, cands=4, distill=128, dpo_steps=60,
                              temperature=0.8, seed=0)
  c = schema.base_config()
  c.model.update(name="vlm", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=352)
  c.vision.update(image_size=48, patch_size=16, d_model=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=128)
  c.vlm.update(projector="mlp2", max_frames=4, temporal_pool=1)
  c.data.update(source="shapes", task="image_caption", tokenizer="builtin_words", image_size=48, max_objects=2,
                num_train_examples=20_000, num_eval_examples=max(64, args.eval))
  c.seq_len = 48  # 9 visual tokens + prompt + a caption of two objects (one token per word)
  c.batch_size = 16
  c.eval_batch_size = 32
  c.eval_every = 0
  c.log_every = 10
  c.checkpoint_every = 25
  c.sample_eval.update(num_examples=args.eval, max_new_tokens=32, show=2)
  c.optimizer.update(warmup_steps=10, schedule="cosine", clip_norm=1.0)
  steps = lambda n: max(int(n * args.scale), 2)
  count = lambda n: max(int(n * args.scale), 8)
  lora = dict(targets=ALL_PROJECTIONS, rank=16, alpha=32.0)
  c.dpo.update(beta=0.1, loss_type="sigmoid", gt_weight=1.0, reference="adapter_base", online=True,
               num_prompts=count(args.prompts), num_candidates=args.cands, temperature=args.temperature,
               max_new_tokens=32, scorer="shapes_caption")
  c.distill_examples = count(args.distill)
  rounds = [f"dpo_{r}" for r in range(1, args.rounds + 1)]
  c.stage_order = ("sft", *rounds, "rebirth")
  c.stages = ml_collections.ConfigDict({
      "sft": dict(steps=steps(200), batch_size=32, trainable=("params/.*",), lora=dict(targets=""),
                  optimizer=dict(lr=1e-3, warmup_steps=20)),
      "rebirth": dict(steps=steps(40), init_from_stage="sft", distill_from_stage=rounds[-1], lora=lora,
                      optimizer=dict(lr=1e-3, warmup_steps=2)),
  })
  for name in rounds:
    c.stages[name] = ml_collections.ConfigDict(dict(
        objective="dpo", steps=steps(args.dpo_steps), batch_size=8, lora=lora, trainable=("lora/.*",),
        optimizer=dict(lr=5e-4, warmup_steps=0, schedule="constant")))
  core.apply_seed(c, args.seed)
  return c
