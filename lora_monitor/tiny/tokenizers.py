"""Tokenizers for the tiny models, built in code from small character-level vocabularies (no download):
CLIP's byte-level BPE without merges, T5 (Unigram), Gemma (BPE with byte fallback) and Qwen2 (byte-level BPE)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2/CLIP): every byte gets a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def build_tokenizer(max_length: int = 77):
    """A CLIPTokenizer over a byte-level vocabulary with no merges: every character is a token."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.json"
        merges_file = Path(folder) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length, pad_token="<|endoftext|>")
    return tokenizer


# Printable ASCII but the space: the alphabet of the T5 and Gemma tokenizers (one token per character).
_ASCII = [chr(code) for code in range(33, 127)]


def _load_tokenizer(cls, backend, config: dict):
    """Write a `tokenizers` backend and its config as a tokenizer folder and load it with cls.

    Loading rather than wrapping makes the built tokenizer exactly what from_pretrained gives back
    after save_pretrained, in transformers 4 (which reads tokenizer.json as is) and 5 (which rebuilds
    the backend from the vocabulary in the class's own way).
    """
    with tempfile.TemporaryDirectory() as folder:
        backend.save(str(Path(folder) / "tokenizer.json"))
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return cls.from_pretrained(folder)


def build_t5_tokenizer(max_length: int = 512):
    """A T5TokenizerFast (SentencePiece-style Unigram) whose pieces are single characters; no sentinels."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in _ASCII]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    backend.add_special_tokens(["<pad>", "</s>", "<unk>"])
    config = dict(
        tokenizer_class="T5Tokenizer", model_max_length=max_length, extra_ids=0, additional_special_tokens=[],
        eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )
    return _load_tokenizer(T5TokenizerFast, backend, config)


def build_gemma_tokenizer(max_length: int = 2048):
    """A GemmaTokenizerFast (BPE with byte fallback, no merges): one token per character, <bos> first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import GemmaTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab = {token: index for index, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in ["▁"] + _ASCII:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=True, unk_token="<unk>", byte_fallback=True, dropout=None))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(
        single=["<bos>", "$A"], pair=["<bos>", "$A", "<bos>", "$B"], special_tokens=[("<bos>", vocab["<bos>"])]
    )
    backend.add_special_tokens(specials)
    config = dict(
        tokenizer_class="GemmaTokenizer", model_max_length=max_length, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>", mask_token="<mask>", add_bos_token=True, add_eos_token=False, padding_side="right",
    )
    return _load_tokenizer(GemmaTokenizerFast, backend, config)


_QWEN_PRETOKENIZE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Whole-word tokens for the words of QwenImagePipeline's prompt template. The pipeline drops the
# first 34 tokens of every encoded prompt (the template's system part, 34 tokens with Qwen's own
# vocabulary); with these words merged the tiny tokenizer spends exactly 34 on it too, so what is
# left is the prompt itself rather than most of an instruction every prompt shares.
_QWEN_WORDS = ["system", "user", "assistant", "Describe"]
_QWEN_SPACED_WORDS = (
    "the image by detailing color shape size texture quantity text spatial relationships of objects and background"
).split()


def _qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level alphabet, a merge chain for each template word (space-prefixed words first, so
    that no bare-word merge can split them), then the special tokens."""
    alphabet = _bytes_to_unicode()
    space = alphabet[ord(" ")]
    vocab = {char: index for index, char in enumerate(alphabet.values())}
    merges = []
    for word in [space + word for word in _QWEN_SPACED_WORDS] + _QWEN_WORDS:
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                merges.append((word[: end - 1], word[end - 1]))
                vocab[word[:end]] = len(vocab)
    for token in _QWEN_SPECIALS:
        vocab[token] = len(vocab)
    return vocab, merges


def build_qwen_tokenizer(max_length: int = 32768):
    """A Qwen2TokenizerFast (byte-level BPE): one token per byte but for the words of QwenImage's
    prompt template, plus Qwen's chat tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import Qwen2TokenizerFast

    vocab, merges = _qwen_vocab_and_merges()
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                   fuse_unk=False, byte_fallback=False)
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE), behavior="isolated", invert=False),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(_QWEN_SPECIALS)
    config = dict(
        tokenizer_class="Qwen2Tokenizer", model_max_length=max_length, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, add_prefix_space=False, errors="replace", additional_special_tokens=_QWEN_SPECIALS[1:],
    )
    return _load_tokenizer(Qwen2TokenizerFast, backend, config)
