"""The toy world's `CLIPTokenizer`: each world word and each reserved identifier is exactly one token.

Pitfall (transformers 5.x): ``CLIPTokenizer(vocab=dict, merges=[])`` splits every word into single characters,
so a word-level vocabulary silently maps multi-letter words to ``<|endoftext|>``. Instead a byte-level BPE with
CLIP's normaliser/pre-tokeniser and ``</w>`` end-of-word suffix is trained with the `tokenizers` library on the
world's word list (each word frequent enough to be merged into a single token), written once as ``vocab.json`` +
``merges.txt``, and always loaded from disk (BPE training may number tokens differently from one run to the next,
and a trained text encoder is tied to the ids).

The files shipped in ``toyworld/tokenizer_files/`` are the canonical ones; :func:`build_tokenizer_files` only
exists to (re)create them.

Reserved identifiers (``sks``, ``zwx``, ...) are single tokens that never occur in the base model's training
prompts: their text-encoder embeddings stay at their random initialisation, ready to be given a meaning by
personalisation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from .world import world_words

__all__ = [
    "IDENTIFIERS",
    "MODEL_MAX_LENGTH",
    "TOKENIZER_DIR",
    "tokenizer_words",
    "build_tokenizer_files",
    "load_tokenizer",
    "check_tokenizer",
]

#: Reserved identifier tokens, never used in base-model training prompts.
IDENTIFIERS: tuple[str, ...] = ("sks", "zwx", "qjv", "vyk", "pfq", "xbj", "kqz", "wlx")
#: Token sequence length (BOS + up to 14 tokens + EOS); must equal the text encoder's max_position_embeddings.
MODEL_MAX_LENGTH = 16
#: Directory of the canonical tokenizer files shipped with the package.
TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer_files"

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tokenizer_words() -> list[str]:
    """World words followed by the reserved identifiers (all must be single tokens)."""
    return list(world_words()) + list(IDENTIFIERS)


def build_tokenizer_files(out_dir: Union[str, os.PathLike], words: Optional[list[str]] = None) -> Path:
    """Train a byte-level BPE so that every word of ``words`` is one token; write ``vocab.json``/``merges.txt``.

    Also writes the tokenizer config so that ``CLIPTokenizer.from_pretrained(out_dir)`` works. Returns ``out_dir``.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    words = list(words) if words is not None else tokenizer_words()
    tok = Tokenizer(BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # Each word is a training "sentence" repeated many times; the alphabet covers every byte so that any text can
    # still be encoded (unknown words fall back to characters). A generous vocab_size lets every word merge fully.
    trainer = BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    corpus = [w for w in sorted(set(words)) for _ in range(10)]
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0, sort_keys=False) + "\n")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2) + "\n"
    )
    tokenizer = load_tokenizer(out)
    check_tokenizer(tokenizer, words)
    return out


def load_tokenizer(path: Union[str, os.PathLike, None] = None):
    """Load the toy world's ``CLIPTokenizer`` from ``path`` (default: the files shipped with the package)."""
    from transformers import CLIPTokenizer

    path = Path(path) if path is not None else TOKENIZER_DIR
    if not (path / "vocab.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer files in {path}; create them with "
            "`python -c 'from svdiff_adapter.toyworld.tokenizer import build_tokenizer_files as b; b(PATH)'`"
        )
    tok = CLIPTokenizer.from_pretrained(str(path))
    tok.model_max_length = MODEL_MAX_LENGTH
    return tok


def check_tokenizer(tokenizer, words: Optional[list[str]] = None) -> None:
    """Raise if a word is not exactly one (non-unknown) token, or if the sequence length is wrong."""
    words = list(words) if words is not None else tokenizer_words()
    unk = tokenizer.convert_tokens_to_ids(EOS)
    bad = []
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == unk:
            bad.append((w, tokenizer.convert_ids_to_tokens(ids)))
    if bad:
        raise ValueError(f"words that are not exactly one token: {bad}")
    if tokenizer.model_max_length != MODEL_MAX_LENGTH:
        raise ValueError(f"model_max_length is {tokenizer.model_max_length}, expected {MODEL_MAX_LENGTH}")


if __name__ == "__main__":  # pragma: no cover
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else TOKENIZER_DIR
    build_tokenizer_files(target)
    print(f"wrote {target}")
