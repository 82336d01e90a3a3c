"""Error-driven data selection on shapes: evaluate a student, find its missing skills from the
first wrong step of its answers, retrieve targeted pool samples, fine-tune; against random
samples of the same size and the whole pool.

  python -m mmjax.main --config configs/shapes_errordriven.py --workdir /tmp/mmjax_errordriven
  python tools/seeds.py --config configs/shapes_errordriven.py --seeds 3 --workdir /tmp/errordriven_seeds

The target task is answering colour, shape and size questions about images of 1-3 objects,
in two steps: find the object, then read the asked attribute ("what colour is the large
square?" -> "the large square is at the top left. the colour is red."). It is scored by the
final answer alone (gen_answer_match, the headline) and by the whole answer (gen_exact_match).

The pool (`pool` records, train split) is task-agnostic: mostly plain count and existence
questions ("how many objects are there?", "is there an object at the top?"), with the target's
kinds only a rare `rare` share (5%: 262 of 5000), every record tagged with the skills its
question exercises (`shapes.question_skills`). Stages (a recipe, mmjax/recipes/stages.py;
selection in mmjax/recipes/select.py):

  student     all weights of a random ViT + projector + LLaMA trained 300 steps on a generic mix
              of captions (which name every colour, shape and size) and questions, the target's
              kinds being only `student_target` (1%) of them: it answers in steps, often wrongly;
  errors_B    from `student`, per budget B (`fractions` of the pool: 0.6, 1.8 and 6%, the
              paper's): the student answers `val` validation questions (held-out, disjoint from
              the test questions and from the pool); the teacher marks each wrong answer's first
              wrong step and the skill it needs (teacher=facts: exact, from the image's objects;
              teacher=model: the first step where the student leaves a longer-trained
              checkpoint's own answer) and the gap profile sums them; B pool records are
              retrieved by the profile over the skill tags (each skill's share of B drawn from
              the records tagged with it, in a seeded random order, or with rank=coverage the
              records that exercise more of the profile first; mix > 0 retrieves that share by
              similarity of the student's vision features to the failed images instead); a
              fresh LoRA adapter trains on them;
  random_B    the same with B pool records drawn at random;
  full        the same on the whole pool.
Each selection trains `epochs` passes over its records (at least `min_steps` steps), so every
budget is trained to the same number of passes rather than the same steps; all are scored on
the same `eval` held-out questions. Selections go to stages/NAME/selection.json (with the
profile, the first wrong steps and the share of selected records on a missing skill); the
table (and results.json, loss_curves.png) compares the methods per budget, the student being
the `@start` row. The table is marked INVALID unless the full pool beats the student by 0.15
(`config.headroom`).

Args: scale (multiplies the student's steps and min_steps; scale=0.02 for a smoke test),
fractions (dash-separated percents of the pool), budgets (explicit dash-separated counts,
overriding fractions), pool (pool size), rare (target-kind share of the pool), val
(validation questions), epochs and min_steps (training per selection), eval (test
questions), student_target (target-kind share of the student's questions), mix (share
retrieved by image features), rank (random | coverage: the order of each skill's tagged pool
records, `select.rank`), teacher (facts | model), seed (the run seed and the generated
train/eval sets; `tools/seeds.py` runs several).
"""
import ml_collections

from mmjax.config import core, schema

ALL_PROJECTIONS = r".*(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2|linear_1|linear_2)"
TARGET_SKILLS = ("colour", "shape", "size")
POOL_SKILLS = ("count", "existence")
GENERIC_SKILLS = ("count", "position", "existence")


def rare_weight(share: float, common: int = 2, rare: int = 3) -> float:
  """The qa weight of each of `rare` question kinds beside `common` kinds of weight 1 so that
  the rare kinds make up `share` of the questions."""
  return share * common / (rare * (1 - share))


def budgets_of(pool: int, fractions: str, budgets: str) -> list[int]:
  """Explicit dash-separated `budgets`, else round(pool * f / 100) for each percent f."""
  if budgets:
    return [int(b) for b in str(budgets).split("-") if b]
  return [max(1, round(pool * float(f) / 100)) for f in str(fractions).split("-") if f]


def get_config(arg=None):
  args = core.parse_arg(arg, scale=1.0, fractions="0.6-1.8-6", budgets="", pool=5000, rare=0.05, val=128,
                        epochs=10.0, min_steps=40, eval=1000, student_steps=300, student_target=0.01, mix=0.0,
                        rank="random", teacher="facts", seed=0)
  budgets = budgets_of(args.pool, args.fractions, args.budgets)
  c = schema.base_config()
  c.model.update(name="vlm", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=352)
  c.vision.update(image_size=48, patch_size=16, d_model=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=128)
  c.vlm.update(projector="mlp2", max_frames=4, temporal_pool=1)
  c.data.update(source="shapes", task="vqa", qa_skills=TARGET_SKILLS, qa_reasoning=TARGET_SKILLS,
                tokenizer="builtin_words", image_size=48, max_objects=3, num_train_examples=50_000,
                num_eval_examples=args.eval + 2 * args.val)  # the test questions, then the validation ones
  c.seq_len = 48
  c.batch_size = 16
  c.eval_batch_size = 64
  c.eval_every = 0
  c.log_every = 25
  c.checkpoint_every = 200
  c.sample_eval.update(num_examples=args.eval, max_new_tokens=20, show=2)
  c.optimizer.update(warmup_steps=10, schedule="cosine", clip_norm=1.0, lr=1e-3)
  c.lora.update(targets=ALL_PROJECTIONS, rank=16, alpha=32.0)
  w = rare_weight(args.rare)
  c.select.update(budget=budgets[0], val_examples=args.val, teacher=args.teacher, mix=args.mix, rank=args.rank,
                  epochs=args.epochs, min_steps=max(int(args.min_steps * args.scale), 2),
                  pool=dict(task="pool", pool_mix=(("vqa", 1.0),), qa_skills=POOL_SKILLS + TARGET_SKILLS,
                            qa_weights=(1.0, 1.0) + (w,) * len(TARGET_SKILLS), qa_plain=True,
                            num_train_examples=args.pool))
  steps = lambda n: max(int(n * args.scale), 2)
  # The student's generic mix: captions (which name every colour, shape and size) and questions,
  # of which the target's kinds are only `student_target` (so it has seen the stepped answers,
  # but little of the target task).
  generic = dict(task="pool", pool_mix=(("image_caption", 1.0), ("vqa", 3.0)),
                 qa_skills=GENERIC_SKILLS + TARGET_SKILLS,
                 qa_weights=(1.0,) * len(GENERIC_SKILLS) + (rare_weight(args.student_target, len(GENERIC_SKILLS)),) * 3)
  stages = {"student": dict(steps=steps(args.student_steps), batch_size=32, trainable=("params/.*",),
                            lora=dict(targets=""),
                            groups=dict(generic=dict(trainable=("params/.*",), data=generic)))}
  order = ["student"]
  if args.teacher == "model":  # a longer-trained checkpoint of the same model is the teacher
    stages["teacher"] = dict(stages["student"], steps=steps(900), init_from_stage="student")
    order.append("teacher")
  tune = dict(init_from_stage="student", trainable=("lora/.*",))
  for b in budgets:
    stages[f"errors_{b}"] = dict(tune, select=dict(method="errors", budget=b, teacher_stage="teacher"
                                                   if args.teacher == "model" else ""))
    stages[f"random_{b}"] = dict(tune, select=dict(method="random", budget=b))
    order += [f"errors_{b}", f"random_{b}"]
  stages["full"] = dict(tune, select=dict(method="all"))
  order.append("full")
  c.stage_order = tuple(order)
  c.stages = ml_collections.ConfigDict(stages)
  # Valid only if the whole pool can teach the target: the full-pool stage must beat the student
  # by 0.15 in final-answer accuracy, or the table is marked INVALID (no room for selections to differ).
  c.headroom.update(metric="gen_answer_match", floor="student", ceiling="full", min=0.15)
  core.apply_seed(c, args.seed)
  return c
