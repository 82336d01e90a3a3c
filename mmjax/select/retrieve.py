"""Retrieval of training samples from a large task-agnostic pool, under an exact budget.

  allocate(profile, n)                          -> {skill: count}  largest remainder, sum n
  select_by_skills(pool_skills, profile, budget, seed, rank='random') -> int64 [budget]
  nearest_neighbours(query_emb [Q, D], pool_emb [N, D], k)       -> scores, indices [Q, k]
  select_by_embedding(failed_emb [Q, D], pool_emb [N, D], budget) -> int64 [budget]
  select(pool_skills, pool_emb, failed_emb, profile, budget, seed, mix=0.5, rank='random') -> int64 [budget]
  select_random(n_pool, budget, seed)                            -> int64 [budget]
  write_selection(path, indices, meta) / read_selection(path) -> (indices, meta)

Every selection returns exactly `budget` distinct pool indices, in the order chosen, as
a pure function of its arguments (seeded draws use numpy's PCG64 with the seed and, per
skill, the crc32 of the skill name, so adding a skill to the profile does not reorder the
draws of another), or raises a one-line ValueError (e.g. a budget larger than the pool).
"""
from __future__ import annotations

import fractions
import functools
import json
import math
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.files import atomic_write
from mmjax.select.gaps import order_skills

RANKS = ("random", "coverage")


def _check_budget(budget, n_pool) -> int:
  if isinstance(budget, bool) or not float(budget).is_integer() or budget < 0:
    raise ValueError(f"selection budget must be a non-negative integer, got {budget!r}")
  budget = int(budget)
  if budget > n_pool:
    raise ValueError(f"selection budget {budget} exceeds the pool of {n_pool} items")
  return budget


def allocate(profile: dict, n: int) -> dict[str, int]:
  """{skill: count} proportional to the positive profile weights, summing exactly to `n`.

  Largest-remainder (Hamilton) rounding, computed in exact fractions of the float weights;
  ties in the remainder go to the skill earlier in `order_skills` order. Skills with
  weight <= 0 are left out; an empty profile allocates nothing ({}).
  """
  weights = {s: fractions.Fraction(float(profile[s])) for s in order_skills(profile) if profile[s] > 0}
  total = sum(weights.values())
  if not weights or n <= 0:
    return {s: 0 for s in weights}
  exact = {s: w * n / total for s, w in weights.items()}
  counts = {s: math.floor(q) for s, q in exact.items()}
  rest = n - sum(counts.values())
  names = list(weights)  # stable: sorted() below keeps this order among equal remainders
  for s in sorted(names, key=lambda s: exact[s] - counts[s], reverse=True)[:rest]:
    counts[s] += 1
  return counts


def _skill_rng(seed: int, skill: str) -> np.random.Generator:
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(str(skill).encode())])


def coverage(tags, profile: dict) -> float:
  """How much of the gap profile one record exercises: the summed positive weights of its
  distinct skill tags."""
  return float(sum(max(float(profile.get(s, 0.0)), 0.0) for s in set(tags)))


def select_by_skills(pool_skills, profile: dict, budget: int, seed: int = 0, *, exclude=(),
                     rank: str = "random") -> np.ndarray:
  """`budget` distinct pool indices drawn per skill in proportion to the profile.

  pool_skills: per pool item, its tuple of skill tags (len N). The budget is allocated
  over the profile's skills (`allocate`); each skill draws its count without replacement
  from the items tagged with it that are not yet chosen (nor in `exclude`), in a seeded
  random order (`rank='random'`) or, with `rank='coverage'`, the items that exercise more of
  the profile first (`coverage`: a question that needs three missing skills before one that
  needs one), ties in the seeded random order. A skill that runs short leaves the pool of
  skills; what it could not take is allocated again over the other skills by profile
  weight, until the budget is met. If the
  tagged items cannot fill it (or the profile is empty), the rest is drawn uniformly,
  seeded, from the remaining pool. Returns int64 [budget], in the order chosen.
  """
  if rank not in RANKS:
    raise ValueError(f"selection rank={rank!r} is not valid; choose one of {', '.join(map(repr, RANKS))}")
  pool_skills = [tuple(t) for t in pool_skills]
  excluded = {int(i) for i in exclude}
  budget = _check_budget(budget, len(pool_skills) - len(excluded))
  skills = [s for s in order_skills(profile) if profile[s] > 0]
  tagged = {s: [] for s in skills}
  for i, tags in enumerate(pool_skills):
    for s in set(tags):
      if s in tagged:
        tagged[s].append(i)
  orders = {s: _skill_rng(seed, s).permutation(np.asarray(tagged[s], np.int64)).tolist() for s in skills}
  if rank == "coverage":
    cover = {i: coverage(pool_skills[i], profile) for s in skills for i in tagged[s]}
    orders = {s: sorted(order, key=lambda i: -cover[i]) for s, order in orders.items()}  # stable: ties stay seeded
  cursor = dict.fromkeys(skills, 0)
  chosen, taken = [], set(excluded)
  active = [s for s in skills if orders[s]]
  while len(chosen) < budget and active:
    quotas = allocate({s: profile[s] for s in active}, budget - len(chosen))
    for s in active:
      order, need = orders[s], quotas[s]
      while need and cursor[s] < len(order):
        i = order[cursor[s]]
        cursor[s] += 1  # an item skipped here is taken for good, so never revisited
        if i not in taken:
          taken.add(i)
          chosen.append(i)
          need -= 1
    # A skill is out once its cursor has passed every item tagged with it; each round
    # either meets every quota (done) or drops a skill, so this ends within len(skills) + 1.
    active = [s for s in active if cursor[s] < len(orders[s])]
  if len(chosen) < budget:
    rest = np.asarray([i for i in range(len(pool_skills)) if i not in taken], np.int64)
    fill = _skill_rng(seed, "<fill>").permutation(rest)[: budget - len(chosen)]
    chosen.extend(fill.tolist())
  return np.asarray(chosen, np.int64)


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _topk_cosine(query, pool, *, k: int, chunk: int):
  eps = 1e-12  # a zero vector scores 0 against everything rather than NaN
  q = query / jnp.maximum(jnp.linalg.norm(query, axis=-1, keepdims=True), eps)
  p = pool / jnp.maximum(jnp.linalg.norm(pool, axis=-1, keepdims=True), eps)
  n = p.shape[0]
  n_chunks = -(-n // chunk)
  p = jnp.pad(p, ((0, n_chunks * chunk - n), (0, 0))).reshape(n_chunks, chunk, p.shape[1])

  def step(carry, xs):
    best_s, best_i = carry
    block, c = xs
    idx = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    s = jnp.dot(q, block.T, precision=jax.lax.Precision.HIGHEST)  # [Q, chunk]
    s = jnp.where(idx[None, :] < n, s, -jnp.inf)  # padding never wins
    # Carried (lower-index) candidates come first and lax.top_k keeps the lower position
    # among equal values, so ties go to the lower pool index, as in a stable sort.
    all_s = jnp.concatenate([best_s, s], axis=1)
    all_i = jnp.concatenate([best_i, jnp.broadcast_to(idx, s.shape)], axis=1)
    top_s, pos = jax.lax.top_k(all_s, k)
    return (top_s, jnp.take_along_axis(all_i, pos, axis=1)), None

  init = (jnp.full((q.shape[0], k), -jnp.inf, q.dtype), jnp.full((q.shape[0], k), n, jnp.int32))
  (scores, indices), _ = jax.lax.scan(step, init, (p, jnp.arange(n_chunks, dtype=jnp.int32)))
  return scores, indices


def nearest_neighbours(query_emb, pool_emb, k: int, chunk: int = 4096):
  """Exact top-k cosine similarity of each query against the pool, in JAX.

  query_emb [Q, D], pool_emb [N, D] (float; zero rows score 0); 1 <= k <= N. The pool is
  scanned in chunks of `chunk` rows (static; N need not divide by it, the last chunk is
  padded and masked) keeping a running top-k, so memory is O(Q * (k + chunk)) rather
  than O(Q * N). Returns (scores float32 [Q, k] descending, indices int32 [Q, k]); ties
  go to the lower pool index.
  """
  query, pool = jnp.asarray(query_emb, jnp.float32), jnp.asarray(pool_emb, jnp.float32)
  if query.ndim != 2 or pool.ndim != 2 or query.shape[1] != pool.shape[1]:
    raise ValueError(f"nearest_neighbours wants query [Q, D] and pool [N, D], got {query.shape} and {pool.shape}")
  n = pool.shape[0]
  if not 1 <= int(k) <= n:
    raise ValueError(f"nearest_neighbours k={k} must be in 1..{n} (the pool size)")
  chunk = max(1, min(int(chunk), n))
  return _topk_cosine(query, pool, k=int(k), chunk=chunk)


def select_by_embedding(failed_emb, pool_emb, budget: int, *, exclude=(), chunk: int = 4096) -> np.ndarray:
  """`budget` distinct pool items nearest (cosine) to the failed validation examples.

  failed_emb [Q, D], pool_emb [N, D]. Round-robin over the queries in order: each takes
  its next nearest item not yet chosen (nor in `exclude`), until exactly `budget` are
  chosen. Neighbour lists start short (about twice budget / Q) and are deepened (doubled)
  only when some query exhausts its list. Returns int64 [budget] in the order chosen.
  """
  pool = np.asarray(pool_emb)
  excluded = {int(i) for i in exclude}
  budget = _check_budget(budget, len(pool) - len(excluded))
  failed = np.asarray(failed_emb)
  if budget == 0:
    return np.zeros(0, np.int64)
  if failed.ndim != 2 or len(failed) == 0:
    raise ValueError(f"select_by_embedding needs failed embeddings [Q >= 1, D], got shape {failed.shape}")
  n, n_q = len(pool), len(failed)
  k = min(n, 2 * -(-budget // n_q) + len(excluded))
  while True:
    _, idx = nearest_neighbours(failed, pool, k, chunk)
    lists = np.asarray(idx).tolist()
    cursor = [0] * n_q
    chosen, taken, exhausted = [], set(excluded), False
    while len(chosen) < budget and not exhausted:
      for q in range(n_q):
        if len(chosen) == budget:
          break
        while cursor[q] < k and lists[q][cursor[q]] in taken:
          cursor[q] += 1
        if cursor[q] == k:
          exhausted = k < n  # with the whole pool listed, a query can only run out if all is taken
          if exhausted:
            break
          continue
        taken.add(lists[q][cursor[q]])
        chosen.append(lists[q][cursor[q]])
    if not exhausted:
      return np.asarray(chosen, np.int64)
    k = min(n, 2 * k)  # restart deeper: the same round-robin, so the result is unchanged so far


def select(pool_skills, pool_emb, failed_emb, profile: dict, budget: int, seed: int = 0, mix: float = 0.5,
           *, chunk: int = 4096, rank: str = "random") -> np.ndarray:
  """`budget` distinct pool indices: round(mix * budget) by embedding, the rest by skills
  (`select_by_skills` with `rank`).

  The embedding share (round half up) is drawn first with `select_by_embedding` from the
  failed examples' embeddings; the skill share then with `select_by_skills`, excluding
  those. With no failed embeddings (or `pool_emb` None) everything goes by skills.
  Returns int64 [budget]: the embedding picks, then the skill picks.
  """
  if not 0.0 <= float(mix) <= 1.0:
    raise ValueError(f"selection mix must be in [0, 1], got {mix!r}")
  n_pool = len(pool_skills)
  budget = _check_budget(budget, n_pool)
  failed = None if failed_emb is None else np.asarray(failed_emb)
  n_emb = math.floor(float(mix) * budget + 0.5)
  if pool_emb is None or failed is None or failed.size == 0:
    n_emb = 0
  if n_emb and len(pool_emb) != n_pool:
    raise ValueError(f"selection pool has {n_pool} skill tags but {len(pool_emb)} embeddings")
  by_emb = select_by_embedding(failed, pool_emb, n_emb, chunk=chunk) if n_emb else np.zeros(0, np.int64)
  by_skill = select_by_skills(pool_skills, profile, budget - n_emb, seed, exclude=by_emb.tolist(), rank=rank)
  return np.concatenate([by_emb, by_skill]).astype(np.int64)


def select_random(n_pool: int, budget: int, seed: int = 0) -> np.ndarray:
  """`budget` distinct indices of range(n_pool), uniformly at random (the baseline)."""
  budget = _check_budget(budget, int(n_pool))
  return np.random.default_rng(int(seed) & 0xFFFFFFFF).choice(int(n_pool), budget, replace=False).astype(np.int64)


def write_selection(path: str, indices, meta: dict | None = None) -> None:
  """Writes {"indices": [...], "meta": meta} as JSON atomically (`mmjax.files.atomic_write`),
  so a reader sees the old file or the whole new one and an interrupted recipe resumes with
  the same selection."""
  atomic_write(os.fspath(path), selection_json(indices, meta))


def selection_json(indices, meta: dict | None = None) -> str:
  """The text of a selection file (what `write_selection` writes)."""
  payload = {"indices": [int(i) for i in np.asarray(indices).reshape(-1)], "meta": meta or {}}
  return json.dumps(payload, indent=1, sort_keys=True)


def read_selection(path: str) -> tuple[np.ndarray, dict]:
  """(indices int64 [n], meta) of a file written by `write_selection`."""
  with open(os.fspath(path)) as f:
    payload = json.load(f)
  if not isinstance(payload, dict) or "indices" not in payload:
    raise ValueError(f"{path} is not a selection file (no 'indices')")
  return np.asarray(payload["indices"], np.int64).reshape(-1), payload.get("meta", {})
