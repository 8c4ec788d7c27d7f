"""SentencePiece tokenizer with the GLM special-token strings.

GLM ships no SentencePiece model (GLM-4.5 uses a byte-level BPE
`tokenizer.json`, GLM-4-9B a tiktoken rank file), so we train our own small
BPE model and keep only the GLM special-token *strings*, not their ids.

Settings and why:

* byte fallback: any text, including characters never seen in training,
  round-trips exactly through `<0xNN>` byte pieces;
* split digits: every digit is its own piece (GLM's tokeniser also splits
  digits, in groups of 1-3);
* identity normalisation, no dummy prefix, no whitespace cleanup: decode is
  the exact inverse of encode (multiple spaces, newlines, no added space);
* special tokens are SentencePiece `user_defined_symbols`, so each is one
  piece even when glued to text (`"<|user|>hi<|image|><|image|>"`).

eos / pad. GLM uses `<|endoftext|>` both as eos and as pad. SentencePiece
refuses to put its own eos and pad at the same id, and its eos/pad pieces are
*control* symbols, which are never produced by encoding text. So the model
has no SentencePiece bos/eos/pad at all (`bos_id = eos_id = pad_id = -1`);
`<|endoftext|>` is the first user-defined symbol and sits at id 0, `<unk>` at
id 1, and the SPECIAL_TOKENS follow from id 2 in order. `Tokenizer.eos_id` and
`Tokenizer.pad_id` both report the id of `<|endoftext|>` (0 in models made by
`train_tokenizer`; looked up by piece, so other layouts work too).
`encode` never adds bos or eos.

Only `sentencepiece`, `numpy` and `etils.epath` are imported, so this runs in
data workers; a `Tokenizer` pickles as its serialized model proto, not its
path. Model paths go through `etils.epath` (local or `gs://`): the model is
read as bytes and loaded from the serialized proto.
"""
from __future__ import annotations

import hashlib
import io
import os
import uuid
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

SPECIAL_TOKENS = (
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|image|>",
    "<think>",
    "</think>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
)
EOS = "<|endoftext|>"

# Embedding tables are padded to a multiple of this (GLM: 151552 = 128 * 1184).
VOCAB_PAD_MULTIPLE = 128


def train_tokenizer(
    texts: Iterable[str],
    model_path: str | os.PathLike,
    *,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    seed_sentencepiece_size: int | None = None,
) -> "Tokenizer":
    """Train a SentencePiece model on `texts`, write it to `model_path`, load it.

    `texts` is materialised into a list (each item one training sentence,
    newlines allowed). Training is deterministic: the same texts give a
    byte-identical model file. `vocab_size` is a soft limit
    (`hard_vocab_limit=False`) so that small corpora train; it must still
    cover 256 byte pieces, the special tokens and every distinct character.
    `seed_sentencepiece_size` only matters for `model_type="unigram"`.
    Parent directories of `model_path` (local or `gs://`) are created; the
    file is written under a temporary name and then renamed into place. Only
    the `.model` file is written (no `.vocab`).
    """
    sentences = list(texts)
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise TypeError(f"train_tokenizer: texts[{i}] is {type(s).__name__}, expected str")
    if not any(sentences):
        raise ValueError("train_tokenizer: texts is empty (no non-empty sentence)")
    if model_type not in ("bpe", "unigram", "char", "word"):
        raise ValueError(f"train_tokenizer: unknown model_type {model_type!r}")

    buf = io.BytesIO()
    kwargs = dict(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=int(vocab_size),
        model_type=model_type,
        # <|endoftext|> first so that it lands on id 0 (the slot before unk).
        user_defined_symbols=[EOS, *SPECIAL_TOKENS],
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=2,  # checked deterministic (tests/test_tokenizer.py)
        minloglevel=2,
    )
    if seed_sentencepiece_size is not None:
        kwargs["seed_sentencepiece_size"] = int(seed_sentencepiece_size)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as e:
        raise ValueError(
            f"train_tokenizer: SentencePiece training for {model_path} failed "
            f"(vocab_size={vocab_size}, model_type={model_type}): {e}"
        ) from e

    path = epath.Path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tokenizer-{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return Tokenizer(path)


RUN_FILE = "tokenizer.model"  # where a run keeps its tokenizer, in its directory (the VLM stages, generation)


class Tokenizer:
    """A loaded SentencePiece model plus the GLM special-token ids.

    `Tokenizer(path)` / `Tokenizer.from_file(path)` load and validate a model
    (a local or `gs://` path, read through `etils.epath`): every SPECIAL_TOKENS
    entry and EOS must be exactly one piece when encoded from text. Pickles as
    the model proto bytes, so data workers need not see the file.
    """

    def __init__(self, model_path: str | os.PathLike):
        path = epath.Path(model_path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer model {path} does not exist")
        if path.is_dir():
            raise ValueError(f"tokenizer model {path} is not a file")
        self._init(path.read_bytes(), os.fspath(path))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Same as `Tokenizer(path)`."""
        return cls(path)

    @classmethod
    def from_serialized(cls, model_proto: bytes, name: str = "<serialized model>") -> "Tokenizer":
        """Load from serialized model proto bytes; `name` is used in error messages."""
        tok = cls.__new__(cls)
        tok._init(bytes(model_proto), name)
        return tok

    def _init(self, proto: bytes, name: str) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            if not proto:
                raise RuntimeError("empty file")
            sp.LoadFromSerializedProto(proto)
        except RuntimeError as e:
            raise ValueError(f"tokenizer model {name} is not a SentencePiece model: {e}") from e
        self._sp = sp
        self._proto = proto
        self._name = name
        self._vocab_size = int(sp.GetPieceSize())
        ids = {}
        for piece in (EOS, *SPECIAL_TOKENS):
            ids[piece] = self._single_piece_id(piece)
        self._special = ids

    def _single_piece_id(self, piece: str) -> int:
        """Id of `piece` if it is in the model and encodes to itself alone, else ValueError."""
        sp = self._sp
        pid = int(sp.PieceToId(piece))
        if sp.IdToPiece(pid) != piece:
            raise ValueError(f"tokenizer {self._name} lacks special token {piece} (not in its vocab)")
        encoded = list(sp.EncodeAsIds(piece))
        if encoded != [pid]:
            raise ValueError(
                f"tokenizer {self._name} lacks special token {piece}: it is in the vocab "
                f"(id {pid}) but encodes to {len(encoded)} pieces {encoded}; "
                "it must be a user_defined_symbol (and the model must not add a dummy prefix)"
            )
        return pid

    # -- pickling: the proto bytes, never the path -------------------------

    def __getstate__(self) -> dict:
        return {"model_proto": self._proto, "name": self._name}

    def __setstate__(self, state: dict) -> None:
        self._init(state["model_proto"], state["name"])

    def __repr__(self) -> str:
        return f"Tokenizer({self._name!r}, vocab_size={self._vocab_size})"

    # -- sizes and ids -----------------------------------------------------

    @property
    def name(self) -> str:
        """The path (or name) the model was loaded from; for messages only."""
        return self._name

    @property
    def serialized_model_proto(self) -> bytes:
        """The model as bytes (what pickling stores)."""
        return self._proto

    @property
    def sha256(self) -> str:
        """sha256 of the model's bytes: which tokenizer a checkpoint was trained with."""
        return hashlib.sha256(self._proto).hexdigest()

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (valid ids are 0..vocab_size-1)."""
        return self._vocab_size

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of 128: rows of the embedding table."""
        m = VOCAB_PAD_MULTIPLE
        return -(-self._vocab_size // m) * m

    @property
    def eos_id(self) -> int:
        """Id of `<|endoftext|>` (also the pad id)."""
        return self._special[EOS]

    @property
    def pad_id(self) -> int:
        """Id of `<|endoftext|>` (also the eos id), as in GLM."""
        return self._special[EOS]

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    @property
    def gmask_id(self) -> int:
        """Id of `[gMASK]`."""
        return self._special["[gMASK]"]

    @property
    def sop_id(self) -> int:
        """Id of `<sop>`."""
        return self._special["<sop>"]

    @property
    def system_id(self) -> int:
        """Id of `<|system|>`."""
        return self._special["<|system|>"]

    @property
    def user_id(self) -> int:
        """Id of `<|user|>`."""
        return self._special["<|user|>"]

    @property
    def assistant_id(self) -> int:
        """Id of `<|assistant|>`."""
        return self._special["<|assistant|>"]

    @property
    def observation_id(self) -> int:
        """Id of `<|observation|>`."""
        return self._special["<|observation|>"]

    @property
    def begin_image_id(self) -> int:
        """Id of `<|begin_of_image|>`."""
        return self._special["<|begin_of_image|>"]

    @property
    def end_image_id(self) -> int:
        """Id of `<|end_of_image|>`."""
        return self._special["<|end_of_image|>"]

    @property
    def image_id(self) -> int:
        """Id of `<|image|>`."""
        return self._special["<|image|>"]

    @property
    def think_id(self) -> int:
        """Id of `<think>`."""
        return self._special["<think>"]

    @property
    def end_think_id(self) -> int:
        """Id of `</think>`."""
        return self._special["</think>"]

    @property
    def begin_box_id(self) -> int:
        """Id of `<|begin_of_box|>`."""
        return self._special["<|begin_of_box|>"]

    @property
    def end_box_id(self) -> int:
        """Id of `<|end_of_box|>`."""
        return self._special["<|end_of_box|>"]

    def special_id(self, piece: str) -> int:
        """Id of `piece`, which must be EOS or one of SPECIAL_TOKENS."""
        try:
            return self._special[piece]
        except KeyError:
            raise ValueError(
                f"special_id: {piece!r} is not a special token; known: {list(self._special)}"
            ) from None

    # -- encode / decode ---------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; no bos/eos added. Special-token strings become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(self._sp.EncodeAsIds(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for each text."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: texts[{i}] is {type(t).__name__}, expected str")
        if not texts:
            return []
        return [list(ids) for ids in self._sp.Encode(texts, out_type=int)]

    def decode(self, ids) -> str:
        """Text of `ids` (list or 1-D array). Ids >= vocab_size (the padding rows
        of the embedding table) are dropped; negative ids are an error."""
        out = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i < 0:
                raise ValueError(f"decode: negative token id {i}")
            if i < self._vocab_size:
                out.append(i)
        return self._sp.DecodeIds(out)
