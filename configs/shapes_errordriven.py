"""Error-driven data selection on shapes: evaluate a student, find its missing skills, retrieve
targeted pool samples, fine-tune; against random samples of the same size and the full pool.

  python -m mmjax.main --config configs/shapes_errordriven.py --workdir /tmp/mmjax_errordriven

The target task is answering *colour* and *shape* questions about images of 1-3 objects
("what colour is the square?" -> "red", "what shape is the object at the top?" -> "circle").
The pool is task-agnostic and holds neither: image captions and count / size / position /
existence questions, each tagged with the skills it exercises (a question: the one it asks
and those its wording needs, e.g. "is there a blue triangle?" -> existence, colour, shape;
a caption: colour, shape, size, position, count). Stages (a recipe, mmjax/recipes/stages.py;
selection in mmjax/recipes/select.py):

  student     all weights of a random ViT + projector + LLaMA, briefly trained on a generic
              mix of captions and all kinds of questions (so it answers, but often wrongly);
  errors_B    from `student`, for each budget B: the student answers `val` held-out target
              questions, the teacher attributes each error to a skill (the question's: colour
              or shape; teacher=model: a longer-trained checkpoint's answers to every
              question about the failed image), and B pool records are retrieved by that
              gap profile and by similarity of the student's vision features to the failed
              images; a fresh LoRA adapter trains on them. The validation questions come
              after the test questions in the held-out split and differ from them;
  random_B    the same with B pool records drawn at random;
  full        the same on the whole pool.
Every fine-tuning stage trains the same number of steps and is scored on the same held-out
target questions (gen_exact_match = answers equal to the truth). Selections go to
stages/NAME/selection.json; the table (and results.json, loss_curves.png) compares the
methods per budget, the student being the `@start` row.

Args: scale (multiplies step counts; scale=0.02 for a smoke test), budgets (dash-separated,
e.g. '300-1000'), pool (pool size), val (validation questions the student answers), steps
(fine-tuning steps per stage), eval (held-out questions per evaluation), teacher (facts | model),
seed (the run seed and the generated train/eval sets; `tools/seeds.py` runs several seeds).
"""
import ml_collections

from mmjax.config import core, schema

ALL_PROJECTIONS = r".*(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2|linear_1|linear_2)"
TARGET_SKILLS = ("colour", "shape")
POOL_SKILLS = ("count", "size", "position", "existence")


def get_config(arg=None):
  args = core.parse_arg(arg, scale=1.0, budgets="300-1000-3000", pool=6000, val=128, steps=150, eval=256,
                              teacher="facts", seed=0)
  budgets = [int(b) for b in args.budgets.split("-") if b]
  c = schema.base_config()
  c.model.update(name="vlm", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=352)
  c.vision.update(image_size=48, patch_size=16, d_model=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=128)
  c.vlm.update(projector="mlp2", max_frames=4, temporal_pool=1)
  c.data.update(source="shapes", task="vqa", qa_skills=TARGET_SKILLS, tokenizer="builtin_words", image_size=48,
                max_objects=3, num_train_examples=50_000,
                num_eval_examples=args.eval + 2 * args.val)  # the test questions, then the validation ones
  c.seq_len = 48
  c.batch_size = 16
  c.eval_batch_size = 64
  c.eval_every = 0
  c.log_every = 25
  c.checkpoint_every = 100
  c.sample_eval.update(num_examples=args.eval, max_new_tokens=6, show=2)
  c.optimizer.update(warmup_steps=10, schedule="cosine", clip_norm=1.0, lr=1e-3)
  c.lora.update(targets=ALL_PROJECTIONS, rank=16, alpha=32.0)
  c.select.update(budget=budgets[0], val_examples=args.val, teacher=args.teacher, mix=0.5,
                  pool=dict(task="pool", pool_mix=(("image_caption", 1.0), ("vqa", 3.0)), qa_skills=POOL_SKILLS,
                            num_train_examples=args.pool))
  steps = lambda n: max(int(n * args.scale), 2)
  generic = dict(task="pool", pool_mix=(("image_caption", 1.0), ("vqa", 3.0)),
                 qa_skills=("count", "colour", "shape", "size", "position", "existence"))
  stages = {"student": dict(steps=steps(300), batch_size=32, trainable=("params/.*",), lora=dict(targets=""),
                            groups=dict(generic=dict(trainable=("params/.*",), data=generic)))}
  order = ["student"]
  if args.teacher == "model":  # a longer-trained checkpoint of the same model is the teacher
    stages["teacher"] = dict(stages["student"], steps=steps(900), init_from_stage="student")
    order.append("teacher")
  tune = dict(steps=steps(args.steps), init_from_stage="student", trainable=("lora/.*",))
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
  # by 0.15 exact match, or the table is marked INVALID (no room for selections to differ).
  c.headroom.update(metric="gen_exact_match", floor="student", ceiling="full", min=0.15)
  core.apply_seed(c, args.seed)
  return c
