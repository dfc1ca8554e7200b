"""Calibration texts and token windows: loaders, their errors, and the shape of the ids."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from streamq import calibration
from streamq.errors import StreamqError

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
UNK, BOS, EOS = 0, 1, 2
WORD_ID = {w: i + 3 for i, w in enumerate(WORDS)}
VOCAB = 3 + len(WORDS)


def _save_tokenizer(folder: Path, bos: bool = True, eos: bool = True) -> Path:
    """A word-level tokenizer with a fixed vocabulary, so expected ids can be written by hand."""
    vocab = {"[UNK]": UNK, "<s>": BOS, "</s>": EOS, **WORD_ID}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    special = {"unk_token": "[UNK]"}
    if bos:
        special["bos_token"] = "<s>"
    if eos:
        special["eos_token"] = "</s>"
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return _save_tokenizer(tmp_path_factory.mktemp("tok"))


def _raises(fn, *needles) -> StreamqError:
    with pytest.raises(StreamqError) as info:
        fn()
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"
    return info.value


# ---------------------------------------------------------------------------------------------
# The built-in set
# ---------------------------------------------------------------------------------------------

CODE_MARKERS = re.compile(r"^\s*(def |class |import |#include|function |const |SELECT|CREATE TABLE|WITH |"
                          r"#!/|\$ )", re.MULTILINE)


def test_builtin_set_is_large_and_mixed():
    texts = calibration.load_texts("builtin")
    assert len(texts) >= 80
    assert len(set(texts)) == len(texts), "duplicate prompts waste calibration tokens"
    assert sum(bool(re.search(r"[\u4e00-\u9fff]", t)) for t in texts) >= 12
    assert sum(bool(CODE_MARKERS.search(t)) for t in texts) >= 10
    assert sum("$" in t and "\\frac" in t for t in texts) >= 3  # LaTeX-style math
    assert all(len(t) >= 200 for t in texts)


def test_builtin_lines_carry_a_kind():
    from importlib import resources
    raw = resources.files("streamq").joinpath(calibration.BUILTIN_RESOURCE).read_text(encoding="utf-8")
    kinds = {json.loads(line)["kind"] for line in raw.splitlines() if line.strip()}
    assert {"prose", "code", "math", "dialogue", "chinese"} <= kinds


# ---------------------------------------------------------------------------------------------
# User files
# ---------------------------------------------------------------------------------------------

def test_jsonl_with_custom_field_skips_blank_lines(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"body": "first", "id": 1}\n\n{"body": "second"}\n{"body": "   "}\n', encoding="utf-8")
    assert calibration.load_texts(str(f), text_field="body") == ["first", "second"]


def test_json_list_of_strings_and_of_objects(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(["one", "two"]))
    b.write_text(json.dumps([{"text": "uno"}, {"text": "dos", "lang": "es"}]))
    assert calibration.load_texts(str(a)) == ["one", "two"]
    assert calibration.load_texts(str(b)) == ["uno", "dos"]


def test_txt_paragraphs_keep_inner_newlines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("line one\nline two\n\n  \nsecond paragraph\n\n\nthird\n")
    assert calibration.load_texts(str(f)) == ["line one\nline two", "second paragraph", "third"]


def test_txt_without_blank_lines_is_one_text_per_line(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("first line\r\n  second line  \r\nthird line")
    assert calibration.load_texts(str(f)) == ["first line", "second line", "third line"]
    g = tmp_path / "m.txt"
    g.write_text("a\nb\nc\n")
    assert calibration.load_texts(str(g)) == ["a", "b", "c"]


def test_missing_and_empty_files_are_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    _raises(lambda: calibration.load_texts(str(missing)), str(missing), "does not exist", "builtin")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    _raises(lambda: calibration.load_texts(str(empty)), str(empty), "empty")
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    _raises(lambda: calibration.load_texts(str(odd)), str(odd), ".csv", ".jsonl")


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "unterminated\n')
    _raises(lambda: calibration.load_texts(str(f)), f"{f}:2", "not valid JSON")

    f.write_text('{"text": "ok"}\n\n{"content": "x"}\n')
    err = _raises(lambda: calibration.load_texts(str(f)), f"{f}:3", "'text'", "'content'")
    assert "text_field" in err.hint

    f.write_text('{"text": 42}\n')
    _raises(lambda: calibration.load_texts(str(f)), f"{f}:1", "int", "not a string")

    f.write_text('["a list"]\n')
    _raises(lambda: calibration.load_texts(str(f)), f"{f}:1", "expected a JSON object")


def test_json_errors_name_file_and_item(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n  "a",\n  oops\n]')
    _raises(lambda: calibration.load_texts(str(f)), f"{f}:3", "not valid JSON")
    f.write_text('{"text": "not a list"}')
    _raises(lambda: calibration.load_texts(str(f)), str(f), "not a list")
    f.write_text('["fine", {"txt": "typo"}]')
    _raises(lambda: calibration.load_texts(str(f)), str(f), "item 1", "'text'")
    f.write_text('[]')
    _raises(lambda: calibration.load_texts(str(f)), str(f), "no non-empty text")


# ---------------------------------------------------------------------------------------------
# Token windows
# ---------------------------------------------------------------------------------------------

def test_has_tokenizer(tmp_path, tok_dir):
    assert calibration.has_tokenizer(tok_dir)
    assert not calibration.has_tokenizer(tmp_path)


def test_windows_have_shape_and_are_deterministic(tok_dir):
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    ids = calibration.token_ids(texts, tok_dir, VOCAB, samples=3, seq_len=7, seed=5)
    assert ids.shape == (3, 7) and ids.dtype == torch.long
    assert torch.equal(ids, calibration.token_ids(texts, tok_dir, VOCAB, 3, 7, 5))
    assert not torch.equal(ids, calibration.token_ids(texts, tok_dir, VOCAB, 3, 7, 6))  # other order
    assert int(ids.min()) >= 0 and int(ids.max()) < VOCAB


def test_bos_before_and_eos_after_each_text(tok_dir):
    ids = calibration.token_ids(["alpha beta", "gamma"], tok_dir, VOCAB, samples=1, seq_len=7, seed=0)
    a, b, g = WORD_ID["alpha"], WORD_ID["beta"], WORD_ID["gamma"]
    assert ids.tolist()[0] in ([BOS, a, b, EOS, BOS, g, EOS], [BOS, g, EOS, BOS, a, b, EOS])


def test_short_stream_is_cycled(tok_dir):
    stream = [BOS, WORD_ID["delta"], WORD_ID["eta"], EOS]
    ids = calibration.token_ids(["delta eta"], tok_dir, VOCAB, samples=4, seq_len=3, seed=0)
    assert ids.flatten().tolist() == stream * 3


def test_tokenizer_without_bos_or_eos(tmp_path):
    folder = _save_tokenizer(tmp_path / "plain", bos=False, eos=False)
    ids = calibration.token_ids(["zeta theta"], folder, VOCAB, samples=1, seq_len=4, seed=0)
    assert ids.tolist() == [[WORD_ID["zeta"], WORD_ID["theta"]] * 2]


def test_random_ids_without_tokenizer(tmp_path):
    for folder in (None, tmp_path):
        ids = calibration.token_ids([], folder, vocab_size=50, samples=2, seq_len=9, seed=3)
        assert ids.shape == (2, 9) and ids.dtype == torch.long
        assert int(ids.min()) >= 0 and int(ids.max()) < 50
        assert torch.equal(ids, calibration.token_ids([], folder, 50, 2, 9, 3))
    assert not torch.equal(ids, calibration.token_ids([], None, 50, 2, 9, 4))


def test_token_id_errors(tmp_path, tok_dir):
    _raises(lambda: calibration.token_ids(["alpha"], tok_dir, VOCAB, 0, 8, 0), "samples=0")
    _raises(lambda: calibration.token_ids([], None, VOCAB, 2, 0, 0), "seq_len=0")
    _raises(lambda: calibration.token_ids([], tok_dir, VOCAB, 2, 4, 0), str(tok_dir), "no calibration texts")
    _raises(lambda: calibration.token_ids(["alpha beta"], tok_dir, 4, 1, 4, 0),
            str(tok_dir), "vocab_size is 4")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{ not json")
    err = _raises(lambda: calibration.token_ids(["alpha"], broken, VOCAB, 1, 4, 0), str(broken), "failed to load")
    assert "remove" in err.hint and "random" in err.hint


def test_builtin_set_tokenizes_into_mixed_windows(tok_dir):
    texts = calibration.load_texts("builtin")
    ids = calibration.token_ids(texts, tok_dir, VOCAB, samples=8, seq_len=64, seed=0)
    # The toy vocabulary maps most of the text to [UNK]; BOS marks where texts begin.
    assert ids.shape == (8, 64) and ids[0, 0] == BOS
    assert int((ids == BOS).sum()) >= 2


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------

def test_fingerprint_tracks_values_and_shape():
    ids = torch.arange(12, dtype=torch.long).view(3, 4)
    fp = calibration.fingerprint(ids)
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert fp == calibration.fingerprint(ids.clone())
    assert fp == calibration.fingerprint(ids.t().contiguous().t())  # layout does not matter
    assert fp != calibration.fingerprint(ids.view(4, 3))             # same bytes, other shape
    changed = ids.clone()
    changed[2, 3] = 99
    assert fp != calibration.fingerprint(changed)
