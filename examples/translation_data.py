"""Data loading and tokenizer training for ``examples/wmt_en_de.py``.

Everything here returns plain ``datasets`` objects in the Hugging Face translation schema: one
column ``"translation"`` holding ``{"<lang>": text, ...}`` per example (the schema of the hub's
``wmt14`` / ``wmt16`` / ``opus_books`` data sets), so the hub path and the local path feed the same
pre-processing.

Local data, per split, is either

* one JSON lines file (``.json`` / ``.jsonl``, optionally ``.gz``) whose lines are
  ``{"translation": {"en": "...", "de": "..."}}``, or
* two line-aligned plain-text files (optionally ``.gz``), one per language. The language of a file
  is read from its name (``train.en.gz``, ``newstest2014.de``, ``val.de.txt``); if the names do not
  say, the first file is the source and the second the target.

Bad input raises before anything is trained: a missing file (``FileNotFoundError``), parallel files
with different line counts, language codes the data does not have, or an empty split
(``ValueError``, naming the file / flag and what was expected).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from datasets import Dataset, DatasetDict

SPLITS = ("train", "validation", "test")
JSON_SUFFIXES = (".json", ".jsonl")
SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
"""Special tokens of a trained tokenizer, with ids 0, 1, 2 in this order (Marian convention: the
decoder starts from ``<pad>``)."""


def _open_text(path: Path):
    """Open a text file for reading, transparently gunzipping ``*.gz``."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _stem_suffixes(path: Path) -> list[str]:
    """Suffixes of ``path`` without a trailing ``.gz``, e.g. ``train.en.gz`` -> ``[".en"]``."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes


def is_json_file(path) -> bool:
    """True for ``*.json``, ``*.jsonl`` and their ``.gz`` versions."""
    suffixes = _stem_suffixes(Path(path))
    return bool(suffixes) and suffixes[-1] in JSON_SUFFIXES


def language_of_file(path) -> Optional[str]:
    """Language code written in a plain-text file's name, or None.

    The last suffix that looks like a language code (2-3 letters, optionally ``_XX`` / ``-XX``), after
    dropping ``.gz`` and ``.txt``: ``train.en.gz`` -> ``"en"``, ``news.de.txt`` -> ``"de"``,
    ``corpus.txt`` -> None."""
    suffixes = [s for s in _stem_suffixes(Path(path)) if s != ".txt"]
    if suffixes and re.fullmatch(r"\.[A-Za-z]{2,3}([_-][A-Za-z]{2})?", suffixes[-1]):
        return suffixes[-1][1:]
    return None


def _check_exists(path: Path, flag: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: file not found: {str(path)!r}.")


def read_lines(path) -> list[str]:
    """Lines of a (possibly gzipped) UTF-8 text file, without their line endings."""
    with _open_text(Path(path)) as f:
        return [line.rstrip("\r\n") for line in f]


def read_json_lines(path, flag: str = "files") -> list[dict]:
    """``translation`` dicts of a JSON lines file in the HF translation schema."""
    path = Path(path)
    _check_exists(path, flag)
    rows = []
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{flag}: {str(path)!r} line {number} is not valid JSON ({err.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("translation"), dict):
                raise ValueError(
                    f"{flag}: {str(path)!r} line {number} must be an object "
                    '{"translation": {"<lang>": "...", ...}}, got ' + repr(line[:80]))
            rows.append({str(k): str(v) for k, v in record["translation"].items()})
    return rows


def read_parallel_text(source_path, target_path, source_lang: str, target_lang: str, flag: str = "files") -> list[dict]:
    """Translation dicts from two line-aligned plain-text files (optionally gzipped).

    Raises ``ValueError`` if the files have different numbers of lines."""
    source_path, target_path = Path(source_path), Path(target_path)
    for p in (source_path, target_path):
        _check_exists(p, flag)
    src, tgt = read_lines(source_path), read_lines(target_path)
    if len(src) != len(tgt):
        raise ValueError(
            f"{flag}: parallel files have different line counts: {str(source_path)!r} has {len(src)} lines, "
            f"{str(target_path)!r} has {len(tgt)}. Line i of one must translate line i of the other.")
    return [{source_lang: s, target_lang: t} for s, t in zip(src, tgt)]


def load_local_split(files: Sequence[str], source_lang: str, target_lang: str, flag: str = "files") -> list[dict]:
    """Translation dicts of one split given on the command line as ``files``.

    ``files`` is one JSON lines file or two plain-text files (see the module docstring)."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [Path(f) for f in files]
    if len(files) == 1 and is_json_file(files[0]):
        return read_json_lines(files[0], flag)
    if len(files) == 2 and not any(is_json_file(f) for f in files):
        langs = [language_of_file(f) for f in files]
        if set(langs) == {source_lang, target_lang} and source_lang != target_lang:
            src, tgt = (files if langs[0] == source_lang else files[::-1])
        elif any(lang is not None for lang in langs) and set(langs) != {source_lang, target_lang}:
            for f in files:  # report missing files before language problems
                _check_exists(f, flag)
            raise ValueError(
                f"{flag}: the file names say languages {langs} but --source_lang/--target_lang are "
                f"{source_lang!r}/{target_lang!r}. Rename the files (e.g. train.{source_lang}.gz, "
                f"train.{target_lang}.gz) or fix the language codes.")
        else:
            src, tgt = files
        return read_parallel_text(src, tgt, source_lang, target_lang, flag)
    raise ValueError(
        f"{flag}: give one JSON lines file (.json/.jsonl[.gz]) or two parallel plain-text files "
        f"(e.g. train.{source_lang}.gz train.{target_lang}.gz), got {[str(f) for f in files]}.")


def check_languages(dataset: Dataset, source_lang: str, target_lang: str, split: str) -> None:
    """Raise ``ValueError`` unless every example of ``dataset`` has both language codes."""
    if source_lang == target_lang:
        raise ValueError(f"--source_lang and --target_lang must differ, both are {source_lang!r}.")
    if len(dataset) == 0:
        raise ValueError(f"The {split} split is empty: no sentence pairs to {'train on' if split == 'train' else 'evaluate'}.")
    first = dataset[0]["translation"]
    available = sorted(k for k, v in first.items() if v is not None)
    for flag, lang in (("--source_lang", source_lang), ("--target_lang", target_lang)):
        if lang not in available:
            raise ValueError(f"{flag}={lang!r} is not a language of the {split} data; it has {available}.")


def load_translation_splits(
    *,
    source_lang: str = "en",
    target_lang: str = "de",
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    train_files: Optional[Sequence[str]] = None,
    validation_files: Optional[Sequence[str]] = None,
    test_files: Optional[Sequence[str]] = None,
    max_samples: Optional[dict] = None,
    cache_dir: Optional[str] = None,
) -> DatasetDict:
    """Load the translation splits as a :class:`datasets.DatasetDict`.

    With any ``*_files`` given, only the local files are read (splits without files are absent);
    else ``datasets.load_dataset(dataset_name, dataset_config_name)`` (e.g. ``wmt14`` / ``de-en``:
    train, validation = newstest2013, test = newstest2014). ``max_samples`` maps a split name to the
    number of leading examples to keep (None = all).

    Every returned split has a single ``translation`` column of ``{source_lang, target_lang}``
    dicts and is non-empty; see the module docstring for the errors raised.
    """
    local = {"train": train_files, "validation": validation_files, "test": test_files}
    local = {k: v for k, v in local.items() if v}
    if not source_lang or not target_lang:
        raise ValueError("--source_lang and --target_lang must be non-empty language codes.")
    if local:
        raw = DatasetDict()
        for split, files in local.items():
            rows = load_local_split(files, source_lang, target_lang, flag=f"--{split}_files")
            if not rows:
                raise ValueError(f"--{split}_files: the {split} split is empty ({[str(f) for f in files]} has no lines).")
            raw[split] = Dataset.from_dict({"translation": rows})
    else:
        if not dataset_name:
            raise ValueError("Give --dataset_name (e.g. wmt14) or local files (--train_files/--validation_files/--test_files).")
        raw = load_hub_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    out = DatasetDict()
    for split, ds in raw.items():
        if "translation" not in ds.column_names:
            raise ValueError(f"The {split} split has no 'translation' column (columns: {ds.column_names}).")
        check_languages(ds, source_lang, target_lang, split)
        limit = (max_samples or {}).get(split)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        keep = [c for c in ds.column_names if c != "translation"]
        out[split] = ds.remove_columns(keep) if keep else ds
    return out


def hub_lookup_error(dataset_name: str, timeout: float = 10.0) -> Optional[str]:
    """One lookup of ``dataset_name`` on the Hub: None when the Hub answers (the data set exists, or
    the Hub refused for another reason that loading will report), else why the Hub could not be
    reached, in one line. Raises ``ValueError`` when the Hub says there is no such data set."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(dataset_name, timeout=timeout)
    except GatedRepoError:
        return None  # exists; loading says what access it needs
    except RepositoryNotFoundError:
        raise ValueError(f"--dataset_name {dataset_name}: no such data set on the Hub (a private one needs "
                         "`hf auth login`).") from None
    except HfHubHTTPError:
        return None  # the Hub answered
    except Exception as err:  # noqa: BLE001 - connection errors of any HTTP stack, reported as one line
        return f"{type(err).__name__}: {' '.join(str(err).split())}"
    return None


@contextmanager
def _offline_mode():
    """The Hub libraries in offline mode inside the block (cached files only, no request)."""
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def load_hub_dataset(dataset_name: str, dataset_config_name: Optional[str] = None,
                     cache_dir: Optional[str] = None) -> DatasetDict:
    """``datasets.load_dataset(dataset_name, dataset_config_name)``, without a minute of retries when
    the Hub cannot be reached.

    In offline mode (``HF_HUB_OFFLINE=1``) only the local cache is read, as ``datasets`` does. Otherwise
    one lookup (:func:`hub_lookup_error`) comes first: if the Hub does not answer, the data set is read
    from the local cache if it is there, else ``ConnectionError`` at once."""
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        unreachable = hub_lookup_error(dataset_name)
        if unreachable is not None:
            try:
                with _offline_mode():
                    return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
            except (ConnectionError, FileNotFoundError, ValueError):
                raise ConnectionError(f"Couldn't reach {dataset_name!r} on the Hub ({unreachable}) and it is not in "
                                      "the local cache") from None
    return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)


def iter_texts(dataset: Dataset, languages: Iterable[str], batch_size: int = 1000):
    """Yield batches of raw sentences of ``languages`` (for tokenizer training)."""
    languages = list(languages)
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start:start + batch_size]["translation"]
        yield [pair[lang] for pair in batch for lang in languages]


def train_joint_tokenizer(dataset: Dataset, languages: Sequence[str], vocab_size: int = 8000, min_frequency: int = 2):
    """Train a joint BPE vocabulary over ``languages`` of ``dataset`` with ``tokenizers``.

    NFKC normalisation, SentencePiece-style ``▁`` word boundaries plus isolated punctuation, BPE with
    ``vocab_size`` entries, ``</s>`` appended to every encoded sentence. Decoding reproduces the
    (normalised) text, so BLEU is computed on detokenised output. Returns a
    :class:`transformers.PreTrainedTokenizerFast` (``save_pretrained`` works) with ``<pad>``=0,
    ``</s>``=1, ``<unk>``=2.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 16:
        raise ValueError(f"--vocab_size must be an integer >= 16, got {vocab_size!r}.")
    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  show_progress=False)
    tok.train_from_iterator(iter_texts(dataset, languages), trainer=trainer, length=len(dataset) * len(languages))
    eos = SPECIAL_TOKENS["eos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A $B {eos}",
                                                       special_tokens=[(eos, tok.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024, **SPECIAL_TOKENS)


class TokenBudgetBatchSampler(torch.utils.data.Sampler):
    """Batches of similar-length examples, each at most ``max_tokens`` padded tokens (fairseq's
    ``--max-tokens``), in a random order that is a function of ``(seed, epoch)``.

    ``lengths[i]`` is example i's length in tokens (for translation: the longer of source and
    target). Every epoch the examples are shuffled, stably sorted by length (so equal lengths land in
    random order), cut greedily into batches whose ``batch_size * longest`` stays within
    ``max_tokens`` (an example longer than ``max_tokens`` gets a batch of its own), and the batches
    are shuffled. Padding is then a few percent instead of the ~40 % of random sentence batches.
    The number of batches does not depend on the epoch, so ``len()`` is exact; call
    :meth:`set_epoch` before each epoch (a resumed run sees the same batches as an uninterrupted one).
    With ``shuffle=False`` the batches come in length order, the same every epoch.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int = 0, shuffle: bool = True):
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}.")
        if len(lengths) == 0:
            raise ValueError("lengths is empty: no examples to batch.")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        if int(self.lengths.min()) < 1:
            raise ValueError("every length must be >= 1.")
        self.max_tokens, self.seed, self.shuffle, self.epoch = max_tokens, seed, shuffle, 0
        self._num_batches = len(self._cut(torch.sort(self.lengths, stable=True).indices))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _cut(self, order: torch.Tensor) -> list[list[int]]:
        batches, current, longest = [], [], 0
        for i, n in zip(order.tolist(), self.lengths[order].tolist()):
            if current and (len(current) + 1) * max(longest, n) > self.max_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, n)
        if current:
            batches.append(current)
        return batches

    def __iter__(self):
        if not self.shuffle:
            yield from self._cut(torch.sort(self.lengths, stable=True).indices)
            return
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g)
        order = perm[torch.sort(self.lengths[perm], stable=True).indices]
        batches = self._cut(order)
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield batches[b]

    def __len__(self) -> int:
        return self._num_batches
