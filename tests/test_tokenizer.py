"""SentencePiece tokenizer: special tokens, eos/pad, byte fallback, round trips,
determinism, pickling and error messages. Trains tiny models (well under 1 s)."""
import io
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from glm5v_jax.data.tokenizer import EOS, SPECIAL_TOKENS, Tokenizer, train_tokenizer

ALL_SPECIAL = (EOS, *SPECIAL_TOKENS)
UNSEEN = "€ü😀"  # never in the training corpus: must go through byte fallback


def _corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """English and Chinese sentences with numbers; no special tokens, no UNSEEN chars."""
    rng = random.Random(seed)
    en_words = (
        "the a model image patch token vision language train step loss data batch "
        "cat dog runs sees small large red blue green picture of on in with and"
    ).split()
    zh_chars = "我们你他的是在有这个图像模型训练数据语言视觉文本中一大小红蓝绿猫狗看见了和"
    out = []
    for i in range(n):
        if i % 2 == 0:
            words = [rng.choice(en_words) for _ in range(rng.randint(4, 12))]
            words.insert(rng.randint(0, len(words)), str(rng.randint(0, 10**6)))
            out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
        else:
            chars = [rng.choice(zh_chars) for _ in range(rng.randint(6, 20))]
            chars.insert(rng.randint(0, len(chars)), str(rng.randint(0, 10**4)))
            out.append("".join(chars) + rng.choice(["。", "？", "！"]))
    assert not any(c in s for s in out for c in UNSEEN)
    return out


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "sub" / "dir" / "spm.model"  # parents created
    return train_tokenizer(corpus, str(path))


def _train_raw(texts, **kw) -> bytes:
    """A model trained directly with sentencepiece (no GLM special tokens unless given)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=600,
        byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
        num_threads=1, minloglevel=2, add_dummy_prefix=False, **kw,
    )
    return buf.getvalue()


def test_special_tokens_are_single_pieces(tok):
    ids = {p: tok.special_id(p) for p in ALL_SPECIAL}
    assert len(set(ids.values())) == len(ALL_SPECIAL)
    for piece, pid in ids.items():
        assert 0 <= pid < tok.vocab_size
        assert tok.encode(piece) == [pid], piece
        assert tok.decode([pid]) == piece
        # glued to text on both sides, and repeated
        text = f"hello{piece}world{piece}{piece}42你好"
        enc = tok.encode(text)
        assert enc.count(pid) == 3, piece
        assert tok.decode(enc) == text
    text = "<|user|>hello<|image|><|image|>"
    enc = tok.encode(text)
    assert enc[0] == tok.user_id and enc[-2:] == [tok.image_id, tok.image_id]
    assert tok.decode(enc) == text
    # Named properties agree with special_id; layout of a train_tokenizer model.
    named = {
        "gmask_id": "[gMASK]", "sop_id": "<sop>", "system_id": "<|system|>",
        "user_id": "<|user|>", "assistant_id": "<|assistant|>",
        "observation_id": "<|observation|>", "begin_image_id": "<|begin_of_image|>",
        "end_image_id": "<|end_of_image|>", "image_id": "<|image|>",
        "think_id": "<think>", "end_think_id": "</think>",
        "begin_box_id": "<|begin_of_box|>", "end_box_id": "<|end_of_box|>",
    }
    assert set(named.values()) == set(SPECIAL_TOKENS)
    for attr, piece in named.items():
        assert getattr(tok, attr) == ids[piece], attr
    assert tok.eos_id == 0 and tok.unk_id == 1
    assert [ids[p] for p in SPECIAL_TOKENS] == list(range(2, 2 + len(SPECIAL_TOKENS)))
    with pytest.raises(ValueError, match="not a special token"):
        tok.special_id("hello")


def test_eos_is_pad_and_padded_vocab(tok):
    assert tok.eos_id == tok.pad_id == tok.special_id(EOS)
    assert tok.padded_vocab_size % 128 == 0
    assert tok.vocab_size <= tok.padded_vocab_size < tok.vocab_size + 128
    assert tok.encode("hi") == tok.encode("hi")  # no bos / eos added
    assert tok.eos_id not in tok.encode("a plain sentence.")


def test_digits_split(tok):
    ids = tok.encode("12345")
    assert [tok.decode([i]) for i in ids] == list("12345")
    ids = tok.encode("model 2024 step")
    pieces = [tok.decode([i]) for i in ids]
    assert "2024" not in pieces and all(p in pieces for p in "2024")


def test_byte_fallback_round_trip(tok):
    ids = tok.encode(UNSEEN)
    assert len(ids) == len(UNSEEN.encode("utf-8"))  # one byte piece per UTF-8 byte
    assert tok.decode(ids) == UNSEEN
    text = f"a {UNSEEN} b<|image|>{UNSEEN}"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", [
    "我们训练一个视觉语言模型，数据是图像和文本。",
    "红猫看见了蓝狗12只",
    "The  model   sees\ta red cat.\n\nNew paragraph\n",
    " leading space and trailing  ",
    "Cat",
    "",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == text


def test_no_dummy_prefix(tok):
    # identity normalisation, no dummy prefix: "Cat" and " Cat" differ
    assert tok.encode("Cat") != tok.encode(" Cat")
    assert tok.decode(tok.encode(" Cat")) == " Cat"


def test_decode_drops_padding_rows(tok):
    text = "a red cat 12"
    ids = tok.encode(text)
    padded = ids + list(range(tok.vocab_size, tok.padded_vocab_size + 1))
    assert tok.decode(padded) == text
    with pytest.raises(ValueError, match="negative"):
        tok.decode([-1])


def test_encode_batch(tok):
    texts = ["a red cat", "我们的图像", "", "<|user|>hi"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == []
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_deterministic_training(corpus, tok, tmp_path):
    a = train_tokenizer(corpus, str(tmp_path / "a.model"))
    b = train_tokenizer(list(corpus), str(tmp_path / "b.model"))
    bytes_a = (tmp_path / "a.model").read_bytes()
    assert bytes_a == (tmp_path / "b.model").read_bytes()
    assert bytes_a == open(tok.name, "rb").read()
    assert a.encode(corpus[0]) == b.encode(corpus[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]  # no .vocab / temp files


def test_pickle_round_trip(corpus, tmp_path):
    path = tmp_path / "p.model"
    t = train_tokenizer(corpus[:500], str(path))
    blob = pickle.dumps(t)
    path.unlink()  # the pickle holds the model bytes, not the path
    t2 = pickle.loads(blob)
    texts = corpus[:20] + [f"<|user|>{UNSEEN}<|image|>12345"]
    assert t2.encode_batch(texts) == t.encode_batch(texts)
    assert (t2.vocab_size, t2.eos_id, t2.image_id) == (t.vocab_size, t.eos_id, t.image_id)
    t3 = Tokenizer.from_serialized(t.serialized_model_proto)
    assert t3.encode(texts[-1]) == t.encode(texts[-1])


def test_unigram_and_seed_size(corpus, tmp_path):
    t = train_tokenizer(corpus, str(tmp_path / "u.model"), vocab_size=1000,
                        model_type="unigram", seed_sentencepiece_size=5000)
    text = f"<|user|>红猫 12345 {UNSEEN}<|image|>"
    assert t.decode(t.encode(text)) == text
    assert t.encode("<|image|>") == [t.image_id]


def test_missing_and_bad_files(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.from_file(str(missing))
    with pytest.raises(ValueError, match="is not a file"):
        Tokenizer(str(tmp_path))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match=r"junk\.model is not a SentencePiece model"):
        Tokenizer(str(junk))
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.model is not a SentencePiece model"):
        Tokenizer(str(empty))


def test_model_without_special_tokens(corpus, tmp_path):
    plain = tmp_path / "plain.model"
    plain.write_bytes(_train_raw(corpus[:300]))
    with pytest.raises(ValueError, match=r"plain\.model lacks special token <\|endoftext\|>"):
        Tokenizer(str(plain))
    # All but <|image|> registered.
    partial = tmp_path / "partial.model"
    syms = [p for p in ALL_SPECIAL if p != "<|image|>"]
    partial.write_bytes(_train_raw(corpus[:300], user_defined_symbols=syms))
    with pytest.raises(ValueError, match=r"partial\.model lacks special token <\|image\|>"):
        Tokenizer(str(partial))
    # <|image|> in the vocab but as a control symbol: not produced from text.
    control = tmp_path / "control.model"
    control.write_bytes(_train_raw(corpus[:300], user_defined_symbols=syms,
                                   control_symbols=["<|image|>"]))
    with pytest.raises(ValueError, match=r"control\.model lacks special token <\|image\|>.*pieces"):
        Tokenizer(str(control))


def test_train_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([], str(tmp_path / "e.model"))
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        train_tokenizer(["ok", b"bytes"], str(tmp_path / "t.model"))
    with pytest.raises(ValueError, match="small.model"):
        train_tokenizer(corpus, str(tmp_path / "small.model"), vocab_size=64)
    assert not (tmp_path / "small.model").exists()


def test_no_jax_or_tf_import():
    code = ("import sys, glm5v_jax.data.tokenizer; "
            "print([m for m in ('jax', 'tensorflow', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
