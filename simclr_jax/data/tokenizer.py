"""The text tokenizer: a WordPiece vocabulary trained on the pretraining split; fixed-length ids.

BERT's normalizer and pre-tokenizer (`tokenizers`), special tokens first and in a fixed order so
their ids are constants the models and augmentations use (`PAD_ID` ... `DEL_ID`). A run keeps its
tokenizer in `WORKDIR/tokenizer.json` (`load_or_train`): trained once, reloaded on every resume.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import ml_collections
    import tokenizers

log = logging.getLogger(__name__)

# The special tokens, in this order: their ids are these constants in every trained vocabulary.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEL]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, DEL_ID = range(len(SPECIAL_TOKENS))
TOKENIZER_FILE = "tokenizer.json"  # in the workdir
WORD_PREFIX = "##"  # WordPiece's mark of a token that continues a word


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, lowercase: bool = True
) -> tokenizers.Tokenizer:
    """A WordPiece tokenizer of at most `vocab_size` tokens (specials included) trained on `texts`.

    Deterministic: the same texts give the same vocabulary. `tokenizers`' own WordPieceTrainer
    is not (huggingface/tokenizers#1794: it numbers the '##' tokens in hash-map order, and those
    numbers break ties between merges), so the vocabulary is learnt as its trainer does (BPE
    merges over the pre-tokenized words, then WordPiece), with the '##' tokens made ordinary
    characters: each character after a word's first is mapped to its own stand-in code point
    (`_Marks`), which the BPE trainer numbers in sorted order like the rest of its alphabet.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} specials.")
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    marks = _Marks()

    def marked_texts() -> Iterator[str]:
        for text in texts:
            words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
            yield " ".join(marks.word(w) for w, _ in words)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    bpe.train_from_iterator(marked_texts(), trainer=trainer)
    vocab = {marks.unmark(t): i for t, i in bpe.get_vocab().items()}
    tok = Tokenizer(
        models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix=WORD_PREFIX)
    )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix=WORD_PREFIX)
    check_specials(tok, "the trained tokenizer")
    return tok


class _Marks:
    """Characters after a word's first as stand-ins: plane-16 private-use code points, numbered
    in order of first use (`unmark` turns a learnt token back into WordPiece's 'x' / '##x')."""

    _FIRST = 0x100000  # Supplementary Private Use Area-B: nothing a normalized corpus uses

    def __init__(self) -> None:
        self._to: dict[str, str] = {}
        self._back: dict[str, str] = {}
        self._words: dict[str, str] = {}

    def word(self, word: str) -> str:
        """`word` with every character after the first replaced by its stand-in."""
        out = self._words.get(word)
        if out is None:
            out = word[:1] + "".join(self._mark(c) for c in word[1:])
            if len(self._words) < 1_000_000:  # a cache of the frequent words, bounded
                self._words[word] = out
        return out

    def _mark(self, char: str) -> str:
        mark = self._to.get(char)
        if mark is None:
            mark = chr(self._FIRST + len(self._to))
            self._to[char], self._back[mark] = mark, char
        return mark

    def unmark(self, token: str) -> str:
        """A learnt token as WordPiece spells it: '##' + characters if it continues a word."""
        if token in SPECIAL_TOKENS or not token or token[0] not in self._back:
            return token[:1] + "".join(self._back.get(c, c) for c in token[1:])
        return WORD_PREFIX + "".join(self._back[c] for c in token)


def check_specials(tok: tokenizers.Tokenizer, where: str) -> None:
    """Raises ValueError unless the special tokens have the ids PAD_ID ... DEL_ID."""
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise ValueError(
            f"{where} gives the special tokens {list(SPECIAL_TOKENS)} the ids {ids}; "
            f"expected {list(range(len(SPECIAL_TOKENS)))} (train it with data.tokenizer)."
        )


def save(tok: tokenizers.Tokenizer, path: str) -> None:
    """Writes `tok` to `path` atomically (a temporary file renamed), so no reader sees half."""
    # A name per host and process: hosts sharing the workdir each write whole files.
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)


def load(path: str) -> tokenizers.Tokenizer:
    """The tokenizer saved at `path` (ValueError naming it if it is missing or unreadable)."""
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise ValueError(f"tokenizer file {path} does not exist.")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001  (the library's errors are long; one line here)
        raise ValueError(f"tokenizer file {path} cannot be read: {str(e)[:200]}") from None
    check_specials(tok, path)
    return tok


def load_for(path: str, vocab_size: int) -> tokenizers.Tokenizer:
    """The tokenizer at `path`, refused in one line if it has more than `vocab_size` tokens."""
    tok = load(path)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(
            f"tokenizer file {path} has {tok.get_vocab_size()} tokens, more than "
            f"model.vocab_size={vocab_size}: it is not this encoder's tokenizer (or use the "
            "vocab_size it was trained for)."
        )
    return tok


def load_or_train(
    config: ml_collections.ConfigDict, workdir: str, texts_fn: Callable[[], Iterable[str]]
) -> tokenizers.Tokenizer:
    """WORKDIR/tokenizer.json if it exists (a resume never retrains), else trained and written.

    `texts_fn()` gives the training split's texts (`data.text.training_texts`); the vocabulary
    has at most `config.model.vocab_size` tokens.
    """
    path = os.path.join(workdir, TOKENIZER_FILE)
    vocab_size = int(config.model.vocab_size)
    if os.path.exists(path):
        return load_for(path, vocab_size)
    lowercase = bool(config.data.get("lowercase", True))
    tok = train_tokenizer(texts_fn(), vocab_size, lowercase=lowercase)
    os.makedirs(workdir, exist_ok=True)
    save(tok, path)
    log.info("trained a %d-token WordPiece vocabulary: %s", tok.get_vocab_size(), path)
    return tok


def encode(
    tok: tokenizers.Tokenizer, texts: Sequence[str], max_len: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens int32 [n, L], words int32 [n, L], number truncated) of `texts`, L = max_len.

    Row: `[CLS] t1 .. tk [SEP] [PAD] ...`; `words[i, j]` is the index (0, 1, ...) of the word
    token j belongs to, -1 on [CLS], [SEP] and [PAD]. A text of more than L - 2 tokens keeps
    its first L - 2 and is counted as truncated.
    """
    if max_len < 3:
        raise ValueError(f"max_len={max_len} must be >= 3 ([CLS], a token, [SEP]).")
    n, keep = len(texts), max_len - 2
    tokens = np.full((n, max_len), PAD_ID, np.int32)
    words = np.full((n, max_len), -1, np.int32)
    tokens[:, 0] = CLS_ID
    truncated = 0
    # The batch encode runs on all cores in Rust. Not `encode_batch_fast`: in tokenizers 0.23
    # its encodings carry no word ids.
    for i, enc in enumerate(_encode_batch(tok, list(texts))):
        ids, word_ids = enc.ids, enc.word_ids
        k = min(len(ids), keep)
        truncated += len(ids) > keep
        tokens[i, 1 : 1 + k] = ids[:k]
        tokens[i, 1 + k] = SEP_ID
        words[i, 1 : 1 + k] = [-1 if w is None else w for w in word_ids[:k]]
    return tokens, words, truncated


def _encode_batch(tok: tokenizers.Tokenizer, texts: list[str]) -> list[Any]:
    """The encodings of `texts` without special tokens ([CLS]/[SEP] are placed by `encode`)."""
    return tok.encode_batch(texts, add_special_tokens=False)
