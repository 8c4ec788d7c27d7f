"""Stage: CogViT stage 2, a text tower and CogViT trained contrastively with the sigmoid loss
(report 2.1). Reads top to bottom; the run layer (`glm5v_jax.train.run`) does the loop,
checkpoints, resume, `init_from`, preemption and writers:
  image sources mixed by weight (config.data.sources, `glm5v_jax.data.source_registry`; shapes
  world built on first use) -> NaFlex batches with their captions as token ids (the tokenizer of
  `tokenizer_from_config`), each batch at one patch budget of `config.data.patch_budgets`; each host
  reads its own rows
  -> TwoTower (models/two_tower.py): CogViT + mean pool + projection, text tower + projection,
     learnable t' and b, created sharded on `config.mesh` (FSDP by default) with Muon (or AdamW)
     and groups vision / text / projection -> SigLIP loss: dense on the global arrays, or a ring /
     all-gather over the mesh's batch axes
  -> evaluation at step 0 (the random-init baseline), every eval_every steps and at the end:
     zero-shot shape and colour and k-NN accuracy of the pooled encoder features on single-object
     images (config.data.eval_source), image->text and text->image recall@1/5 on the sources'
     eval parts (several objects per image)
  -> TensorBoard + metrics.jsonl, and a step-0-vs-final table (logged, eval_table.md).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from etils import epath

from glm5v_jax.data import shapes_world
from glm5v_jax.data.image_batches import ImageBatchConfig, make_image_batch_iterator
from glm5v_jax.data.source_registry import DataSources, open_sources, tokenizer_from_config
from glm5v_jax.data.tokenizer import Tokenizer
from glm5v_jax.losses.contrastive import l2_normalize, sharded_sigmoid_contrastive_loss, sigmoid_contrastive_loss
from glm5v_jax.errors import ConfigError
from glm5v_jax.models.two_tower import TwoTower, TwoTowerSpec, two_tower_spec_from_config
from glm5v_jax.train.parallel import (MeshPlan, TrainProgram, batch_shardings, global_batch,
                                       host_batch_shardings, jit_step, plan_from_config)
from glm5v_jax.train.run import Job, PlacedState, place_state
from glm5v_jax.train.vision_eval import knn_report, labelled_eval_sets

log = logging.getLogger(__name__)
IMAGE_KEYS = ("patches", "patch_yx", "valid")
BATCH_KEYS = IMAGE_KEYS + ("text",)
LOSS_IMPLS = ("dense", "ring", "all_gather")


# ----------------------------------------------------------------------------- text
def tokenize(tokenizer: Tokenizer, texts, text_len: int) -> np.ndarray:
    """`[N, text_len]` ids as the image-batch pipeline writes captions: ids, eos, pad..."""
    out = np.full((len(texts), text_len), tokenizer.pad_id, np.int32)
    for i, ids in enumerate(tokenizer.encode_batch(list(texts))):
        ids = ids[:text_len - 1] + [tokenizer.eos_id]
        out[i, :len(ids)] = ids
    return out


def class_prompts() -> tuple[list[str], np.ndarray, np.ndarray]:
    """Zero-shot prompts in the phrasing of the shapes-world captions (`shapes_world._captions`
    with one object, every template and background): (texts, colour index, shape index)."""
    colours, texts, ci, si = list(shapes_world.COLOURS), [], [], []
    for c, colour in enumerate(colours):
        for s, shape in enumerate(shapes_world.SHAPES):
            en = shapes_world._count_phrase(1, colour, shape)
            group = [f"There is {en} in this picture."]
            for bg in shapes_world.BACKGROUNDS:
                group += [f"{en[0].upper() + en[1:]} on a {bg} background.",
                          f"This image shows {en} against a {bg} background.", f"A {bg} background with {en}."]
            texts += group
            ci += [c] * len(group)
            si += [s] * len(group)
    return texts, np.asarray(ci), np.asarray(si)


# ----------------------------------------------------------------------------- metrics
def _unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(prompt_emb: np.ndarray, prompt_class: np.ndarray, num_classes: int) -> np.ndarray:
    """Prompt ensembling: per class the mean of its unit prompt embeddings `[C, E]`."""
    e = _unit(prompt_emb)
    return np.stack([e[prompt_class == k].mean(0) for k in range(num_classes)])


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images (label >= 0) whose most cosine-similar class embedding is their label."""
    keep = np.asarray(labels) >= 0
    pred = (_unit(image_emb) @ _unit(class_emb).T).argmax(1)
    return float(np.mean(pred[keep] == np.asarray(labels)[keep])) if keep.any() else float("nan")


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Recall@k both ways for N pairs (row i of each): the true partner ranks within the top k.
    Rank = number of candidates scoring strictly higher, so identical captions (equal text
    embeddings) do not count against each other."""
    sims = _unit(image_emb) @ _unit(text_emb).T  # [N images, N texts]
    diag = np.diag(sims)
    ranks = {"i2t": (sims > diag[:, None]).sum(1), "t2i": (sims > diag[None, :]).sum(0)}
    return {f"{d}_r{k}": float(np.mean(r < k)) for d, r in ranks.items() for k in ks}


# ----------------------------------------------------------------------------- model, loss, step
def make_loss_fn(loss_impl: str, plan: MeshPlan | None):
    """loss_fn(model, batch) -> (SigLIP loss, metrics) of the towers' outputs on the batch: `dense`
    on the global arrays, or `ring` / `all_gather` in a shard_map over the plan's batch axes."""
    if loss_impl not in LOSS_IMPLS:
        raise ConfigError("config.loss_impl", f"unknown {loss_impl!r}; expected one of {LOSS_IMPLS}")

    def loss_fn(model: TwoTower, batch):
        img, txt = model(*(batch[k] for k in IMAGE_KEYS), batch["text"])
        t_prime, b = model.t_prime[...], model.b[...]
        if loss_impl == "dense":
            loss = sigmoid_contrastive_loss(img, txt, t_prime, b)
        else:
            loss = sharded_sigmoid_contrastive_loss(img, txt, t_prime, b, mesh=plan.mesh, batch_axes=plan.batch_axes,
                                                    impl=loss_impl)
        pos_cos = jnp.mean(jnp.sum(l2_normalize(img) * l2_normalize(txt), -1))
        return loss, {"temperature": jnp.exp(t_prime), "bias": b, "positive_cosine": pos_cos}
    return loss_fn


def train_step_fn(graphdef, loss_fn):
    """`(state, batch) -> (state, metrics)` on the split TrainState (two towers + optimizer)."""
    def pure_train_step(state, batch):
        ts = nnx.merge(graphdef, state)
        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(ts.model, batch)
        ts.optimizer.update(ts.model, grads)
        return nnx.state(ts), dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return pure_train_step


@dataclasses.dataclass
class PlacedTowers:
    """The two towers and their optimizer on the run's mesh (`run.PlacedState`), and the jitted step."""

    placed: PlacedState
    step: Callable  # (state, global batch) -> (state, metrics), any patch budget


def place_on_mesh(config: ml_collections.ConfigDict, spec: TwoTowerSpec, plan: MeshPlan, *,
                  abstract: bool = False) -> PlacedTowers:
    """The towers and optimizer created sharded per the rules (FSDP by default; `run.place_state`)
    and the step jitted on the mesh. `abstract=True`: shapes and shardings only (AOT compiles)."""
    placed = place_state(config, plan, lambda: TwoTower(spec, rngs=nnx.Rngs(config.seed)), abstract=abstract)
    b, t = int(config.data.batch_size), int(config.data.text_len)
    n, p = int(config.model.vision.max_patches), int(config.model.vision.patch_size)
    batch_sh = batch_shardings(dict(batch_contract(b, n, p, t)), plan)
    step = jit_step(train_step_fn(placed.graphdef, make_loss_fn(config.loss_impl, plan)), plan, placed.shardings,
                    batch_sh, nonfinite=config.get("nonfinite", "stop"))
    return PlacedTowers(placed, step)


def batch_contract(batch: int, patches: int, patch_size: int, text_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes of a stage-2 batch at one patch budget."""
    sds = jax.ShapeDtypeStruct
    return dict(patches=sds((batch, patches, patch_size * patch_size * 3), jnp.float32),
                patch_yx=sds((batch, patches, 2), jnp.int32), valid=sds((batch, patches), jnp.bool_),
                text=sds((batch, text_len), jnp.int32))


# ----------------------------------------------------------------------------- data
def budget_at(config: ml_collections.ConfigDict, step: int) -> int:
    """The patch budget of training step `step` (1-based): cycling, or seeded random."""
    budgets = tuple(int(b) for b in config.data.patch_budgets)
    if config.data.budget_schedule == "cycle":
        return budgets[(step - 1) % len(budgets)]
    if config.data.budget_schedule == "random":
        return budgets[int(np.random.default_rng([config.seed, step]).integers(len(budgets)))]
    raise ConfigError("config.data.budget_schedule",
                      f"unknown {config.data.budget_schedule!r}; expected cycle | random")


def _batch_config(config, budget: int, batch_size: int, **kw) -> ImageBatchConfig:
    v = config.model.vision
    return ImageBatchConfig(batch_size=batch_size, patch_size=v.patch_size, max_patches=budget,
                            merge=v.merge_size, caption_keys=tuple(config.data.caption_keys), **kw)


class BudgetBatches:
    """Training batches, each at the patch budget of its step (`budget_at`): one checkpointable
    iterator per budget, and the step count, in one iterator state."""

    def __init__(self, config, source, tokenizer):
        self.config, self.step = config, 0
        hosts, budgets = jax.process_count(), tuple(int(b) for b in config.data.patch_budgets)
        self.iters = {b: make_image_batch_iterator(source, _batch_config(
            config, b, config.data.batch_size // hosts, seed=config.seed + i, text_len=config.data.text_len,
            num_workers=config.data.num_workers, process_index=jax.process_index(), process_count=hosts), tokenizer)
            for i, b in enumerate(budgets)}

    def __next__(self) -> dict:
        self.step += 1
        budget = budget_at(self.config, self.step)
        return {k: v for k, v in next(self.iters[budget]).items() if k in BATCH_KEYS}

    @property
    def stats(self) -> dict:
        out: dict = {}
        for it in self.iters.values():
            for k, v in it.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    def get_state(self) -> dict:
        return {"step": self.step, "budgets": {str(b): it.get_state() for b, it in self.iters.items()}}

    def set_state(self, state: dict) -> None:
        self.step = int(state.get("step", 0))
        for b, it in self.iters.items():
            it.set_state(state["budgets"][str(b)])


def _fixed_batches(source, config, budget: int, text_len: int, tokenizer):
    """The records of `source` in order, as full batches (a last partial batch is dropped)."""
    cfg = _batch_config(config, budget, config.data.batch_size, shuffle=False, num_epochs=1, text_len=text_len)
    return list(make_image_batch_iterator(source, cfg, tokenizer if text_len else None))


def make_evaluator(config, data: DataSources, workdir, tokenizer):
    """evaluate(model) -> {"eval/...": value}, or None when config.eval_every is 0. Zero-shot and
    k-NN classification read `config.data.eval_source` (single-object images: the shape and colour
    labels describe the whole image); retrieval reads the training sources' eval parts (several
    objects per image, so captions tell images apart), when there are any."""
    if not config.eval_every:
        return None
    d, budget, bs = config.data, int(config.model.vision.max_patches), config.data.batch_size
    knn_train, labelled = (_fixed_batches(part, config, budget, 0, None) for part in labelled_eval_sets(d, workdir))
    if not knn_train or not labelled:
        raise ConfigError("config.data.eval_source", f"its train and eval parts give {len(knn_train)} and "
                                                     f"{len(labelled)} full batches of {bs} images; each needs at "
                                                     "least one (train_size, eval_size)")
    captioned = _fixed_batches(data.mixture("eval"), config, budget, d.text_len, tokenizer) if data.eval else []
    if data.eval and not captioned:
        raise ConfigError("config.data.sources", f"their eval parts give no full batch of {bs} images (eval_size)")
    texts, colour_of, shape_of = class_prompts()
    prompts = tokenize(tokenizer, texts, d.text_len)
    prompts = np.concatenate([prompts, np.repeat(prompts[-1:], -len(prompts) % bs, 0)])  # whole batches

    log.info("evaluation: %d labelled single-object images, %d k-NN reference images, %d class prompts, %d "
             "captioned images for retrieval", len(labelled) * bs, len(knn_train) * bs, len(texts),
             len(captioned) * bs)

    @nnx.jit
    def encode_image(model: TwoTower, batch):  # (pooled encoder features, image embedding)
        feats = model.image.features(*(batch[k] for k in IMAGE_KEYS))
        return feats, model.image.proj(feats)

    encode_text = nnx.jit(lambda model, tokens: model.text(tokens))

    def image_embeddings(model: TwoTower, batches) -> np.ndarray:
        return np.concatenate([np.asarray(encode_image(model, {k: b[k] for k in IMAGE_KEYS})[1]) for b in batches])

    def evaluate(model: TwoTower) -> dict:
        img = image_embeddings(model, labelled)
        pe = np.concatenate([np.asarray(encode_text(model, prompts[i:i + bs])) for i in range(0, len(prompts), bs)])
        pe = pe[:len(texts)]
        out = {f"zero_shot/{name}": zero_shot_accuracy(img, class_embeddings(pe, cls, n),
                                                       np.concatenate([b[f"{name}_label"] for b in labelled]))
               for name, cls, n in (("shape", shape_of, len(shapes_world.SHAPES)),
                                    ("colour", colour_of, len(shapes_world.COLOURS)))}
        if captioned:
            txt = np.concatenate([np.asarray(encode_text(model, b["text"])) for b in captioned])
            out.update({f"retrieval/{k}": v for k, v in retrieval_recall(image_embeddings(model, captioned),
                                                                           txt).items()})
        out.update(knn_report(lambda b: encode_image(model, {k: b[k] for k in IMAGE_KEYS})[0], knn_train, labelled,
                              k=d.knn_k))
        return {f"eval/{k}": v for k, v in out.items()}
    return evaluate


# ----------------------------------------------------------------------------- the stage
def setup(config: ml_collections.ConfigDict, workdir: epath.Path, plan: MeshPlan) -> Job:
    data = open_sources(config.data, workdir)
    tokenizer = tokenizer_from_config(config.data, workdir)
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked; the tokenizer's ids are recorded
    config.model.text.vocab_size, config.model.text.pad_id = tokenizer.vocab_size, tokenizer.pad_id
    config.model.text.eos_id = tokenizer.eos_id
    for step in range(1, len(config.data.patch_budgets) + 1):
        budget_at(config, step)  # an unknown schedule fails here, before anything is compiled
    spec = two_tower_spec_from_config(config.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                      eos_id=tokenizer.eos_id)
    towers = place_on_mesh(config, spec, plan)
    placed = towers.placed
    log.info("loss %s; batch split over %s", config.loss_impl, plan.batch_axes)
    train_iter = BudgetBatches(config, data.mixture("train", config.seed), tokenizer)
    batch_sh: dict = {}

    def train_step(state, batch, step):
        del step
        if not batch_sh:  # every budget has the same shardings (leading axis over the batch axes)
            batch_sh.update(host_batch_shardings(batch, plan))
        state, metrics = towers.step(state, global_batch(batch, batch_sh))
        return state, dict(metrics, patch_budget=batch["patches"].shape[1])

    evaluator = make_evaluator(config, data, workdir, tokenizer)
    evaluate = None if evaluator is None else lambda state: evaluator(nnx.merge(placed.graphdef, state).model)


    return Job(config=config, plan=plan, state=placed.state, shardings=placed.shardings, train_iter=train_iter,
               train_step=train_step, schedules=placed.schedules, evaluate=evaluate,
               work=lambda batch: {"examples": len(batch["text"])}, routing=placed.routing,
               replicated=placed.replicated, hparams=dict(preset=config.get("preset", ""), params=placed.params,
                                                          loss_impl=config.loss_impl),
               fingerprints={"data.tokenizer": tokenizer.sha256})


def abstract_program(config: ml_collections.ConfigDict, devices: Sequence[Any], *, update_rms: bool = True):
    """The stage-2 step at the largest patch budget, abstract (no tokenizer: the preset's text
    vocabulary size)."""
    del update_rms  # stage 2 logs no per-group update RMS
    config = ml_collections.ConfigDict(config.to_dict())
    t = config.model.text
    vocab = int(t.get("vocab_size", 0) or config.data.tokenizer_vocab_size)
    spec = two_tower_spec_from_config(config.model, vocab_size=vocab, pad_id=int(t.get("pad_id", 0)),
                                      eos_id=int(t.get("eos_id", 1)))
    plan = plan_from_config(config.mesh, devices)
    towers = place_on_mesh(config, spec, plan, abstract=True)
    placed = towers.placed
    b, p, text_len = int(config.data.batch_size), int(config.model.vision.patch_size), int(config.data.text_len)
    n = max(int(x) for x in config.data.patch_budgets)
    batch = batch_contract(b, n, p, text_len)
    batch_sh = batch_shardings(batch, plan)
    args = (placed.state, {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch.items()})
    matmul = sum(math.prod(x.shape) for x in jax.tree.leaves(placed.state["model"]) if len(x.shape) >= 2)
    flops = 6.0 * matmul * b * max(n, text_len)  # an upper bound: every weight sees the longer sequence
    facts = dict(global_batch=b, max_patches=n, text_len=text_len, loss_impl=str(config.loss_impl),
                 optimizer=str(config.optim.name))
    summary = (f"{b} image-text pairs x {n} patches of {p}px, captions of {text_len} tokens (global); "
               f"loss {config.loss_impl}, optimizer {config.optim.name}")
    return TrainProgram(plan, towers.step, args, placed.replicated, facts, summary, flops)
