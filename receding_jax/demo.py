"""A one-minute demonstration: a small CNN with bounded norms and the receding penalty on 8x8 digits.

    python -m receding_jax.demo

Uses scikit-learn's embedded digits (1,797 images, no download). Prints test accuracy and how the
importances split into receded (< 0.05) and kept (> 0.5) channels. Without scikit-learn it says what to
install in one line and exits with status 2.
"""

from __future__ import annotations

import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import receding_jax as rj


class DigitsNet(nn.Module):
  """conv(16)-norm-relu-conv(32)-norm-relu-mean-dense on [batch, 8, 8, 1] images."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for width in (16, 32):
      x = nn.Conv(width, (3, 3))(x)
      x = nn.relu(rj.BoundedScaleNorm(use_running_average=not train)(x))
    return nn.Dense(10)(x.mean((1, 2)))


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Digits as float32 [n, 8, 8, 1] in [0, 1]; the first 1,500 train, the rest test."""
  from sklearn.datasets import load_digits as sklearn_digits

  data = sklearn_digits()
  images = (data.images / 16.0).astype(np.float32)[..., None]
  return images[:1500], data.target[:1500], images[1500:], data.target[1500:]


def main(steps: int = 300, batch_size: int = 64, strength: float = 5e-3, seed: int = 0) -> dict[str, float]:
  """Trains, prints and returns the test accuracy and the importance summary."""
  try:
    train_x, train_y, test_x, test_y = load_digits()
  except ImportError as e:
    print(f"error: the demo needs scikit-learn's digits: pip install scikit-learn (or pip install -e '.[train]'); "
          f"{e}", file=sys.stderr)
    raise SystemExit(2) from None
  model = DigitsNet()
  variables = model.init(jax.random.key(seed), jnp.asarray(train_x[:2]), train=False)
  tx = optax.chain(rj.add_receding_penalty(strength), optax.sgd(0.05, momentum=0.9, nesterov=True))
  opt_state = tx.init(variables["params"])

  @jax.jit
  def train_step(variables, opt_state, x, y):
    def loss_fn(params):
      logits, updates = model.apply(
          {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    step, opt_state = tx.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], step)
    return {"params": params, **updates}, opt_state, loss

  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for step in range(steps):
    idx = rng.choice(len(train_x), batch_size, replace=False)
    variables, opt_state, loss = train_step(variables, opt_state, train_x[idx], train_y[idx])
    if step % 100 == 0 or step == steps - 1:
      print(f"step {step:4d}  loss {float(loss):.3f}")
  logits = model.apply(variables, jnp.asarray(test_x), train=False)
  accuracy = float(np.mean(np.asarray(logits.argmax(-1)) == test_y))
  summary = rj.importance_summary(rj.neuron_importances(variables))
  print(f"test accuracy {accuracy:.3f} after {steps} steps ({time.perf_counter() - start:.1f} s)")
  print("importances: " + ", ".join(f"{k} {v:.3g}" for k, v in summary.items()))
  return {"accuracy": accuracy, **summary}


if __name__ == "__main__":
  main()
