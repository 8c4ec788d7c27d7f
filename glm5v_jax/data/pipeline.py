"""grain input pipeline: records -> packed multimodal batches of the `glm5v_jax.data.batch` contract.

Stages (all deterministic given `PipelineConfig.seed`):

    source (random access: source[i] -> record dict)
      -> per-host shard        ds[process_index::process_count]
      -> shuffle               MapDataset.shuffle(seed), reshuffled every epoch
      -> repeat                num_epochs (None = forever)
      -> map_with_index        decode PNG (PIL), NaFlex, `templates.build_document` (or, with
                               document_kind "sft", a `conversations` chat)
      -> to_iter_dataset       (+ mp_prefetch when num_workers > 0)
      -> PackedBatchDataset    packing into `rows_per_batch` rows of `seq_len` tokens, at most
                               `max_images_per_row` images per row, emitted as one batch dict
                               (`packed_batches`: greedy first fit, or `packing="joint"`:
                               first-fit decreasing on both capacities, rows balanced over
                               data-parallel ranks in text and ViT tokens)

Record format (any random-access source whose items are dicts; strings may be `str`
or `bytes`): image (PNG/JPEG bytes, or a uint8 array; b"" for text-only), width,
height, kind ("image" | "text"), caption_en, caption_zh, ocr, qa_json, boxes_json,
text, id. See `glm5v_jax.data.templates` for how a record becomes a document.

Batch (numpy; B = rows_per_batch, S = seq_len, M = max_images_per_row,
N = max_patches, P = patch_size):

    tokens [B, S] int32        (padding = tokenizer.pad_id)
    segment_ids [B, S] int32   (1, 2, ... per document in a row, 0 = padding)
    loss_mask [B, S] bool      (1 = this token is a target; see templates)
    patches [B*M, N, P*P*3]    (patch_dtype), patch_yx [B*M, N, 2] int32,
    patch_valid [B*M, N] bool, image_grid [B*M, 2] int32, image_valid [B*M] bool

and with `PipelineConfig.document_kind = "sft"` (multi-turn conversations, see
`glm5v_jax.data.conversations`) also

    task_ids [B, S] int32      (`conversations.TASK_IDS` of the answer a target belongs to, 0 elsewhere)
    answer_ids [B, S] int32    (1, 2, ... per answer, numbered through the row; 0 = not a target)

Row b owns image slots b*M .. b*M+M-1, filled in order of appearance, unused slots
invalid, so the valid images in slot order are in the order of the `<|image|>`
tokens of the row-major flattened batch: the order the model scatters features in.
Every batch is checked with `validate_vlm_batch` (config.validate).

Bad samples never crash the pipeline and never reach a batch; they are counted in
the iterator's `.stats` (running totals, part of its checkpoint state):

    skipped/undecodable_image  image bytes PIL cannot decode
    skipped/empty_image        kind "image" with no bytes, or width/height 0
    skipped/too_small_image    smaller than one patch per side (NaFlexError), e.g. 1x2000
    skipped/empty_text         no usable caption/QA/box/OCR (image) or empty text (text-only)
    skipped/too_long           doc whose first target is past seq_len (an image block, an SFT prompt)
    skipped/task_filter        an SFT record without a turn of `sft_tasks`
    skipped/error              any other exception while processing the record
    skipped/bad_record         a record its source cannot read or parse (a corrupt ArrayRecord
                               shard; the source logs its file and position)
    truncated/text             text-only doc cut to seq_len
    truncated/image            image doc whose answer was cut at seq_len
    dropped/empty_caption      image record without a caption (other tasks still used)
    dropped/empty_answer       QA pairs with an empty question or answer, left out
    examples, examples/image, examples/text   documents accepted for packing (emitted, or
                               carried over into the next batch)
    batches, tokens (non-padding), images     emitted

Checkpointing: the batch iterator's `get_state()` is a JSON-serialisable dict

    {"version": 1, "parent": <grain state of the upstream iterator at the oldest
     document not yet emitted>, "n_consumed": int, "keep": [int, ...],
     "stats": {...}, "layout": {seq_len, rows_per_batch, max_images_per_row, max_patches}}

Between batches the only unfinished documents are the ones carried over (they did
not fit the previous batch). `set_state` rewinds the upstream iterator to the
oldest of them and re-reads `n_consumed` documents, keeping the offsets in `keep`
(the carried ones) and dropping the others (already emitted or skipped and
counted), so the next batch equals the one the saved iterator would have produced,
with no image data in the state. Works with `grain.checkpoint.CheckpointSave`.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import time
import zlib
from typing import Any, Iterator, Mapping

import grain
import numpy as np
from PIL import Image

from glm5v_jax.data.packed_batches import (PACKINGS, SFT_KEYS, STAT_KEYS, STATE_VERSION,  # noqa: F401
                                           PackedBatchDataset, PackedBatchIterator, PackLayout, empty_stats,
                                           patch_dtype)
from glm5v_jax.data.conversations import TASKS as SFT_TASKS, make_conversation, render_conversation
from glm5v_jax.errors import ConfigError
# Sources live in their own module; re-exported here because callers build pipelines from them.
from glm5v_jax.data.sources import (  # noqa: F401
    BAD_RECORD, _as_map_dataset, array_record_source, caption_record, is_bad_record, mix_sources, parse_tf_example,
    tfds_source,
)
from glm5v_jax.data.naflex import NaFlexError, fit_grid, pad_patches, patchify, resize_to_grid
from glm5v_jax.data.templates import (DEFAULT_TASK_WEIGHTS, TASKS, SkipSample, as_str, available_tasks,
                                      build_document)

log = logging.getLogger(__name__)

DOCUMENT_KINDS = ("pretrain", "sft")


@dataclasses.dataclass(kw_only=True)
class PipelineConfig:
    """Settings of `make_batch_iterator` (all keyword-only)."""

    seq_len: int
    rows_per_batch: int
    max_images_per_row: int
    patch_size: int = 16
    max_patches: int = 256
    merge: int = 2
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever
    shuffle: bool = True
    num_workers: int = 0  # > 0: decode + NaFlex + templating in grain worker processes
    worker_buffer_size: int = 8  # per-worker prefetch buffer (elements)
    read_threads: int = 0  # grain ReadOptions.num_threads per process (0: read in the caller's thread)
    read_buffer: int = 32  # grain ReadOptions.prefetch_buffer_size (with read_threads > 0)
    process_index: int = 0
    process_count: int = 1
    task_weights: dict[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    zh_caption_prob: float = 0.3
    qa_all_prob: float = 0.5
    # Documents that did not fit the open batch before it is emitted (>= 1, <= rows_per_batch).
    # 1 = emit as soon as one document does not fit; larger packs tighter.
    pack_lookahead: int = 4
    # "first_fit": greedy in arrival order; "joint": first-fit decreasing over a window on tokens and images at
    # once, rows dealt to `packing_ranks` data-parallel ranks balanced in text and ViT tokens (packed_batches)
    packing: str = "first_fit"
    packing_ranks: int = 1
    patch_dtype: str = "float32"  # or "bfloat16" (via ml_dtypes)
    # Big images: JPEG DCT-scaled decoding and an integer box-reduce before the bicubic resize.
    fast_downscale: bool = True
    validate: bool = True  # validate_vlm_batch on every batch
    # Raise (instead of looping forever) after this many skipped records in a row: a source
    # whose records are all bad, e.g. raw bytes without a parser.
    max_consecutive_skips: int = 10_000
    # "pretrain": `templates.build_document` (one task per image record, text records whole).
    # "sft": a multi-turn `conversations.make_conversation` per record, and the batch gains
    # task_ids / answer_ids [B, S] int32 (task_weights and qa_all_prob are then unused).
    document_kind: str = "pretrain"
    sft_min_turns: int = 2
    sft_max_turns: int = 5
    sft_system_prob: float = 0.5  # probability of a <|system|> message
    sft_text_turn_prob: float = 0.5  # probability of one text-only turn in an image conversation
    sft_tasks: tuple[str, ...] = ()  # only turns of these conversations.TASKS (() = every task)

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError("PipelineConfig", msg)  # each message names its field
        need(self.seq_len > 0, f"seq_len ({self.seq_len}) must be positive")
        need(self.rows_per_batch > 0, f"rows_per_batch ({self.rows_per_batch}) must be positive")
        need(self.max_images_per_row >= 1, f"max_images_per_row ({self.max_images_per_row}) must be >= 1")
        need(self.patch_size > 0 and self.merge >= 1, "patch_size and merge must be positive")
        need(self.max_patches > 0 and self.max_patches % (self.merge ** 2) == 0,
             f"max_patches ({self.max_patches}) must be a positive multiple of merge**2 = {self.merge ** 2}")
        need(0 <= self.process_index < self.process_count,
             f"process_index ({self.process_index}) must lie in [0, process_count={self.process_count})")
        need(self.num_epochs is None or self.num_epochs >= 1, f"num_epochs ({self.num_epochs}) must be >= 1 or None")
        need(0 <= self.seed < 2 ** 32, f"seed ({self.seed}) must lie in [0, 2**32)")
        need(self.pack_lookahead >= 1, f"pack_lookahead ({self.pack_lookahead}) must be >= 1")
        need(self.packing in PACKINGS, f"packing ({self.packing!r}) must be one of {PACKINGS}")
        need(self.packing_ranks >= 1 and self.rows_per_batch % self.packing_ranks == 0,
             f"packing_ranks ({self.packing_ranks}) must be >= 1 and divide rows_per_batch ({self.rows_per_batch})")
        need(self.num_workers >= 0, f"num_workers ({self.num_workers}) must be >= 0")
        need(self.patch_dtype in ("float32", "bfloat16"),
             f"patch_dtype ({self.patch_dtype!r}) must be float32 or bfloat16")
        need(set(self.task_weights) <= set(TASKS),
             f"task_weights keys {sorted(self.task_weights)} must be among {TASKS}")
        need(any(w > 0 for w in self.task_weights.values()), "task_weights needs a positive weight")
        need(self.max_consecutive_skips >= 1, f"max_consecutive_skips ({self.max_consecutive_skips}) must be >= 1")
        need(self.document_kind in DOCUMENT_KINDS,
             f"document_kind ({self.document_kind!r}) must be one of {DOCUMENT_KINDS}")
        need(1 <= self.sft_min_turns <= self.sft_max_turns,
             f"need 1 <= sft_min_turns ({self.sft_min_turns}) <= sft_max_turns ({self.sft_max_turns})")
        need(0 <= self.sft_system_prob <= 1 and 0 <= self.sft_text_turn_prob <= 1,
             "sft_system_prob and sft_text_turn_prob must lie in [0, 1]")
        need(set(self.sft_tasks) <= set(SFT_TASKS), f"sft_tasks {list(self.sft_tasks)} must be among {SFT_TASKS}")


# --------------------------------------------------------------------------- images


class _ImageSkip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _open_image(data: Any) -> Image.Image:
    """A PIL image from encoded bytes (opened lazily: header only) or a uint8 array; raises _ImageSkip."""
    if isinstance(data, np.ndarray) and data.dtype != np.object_:
        arr = data
        if arr.size == 0:
            raise _ImageSkip("skipped/empty_image")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise _ImageSkip("skipped/undecodable_image")
        return Image.fromarray(np.ascontiguousarray(arr))
    if isinstance(data, np.ndarray):  # 0-d object array holding bytes
        data = data.item() if data.size == 1 else b""
    if isinstance(data, str):
        data = data.encode("latin-1")
    data = bytes(data or b"")
    if not data:
        raise _ImageSkip("skipped/empty_image")
    try:
        return Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001  PIL raises many kinds (UnidentifiedImageError, DecompressionBomb...)
        raise _ImageSkip("skipped/undecodable_image") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")  # transparent pixels -> white, not whatever RGB they hold
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess_image(data: Any, *, patch_size: int, max_patches: int, merge: int = 2,
                     fast_downscale: bool = True) -> dict[str, np.ndarray]:
    """Encoded image (or uint8 array) -> NaFlex arrays (patches, patch_yx, valid, grid).

    Same grid as `naflex_preprocess` (from the stored size). With `fast_downscale`, a
    JPEG is decoded at a reduced DCT scale no smaller than the target (`draft`), and an
    image at least twice the target size per side is box-reduced by an integer factor
    (cheap, antialiased) before the bicubic resize. Raises `_ImageSkip` with a counter name.
    """
    img = _open_image(data)
    if img.width == 0 or img.height == 0:
        raise _ImageSkip("skipped/empty_image")
    try:
        gh, gw = fit_grid(img.height, img.width, patch_size=patch_size, max_patches=max_patches, merge=merge)
    except NaFlexError:
        raise _ImageSkip("skipped/too_small_image") from None
    target = (gw * patch_size, gh * patch_size)  # PIL (width, height)
    try:
        if fast_downscale and img.format == "JPEG":
            img.draft(None, target)  # DCT scaling; mode unchanged
        img.load()
        img = _to_rgb(img)
    except Exception:  # noqa: BLE001  truncated / corrupt data behind a valid header
        raise _ImageSkip("skipped/undecodable_image") from None
    factor = min(img.height // target[1], img.width // target[0])
    if fast_downscale and factor >= 2:
        img = img.reduce(factor)
    resized = resize_to_grid(np.asarray(img), gh, gw, patch_size)
    patches, yx = patchify(resized, patch_size, merge)
    patches, yx, valid = pad_patches(patches, yx, max_patches)
    return dict(patches=patches, patch_yx=yx, valid=valid, grid=np.array([gh, gw], np.int32))


# --------------------------------------------------------------------------- per-record map


def _record_kind(record: Mapping[str, Any]) -> str:
    kind = as_str(record.get("kind")).strip().lower()
    if kind in ("image", "text"):
        return kind
    image = record.get("image")
    has_image = image is not None and (np.size(image) > 0 if isinstance(image, np.ndarray) else bool(image))
    return "image" if has_image else "text"


def _skip(reason: str, counts: dict[str, int] | None = None) -> dict[str, Any]:
    counts = dict(counts or {})
    counts[reason] = counts.get(reason, 0) + 1
    return {"skip": reason, "counts": counts}


_n_errors = 0


def _warn_error(record: Any, e: Exception) -> None:
    """Log the first 10 unexpected errors of this process, then every 1000th."""
    global _n_errors
    _n_errors += 1
    if _n_errors <= 10 or _n_errors % 1000 == 0:
        rid = as_str(record.get("id")) if isinstance(record, Mapping) else f"<{type(record).__name__}>"
        log.warning("pipeline: record %r skipped (error %d in this process) after %s: %s",
                    rid, _n_errors, type(e).__name__, e)


@dataclasses.dataclass(frozen=True)
class ProcessRecord:
    """grain `map_with_index` transform: (index, record) -> packable document or a skip marker.

    A document is {"tokens" int32 [L], "loss_mask" bool [L], "n_images": 0|1, "counts": {...}}
    (plus "task_ids", "answer_ids" int32 [L] with document_kind "sft") plus, for image documents,
    "patches" [1, N, D], "patch_yx" [1, N, 2], "patch_valid" [1, N], "image_grid" [1, 2]. A skip
    marker is {"skip": reason, "counts": {...}}. Module-level and plain data, so it pickles into
    grain workers.
    """

    tokenizer: Any
    config: PipelineConfig
    epoch_len: int

    def rng(self, index: int, record: Mapping[str, Any]) -> np.random.Generator:
        rid = as_str(record.get("id"))
        key = zlib.crc32(rid.encode("utf-8")) if rid else index % self.epoch_len
        return np.random.default_rng([self.config.seed, key, index // self.epoch_len, 0x7E5C])

    def __call__(self, index: int, record: Mapping[str, Any]) -> dict[str, Any]:
        if is_bad_record(record):  # the source has logged it
            return _skip(BAD_RECORD)
        try:
            return self._process(index, record)
        except Exception as e:  # noqa: BLE001  bad data must never stop training
            _warn_error(record, e)
            return _skip("skipped/error")

    def _document(self, record: Mapping[str, Any], n_image_tokens: int | None,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The token arrays of one record; raises SkipSample."""
        cfg, tok = self.config, self.tokenizer
        if cfg.document_kind == "sft":
            conv = make_conversation(record, rng, image=n_image_tokens is not None, min_turns=cfg.sft_min_turns,
                                     max_turns=cfg.sft_max_turns, system_prob=cfg.sft_system_prob,
                                     text_turn_prob=cfg.sft_text_turn_prob, zh_caption_prob=cfg.zh_caption_prob,
                                     tasks=cfg.sft_tasks)
            return render_conversation(conv, tok, n_image_tokens=n_image_tokens)._asdict()
        if n_image_tokens is None:
            ids, mask = build_document(record, tok, n_image_tokens=None, rng=rng)
        else:
            ids, mask = build_document(record, tok, n_image_tokens=n_image_tokens, rng=rng,
                                       task_weights=cfg.task_weights, zh_caption_prob=cfg.zh_caption_prob,
                                       qa_all_prob=cfg.qa_all_prob)
        return {"tokens": ids, "loss_mask": mask}

    def _fit(self, doc: dict[str, np.ndarray], kind: str, counts: dict[str, int]) -> dict[str, np.ndarray] | None:
        """`doc` cut to seq_len (counted as truncated/<kind>), or None when no target is left."""
        seq_len, mask = self.config.seq_len, doc["loss_mask"]
        if len(mask) <= seq_len:
            return doc
        first_target = int(np.argmax(mask)) if mask.any() else len(mask)
        if first_target >= seq_len:  # the prompt (image block, ...) alone fills the row
            return None
        counts[f"truncated/{kind}"] = 1
        return {k: v[:seq_len] for k, v in doc.items()}

    def _process(self, index: int, record: Mapping[str, Any]) -> dict[str, Any]:
        cfg = self.config
        counts: dict[str, int] = {}
        rng = self.rng(index, record)
        if _record_kind(record) == "text":
            try:
                doc = self._fit(self._document(record, None, rng), "text", counts)
            except SkipSample as e:
                return _skip(e.reason)
            if doc is None:
                return _skip("skipped/too_long", counts)
            counts.update({"examples": 1, "examples/text": 1})
            return {**doc, "n_images": 0, "counts": counts}

        try:
            w, h = int(np.asarray(record.get("width", -1))), int(np.asarray(record.get("height", -1)))
        except (TypeError, ValueError):
            w = h = -1
        if w == 0 or h == 0:
            return _skip("skipped/empty_image")
        tasks = available_tasks(record, counts)  # before decoding: no text, no work
        if cfg.document_kind != "sft":  # a conversation uses every task the record has data for
            tasks = [t for t in tasks if cfg.task_weights.get(t, 0.0) > 0]
        if not tasks:
            return _skip("skipped/empty_text", counts)
        try:
            item = preprocess_image(record.get("image"), patch_size=cfg.patch_size, max_patches=cfg.max_patches,
                                    merge=cfg.merge, fast_downscale=cfg.fast_downscale)
        except _ImageSkip as e:
            return _skip(e.reason, counts)
        gh, gw = (int(v) for v in item["grid"])
        n_tok = (gh // cfg.merge) * (gw // cfg.merge)
        try:
            doc = self._fit(self._document(record, n_tok, rng), "image", counts)
        except SkipSample as e:
            return _skip(e.reason, counts)
        if doc is None:
            return _skip("skipped/too_long", counts)
        counts.update({"examples": 1, "examples/image": 1})
        dt = patch_dtype(cfg.patch_dtype)
        return {**doc, "n_images": 1, "counts": counts,
                "patches": item["patches"][None].astype(dt), "patch_yx": item["patch_yx"][None],
                "patch_valid": item["valid"][None], "image_grid": item["grid"][None]}


# --------------------------------------------------------------------------- public API


def _mark_absl_flags_parsed() -> None:
    """grain 0.2.18 reads an absl flag in mp_prefetch; outside absl.app.run it is unparsed."""
    from absl import flags  # noqa: PLC0415

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_record_dataset(source: Any, tokenizer, config: PipelineConfig) -> grain.IterDataset:
    """The pipeline up to (not including) packing: an IterDataset of documents / skip markers."""
    ds = _as_map_dataset(source)
    if config.process_count > 1:
        ds = ds[config.process_index::config.process_count]
    n = len(ds)
    if n == 0:
        raise ValueError(f"process {config.process_index} of {config.process_count} has no records "
                         f"(source length {len(_as_map_dataset(source))})")
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    if config.num_epochs != 1:
        ds = ds.repeat(config.num_epochs)
    ds = ds.map_with_index(ProcessRecord(tokenizer, config, n))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=config.read_buffer))
    if config.num_workers > 0:
        _mark_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                         per_worker_buffer_size=config.worker_buffer_size))
    return it


def pack_layout(tokenizer, config: PipelineConfig) -> PackLayout:
    return PackLayout(
        seq_len=config.seq_len, rows_per_batch=config.rows_per_batch,
        max_images_per_row=config.max_images_per_row, max_patches=config.max_patches,
        patch_dim=config.patch_size * config.patch_size * 3, pad_id=int(tokenizer.pad_id),
        image_token_id=int(tokenizer.image_id), vocab_size=int(tokenizer.vocab_size), merge=config.merge,
        lookahead=config.pack_lookahead, patch_dtype=config.patch_dtype, validate=config.validate,
        max_consecutive_skips=config.max_consecutive_skips, document_kind=config.document_kind,
        packing=config.packing, balance_ranks=config.packing_ranks)


def make_batch_dataset(source: Any, tokenizer, config: PipelineConfig) -> PackedBatchDataset:
    """The whole pipeline as a grain IterDataset of batch dicts (e.g. for `grain.experimental.device_put`)."""
    return PackedBatchDataset(make_record_dataset(source, tokenizer, config), pack_layout(tokenizer, config))


def make_batch_iterator(source: Any, tokenizer, config: PipelineConfig) -> PackedBatchIterator:
    """Checkpointable iterator of packed batch dicts (numpy); `.stats` holds the running counters.

    source: any random-access source (`len`, `source[i]` -> record dict), e.g. a list of dicts,
      `tfds.data_source(...)`, `tfds_source(...)`, `array_record_source(...)`, or a
      `grain.MapDataset` such as `mix_sources(...)`.
    """
    return iter(make_batch_dataset(source, tokenizer, config))


def measure_throughput(iterator: Iterator[Mapping[str, np.ndarray]], n_batches: int) -> dict[str, float]:
    """Pull `n_batches` batches and time them (includes any warm-up the iterator still does).

    examples = packed documents (sum over rows of the max segment id), tokens = non-padding.
    """
    if n_batches <= 0:
        raise ValueError("n_batches must be positive")
    examples = tokens = images = batches = 0
    start = time.perf_counter()
    for _ in range(n_batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        seg = np.asarray(batch["segment_ids"])
        examples += int(seg.max(axis=1).sum())
        tokens += int((seg != 0).sum())
        images += int(np.asarray(batch.get("image_valid", np.zeros(0, bool))).sum())
        batches += 1
    dt = max(time.perf_counter() - start, 1e-9)
    return dict(seconds=dt, batches=batches, examples=examples, batches_per_s=batches / dt,
                examples_per_s=examples / dt, tokens_per_s=tokens / dt, images_per_s=images / dt)
