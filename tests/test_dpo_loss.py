"""dpo_loss for every loss_type against TRL's formulas, written out in numpy (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import losses


def logsig(x):
  return -np.logaddexp(0.0, -x)


def sig(x):
  return 1 / (1 + np.exp(-x))


def trl_reference(pc, pr, rc, rr, beta, loss_type, ls, lc, lr):
  if loss_type == "ipo":  # TRL averages log-probs over the completion for IPO
    pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
  pi_logratios = pc - pr
  ref_logratios = rc - rr
  logits = pi_logratios - ref_logratios
  if loss_type == "sigmoid":
    out = -logsig(beta * logits) * (1 - ls) - logsig(-beta * logits) * ls
  elif loss_type == "robust":
    out = (-logsig(beta * logits) * (1 - ls) + logsig(-beta * logits) * ls) / (1 - 2 * ls)
  elif loss_type == "hinge":
    out = np.maximum(0, 1 - beta * logits)
  elif loss_type == "ipo":
    out = (logits - 1 / (2 * beta)) ** 2
  elif loss_type == "bco_pair":
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    delta = np.concatenate([chosen_rewards, rejected_rewards]).mean()
    out = -logsig(chosen_rewards - delta) - logsig(-(rejected_rewards - delta))
  elif loss_type == "apo_zero":
    out = (1 - sig(beta * (pc - rc))) + sig(beta * (pr - rr))
  return out, beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize("loss_type,ls", [(t, 0.0) for t in losses.DPO_LOSS_TYPES]
                         + [("sigmoid", 0.2), ("robust", 0.2)])  # label smoothing applies to these two
def test_dpo_loss_matches_trl(loss_type, ls):
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(size=16) * 20 - 60 for _ in range(4))
  lc, lr = rng.integers(1, 40, size=16).astype(float), rng.integers(1, 40, size=16).astype(float)
  got, cr, rj = losses.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=ls,
                                chosen_lengths=lc, rejected_lengths=lr)
  ref, ref_cr, ref_rj = trl_reference(pc, pr, rc, rr, 0.1, loss_type, ls, lc, lr)
  np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
  if loss_type != "ipo":
    np.testing.assert_allclose(cr, ref_cr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rj, ref_rj, rtol=1e-5, atol=1e-5)


def test_sigmoid_equal_policy_and_reference_is_log2():
  x = jnp.asarray([-12.0, -3.5])
  out, _, _ = losses.dpo_loss(x, x - 1, x, x - 1, beta=0.5)
  np.testing.assert_allclose(out, np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
def test_gradients_finite_at_extreme_log_ratios(loss_type):
  def f(pc, pr):
    out, _, _ = losses.dpo_loss(pc, pr, jnp.zeros(3), jnp.zeros(3), beta=1.0, loss_type=loss_type,
                                chosen_lengths=jnp.ones(3), rejected_lengths=jnp.ones(3))
    return out.sum()
  pc = jnp.asarray([1e4, -1e4, 0.0])
  pr = jnp.asarray([-1e4, 1e4, 0.0])
  g = jax.grad(f, argnums=(0, 1))(pc, pr)
  assert all(np.isfinite(np.asarray(x)).all() for x in g)
  assert np.isfinite(float(f(pc, pr)))


def test_sequence_log_probs_sum_and_average():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, size=(2, 5)))
  mask = jnp.asarray([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
  tok = np.asarray(losses.token_log_probs(logits, targets))
  s = losses.sequence_log_probs(logits, targets, mask)
  np.testing.assert_allclose(s, (tok * np.asarray(mask)).sum(-1), rtol=1e-6)
  a = losses.sequence_log_probs(logits, targets, mask, average=True)
  np.testing.assert_allclose(a, (tok * np.asarray(mask)).sum(-1) / np.asarray(mask).sum(-1), rtol=1e-6)


def test_unknown_loss_type():
  with pytest.raises(ValueError, match="loss_type='kto' is not one of"):
    losses.dpo_loss(0.0, 0.0, 0.0, 0.0, beta=0.1, loss_type="kto")


def test_sequence_log_probs_hand_written_backward_matches_autodiff():
  """The one-pass backward of sequence_log_probs equals autodiff of the naive formula, for a
  cotangent that differs per row (as DPO's loss gives)."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(3, 7, 11)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, (3, 7)))
  mask = jnp.asarray(rng.integers(0, 2, (3, 7)))
  w = jnp.asarray([0.5, -2.0, 1.5])
  naive = lambda x: jnp.sum(w * jnp.sum(losses.token_log_probs(x, targets) * mask, axis=-1))
  fused = lambda x: jnp.sum(w * losses.sequence_log_probs(x, targets, mask))
  np.testing.assert_allclose(fused(logits), naive(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(fused)(logits), jax.grad(naive)(logits), rtol=1e-5, atol=1e-6)
  bf = logits.astype(jnp.bfloat16)
  assert jax.grad(lambda x: jnp.sum(losses.sequence_log_probs(x, targets, mask)))(bf).dtype == jnp.bfloat16
