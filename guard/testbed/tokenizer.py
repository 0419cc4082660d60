"""The real CLIP BPE tokenizer, written offline from the vocabulary open_clip ships.

open_clip bundles `bpe_simple_vocab_16e6.txt.gz` (the merges OpenAI's CLIP was trained with);
from it we derive the vocab.json / merges.txt pair that transformers' CLIPTokenizer reads, in
exactly the order open_clip's SimpleTokenizer assigns ids, so token ids match CLIP's.
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe_file() -> Path:
    path = Path(str(resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")))
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE vocabulary is missing: {path}")
    return path


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's token → id map (49408 entries) and its merges, in rank order."""
    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer_files(directory: Path) -> Path:
    """Write vocab.json and merges.txt into `directory`."""
    vocab, merges = clip_vocab_and_merges()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


@lru_cache(maxsize=1)
def load_clip_tokenizer():
    """A transformers CLIPTokenizer with CLIP's real vocabulary, built without network access."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges],
                        model_max_length=77, pad_token="<|endoftext|>")
    if len(tok) != 49408:
        raise RuntimeError(f"CLIP tokenizer built with {len(tok)} tokens, expected 49408")
    return tok
