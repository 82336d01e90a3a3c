"""Multi-round DPO on shapes video captions (video-SALMONN 2): SFT -> R online DPO rounds with a
rolling reference and a ground-truth term -> rebirth, with the controls that tell its effect
apart from more training.

  python -m mmjax.main --config configs/shapes_mrdpo.py --workdir /tmp/mmjax_mrdpo
  python tools/seeds.py --config configs/shapes_mrdpo.py --seeds 3 --workdir /tmp/mrdpo_seeds
  python tools/mrdpo_report.py --workdir /tmp/mrdpo_seeds

The data: 4-frame shapes videos in which objects appear, move and disappear (up to 3 events),
with three tasks mixed equally (`data.task='pool'`):
  global caption  "describe the video." -> "first a red circle appears at the top left, then ..."
  local caption   "describe the video from frame 2 to frame 4." -> the caption of that
                  interval's events alone
  video QA        "where does the red circle appear?" -> "top left" (count, colour, position,
                  existence): the non-captioning ability DPO on captions may erode
Every stage is scored on the first `eval` held-out videos of that mix: the global error
`error` = missing + hallucinated events over true events (per caption; `micro_error` over
all captions; `error_se` its standard error), `local_error` the same on local captions,
`repetition` / `local_repetition` (repeated clauses), exact match, and `qa_exact_match`
(with `qa_se`) on the questions.

Stages (a recipe, mmjax/recipes/stages.py; every LoRA stage trains a rank-16 adapter on all
projections with batch 8):
  sft         all weights of a random ViT + projector + LLaMA learn the three tasks
              (`sft_steps`), short of convergence, so captions still miss and invent events;
  dpo_1..R    one online DPO round each (`rounds`): the round's policy (the previous round
              merged) samples `cands` captions at `temperature` for `prompts` train caption
              prompts (global and local: `dpo.prompt_data`), scored by `shapes_caption`
              (missing + hallucination + repetition over the caption's own events); best vs
              worst become a pair when their scores differ by more than `min_gap`; a fresh
              adapter trains `dpo_steps` steps with the sigmoid loss plus the ground-truth
              term (`gt`: an SFT term on each pair's ground-truth caption, as video-SALMONN 2
              stabilises its rounds; TRL's `rpo_alpha` has the same form but applies it to
              the chosen response). The reference is the policy without its adapter: the
              merged previous round (the LoRA proxy of a rolling reference).
  rebirth     from `sft`, a fresh adapter trains `rebirth_steps` steps on dpo_R's greedy
              captions of `distill` train caption prompts (SFT of the pre-DPO model on the
              DPO model's own outputs); `rebirth_filtered` keeps only the captions the
              scorer rates at most `filter_max` (0: no missing, invented or repeated event).
Controls and ablations (`controls=True`), each on the same steps (R x dpo_steps of training
after sft, batch 8):
  cont_sft    continued SFT: the ground-truth term alone, LoRA on the train captions
              (global and local) for R x dpo_steps steps, from sft;
  long        one long round: R x prompts prompts sampled once from sft, R x dpo_steps steps,
              no reference update;
  fixed_1..R  the same rounds without the LoRA proxy: one adapter trained on across rounds
              (`continue_adapter`), the reference updated to the previous round's policy
              (its log-probs precomputed with the pairs);
  gt0_1..R    the rounds with ground-truth weight 0.
Stop rule (`stop=True`; off by default, `mmjax.recipes.stop`): after sft and after each round,
the model answers `val` validation videos (held-out videos after the test ones, none equal to a
test record); the first round whose video QA accuracy on them is more than `margin` below
sft's is rejected and ends the rounds, its result and the later rounds' being the policy it
started from (so rebirth distils the kept policy); the table's `validation` column has the
values and the line under it what the rule decided. The controls run all their rounds.
The table (results.txt / results.json / loss_curves.png) has every stage with its pairs per
round (`pairs`) and its first DPO loss (log 2: policy = reference); `tools/mrdpo_report.py`
checks the paper's claims per seed and as mean ± sd over a `tools/seeds.py` run.

Args: scale (multiplies step and prompt counts; scale=0.02 for a smoke test), rounds (R),
eval (held-out videos, a third of each task), prompts (per round), cands (per prompt),
temperature, min_gap, dpo_steps (per round), gt (ground-truth weight), sft_steps,
rebirth_steps, distill (rebirth prompts), filter_max, controls (add the controls), stop, margin, val
(the stop rule and its validation videos), lr_decay (round r trains at 5e-4 x lr_decay^(r-1), in
the fixed_ and gt0_ rounds too, and cont_sft and long step down the same way every K steps;
1 = every round at 5e-4), scorer (the rounds' pair scorer: `shapes_caption`, or
`shapes_caption_recall`, which counts missing events twice; filtered rebirth keeps
`shapes_caption`), pair_length and length_tolerance (`matched`: each pair is the two
candidates of similar length, word counts within length_tolerance of the longer one's, whose
scores differ most, so no pair rewards a shorter caption for its length; `any`: best vs worst),
rejected (`worst`: the worst candidate; `greedy`: the round's policy's own greedy caption, paired
with the best candidate when that one scores better, so the pairs push down what the policy
says rather than rare samples), fresh (the rounds' prompts, the long round's and continued SFT's
captions come from another generated train set, split_seed = seed + 1000: videos of the same
distribution that SFT never trained on; False: SFT's own train videos),
seed (the run seed and the generated train / eval sets).
"""
import ml_collections

from mmjax.config import core, schema

ALL_PROJECTIONS = r".*(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2|linear_1|linear_2)"
FRESH = 1000  # fresh=True: the prompts' train set is data.split_seed seed + FRESH
TASKS = (("video_caption", 1.0), ("video_local_caption", 1.0), ("video_qa", 1.0))
CAPTIONS = (("video_caption", 1.0), ("video_local_caption", 1.0))


def get_config(arg=None):
  args = core.parse_arg(arg, scale=1.0, rounds=3, eval=3000, prompts=256, cands=6, temperature=1.0, min_gap=0.0,
                        dpo_steps=60, gt=1.0, sft_steps=1500, rebirth_steps=120, distill=512, filter_max=0.0, controls=True,
                        stop=False, margin=0.02, val=1500, lr_decay=1.0, scorer="shapes_caption",
                        pair_length="any", length_tolerance=0.1, rejected="worst", fresh=False, seed=0)
  if not 0 < args.lr_decay <= 1:
    raise core.ConfigError(f"config arg lr_decay={args.lr_decay!r} is not valid; it multiplies each later round's "
                           "learning rate and must lie in (0, 1]")
  # the rounds' prompts (and continued SFT's captions): the train videos SFT learnt, or (fresh) another
  # generated train set of the same distribution, videos SFT never saw
  captions = dict(pool_mix=CAPTIONS, **(dict(split_seed=args.seed + FRESH) if args.fresh else {}))
  c = schema.base_config()
  c.model.update(name="vlm", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=352)
  c.vision.update(image_size=48, patch_size=16, d_model=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=128)
  c.vlm.update(projector="mlp2", max_frames=4, temporal_pool=1)
  c.data.update(source="shapes", task="pool", pool_mix=TASKS, tokenizer="builtin_words", image_size=48,
                max_objects=2, video_frames=4, max_events=3, num_train_examples=20_000, num_eval_examples=args.eval)
  c.seq_len = 96  # 4 frames x 9 visual tokens + prompt + up to 3 clauses
  c.batch_size = 8
  c.eval_batch_size = 64
  c.eval_every = 0
  c.eval_at_start = False  # every stage starts where another stage's evaluation ended (sft: a random init)
  c.log_every = 20
  c.checkpoint_every = 100
  c.sample_eval.update(num_examples=args.eval, max_new_tokens=48, show=2)
  c.optimizer.update(warmup_steps=10, schedule="cosine", clip_norm=1.0)
  c.lora.update(targets=ALL_PROJECTIONS, rank=16, alpha=32.0)
  steps = lambda n: max(int(n * args.scale), 2)
  count = lambda n: max(int(n * args.scale), 8)
  K, R = steps(args.dpo_steps), args.rounds
  c.dpo.update(beta=0.1, loss_type="sigmoid", gt_weight=args.gt, reference="adapter_base", online=True,
               num_prompts=count(args.prompts), num_candidates=args.cands, temperature=args.temperature,
               min_score_gap=args.min_gap, max_new_tokens=48, scorer=args.scorer,
               pair_length=args.pair_length, length_tolerance=args.length_tolerance, rejected=args.rejected,
               prompt_data=captions)
  lora_stage = dict(lora=dict(targets=ALL_PROJECTIONS), trainable=("lora/.*",))
  dpo_round = dict(lora_stage, objective="dpo", steps=K, optimizer=dict(lr=5e-4, warmup_steps=0, schedule="constant"))
  at_round = lambda r: dict(dpo_round, optimizer=dict(dpo_round["optimizer"], lr=5e-4 * args.lr_decay ** r))  # r from 0
  stages = {
      "sft": dict(steps=steps(args.sft_steps), batch_size=32, trainable=("params/.*",), lora=dict(targets=""),
                  eval_at_start=False, optimizer=dict(lr=1e-3, warmup_steps=20)),
  }
  rounds = [f"dpo_{r}" for r in range(1, R + 1)]
  for r, name in enumerate(rounds):
    stages[name] = at_round(r)
  rebirth = dict(lora_stage, steps=steps(args.rebirth_steps), init_from_stage="sft", distill_from_stage=rounds[-1],
                 distill_examples=count(args.distill), distill_data=dict(pool_mix=CAPTIONS),
                 optimizer=dict(lr=1e-3, warmup_steps=5))
  stages["rebirth"] = rebirth
  stages["rebirth_filtered"] = dict(rebirth, distill_scorer="shapes_caption", distill_max_score=args.filter_max)
  order = ["sft", *rounds, "rebirth", "rebirth_filtered"]
  if args.controls:
    # the controls follow the rounds' learning rates: 5e-4, times lr_decay every K steps
    profile = dict(lr=5e-4, warmup_steps=0, **(dict(schedule="step", step_every=K, step_rate=args.lr_decay)
                                               if args.lr_decay < 1 else dict(schedule="constant")))
    stages["cont_sft"] = dict(lora_stage, steps=R * K, init_from_stage="sft",
                              groups=dict(captions=dict(trainable=("lora/.*",), data=captions)),
                              optimizer=profile)
    stages["long"] = dict(dpo_round, steps=R * K, init_from_stage="sft", dpo=dict(num_prompts=R * count(args.prompts)),
                          optimizer=profile)
    fixed = [f"fixed_{r}" for r in range(1, R + 1)]
    for r, name in enumerate(fixed):
      stages[name] = dict(at_round(r), dpo=dict(reference="precomputed"),
                          **(dict(init_from_stage="sft") if r == 0 else dict(continue_adapter=True)))
    gt0 = [f"gt0_{r}" for r in range(1, R + 1)]
    for r, name in enumerate(gt0):
      stages[name] = dict(at_round(r), dpo=dict(gt_weight=0.0), **(dict(init_from_stage="sft") if r == 0 else {}))
    order += ["cont_sft", "long", *fixed, *gt0]
  if args.stop:  # the stop rule: validation videos after the test ones (a quarter more, in case any equals one)
    val = args.val
    c.stop.update(stages=tuple(rounds), baseline="sft", metric="qa_exact_match", margin=args.margin, val_examples=val)
    c.data.num_eval_examples = args.eval + val + max(val // 4, 8)
  c.stage_order = tuple(order)
  c.stages = ml_collections.ConfigDict(stages)
  core.apply_seed(c, args.seed)
  return c
