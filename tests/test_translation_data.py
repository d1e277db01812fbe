"""Local-data loaders and the joint BPE tokenizer of examples/translation_data.py."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, require_shared_data

sys.path.insert(0, str(REPO_ROOT / "examples"))
from translation_data import (  # noqa: E402
    TokenBudgetBatchSampler,
    language_of_file,
    load_local_split,
    load_translation_splits,
    train_joint_tokenizer,
)

EN = ["A man rides a bike.", "Two dogs play in the snow.", "A girl, smiling, holds a red balloon."]
DE = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Ein Mädchen hält lächelnd einen roten Ballon."]


def write_text(path: Path, lines, gz=False):
    data = "".join(line + "\n" for line in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, pairs, gz=False):
    lines = [json.dumps({"translation": {"en": e, "de": d}}, ensure_ascii=False) for e, d in pairs]
    return write_text(path, lines, gz=gz)


@pytest.mark.parametrize("gz", [False, True])
def test_json_lines(tmp_path, gz):
    path = write_jsonl(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"), zip(EN, DE), gz=gz)
    ds = load_translation_splits(train_files=[path])
    assert list(ds) == ["train"]
    assert ds["train"].column_names == ["translation"]
    assert ds["train"]["translation"] == [{"en": e, "de": d} for e, d in zip(EN, DE)]


@pytest.mark.parametrize("gz", [False, True])
def test_parallel_text_language_from_names(tmp_path, gz):
    ext = ".gz" if gz else ""
    en = write_text(tmp_path / f"train.en{ext}", EN, gz)
    de = write_text(tmp_path / f"train.de{ext}", DE, gz)
    # given in target-first order: the file names decide which is which
    ds = load_translation_splits(train_files=[de, en], test_files=[en, de])
    assert len(ds["train"]) == 3 and len(ds["test"]) == 3
    assert ds["train"][2]["translation"] == {"en": EN[2], "de": DE[2]}
    assert ds["test"]["translation"] == ds["train"]["translation"]


def test_parallel_text_without_language_in_names_is_source_then_target(tmp_path):
    a = write_text(tmp_path / "source.txt", EN)
    b = write_text(tmp_path / "target.txt", DE)
    rows = load_local_split([a, b], "en", "de")
    assert rows[1] == {"en": EN[1], "de": DE[1]}


def test_reverse_direction_and_max_samples(tmp_path):
    en = write_text(tmp_path / "v.en", EN)
    de = write_text(tmp_path / "v.de", DE)
    ds = load_translation_splits(source_lang="de", target_lang="en", validation_files=[en, de],
                                 max_samples={"validation": 2})
    assert ds["validation"]["translation"] == [{"de": DE[0], "en": EN[0]}, {"de": DE[1], "en": EN[1]}]


def test_language_of_file():
    assert language_of_file("train.en.gz") == "en"
    assert language_of_file("newstest2014.de") == "de"
    assert language_of_file("val.de.txt") == "de"
    assert language_of_file("corpus.txt") is None
    assert language_of_file("data.pt_BR.gz") == "pt_BR"


# ------------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    en = write_text(tmp_path / "t.en", EN)
    with pytest.raises(FileNotFoundError, match=r"--train_files: file not found: .*nope\.de"):
        load_translation_splits(train_files=[en, str(tmp_path / "nope.de")])
    with pytest.raises(FileNotFoundError, match=r"--test_files: file not found: .*absent\.jsonl"):
        load_translation_splits(test_files=[str(tmp_path / "absent.jsonl")])


def test_mismatched_line_counts(tmp_path):
    en = write_text(tmp_path / "t.en.gz", EN, gz=True)
    de = write_text(tmp_path / "t.de.gz", DE[:2], gz=True)
    with pytest.raises(ValueError, match=r"--validation_files: parallel files have different line counts: "
                                         r".*t\.en\.gz' has 3 lines, .*t\.de\.gz' has 2"):
        load_translation_splits(validation_files=[en, de])


def test_unknown_language_codes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", zip(EN, DE))
    with pytest.raises(ValueError, match=r"--source_lang='fr' is not a language of the train data; it has \['de', 'en'\]"):
        load_translation_splits(source_lang="fr", train_files=[path])
    with pytest.raises(ValueError, match=r"--target_lang='xx'"):
        load_translation_splits(target_lang="xx", train_files=[path])
    en = write_text(tmp_path / "t.en", EN)
    de = write_text(tmp_path / "t.de", DE)
    with pytest.raises(ValueError, match=r"file names say languages \['en', 'de'\] but --source_lang/--target_lang are 'en'/'fr'"):
        load_translation_splits(target_lang="fr", train_files=[en, de])
    with pytest.raises(ValueError, match="must differ"):
        load_translation_splits(source_lang="en", target_lang="en", train_files=[path])


def test_empty_split(tmp_path):
    en = write_text(tmp_path / "e.en", [])
    de = write_text(tmp_path / "e.de", [])
    with pytest.raises(ValueError, match=r"--test_files: the test split is empty"):
        load_translation_splits(test_files=[en, de])
    empty_json = write_text(tmp_path / "e.jsonl", [])
    with pytest.raises(ValueError, match=r"--train_files: the train split is empty"):
        load_translation_splits(train_files=[empty_json])


def test_bad_file_combinations(tmp_path):
    en = write_text(tmp_path / "t.en", EN)
    with pytest.raises(ValueError, match="give one JSON lines file .* or two parallel plain-text files"):
        load_translation_splits(train_files=[en])
    bad = write_text(tmp_path / "bad.jsonl", ['{"en": "x"}'])
    with pytest.raises(ValueError, match=r"line 1 must be an object"):
        load_translation_splits(train_files=[bad])


# ------------------------------------------------------------------------------------------ tokenizer


def test_joint_tokenizer_roundtrip_and_reload(tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    ds = Dataset.from_dict({"translation": [{"en": e, "de": d} for e, d in zip(EN * 20, DE * 20)]})
    tok = train_joint_tokenizer(ds, ["en", "de"], vocab_size=120, min_frequency=1)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) <= 120
    for text in EN + DE:
        ids = tok(text).input_ids
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
        assert tok.decode(ids, skip_special_tokens=True) == text  # detokenised output for BLEU
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(DE[2]).input_ids == tok(DE[2]).input_ids
    with pytest.raises(ValueError, match="--vocab_size must be an integer >= 16"):
        train_joint_tokenizer(ds, ["en", "de"], vocab_size=3)


def test_multi30k_from_shared_data():
    d = require_shared_data("multi30k")
    ds = load_translation_splits(validation_files=[str(d / "val.de.gz"), str(d / "val.en.gz")],
                                 test_files=[str(d / "test_2016_flickr.en.gz"), str(d / "test_2016_flickr.de.gz")])
    assert (len(ds["validation"]), len(ds["test"])) == (1014, 1000)
    first = ds["validation"][0]["translation"]
    assert first["en"].startswith("A group of men") and first["de"].startswith("Eine Gruppe von Männern")


def padded_tokens(batch, lengths):
    return len(batch) * max(lengths[i] for i in batch)


def test_token_budget_batches_cover_every_example_once_within_the_budget():
    g = __import__("random").Random(0)
    lengths = [g.randint(1, 40) for _ in range(997)] + [75]  # one example longer than the budget
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=64, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [b for b in batches if padded_tokens(b, lengths) > 64] == [[997]]  # alone in its batch
    # similar lengths together: padding a few percent (random batches of 2 would pad ~33 %)
    assert sum(padded_tokens(b, lengths) for b in batches) / sum(lengths) < 1.05
    # greedy: no batch could have taken the next example of the length order
    assert min(len(b) for b in batches) >= 1


def test_token_budget_order_is_a_function_of_seed_and_epoch():
    lengths = [1 + (7 * i) % 30 for i in range(500)]
    a, b = TokenBudgetBatchSampler(lengths, 90, seed=3), TokenBudgetBatchSampler(lengths, 90, seed=3)
    epoch0 = list(a)
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch0 == list(b) and epoch1 != epoch0
    b.set_epoch(1)
    assert list(b) == epoch1
    assert len({len(list(TokenBudgetBatchSampler(lengths, 90, seed=s))) for s in range(4)}) == 1  # len() exact
    assert list(TokenBudgetBatchSampler(lengths, 90, seed=4)) != epoch0
    fixed = TokenBudgetBatchSampler(lengths, 90, shuffle=False)
    ordered = [lengths[i] for batch in fixed for i in batch]
    assert ordered == sorted(lengths) and list(fixed) == list(fixed)


@pytest.mark.parametrize("lengths, max_tokens, message", [
    ([3, 4], 0, "max_tokens must be a positive integer, got 0."),
    ([3, 4], 2.5, "max_tokens must be a positive integer, got 2.5."),
    ([], 8, "lengths is empty"),
    ([3, 0], 8, "every length must be >= 1."),
])
def test_token_budget_bad_arguments(lengths, max_tokens, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        TokenBudgetBatchSampler(lengths, max_tokens)
