"""The sigmoid (SigLIP) image-text loss: dense, and distributed as a bidirectional ring.

    L = -(1/B) sum_i sum_j log sigmoid(z_ij (exp(t') x_i . y_j + b)),   z_ii = 1, z_ij = -1 (i != j)

with x, y the L2-normalised image and text embeddings of a batch of B pairs. Every pair is
an independent binary problem, so the loss is a sum of blocks and can be computed without any
device ever holding the B x B logits:

* `sigmoid_contrastive_loss`: one device, the whole B x B matrix (the reference).
* `ring_sigmoid_contrastive_loss`: inside `shard_map` over a batch axis of W devices holding
  b = B / W pairs each. Every device scores its own b x b block (the positives), then text
  embeddings travel both ways round the ring (`ppermute` to the left and right neighbours), so
  after ceil((W-1)/2) rounds every device has scored its images against every device's texts
  (one last one-way round when W is even). A custom VJP replays the same ring in the backward
  pass: the gradient of each text block travels with the block and is sent home at the end. A
  device holds its own embeddings, two travelling blocks and their gradients, and one b x b
  logits block at a time: memory O(b D + b^2), against O(B D + b B) for gathering all texts.
* `all_gather_sigmoid_contrastive_loss`: the simple distributed form (all texts gathered to
  every device, b x B logits); the baseline the ring is benchmarked against.
* `sharded_sigmoid_contrastive_loss`: either distributed form on a mesh, from global arrays.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from glm5v_jax.errors import ConfigError

T_PRIME_INIT = math.log(10.0)  # t' : the temperature t = exp(t') starts at 10
BIAS_INIT = -10.0  # b: strongly negative at first, since negatives outnumber positives B - 1 to 1
NORM_EPS = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ||x|| over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + NORM_EPS)


def _check(image_emb: jax.Array, text_emb: jax.Array) -> None:
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb and text_emb must both be [B, D] with the same shape, got "
                         f"{image_emb.shape} and {text_emb.shape}")


def _block_loss(x: jax.Array, y: jax.Array, t: jax.Array, b: jax.Array, positives: bool) -> jax.Array:
    """sum_ij -log sigmoid(z_ij (t x_i.y_j + b)) over one block; z = +1 on the diagonal when
    the block pairs each image with its own text (`positives`), -1 everywhere otherwise."""
    logits = t * (x @ y.T) + b
    z = 2.0 * jnp.eye(x.shape[0], y.shape[0], dtype=logits.dtype) - 1.0 if positives else -1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * logits))


def _block_grads(x, y, t, b, positives: bool):
    """(loss, d/dx, d/dy, d/dt, d/db) of `_block_loss`, by hand: d/dlogit = -z sigmoid(-z logit)."""
    sims = x @ y.T
    logits = t * sims + b
    z = 2.0 * jnp.eye(x.shape[0], y.shape[0], dtype=logits.dtype) - 1.0 if positives else -1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(z * logits))
    dlogits = -z * jax.nn.sigmoid(-z * logits)  # [b_x, b_y]
    return loss, t * (dlogits @ y), t * (dlogits.T @ x), jnp.sum(dlogits * sims), jnp.sum(dlogits)


def sigmoid_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, t_prime: jax.Array,
                             b: jax.Array) -> jax.Array:
    """The SigLIP loss of a batch on one device. image_emb, text_emb `[B, D]` (any scale:
    normalised inside); t_prime, b scalars (init `T_PRIME_INIT`, `BIAS_INIT`). Row i of each is
    one pair. Returns the mean over images of the summed per-pair losses (big_vision's reduction)."""
    _check(image_emb, text_emb)
    x, y = l2_normalize(image_emb), l2_normalize(text_emb)
    t = jnp.exp(jnp.asarray(t_prime, jnp.float32))
    return _block_loss(x, y, t, jnp.asarray(b, jnp.float32), positives=True) / x.shape[0]


# ----------------------------------------------------------------------------- the ring
def _shift(x: jax.Array, axis_name, size: int, offset: int) -> jax.Array:
    """Each device receives x from the device `offset` places after it on the ring."""
    return jax.lax.ppermute(x, axis_name, [(i, (i - offset) % size) for i in range(size)])


def _schedule(size: int) -> tuple[int, int]:
    """(bidirectional rounds, final one-way rounds): every other device visited exactly once."""
    return (size - 1) // 2, (size - 1) % 2


def _ring_forward(x, y, t, b, axis_name, size: int):
    rounds, extra = _schedule(size)
    total = _block_loss(x, y, t, b, positives=True)

    def body(_, carry):
        total, right, left = carry
        right, left = _shift(right, axis_name, size, 1), _shift(left, axis_name, size, -1)
        total = total + _block_loss(x, right, t, b, False) + _block_loss(x, left, t, b, False)
        return total, right, left

    total, right, _ = jax.lax.fori_loop(0, rounds, body, (total, y, y))
    if extra:
        total = total + _block_loss(x, _shift(right, axis_name, size, 1), t, b, False)
    return jax.lax.psum(total, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring_loss(x, y, t, b, axis_name, size: int):
    """sum over all B x B pairs of the per-pair loss, from normalised local blocks x, y `[b, D]`."""
    return _ring_forward(x, y, t, b, axis_name, size)


def _ring_loss_fwd(x, y, t, b, axis_name, size):
    return _ring_forward(x, y, t, b, axis_name, size), (x, y, t, b)


def _ring_loss_bwd(axis_name, size, residuals, g):
    x, y, t, b = residuals
    rounds, extra = _schedule(size)
    _, dx, dy, dt, db = _block_grads(x, y, t, b, True)

    def visit(block, block_grad, dx, dt, db):
        _, gx, gy, gt, gb = _block_grads(x, block, t, b, False)
        return block_grad + gy, dx + gx, dt + gt, db + gb

    def body(_, carry):
        right, right_grad, left, left_grad, dx, dt, db = carry
        # A block's gradient accumulator travels with the block.
        right, right_grad = _shift(right, axis_name, size, 1), _shift(right_grad, axis_name, size, 1)
        left, left_grad = _shift(left, axis_name, size, -1), _shift(left_grad, axis_name, size, -1)
        right_grad, dx, dt, db = visit(right, right_grad, dx, dt, db)
        left_grad, dx, dt, db = visit(left, left_grad, dx, dt, db)
        return right, right_grad, left, left_grad, dx, dt, db

    zeros = jnp.zeros_like(y)
    right, right_grad, _, left_grad, dx, dt, db = jax.lax.fori_loop(
        0, rounds, body, (y, zeros, y, zeros, dx, dt, db))
    if extra:
        right, right_grad = _shift(right, axis_name, size, 1), _shift(right_grad, axis_name, size, 1)
        right_grad, dx, dt, db = visit(right, right_grad, dx, dt, db)
    # Send the accumulated text gradients back to the devices that own those texts.
    dy = dy + _shift(right_grad, axis_name, size, -(rounds + extra)) + _shift(left_grad, axis_name, size, rounds)
    dt, db = jax.lax.psum(dt, axis_name), jax.lax.psum(db, axis_name)  # t and b are shared
    return g * dx, g * dy, g * dt, g * db


_ring_loss.defvjp(_ring_loss_fwd, _ring_loss_bwd)


def _axis_size(axis_name) -> int:
    names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
    return math.prod(jax.lax.axis_size(n) for n in names)


def ring_sigmoid_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, t_prime: jax.Array,
                                  b: jax.Array, *, axis_name: str | Sequence[str]) -> jax.Array:
    """The SigLIP loss of the global batch, called inside `shard_map` with this device's pairs
    (image_emb, text_emb `[b, D]`) sharded over `axis_name` (t_prime, b replicated). Equal to
    `sigmoid_contrastive_loss` of the concatenated batch, on every device; see the module docstring."""
    _check(image_emb, text_emb)
    size = _axis_size(axis_name)
    x, y = l2_normalize(image_emb), l2_normalize(text_emb)
    t = jnp.exp(jnp.asarray(t_prime, jnp.float32))
    total = _ring_loss(x, y, t, jnp.asarray(b, jnp.float32), axis_name, size)
    return total / (x.shape[0] * size)


def all_gather_sigmoid_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, t_prime: jax.Array,
                                        b: jax.Array, *, axis_name: str | Sequence[str]) -> jax.Array:
    """Same contract as `ring_sigmoid_contrastive_loss`, by gathering every text to every device
    (b x B logits per device): simple, and the memory baseline for the ring."""
    _check(image_emb, text_emb)
    size = _axis_size(axis_name)
    x, y = l2_normalize(image_emb), l2_normalize(text_emb)
    y_all = jax.lax.all_gather(y, axis_name, tiled=True)  # [B, D]
    t = jnp.exp(jnp.asarray(t_prime, jnp.float32))
    logits = t * (x @ y_all.T) + jnp.asarray(b, jnp.float32)  # [b, B]
    n = x.shape[0]
    own = jax.lax.axis_index(axis_name) * n + jnp.arange(n)
    z = jnp.where(jnp.arange(n * size)[None, :] == own[:, None], 1.0, -1.0)
    total = jax.lax.psum(-jnp.sum(jax.nn.log_sigmoid(z * logits)), axis_name)
    return total / (n * size)


DISTRIBUTED = {"ring": ring_sigmoid_contrastive_loss, "all_gather": all_gather_sigmoid_contrastive_loss}


def sharded_sigmoid_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, t_prime: jax.Array,
                                     b: jax.Array, *, mesh: Mesh, batch_axes: str | Sequence[str],
                                     impl: str = "ring") -> jax.Array:
    """The SigLIP loss of global `[B, D]` embeddings whose batch is split over `batch_axes` of
    `mesh`: `shard_map` around the ring (`impl="ring"`) or all-gather form. Differentiable."""
    if impl not in DISTRIBUTED:
        raise ConfigError("impl", f"unknown sigmoid loss implementation {impl!r}; expected one of {tuple(DISTRIBUTED)}")
    axes = tuple(batch_axes) if isinstance(batch_axes, (tuple, list)) else (batch_axes,)
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ConfigError("batch_axes", f"{missing} not in the mesh axes {mesh.axis_names}")
    devices = math.prod(mesh.shape[a] for a in axes)
    if image_emb.shape[0] % devices:
        raise ValueError(f"the batch of {image_emb.shape[0]} pairs does not split over {devices} devices "
                         f"of mesh axes {axes}")
    fn = functools.partial(DISTRIBUTED[impl], axis_name=axes if len(axes) > 1 else axes[0])
    spec = P(axes if len(axes) > 1 else axes[0])
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())(
        image_emb, text_emb, jnp.asarray(t_prime, jnp.float32), jnp.asarray(b, jnp.float32))
