"""Stage 2 trainer: CogViT and a text tower trained contrastively with the sigmoid loss (report 2.1).

One readable loop, the sibling of `glm5v_jax.train.cogvit_mim`:
  image sources mixed by weight (shapes world built on first use) -> NaFlex batches with their
  captions as token ids, each batch at one patch budget of `config.data.patch_budgets`
  -> TwoTower (models/two_tower.py): CogViT + mean pool + projection, text tower + projection,
     learnable t' and b -> SigLIP loss: dense on one device, or ring / all-gather over a
     data-parallel mesh -> Muon (or AdamW) with groups vision / text / projection
  -> resume from the newest good checkpoint
  -> evaluation on the shapes-world validation split at step 0 (the random-init baseline),
     every eval_every steps and at the end: zero-shot shape and colour of the first object,
     image->text and text->image recall@1/5, k-NN accuracy of the pooled encoder features
  -> TensorBoard + metrics.jsonl, and a step-0-vs-final table (logged, eval_table.md).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glm5v_jax.data import shapes_world
from glm5v_jax.data.image_batches import ImageBatchConfig, make_image_batch_iterator
from glm5v_jax.data.tokenizer import Tokenizer, train_tokenizer
from glm5v_jax.losses.contrastive import l2_normalize, sharded_sigmoid_contrastive_loss, sigmoid_contrastive_loss
from glm5v_jax.models.two_tower import TwoTower, two_tower_spec_from_config
from glm5v_jax.train.checkpoint import Checkpointer
from glm5v_jax.train.optimizer import transform_from_config
from glm5v_jax.train.vision_data import prepare_image_sources
from glm5v_jax.train.vision_eval import knn_report, write_eval_table
from glm5v_jax.train.writers import (
    JsonlWriter,
    MultiWriter,
    TensorBoardWriter,
    plot_curves,
)

log = logging.getLogger(__name__)
IMAGE_KEYS = ("patches", "patch_yx", "valid")
BATCH_KEYS = IMAGE_KEYS + ("text",)
LOSS_IMPLS = ("dense", "ring", "all_gather")
DATA_AXIS = "data"


# ----------------------------------------------------------------------------- text
def prepare_tokenizer(data: ml_collections.ConfigDict, workdir: Path) -> Tokenizer:
    """config.data.tokenizer, or a SentencePiece model trained on the texts (captions, QA, OCR) of
    the largest shapes-world source, cached in the data directory."""
    if data.tokenizer:
        return Tokenizer(data.tokenizer)
    worlds = [s for s in data.sources.values() if s.kind == "shapes_world"]
    src = max(worlds, key=lambda s: int(s.train)) if worlds else None
    if src is None:
        raise ValueError("config.data.tokenizer: no shapes_world source to train a tokenizer on; give the path "
                         "of a SentencePiece model")
    n = min(int(src.train), int(data.tokenizer_images))
    path = (Path(data.data_dir) if data.data_dir else Path(workdir) / "data") / \
        f"siglip_tokenizer_seed{src.build_seed}_{n}_{data.tokenizer_vocab_size}.model"
    if path.exists():
        return Tokenizer(str(path))
    t0 = time.time()
    tok = train_tokenizer(shapes_world.iter_texts(int(src.build_seed), {"train": n}), str(path),
                          vocab_size=int(data.tokenizer_vocab_size))
    log.info("trained tokenizer %s (%d pieces) in %.1f s", path, tok.vocab_size, time.time() - t0)
    return tok


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
class TrainState(nnx.Module):
    """What training changes and checkpoints: the two towers and the optimizer."""

    def __init__(self, model: TwoTower, optimizer: nnx.Optimizer):
        self.model, self.optimizer = model, optimizer


def build_state(config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    """(TrainState, {"<group>/<kind>": schedule}, Muon routing text or None)."""
    spec = two_tower_spec_from_config(config.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                      eos_id=tokenizer.eos_id)
    model = TwoTower(spec, rngs=nnx.Rngs(config.seed))
    tx, schedules, _, routing = transform_from_config(model, config.optim, config.total_steps)
    return TrainState(model, nnx.Optimizer(model, tx, wrt=nnx.Param)), schedules, routing


def data_mesh(config: ml_collections.ConfigDict) -> Mesh | None:
    """None for `dense`; else a 1D mesh ('data') over config.mesh.data devices (0 = all)."""
    if config.loss_impl not in LOSS_IMPLS:
        raise ValueError(f"config.loss_impl: unknown {config.loss_impl!r}; expected one of {LOSS_IMPLS}")
    if config.loss_impl == "dense":
        return None
    n = int(config.mesh.data) or jax.device_count()
    if n > jax.device_count() or config.data.batch_size % n:
        raise ValueError(f"config.mesh.data: {n} devices (of {jax.device_count()}) must divide "
                         f"config.data.batch_size = {config.data.batch_size}")
    return Mesh(np.asarray(jax.devices()[:n]), (DATA_AXIS,))


def make_loss_fn(loss_impl: str, mesh: Mesh | None):
    """loss_fn(model, batch) -> (SigLIP loss, metrics) of the towers' outputs on the batch."""
    def loss_fn(model: TwoTower, batch):
        img, txt = model(*(batch[k] for k in IMAGE_KEYS), batch["text"])
        t_prime, b = model.t_prime[...], model.b[...]
        if loss_impl == "dense":
            loss = sigmoid_contrastive_loss(img, txt, t_prime, b)
        else:
            loss = sharded_sigmoid_contrastive_loss(img, txt, t_prime, b, mesh=mesh, batch_axes=DATA_AXIS,
                                                    impl=loss_impl)
        pos_cos = jnp.mean(jnp.sum(l2_normalize(img) * l2_normalize(txt), -1))
        return loss, {"temperature": jnp.exp(t_prime), "bias": b, "positive_cosine": pos_cos}
    return loss_fn


def replicate(state: TrainState, mesh: Mesh) -> None:
    """Every parameter and optimizer slot copied to each device of `mesh` (data parallelism)."""
    nnx.update(state, jax.device_put(nnx.state(state), NamedSharding(mesh, P())))


def device_batch(batch, mesh: Mesh | None) -> dict:
    """A host batch as device arrays; on a mesh split along its leading (batch) axis."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return jax.device_put(dict(batch), NamedSharding(mesh, P(DATA_AXIS)))


def make_train_step(loss_fn):
    @nnx.jit
    def train_step(state: TrainState, batch):
        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(state.model, batch)
        state.optimizer.update(state.model, grads)
        return dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return train_step


# ----------------------------------------------------------------------------- data
def budget_at(config: ml_collections.ConfigDict, step: int) -> int:
    """The patch budget of training step `step` (1-based): cycling, or seeded random."""
    budgets = tuple(int(b) for b in config.data.patch_budgets)
    if config.data.budget_schedule == "cycle":
        return budgets[(step - 1) % len(budgets)]
    if config.data.budget_schedule == "random":
        return budgets[int(np.random.default_rng([config.seed, step]).integers(len(budgets)))]
    raise ValueError(f"config.data.budget_schedule: unknown {config.data.budget_schedule!r}; expected cycle | random")


def _batch_config(config, budget: int, **kw) -> ImageBatchConfig:
    v = config.model.vision
    return ImageBatchConfig(batch_size=config.data.batch_size, patch_size=v.patch_size, max_patches=budget,
                            merge=v.merge_size, caption_keys=tuple(config.data.caption_keys), **kw)


def _fixed_batches(source, config, n_images: int, budget: int, text_len: int, tokenizer):
    """The first n_images of `source` in order, as full batches (a last partial batch is dropped)."""
    import grain

    ds = source[:n_images] if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)[:n_images]
    cfg = _batch_config(config, budget, shuffle=False, num_epochs=1, text_len=text_len)
    return list(make_image_batch_iterator(ds, cfg, tokenizer if text_len else None))


def make_evaluator(config, sources, tokenizer):
    """evaluate(model) -> {"eval/...": value}, or None when there is no labelled evaluation set."""
    if sources.eval is None or not config.eval_every:
        return None
    d, budget, bs = config.data, int(config.model.vision.max_patches), config.data.batch_size
    knn_train = _fixed_batches(sources.knn_train, config, d.knn_train_images, budget, 0, None)
    evals = _fixed_batches(sources.eval, config, d.eval_images, budget, d.text_len, tokenizer)
    if not knn_train or not evals:
        raise ValueError(f"config.data.knn_train_images / eval_images: the evaluation sets give {len(knn_train)} and "
                         f"{len(evals)} full batches of {bs} images; each needs at least one")
    texts, colour_of, shape_of = class_prompts()
    prompts = tokenize(tokenizer, texts, d.text_len)
    prompts = np.concatenate([prompts, np.repeat(prompts[-1:], -len(prompts) % bs, 0)])  # whole batches

    log.info("evaluation: %d validation images with captions, %d k-NN reference images, %d class prompts",
             len(evals) * bs, len(knn_train) * bs, len(texts))

    @nnx.jit
    def encode_image(model: TwoTower, batch):  # (pooled encoder features, image embedding)
        feats = model.image.features(*(batch[k] for k in IMAGE_KEYS))
        return feats, model.image.proj(feats)

    encode_text = nnx.jit(lambda model, tokens: model.text(tokens))

    def evaluate(model: TwoTower) -> dict:
        img = [encode_image(model, {k: b[k] for k in IMAGE_KEYS})[1] for b in evals]
        img = np.concatenate([np.asarray(x) for x in img])
        txt = np.concatenate([np.asarray(encode_text(model, b["text"])) for b in evals])
        pe = np.concatenate([np.asarray(encode_text(model, prompts[i:i + bs])) for i in range(0, len(prompts), bs)])
        pe = pe[:len(texts)]
        out = {f"zero_shot/{name}": zero_shot_accuracy(img, class_embeddings(pe, cls, n),
                                                       np.concatenate([b[f"{name}_label"] for b in evals]))
               for name, cls, n in (("shape", shape_of, len(shapes_world.SHAPES)),
                                    ("colour", colour_of, len(shapes_world.COLOURS)))}
        out.update({f"retrieval/{k}": v for k, v in retrieval_recall(img, txt).items()})
        out.update(knn_report(lambda b: encode_image(model, {k: b[k] for k in IMAGE_KEYS})[0], knn_train, evals,
                              k=d.knn_k))
        return {f"eval/{k}": v for k, v in out.items()}
    return evaluate


# ----------------------------------------------------------------------------- the loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (resuming if possible) until `config.total_steps`; returns the last metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sources = prepare_image_sources(config.data, workdir, seed=config.seed)
    tokenizer = prepare_tokenizer(config.data, workdir)
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked; the tokenizer's ids are recorded
    config.model.text.vocab_size, config.model.text.pad_id = tokenizer.vocab_size, tokenizer.pad_id
    config.model.text.eos_id = tokenizer.eos_id
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    mesh = data_mesh(config)
    for step in range(1, len(config.data.patch_budgets) + 1):
        budget_at(config, step)  # an unknown schedule fails here, before anything is compiled

    state, schedules, routing = build_state(config, tokenizer)
    if routing:
        (workdir / "routing.txt").write_text(routing + "\n")
    if mesh is not None:
        replicate(state, mesh)
        log.info("loss %s over %d devices (mesh axis %r); batch split, parameters replicated", config.loss_impl,
                 mesh.size, DATA_AXIS)

    budgets = tuple(int(b) for b in config.data.patch_budgets)
    iters = {b: make_image_batch_iterator(
        sources.train, _batch_config(config, b, seed=config.seed + i, text_len=config.data.text_len,
                                     num_workers=config.data.num_workers), tokenizer)
        for i, b in enumerate(budgets)}
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
    start_step = 0
    restored = ckpt.restore_latest(nnx.state(state))
    if restored is not None:
        start_step, saved, data_state, _ = restored
        nnx.update(state, saved)
        for b, it in iters.items():
            it.set_state(data_state["budgets"][str(b)])
        log.info("resuming at step %d", start_step)

    evaluate = make_evaluator(config, sources, tokenizer)
    writer = MultiWriter([TensorBoardWriter(workdir / "tensorboard"), JsonlWriter(workdir / "metrics.jsonl")])
    train_step = make_train_step(make_loss_fn(config.loss_impl, mesh))
    last: dict = {}
    if start_step == 0 and evaluate is not None:
        last = evaluate(state.model)  # the random-init towers: the baseline training must beat
        writer.write_scalars(0, last)
        log.info("step 0 (random init): %s", last)
    acc: dict = {}
    t0, window = time.time(), 0
    step = start_step
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            budget = budget_at(config, step)
            batch = device_batch({k: v for k, v in next(iters[budget]).items() if k in BATCH_KEYS}, mesh)
            metrics = train_step(state, batch)
            for k, v in dict(metrics, patch_budget=budget).items():
                acc.setdefault(k, []).append(v)
            window += 1
            if step % config.log_every == 0 or step == config.total_steps:
                scalars = {f"train/{k}" if k != "loss" else k: float(np.mean(jax.device_get(v)))
                           for k, v in acc.items()}
                elapsed = time.time() - t0
                scalars["perf/steps_per_s"] = window / max(elapsed, 1e-9)
                scalars["perf/images_per_s"] = window * config.data.batch_size / max(elapsed, 1e-9)
                scalars.update({f"lr/{k}": float(s(step - 1)) for k, s in schedules.items()})
                stats: dict = {}
                for it in iters.values():
                    for k, v in it.stats.items():
                        stats[k] = stats.get(k, 0) + v
                scalars.update({f"data/{k}": float(v) for k, v in stats.items()})
                writer.write_scalars(step, scalars)
                log.info("step %d/%d  loss %.4f  t %.2f  b %.2f  %.2f steps/s", step, config.total_steps,
                         scalars["loss"], scalars["train/temperature"], scalars["train/bias"],
                         scalars["perf/steps_per_s"])
                last.update(scalars)
                acc, t0, window = {}, time.time(), 0
            if evaluate is not None and (step % config.eval_every == 0 or step == config.total_steps):
                ev = evaluate(state.model)
                writer.write_scalars(step, ev)
                log.info("step %d eval: %s", step, ev)
                last.update(ev)
                t0 = time.time()
            if step % config.checkpoint_every == 0 or step == config.total_steps:
                data_state = {"budgets": {str(b): it.get_state() for b, it in iters.items()}}
                ckpt.save(step, nnx.state(state), data_state, json.loads(config.to_json_best_effort()), force=True)
            writer.flush()
    finally:
        ckpt.close()
        writer.close()
    if evaluate is not None and step == config.total_steps:
        table = write_eval_table(workdir, step)
        log.info("evaluation, random init vs trained:\n%s", table)
    plot_curves(workdir / "metrics.jsonl", workdir / "loss_curves.png")
    return dict(last, step=step)
