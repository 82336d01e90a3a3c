"""Multi-round DPO of LLaVA-1.5-7B with online pairs and a rolling reference, then rebirth SFT,
on one 8-GPU node (bf16, FSDP over 8).

  python -m mmjax.main --config configs/llava_mrdpo.py:hf=/models/llava-1.5-7b-hf,data=/data/detail_prompts.json,eval=/data/detail_val.json \\
      --workdir /ckpt/llava_mrdpo

Stages (a recipe, mmjax/recipes/stages.py):
  dpo_1..R   one DPO round each: at its start the round's policy (LLaVA-1.5 for the first,
             then the previous round with its adapter merged in) samples `cands` answers
             for `prompts` train records (images with a conversation whose last turn is the
             reference answer), a scorer ranks them against the reference (`scorer`), the
             best and the worst become a pair (mmjax/recipes/pairs.py); a fresh LoRA adapter
             on the language model then trains on the pairs with the sigmoid loss and an SFT
             term on the reference answer (dpo.gt_weight), the reference being the policy
             without its adapter (so each round's first DPO loss is log 2);
  rebirth    SFT of the starting model (init_from_stage='init', LLaVA-1.5 itself) with a fresh
             adapter on the final policy's own answers to `distill` train prompts.
Held-out records are answered greedily after every stage (exact match against the
reference); the table goes to results.txt, the last stage's model to WORKDIR/model
(`tools/convert_hf.py export --ckpt WORKDIR/model --out DIR --merge` writes LLaVA back).

Data: LLaVA-format `.json` lists or `.jsonl` files with an image and `conversations`
(paths relative to `media_root`, else to the data file). The model directory is the
Hugging Face `LlavaForConditionalGeneration` checkpoint; its tokenizer and CLIP
`preprocessor_config.json` (336 px, 576 image tokens) are used as they are.

Args: hf, data, eval, media_root, rounds, prompts (per round), cands (per prompt), dpo_steps
(per round), distill, rebirth_steps, batch (pairs / rows per step), seq_len, scorer
(edit_distance | exact_match), dtype, fsdp.
"""
import ml_collections

from mmjax.config import core, schema

LLM = r"llm/layers_\d+/(attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))"


def get_config(arg=None):
  args = core.parse_arg(arg, hf="", data="", eval="", media_root="", rounds=3, prompts=512, cands=4, dpo_steps=200,
                        distill=1024, rebirth_steps=300, batch=16, seq_len=1024, scorer="edit_distance",
                        dtype="bfloat16", fsdp=8)
  c = schema.base_config()
  c.model.update(name="vlm", dtype=args.dtype, param_dtype=args.dtype, remat="full" if args.dtype == "bfloat16"
                 else "none", logits_chunk=1024)  # the loss's fp32 logits 1024 positions at a time
  c.vision.update(dtype=args.dtype, param_dtype=args.dtype)
  c.init_from_hf = args.hf
  c.data.update(source="jsonl", train_path=args.data, eval_path=args.eval, tokenizer=args.hf, image_processor=args.hf,
                image_size=336, media_root=args.media_root)
  c.seq_len = args.seq_len  # 576 image tokens + the conversation
  c.batch_size = args.batch
  c.eval_batch_size = max(8, args.fsdp)
  c.eval_every = 0
  c.log_every = 10
  c.checkpoint_every = 100
  c.sample_eval.update(num_examples=256, max_new_tokens=256, show=2)
  c.lora.update(targets=LLM, rank=16, alpha=32.0)
  c.trainable = ("lora/.*",)
  c.dpo.update(beta=0.1, loss_type="sigmoid", gt_weight=1.0, reference="adapter_base", online=True,
               num_prompts=args.prompts, num_candidates=args.cands, temperature=0.8, max_new_tokens=256,
               scorer=args.scorer)
  c.distill_examples = args.distill
  c.mesh.update(data=1, fsdp=args.fsdp, tensor=1)
  c.reuse_host_memory = False  # a GPU host
  rounds = [f"dpo_{r}" for r in range(1, args.rounds + 1)]
  c.stage_order = (*rounds, "rebirth")
  c.stages = ml_collections.ConfigDict({
      "rebirth": dict(steps=args.rebirth_steps, init_from_stage="init", distill_from_stage=rounds[-1],
                      optimizer=dict(lr=1e-4, warmup_steps=20)),
  })
  for name in rounds:
    c.stages[name] = ml_collections.ConfigDict(dict(
        objective="dpo", steps=args.dpo_steps, optimizer=dict(lr=2e-5, warmup_steps=10, schedule="constant")))
  return c
