"""Packing documents into batches: the checkpointable grain iterator behind `pipeline.make_batch_iterator`.

Documents (`pipeline.ProcessRecord` outputs: tokens, loss mask, images' patches) are placed into
`rows_per_batch` rows of `seq_len` tokens with at most `max_images_per_row` images per row:

  first_fit  (default) greedy first fit in arrival order: a document that fits no open row waits for the
             next batch (`lookahead` such documents close the batch)
  joint      first-fit decreasing over a window of documents on both capacities at once
             (`data.packing.pack_rows`), then the rows dealt to the `balance_ranks` data-parallel ranks
             that share the batch, each rank's rows contiguous, its text tokens and ViT tokens balanced
             (`data.packing.balance_ranks`); the window's documents that find no row open the next batch

State: the parent's state before the oldest document still held, how many documents were read since,
which of those are held, and the running `.stats`; a restore replays the parent from there.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import grain
import numpy as np

from glm5v_jax.data.batch import validate_vlm_batch
from glm5v_jax.data.packing import pack_rows, rank_order

STAT_KEYS = (
    "skipped/undecodable_image", "skipped/empty_image", "skipped/too_small_image",
    "skipped/empty_text", "skipped/too_long", "skipped/task_filter", "skipped/error", "skipped/bad_record",
    "truncated/text", "truncated/image", "dropped/empty_caption", "dropped/empty_answer",
    "examples", "examples/image", "examples/text", "batches", "tokens", "images",
)
STATE_VERSION = 1
SFT_KEYS = ("task_ids", "answer_ids")  # extra per-token keys of "sft" documents and batches


def empty_stats() -> dict[str, int]:
    return {k: 0 for k in STAT_KEYS}


def patch_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415  (ships with jax; imported only when asked for)
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


PACKINGS = ("first_fit", "joint")


@dataclasses.dataclass(frozen=True)
class PackLayout:
    """Static shapes and ids the packer needs (plain data, picklable)."""

    seq_len: int
    rows_per_batch: int
    max_images_per_row: int
    max_patches: int
    patch_dim: int
    pad_id: int
    image_token_id: int
    vocab_size: int
    merge: int = 2
    lookahead: int = 4
    patch_dtype: str = "float32"
    validate: bool = True
    max_consecutive_skips: int = 10_000
    document_kind: str = "pretrain"
    packing: str = "first_fit"  # PACKINGS
    balance_ranks: int = 1  # joint: data-parallel ranks sharing the batch's rows (rows_per_batch / ranks each)

    def key(self) -> dict[str, Any]:
        key: dict[str, Any] = dict(seq_len=self.seq_len, rows_per_batch=self.rows_per_batch,
                                   max_images_per_row=self.max_images_per_row, max_patches=self.max_patches)
        if self.document_kind != "pretrain":  # pre-training states keep their old layout key
            key["document_kind"] = self.document_kind
        if self.packing != "first_fit":  # (first-fit states keep theirs too)
            key.update(packing=self.packing, balance_ranks=self.balance_ranks)
        return key


class _Row:
    __slots__ = ("docs", "used", "n_images")

    def __init__(self):
        self.docs: list[dict] = []
        self.used = 0
        self.n_images = 0

    def fits(self, doc: dict, layout: PackLayout) -> bool:
        return (self.used + len(doc["tokens"]) <= layout.seq_len
                and self.n_images + doc["n_images"] <= layout.max_images_per_row)

    def add(self, doc: dict) -> None:
        self.docs.append(doc)
        self.used += len(doc["tokens"])
        self.n_images += doc["n_images"]


class PackedBatchIterator(grain.DatasetIterator):
    """Checkpointable iterator of packed batches; see the module docstring for the state."""

    def __init__(self, parent: grain.DatasetIterator, layout: PackLayout):
        super().__init__(parent)
        self._layout = layout
        self._lookahead = max(1, min(layout.lookahead, layout.rows_per_batch))
        self._carry: list[tuple[int, Any, dict]] = []  # (seq, parent state before it, doc)
        self._seq = 0  # documents read from the parent (relative numbering)
        self.stats: dict[str, int] = empty_stats()

    # -- reading
    def _read(self) -> tuple[Any, dict]:
        pre = copy.deepcopy(self._parent.get_state())
        el = next(self._parent)
        self._seq += 1
        return pre, el

    def _count(self, counts: Mapping[str, int]) -> None:
        for k, v in counts.items():
            self.stats[k] = self.stats.get(k, 0) + int(v)

    # -- packing
    def _place(self, rows: list[_Row], doc: dict) -> bool:
        for row in rows:
            if row.fits(doc, self._layout):
                row.add(doc)
                return True
        return False

    def _next_document(self) -> tuple[Any, dict] | None:
        """(parent state before it, document) of the next document that was not skipped; None at the end."""
        skips = 0
        while True:
            try:
                pre, el = self._read()
            except StopIteration:
                return None
            self._count(el.get("counts", {}))
            if "skip" not in el:
                return pre, el
            skips += 1
            if skips >= self._layout.max_consecutive_skips:
                bad = {k: v for k, v in self.stats.items() if v and k.startswith("skipped/")}
                raise RuntimeError(f"packer: {skips} records in a row were skipped ({bad}); "
                                   "is the source in the record format?")

    def __next__(self) -> dict[str, np.ndarray]:
        if self._layout.packing == "joint":
            return self._next_joint()
        layout = self._layout
        rows = [_Row() for _ in range(layout.rows_per_batch)]
        carried, self._carry = self._carry, []
        for entry in carried:  # documents that did not fit the previous batch go first
            if not self._place(rows, entry[2]):
                self._carry.append(entry)
        while len(self._carry) < self._lookahead:
            read = self._next_document()
            if read is None:
                break
            pre, el = read
            if not self._place(rows, el):
                self._carry.append((self._seq - 1, pre, el))
        if not any(row.docs for row in rows):
            if self._carry:  # cannot happen: every document fits an empty row
                raise RuntimeError("packer: carried documents do not fit an empty batch")
            raise StopIteration
        return self._emit(rows)

    def _next_joint(self) -> dict[str, np.ndarray]:
        """A window of documents (those held from the last batch, then new ones until they would fill the
        batch in tokens or in images, and `lookahead` more) packed by `pack_rows` on both capacities; the
        first rows_per_batch rows are dealt to the ranks (`balance_ranks` on each row's text tokens and
        valid ViT patches), the documents of the other rows are held for the next batch."""
        layout = self._layout
        rows_total = layout.rows_per_batch
        window, self._carry = self._carry, []
        tokens = sum(len(e[2]["tokens"]) for e in window)
        images = sum(e[2]["n_images"] for e in window)
        extra = 0
        while extra < self._lookahead:
            if tokens >= rows_total * layout.seq_len or images >= rows_total * layout.max_images_per_row:
                extra += 1
            read = self._next_document()
            if read is None:
                break
            pre, el = read
            window.append((self._seq - 1, pre, el))
            tokens, images = tokens + len(el["tokens"]), images + el["n_images"]
        if not window:
            raise StopIteration
        docs = [e[2] for e in window]
        packed, too_large = pack_rows([len(d["tokens"]) for d in docs], [d["n_images"] for d in docs],
                                      seq_len=layout.seq_len, vit_capacity=layout.max_images_per_row)
        if too_large:  # cannot happen: ProcessRecord fits every document to a row
            raise RuntimeError(f"packer: {len(too_large)} documents do not fit an empty row")
        chosen, held = packed[:rows_total], packed[rows_total:]
        self._carry = sorted((window[i] for r in held for i in r), key=lambda e: e[0])
        loads = np.zeros((rows_total, 2))
        for r, members in enumerate(chosen):
            loads[r] = (sum(len(docs[i]["tokens"]) for i in members),
                        sum(int(np.sum(docs[i]["patch_valid"])) for i in members if docs[i]["n_images"]))
        rows = []
        for r in rank_order(loads, layout.balance_ranks):  # each rank's rows contiguous
            row = _Row()
            for i in (chosen[r] if r < len(chosen) else []):
                row.add(docs[i])
            rows.append(row)
        return self._emit(rows)

    def _emit(self, rows: list[_Row]) -> dict[str, np.ndarray]:
        L = self._layout
        b, s, m, n = L.rows_per_batch, L.seq_len, L.max_images_per_row, L.max_patches
        out = dict(
            tokens=np.full((b, s), L.pad_id, np.int32),
            segment_ids=np.zeros((b, s), np.int32),
            loss_mask=np.zeros((b, s), bool),
            patches=np.zeros((b * m, n, L.patch_dim), patch_dtype(L.patch_dtype)),
            patch_yx=np.zeros((b * m, n, 2), np.int32),
            patch_valid=np.zeros((b * m, n), bool),
            image_grid=np.zeros((b * m, 2), np.int32),
            image_valid=np.zeros((b * m,), bool),
        )
        sft = L.document_kind == "sft"
        if sft:
            out.update({key: np.zeros((b, s), np.int32) for key in SFT_KEYS})
        n_images = 0
        for r, row in enumerate(rows):
            pos, slot, n_answers = 0, r * m, 0
            for seg, doc in enumerate(row.docs, start=1):
                k = len(doc["tokens"])
                out["tokens"][r, pos:pos + k] = doc["tokens"]
                out["segment_ids"][r, pos:pos + k] = seg
                out["loss_mask"][r, pos:pos + k] = doc["loss_mask"]
                if sft:  # answers numbered through the row: 1, 2, ... over its documents
                    out["task_ids"][r, pos:pos + k] = doc["task_ids"]
                    answers = doc["answer_ids"]
                    out["answer_ids"][r, pos:pos + k] = np.where(answers > 0, answers + n_answers, 0)
                    n_answers += int(answers.max(initial=0))
                pos += k
                for j in range(doc["n_images"]):
                    out["patches"][slot] = doc["patches"][j]
                    out["patch_yx"][slot] = doc["patch_yx"][j]
                    out["patch_valid"][slot] = doc["patch_valid"][j]
                    out["image_grid"][slot] = doc["image_grid"][j]
                    out["image_valid"][slot] = True
                    slot += 1
                    n_images += 1
        if L.validate:
            validate_vlm_batch(out, image_token_id=L.image_token_id, vocab_size=L.vocab_size, merge=L.merge)
        self.stats["batches"] += 1
        self.stats["tokens"] += int((out["segment_ids"] != 0).sum())
        self.stats["images"] += n_images
        return out

    # -- checkpointing
    def get_state(self) -> dict[str, Any]:
        if self._carry:
            anchor_seq, anchor_state, _ = self._carry[0]
            parent = copy.deepcopy(anchor_state)
            n_consumed = self._seq - anchor_seq
            keep = [seq - anchor_seq for seq, _, _ in self._carry]
        else:
            parent, n_consumed, keep = copy.deepcopy(self._parent.get_state()), 0, []
        return {"version": STATE_VERSION, "parent": parent, "n_consumed": n_consumed, "keep": keep,
                "stats": dict(self.stats), "layout": self._layout.key()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"packed-batch iterator state version {state.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        if dict(state["layout"]) != self._layout.key():
            raise ValueError(f"packed-batch iterator state was saved with layout {dict(state['layout'])}, "
                             f"this pipeline has {self._layout.key()}")
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self.stats = empty_stats()
        self.stats.update({k: int(v) for k, v in state["stats"].items()})
        self._carry, self._seq = [], 0
        keep = set(int(i) for i in state["keep"])
        for i in range(int(state["n_consumed"])):  # replay: rebuild the carried documents
            pre, el = self._read()
            if i in keep:
                if "skip" in el:
                    raise ValueError("packed-batch iterator state does not match the data: "
                                     f"replayed element {i} is a skipped record")
                self._carry.append((i, pre, el))

    def __str__(self) -> str:
        return f"PackedBatchIterator({self._layout})"


class PackedBatchDataset(grain.IterDataset):
    """IterDataset of packed batches over an IterDataset of `ProcessRecord` outputs."""

    def __init__(self, parent: grain.IterDataset, layout: PackLayout):
        super().__init__(parent)
        self._layout = layout

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), self._layout)

    def __str__(self) -> str:
        return f"PackedBatchDataset({self._layout})"
