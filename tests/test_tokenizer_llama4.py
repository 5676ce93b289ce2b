"""Meta's own tokenizer.model files (Llama 3 and Llama 4, shipped in Meta's ``llama-models``
package) against Meta's reference tokenizer and chat format: ids, special tokens, decoding, the
chat format, the tokenizer.json round trip, and refusing a tokenizer.model camelid cannot tell."""

from __future__ import annotations

import random
import re
import sys
import sysconfig
import types
from pathlib import Path

import pytest
from conftest import needs_hf, transformers

from camelid.errors import TokenizerError
from camelid.infer.engine import default_stop_ids
from camelid.tokenizer import LLAMA4_PATTERN, Tokenizer

llama_models = pytest.importorskip(
    "llama_models", reason="needs Meta's llama-models package (the reference; test extra)"
)
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer3  # noqa: E402
from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer4  # noqa: E402

ROOT = Path(llama_models.__file__).parent
LLAMA3_MODEL = ROOT / "llama3" / "tokenizer.model"
LLAMA4_MODEL = ROOT / "llama4" / "tokenizer.model"

FRAGMENTS = [
    "Hello", "world", " the", "The", "QUICK", "brown", "fox's", "they'LL", "I'm", "we've",
    "DON'T", "it'S", "y'all", "CamelCase", "HTTPServer", "getHTTPResponse", "iPhone", "McDonald's",
    "naïve", "café", "Straße", "ΕΛΛΗΝΙΚΆ", "Ελληνικά", "русский", "ПРИВЕТ", "中文", "你好，世界！",
    "日本語のテキスト", "カタカナ", "한국어", "مرحبا بالعالم", "שלום", "हिन्दी", "ไทย", "e\u0301",
    "A\u0308B", "👋", "🇯🇵", "🇫🇷", "👨‍👩‍👧‍👦", "🏳️‍🌈", "👍🏽", "1234567", "3.14159", "0x1F", "1e-9",
    "-42", "1,234,567.89", "def f(x):", "\treturn x", "    if a == b:", "{}", "[];", "->", "!=",
    "...", "'''", "#", "@", "$", "a/b/c", "http://x.y/z?q=1", "//", "/*", "*/\n", "</div>\n",
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2028", "\x0b",
    "<|eot|>", "<|eot_id|>", "<|begin_of_text|>", "<|header_start|>", "<|", "|>",
    "<|not_a_token|>", "\x00", "\x7f", "\ufeff",
]  # fmt: skip

HAND_WRITTEN = [
    "",
    "Hello, world! I'm here; they'll see. You're right, we'd go, he's DONE.",
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n-1) + fib(n-2)\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    'SELECT * FROM users WHERE name = "O\'Brien";',
    '{"key": [1, 2.5, -3e10, null, true], "nested": {"a": "b"}}',
    "你好，世界！这是一个测试。日本語のテキストとカタカナ、ひらがな。한국어 문장입니다.",
    "mixed: English 中文 русский العربية हिन्दी ελληνικά 日本語 한국어 עברית ไทย",
    "emoji 👋🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷🇺🇳 rainbow 🏳️‍🌈 ❤️‍🔥",
    "tabs\t\tand  spaces   and\n\n\nnewlines\r\n\r\n  trailing   ",
    " leading space",
    "\n\n\nleading newlines",
    "paths: /usr/bin/env, C:\\Windows\\System32, ./a/b/../c/",
    "<|eot|>",
    "<|begin_of_text|>hi<|end_of_text|>",
    "<|header_start|>user<|header_end|>\n\nhi<|eot|>",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "e\u0301 combining, \u200b zero width, \ufeff bom, \x00 nul, \u0301\u0301 marks",
    "x" * 5000,
    "ab" * 3000,
    "1" * 1000,
]


def _numbers() -> list[str]:
    rng = random.Random(0)
    out = ["".join(rng.choice("0123456789") for _ in range(n)) for n in range(1, 41)]
    out += [str(10**n) for n in range(30)] + [f"{rng.uniform(-1e6, 1e6):.{n}f}" for n in range(9)]
    out += ["1,000,000", "1 000 000", "3.14e-10", "0.000001", "२०२४", "٣٤٥", "①②③", "Ⅻ"]
    return out


def _whitespace() -> list[str]:
    out = []
    for n in range(1, 18):
        out += [" " * n, "\n" * n, "\t" * n, " " * n + "word", "word" + " " * n + "next"]
        out += ["a" + " " * n + "\n" + " " * n + "b", "\r\n" * n, " \n" * n, "x\n" + " " * n]
    return out


def _random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 20)):
        r = rng.random()
        if r < 0.7:
            parts.append(rng.choice(FRAGMENTS))
        elif r < 0.85:
            parts.append(" " * rng.randint(1, 6) + "\n" * rng.randint(0, 3))
        else:  # any non-surrogate code point
            cp = rng.choice([rng.randint(0x20, 0x2FFF), rng.randint(0xE000, 0x10FFFF)])
            parts.append(chr(cp))
    return "".join(parts)


def _code() -> list[str]:
    """About 150 KB of real Python source."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        if size > 150_000:
            break
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
    return texts


def broad_texts() -> list[str]:
    rng = random.Random(4)
    return (
        HAND_WRITTEN
        + FRAGMENTS
        + _numbers()
        + _whitespace()
        + [_random_text(rng) for _ in range(600)]
        + _code()
    )


TEXTS = broad_texts()

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant.\n"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "  Translate 你好 and explain 👋🏽\n\n"},
    {"role": "assistant", "content": "\nHello.\n  It is a greeting. "},
    {"role": "user", "content": "Code? <|eot|> is text here"},
    {"role": "assistant", "content": ""},
    {"role": "tool", "content": '{"result": 42}'},  # Meta: an "ipython" header, ends in <|eom|>
    {"role": "user", "content": "def f():\n\treturn 1  \n"},
]


# --- fixtures: each tokenizer loaded once ---


@pytest.fixture(scope="module")
def meta3() -> MetaTokenizer3:
    return MetaTokenizer3(LLAMA3_MODEL)


@pytest.fixture(scope="module")
def meta4() -> MetaTokenizer4:
    return MetaTokenizer4(LLAMA4_MODEL)


@pytest.fixture(scope="module")
def tok3() -> Tokenizer:
    return Tokenizer.load(LLAMA3_MODEL)


@pytest.fixture(scope="module")
def tok4() -> Tokenizer:
    return Tokenizer.load(LLAMA4_MODEL)


@pytest.fixture(scope="module")
def pairs(tok3, tok4, meta3, meta4) -> dict[str, tuple[Tokenizer, object]]:
    return {"llama3": (tok3, meta3), "llama4": (tok4, meta4)}


@pytest.fixture(scope="module")
def meta_chat4(meta4):
    """Meta's Llama 4 ChatFormat. Its module imports the image transforms (torchvision) at the
    top; text chats never use them, so without torchvision (its wheels pull in a CUDA torch)
    that one module is replaced by a stand-in that fails if it were ever used."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        name = "llama_models.llama4.preprocess"
        stand_in = types.ModuleType(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError("image transforms need torchvision")

        stand_in.ResizeNormalizeImageTransform = unavailable
        stand_in.VariableSizeImageTransform = unavailable
        sys.modules[name] = stand_in
        try:
            from llama_models.llama4.chat_format import ChatFormat
        finally:
            del sys.modules[name]
    else:
        from llama_models.llama4.chat_format import ChatFormat
    return ChatFormat(meta4)


# --- which Llama a tokenizer.model is ---


def test_llama4_layout(tok4, meta4):
    assert tok4.vocab_size == meta4.n_words == 202_048
    assert len(tok4.special_tokens) == 2048
    assert tok4.special_tokens == meta4.special_tokens  # every name at Meta's id
    assert (tok4.bos_id, tok4.eos_id, tok4.eot_id) == (meta4.bos_id, meta4.eos_id, meta4.eot_id)
    assert (tok4.bos_id, tok4.eos_id, tok4.eot_id) == (200000, 200001, 200008)
    assert tok4.special_tokens["<|header_start|>"] == 200005
    assert tok4.special_tokens["<|reserved_special_token_0|>"] == 201144
    assert tok4._backend.layout.name == "Llama 4"
    assert tok4._backend.layout.pattern == LLAMA4_PATTERN == meta4.O200K_PATTERN


def test_llama3_layout(tok3, meta3):
    assert tok3.vocab_size == meta3.n_words == 128_256
    assert tok3._backend.layout.name == "Llama 3"
    assert (tok3.bos_id, tok3.eos_id, tok3.eot_id) == (meta3.bos_id, meta3.eos_id, meta3.eot_id)
    # The tokens with a meaning sit at Meta's ids. (Reserved slots keep the Llama 3.1
    # tokenizer.json names, as before; llama-models calls two of them <|step_id|>, <|image|>.)
    for name in ("<|finetune_right_pad_id|>", "<|start_header_id|>", "<|end_header_id|>"):
        assert tok3.special_tokens[name] == meta3.special_tokens[name]
    for name in ("<|eom_id|>", "<|eot_id|>", "<|python_tag|>"):
        assert tok3.special_tokens[name] == meta3.special_tokens[name]


def test_stop_ids(tok3, tok4, meta3, meta4):
    assert sorted(default_stop_ids(tok4)) == sorted(meta4.stop_tokens)
    assert sorted(default_stop_ids(tok3)) == sorted(meta3.stop_tokens)


def _write_ranks(lines: list[str], path: Path) -> Path:
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize("drop", [1, 50_000])
def test_unknown_rank_count_refused(tmp_path, drop):
    lines = LLAMA4_MODEL.read_text().splitlines(keepends=True)
    path = _write_ranks(lines[:-drop], tmp_path / "tokenizer.model")
    n = 200_000 - drop
    with pytest.raises(
        TokenizerError, match=rf"{re.escape(str(path))}: {n:,} BPE ranks.*128,000 \(Llama 3\)"
    ):
        Tokenizer.load(path)
    with pytest.raises(TokenizerError, match="200,000 \\(Llama 4\\)"):
        Tokenizer.load(tmp_path)


def test_tiny_rank_table_refused(tmp_path):
    import base64

    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)]
    path = _write_ranks(lines, tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerError, match=r"256 BPE ranks, which is no tokenizer\.model"):
        Tokenizer.load(path)


# --- ids against Meta's reference ---


@pytest.mark.parametrize("which", ["llama3", "llama4"])
def test_ids_equal_meta(pairs, which):
    tok, meta = pairs[which]
    for text in TEXTS:
        assert tok.encode(text) == meta.encode(text, bos=False, eos=False), text
    assert tok.encode_batch(TEXTS, bos=True) == [meta.encode(t, bos=True, eos=False) for t in TEXTS]
    assert tok.encode("hi", bos=True, eos=True) == meta.encode("hi", bos=True, eos=True)


@pytest.mark.parametrize("which", ["llama3", "llama4"])
def test_special_text_equals_meta(pairs, which):
    tok, meta = pairs[which]
    names = [n for n, i in tok.special_tokens.items() if meta.special_tokens.get(n) == i]
    texts = [*names[:40], "a<|eot|>b<|eot_id|>c", "<|header_start|>user<|header_end|>\n\nx<|eot|>"]
    for text in texts:
        plain = tok.encode(text)
        assert plain == meta.encode(text, bos=False, eos=False)
        assert not set(plain) & set(tok.special_tokens.values())  # plain text, no control ids
        allowed = meta.encode(text, bos=False, eos=False, allowed_special="all")
        assert tok.encode(text, allow_special=True) == allowed


@pytest.mark.parametrize("which", ["llama3", "llama4"])
def test_decode_round_trip(pairs, which):
    tok, meta = pairs[which]
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(ids) == meta.decode(ids)
    ids = tok.encode("<|eot|>x", bos=True, allow_special=True)
    assert tok.decode(ids) == meta.decode(ids)


# --- the chat format ---


def _meta_messages(messages):
    from llama_models.datatypes import RawMessage

    return [RawMessage(role=m["role"], content=m["content"]) for m in messages]


def test_llama4_chat_equals_meta(tok4, meta_chat4):
    """A multi-turn chat with a system message and the generation prompt, token for token."""
    for n in range(1, len(CONVERSATION) + 1):
        messages = CONVERSATION[:n]
        ref = meta_chat4.encode_dialog_prompt(_meta_messages(messages)).tokens
        assert tok4.apply_chat_template(messages, add_generation_prompt=True) == ref
        # Without the generation prompt it is the same minus Meta's trailing assistant header.
        header = meta_chat4._encode_header("assistant")
        assert tok4.apply_chat_template(messages) == ref[: -len(header)]
    text = tok4.render_chat(CONVERSATION[:2], add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\n"
        "You are a terse assistant.\n<|eot|>"
        "<|header_start|>user<|header_end|>\n\nWhat is 2+2?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )


def test_llama4_chat_mask(tok4):
    ids, mask = tok4.apply_chat_template(CONVERSATION, return_assistant_mask=True)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    expected = []
    for m in CONVERSATION:
        if m["role"] == "assistant":
            expected += [*tok4.encode(m["content"]), tok4.eot_id]
    assert trained == expected
    # one turn end per message ("<|eot|>" in content stays text)
    assert ids.count(tok4.eot_id) == len(CONVERSATION) - 1
    assert ids.count(tok4.special_tokens["<|eom|>"]) == 1  # the tool message


# --- tokenizer.json ---


@pytest.fixture(scope="module")
def saved4(tok4, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama4-json")
    tok4.save(out)
    return out


@pytest.fixture(scope="module")
def meta4_ids(meta4) -> list[list[int]]:
    return [meta4.encode(t, bos=False, eos=False) for t in TEXTS]


def test_saved_json_same_ids(tok4, saved4, meta4, meta4_ids):
    again = Tokenizer.load(saved4 / "tokenizer.json")
    assert again.digest == tok4.digest
    assert again.special_tokens == tok4.special_tokens
    assert again._backend.twin is not None  # provably the same BPE: plain text runs on tiktoken
    # The tokenizers pipeline itself (not the twin) gives Meta's ids.
    pipe = again._backend._specials_as_text.encode_batch(TEXTS, add_special_tokens=False)
    assert [e.ids for e in pipe] == meta4_ids
    assert again.encode_batch(TEXTS) == meta4_ids
    for text in HAND_WRITTEN + FRAGMENTS:
        allowed = meta4.encode(text, bos=False, eos=False, allowed_special="all")
        assert again.encode(text, allow_special=True) == allowed
    messages = CONVERSATION[:4]
    assert again.apply_chat_template(messages, True) == tok4.apply_chat_template(messages, True)


def test_saved_json_in_transformers(tok4, saved4):
    needs_hf()
    hf = transformers.AutoTokenizer.from_pretrained(saved4)
    for text in HAND_WRITTEN + _numbers() + FRAGMENTS:
        assert hf(text)["input_ids"] == tok4.encode(text, bos=True, allow_special=True), text
    # The chat template renders the same text; it gives the same ids where no content starts
    # with a newline or holds special-token text (transformers tokenizes the rendered string
    # as a whole, and reads such text there as control tokens).
    chat = [m for m in CONVERSATION if m["content"][:1] != "\n" and "<|" not in m["content"]]
    for gen in (False, True):
        text = hf.apply_chat_template(CONVERSATION, add_generation_prompt=gen, tokenize=False)
        assert text == tok4.render_chat(CONVERSATION, add_generation_prompt=gen)
        ref = hf.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False)
        assert ref == tok4.apply_chat_template(chat, add_generation_prompt=gen)


def test_hf_converted_json_same_ids(tok4, meta4, meta4_ids, tmp_path):
    """A tokenizer.json made as Hugging Face made Llama 4's (transformers' TikTokenConverter
    with Meta's split pattern and special tokens) reads as the tokenizer.model does."""
    needs_hf()
    from transformers.convert_slow_tokenizer import TikTokenConverter

    names = sorted(meta4.special_tokens, key=meta4.special_tokens.__getitem__)
    converter = TikTokenConverter(
        str(LLAMA4_MODEL), pattern=meta4.O200K_PATTERN, extra_special_tokens=names
    )
    (tmp_path / "tokenizer.json").write_text(converter.converted().to_str())
    hf = Tokenizer.load(tmp_path)
    assert hf.vocab_size == 202_048
    assert hf.special_tokens == meta4.special_tokens
    assert hf.digest == tok4.digest
    assert hf._backend.twin is not None
    pipe = hf._backend._specials_as_text.encode_batch(TEXTS, add_special_tokens=False)
    assert [e.ids for e in pipe] == meta4_ids
    assert hf.encode_batch(TEXTS) == meta4_ids
    assert hf.apply_chat_template(CONVERSATION, True) == tok4.apply_chat_template(
        CONVERSATION, True
    )
