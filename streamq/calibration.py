"""Calibration data: texts from the built-in set or a user file, cut into fixed-size token windows.

Static activation scales are measured by running these windows through the model, so the windows
should resemble what the model sees in use. The built-in set mixes prose, code, math, dialogue,
Chinese and structured text for that reason, and the texts are shuffled before concatenation so
that one window spans several kinds. A model folder without a tokenizer gets uniformly random ids
instead: they still exercise every layer, but give less representative ranges.
"""
from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path

import torch

from .errors import StreamqError

BUILTIN = "builtin"
BUILTIN_RESOURCE = "data/calib_prompts.jsonl"

# Any of these means the folder is meant to carry a tokenizer; if it then fails to load, that is an
# error rather than a silent fall back to random ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# Texts are tokenized in batches and tokenizing stops once enough tokens exist, so a large user file
# costs only what the windows need.
_TOKENIZE_BATCH = 64

_FORMAT_HINT = {
    ".jsonl": 'each line must be one JSON object such as {"text": "..."}',
    ".json": 'the file must hold a list of strings, or a list of objects such as {"text": "..."}',
    ".txt": "separate texts with blank lines, or put one text per line",
}


# ---------------------------------------------------------------------------------------------
# Loading texts
# ---------------------------------------------------------------------------------------------

def load_texts(source: str, text_field: str = "text") -> list[str]:
    """The calibration texts named by `source`: "builtin" or a .jsonl, .json or .txt file."""
    if source == BUILTIN:
        raw = resources.files("streamq").joinpath(BUILTIN_RESOURCE).read_text(encoding="utf-8")
        return _parse_jsonl(raw, f"built-in calibration set ({BUILTIN_RESOURCE})", "text")
    path = Path(source).expanduser()
    raw = _read_file(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        texts = _parse_jsonl(raw, str(path), text_field)
    elif suffix == ".json":
        texts = _parse_json(raw, str(path), text_field)
    else:
        texts = _parse_txt(raw)
    if not texts:
        raise StreamqError(f"calibration file {path} holds no non-empty text", _FORMAT_HINT[suffix])
    return texts


def _read_file(path: Path) -> str:
    if not path.is_file():
        raise StreamqError(f"calibration file {path} does not exist",
                           'check calibration.source, or use source = "builtin" for the built-in set')
    if path.suffix.lower() not in _FORMAT_HINT:
        raise StreamqError(f"calibration file {path} has an unsupported extension '{path.suffix}'",
                           "use a .jsonl, .json or .txt file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise StreamqError(f"calibration file {path} is not UTF-8 text (byte {e.start})",
                           "re-save the file as UTF-8") from None
    if not raw.strip():
        raise StreamqError(f"calibration file {path} is empty", _FORMAT_HINT[path.suffix.lower()])
    return raw


def _parse_jsonl(raw: str, where: str, field: str) -> list[str]:
    texts = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise StreamqError(f"{where}:{lineno}: not valid JSON ({e.msg} at column {e.colno})",
                               _FORMAT_HINT[".jsonl"]) from None
        text = _field_text(obj, field, f"{where}:{lineno}")
        if text.strip():
            texts.append(text)
    return texts


def _parse_json(raw: str, where: str, field: str) -> list[str]:
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StreamqError(f"{where}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})",
                           _FORMAT_HINT[".json"]) from None
    if not isinstance(doc, list):
        raise StreamqError(f"{where}: the top level is a JSON {type(doc).__name__}, not a list",
                           _FORMAT_HINT[".json"])
    texts = []
    for i, item in enumerate(doc):
        text = item if isinstance(item, str) else _field_text(item, field, f"{where}: item {i}")
        if text.strip():
            texts.append(text)
    return texts


def _field_text(obj, field: str, where: str) -> str:
    """The string under `field` of one JSON object, with errors that say where it went wrong."""
    if not isinstance(obj, dict):
        raise StreamqError(f"{where}: expected a JSON object, found {type(obj).__name__}",
                           f'write each text as {{"{field}": "..."}}')
    if field not in obj:
        found = ", ".join(f"'{k}'" for k in obj) or "none"
        raise StreamqError(f"{where}: object has no field '{field}' (fields: {found})",
                           f"set calibration.text_field to the field holding the text, "
                           f"or add '{field}' to every object")
    text = obj[field]
    if not isinstance(text, str):
        raise StreamqError(f"{where}: field '{field}' is a {type(text).__name__}, not a string",
                           f"store the text of '{field}' as a JSON string")
    return text


def _parse_txt(raw: str) -> list[str]:
    """Paragraphs separated by blank lines; a file without blank lines gives one text per line."""
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")
    blocks = re.split(r"\n(?:[ \t]*\n)+", raw.strip())
    if len(blocks) == 1:
        return [line.strip() for line in raw.splitlines() if line.strip()]
    # Inner newlines are kept: they are part of code and lists, and the model sees them as tokens.
    return [b.strip("\n").rstrip() for b in blocks if b.strip()]


# ---------------------------------------------------------------------------------------------
# Token windows
# ---------------------------------------------------------------------------------------------

def has_tokenizer(model_dir: Path) -> bool:
    model_dir = Path(model_dir)
    return any((model_dir / name).is_file() for name in TOKENIZER_FILES)


def token_ids(texts: list[str], tokenizer_dir: Path | None, vocab_size: int,
              samples: int, seq_len: int, seed: int) -> torch.LongTensor:
    """[samples, seq_len] token ids: tokenized texts if a tokenizer is given, else random ids."""
    if samples < 1 or seq_len < 1:
        raise StreamqError(f"calibration needs samples >= 1 and seq_len >= 1, got samples={samples} "
                           f"seq_len={seq_len}", "fix calibration.samples and calibration.seq_len")
    if tokenizer_dir is None or not has_tokenizer(Path(tokenizer_dir)):
        return _random_ids(vocab_size, samples, seq_len, seed)
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = _load_tokenizer(tokenizer_dir)
    stream = _token_stream(_shuffled(texts, seed), tokenizer, samples * seq_len, tokenizer_dir)
    ids = _windows(stream, samples, seq_len)
    _check_vocab(ids, vocab_size, tokenizer_dir)
    return ids


def _random_ids(vocab_size: int, samples: int, seq_len: int, seed: int) -> torch.LongTensor:
    if vocab_size < 1:
        raise StreamqError(f"cannot draw random calibration ids: vocab_size is {vocab_size}",
                           "check vocab_size in the model's config.json")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (samples, seq_len), generator=gen, dtype=torch.long)


def _load_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer  # imported here: it is slow and only this path needs it
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types here; all mean the same to the user
        raise StreamqError(f"the tokenizer in {tokenizer_dir} failed to load: {type(e).__name__}: {e}",
                           f"fix the tokenizer files, or remove {', '.join(TOKENIZER_FILES)} from "
                           f"the folder to calibrate with random token ids") from None


def _shuffled(texts: list[str], seed: int) -> list[str]:
    """The texts in a seeded order, so that consecutive texts (and so each window) mix kinds."""
    gen = torch.Generator().manual_seed(seed)
    return [texts[i] for i in torch.randperm(len(texts), generator=gen).tolist()]


def _token_stream(texts: list[str], tokenizer, needed: int, tokenizer_dir: Path) -> list[int]:
    """BOS + text + EOS for each text, concatenated, until at least `needed` ids (or all texts)."""
    if not texts:
        raise StreamqError(f"no calibration texts to tokenize with the tokenizer in {tokenizer_dir}",
                           'use calibration.source = "builtin" or a file with at least one text')
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    # A tokenizer whose BOS and EOS are one token would otherwise emit it twice between texts.
    tail = [eos] if eos is not None and eos != bos else []
    stream: list[int] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = texts[start:start + _TOKENIZE_BATCH]
        # verbose=False: long texts are expected here and need no "longer than max length" warning.
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            stream.extend(head + list(ids) + tail)
        if len(stream) >= needed:
            break
    if not stream:
        raise StreamqError(f"the calibration texts give no tokens with the tokenizer in {tokenizer_dir}",
                           "check that the texts are in a language the tokenizer covers")
    return stream


def _windows(stream: list[int], samples: int, seq_len: int) -> torch.LongTensor:
    """Consecutive windows over the stream; a short stream is cycled through again from its start."""
    needed = samples * seq_len
    repeats = -(-needed // len(stream))
    flat = torch.tensor(stream, dtype=torch.long).repeat(repeats)[:needed]
    return flat.view(samples, seq_len).clone()


def _check_vocab(ids: torch.LongTensor, vocab_size: int, tokenizer_dir: Path) -> None:
    # Caught here rather than as an index error deep inside the embedding lookup.
    top = int(ids.max())
    if top >= vocab_size:
        raise StreamqError(f"the tokenizer in {tokenizer_dir} produces token id {top}, but the model's "
                           f"vocab_size is {vocab_size}",
                           "the tokenizer does not belong to this model: copy the matching tokenizer "
                           "files, or remove them to calibrate with random token ids")


def fingerprint(ids: torch.LongTensor) -> str:
    """sha256 of the ids' shape and int64 bytes: equal fingerprints mean identical calibration data."""
    data = ids.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()
