"""SFT data: the loss mask token by token against the rendered Llama 3 chat template, prompt/
completion pairs, bad input with file:line, ``camelid prepare --format chat --inspect``, and
packing: no attention across conversations, packed loss == unpacked loss (dense and Llama 4
attention), the loader's exact resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import camelid_main

from camelid.config import ModelConfig
from camelid.data import SFTConfig, SFTData, SFTLoader, TokenLoader, prepare_sft
from camelid.data.sft import record_messages, show_example, tokenize_chat
from camelid.errors import DataError
from camelid.loss import IGNORE_INDEX, next_token_loss
from camelid.model.transformer import Transformer
from camelid.tokenizer import Tokenizer, train_tokenizer

WORDS = (
    "You are a helpful assistant. What is the capital of France? Paris is the capital. "
    "And of Italy? Rome. Thanks! You are welcome. Add two and three. Five. Reverse abc. cba. "
)

CHATS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "  Rome.\n"},  # trimmed by the Llama 3 template
    ],
    [
        {"role": "user", "content": "Add two and three."},
        {"role": "assistant", "content": "Five."},
        {"role": "user", "content": "Thanks! <|eot_id|> <|begin_of_text|>"},  # stays text
        {"role": "assistant", "content": "You are welcome.\n\nTwo lines."},
    ],
    [{"role": "assistant", "content": "Reverse abc: cba."}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer([WORDS * 3, *WORDS.split(". ")], 700).save(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` varied conversations (1 to 3 exchanges, some with a system turn)."""
    rng = np.random.default_rng(seed)
    words = WORDS.split()
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 == 0 else []
        for _ in range(int(rng.integers(1, 4))):
            for role in ("user", "assistant"):
                k = int(rng.integers(1, 9))
                msgs.append({"role": role, "content": " ".join(rng.choice(words, k))})
        out.append(
            {"messages": msgs}
            if i % 4
            else {"prompt": msgs[-2]["content"], "completion": msgs[-1]["content"]}
        )
    return out


# ------------------------------------------------------------------------------ the mask
def expected_mask(tok: Tokenizer, ids: list[int]) -> tuple[list[int], list[tuple[str, str]]]:
    """The mask read off the ids of a rendered template on their own: walk each
    <|start_header_id|> role <|end_header_id|> "\\n\\n" content <|eot_id|>, learn content and
    <|eot_id|> where the role is assistant. Also the (role, content) pairs found."""
    start, end, eot = (
        tok.special_tokens[s] for s in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    )
    sep = tok.encode("\n\n")
    assert ids[0] == tok.bos_id
    mask, found, i = [0], [], 1
    while i < len(ids):
        assert ids[i] == start, f"token {i}: expected a header"
        j = ids.index(end, i)
        role = tok.decode(ids[i + 1 : j])
        assert ids[j + 1 : j + 1 + len(sep)] == sep
        c = j + 1 + len(sep)
        k = ids.index(eot, c)
        learned = int(role == "assistant")
        mask += [0] * (c - i) + [learned] * (k - c) + [learned]  # content, then its <|eot_id|>
        found.append((role, tok.decode(ids[c:k])))
        i = k + 1
    return mask, found


@pytest.mark.parametrize("messages", CHATS)
def test_mask_is_exactly_assistant_content_and_eot(tok, messages):
    ids, mask = tokenize_chat(tok, messages)
    # The ids are those of the rendered template text (special-token text read as control
    # tokens; content that spells one stays text, so it is left out of this comparison), and
    # the mask, checked token by token, is the one the template's structure gives.
    if not any("<|" in m["content"] for m in messages):
        assert ids == tok.encode(tok.render_chat(messages), allow_special=True)
    want, found = expected_mask(tok, ids)
    assert mask == want
    assert found == [(m["role"], m["content"].strip()) for m in messages]
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id and mask[0] == 0
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    assert learned.count(tok.eot_id) == n_assistant  # every assistant turn ends learned
    assert tok.decode(learned) == "".join(
        m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"
    )


def test_prompt_completion_is_one_user_and_one_assistant_turn(tok):
    kind, msgs = record_messages({"prompt": "Add two and three.", "completion": "Five."}, "x:1")
    assert kind == "prompt-completion"
    ids, mask = tokenize_chat(tok, msgs)
    want, found = expected_mask(tok, ids)
    assert mask == want and found == [("user", "Add two and three."), ("assistant", "Five.")]
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "Five.<|eot_id|>"


def test_prepare_writes_masked_shards_and_pad_equal_to_eot_never_masks_it(tok, tok_dir, tmp_path):
    records = chat_records(60)
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    m = prepare_sft(
        SFTConfig(corpus=(str(data),), val_fraction=0.2), tok_dir, tmp_path / "ds", progress=False
    )
    assert m["kind"] == "sft" and m["sft"]["format"] == "chat"
    assert m["sft"]["by_kind"] == {"chat": 45, "prompt-completion": 15}
    sp = m["splits"]
    assert sp["train"]["documents"] + sp["validation"]["documents"] == 60
    assert sp["validation"]["documents"] > 0
    # Each stored conversation is exactly what the template gives for its record, mask too.
    expected = {}
    for r in records:
        ids, mask = tokenize_chat(tok, record_messages(r, "r")[1])
        expected[tuple(ids)] = mask
    train = SFTData(tmp_path / "ds", "train")
    assert len(train) == sp["train"]["documents"]
    for i in range(len(train)):
        ids, mask = train.example(i)
        assert expected[tuple(ids.tolist())] == mask.tolist()
    # The pad token equal to <|eot_id|>: padding is told by position, so every assistant turn's
    # <|eot_id|> is still a learned target and no padding is.
    loader = SFTLoader(tmp_path / "ds", batch_size=1, seq_len=128, shuffle=False, pad_id=tok.eot_id)
    learned = eot_targets = padding = 0
    for _ in range(len(loader)):
        x, y, _, doc = next(loader)
        learned += int((y != IGNORE_INDEX).sum())
        eot_targets += int((y == tok.eot_id).sum())
        assert (x[doc == -1] == tok.eot_id).all() and (y[doc == -1] == IGNORE_INDEX).all()
        padding += int((doc == -1).sum())
    assert learned == sp["train"]["learned_tokens"]
    turns = sum(
        int((train.example(i)[0] == tok.eot_id)[train.example(i)[1] == 1].sum())
        for i in range(len(train))
    )
    assert eot_targets == turns > 0
    assert padding / (len(loader) * 128) == pytest.approx(loader.padding_share)
    with pytest.raises(DataError, match="SFTLoader"):
        TokenLoader(tmp_path / "ds", seq_len=16, batch_size=1)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "line, needle",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "message 0: unknown role 'bot'"),
        (
            {
                "messages": [
                    {"role": "user", "content": " \n"},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "message 0 (user): empty content",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
            "message 1 (assistant): empty content",
        ),
        (
            {"messages": [{"role": "user"}]},
            "message 0 (user): 'content' must be a string (missing)",
        ),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"prompt": "x"}, "'completion' must be a string (missing)"),
        ({"text": "x"}, "no 'messages' or 'prompt'/'completion' field (fields: 'text')"),
        ('{"messages": [', "not valid JSON"),
        ("[1, 2]", "a record must be a JSON object"),
    ],
)
def test_bad_record_names_file_and_line_and_writes_nothing(tok_dir, tmp_path, line, needle):
    data = write_jsonl(tmp_path / "chat.jsonl", [chat_records(1)[0], line])
    with pytest.raises(DataError) as e:
        prepare_sft(SFTConfig(corpus=(str(data),)), tok_dir, tmp_path / "ds", progress=False)
    assert f"{data}:2: {needle}" in str(e.value)
    assert not (tmp_path / "ds").exists()


def test_empty_file_is_refused(tok_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        prepare_sft(SFTConfig(corpus=(str(tmp_path / "empty.jsonl"),)), tok_dir, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_prompt_completion_format_takes_only_pairs(tok_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"messages": CHATS[0]}]
    )
    with pytest.raises(DataError, match=r"pc.jsonl:2: no 'prompt'/'completion' field"):
        prepare_sft(
            SFTConfig(corpus=(str(data),), format="prompt-completion"),
            tok_dir,
            tmp_path / "ds",
            progress=False,
        )


def test_too_long_is_skipped_and_counted_or_truncated_to_whole_turns(tok, tok_dir, tmp_path):
    long = {"messages": CHATS[0]}
    full = len(tokenize_chat(tok, CHATS[0])[0])
    first_turn = len(tokenize_chat(tok, CHATS[0][:3])[0])
    short = {"prompt": "Add two and three.", "completion": "Five."}
    data = write_jsonl(
        tmp_path / "c.jsonl",
        [short, long, {"messages": [*CHATS[0][:2], {"role": "assistant", "content": WORDS * 4}]}],
    )
    cfg = SFTConfig(corpus=(str(data),), max_len=first_turn + 1, val_fraction=0.0)
    assert first_turn + 1 < full
    m = prepare_sft(cfg, tok_dir, tmp_path / "skip", progress=False)
    assert m["sft"]["skipped_too_long"] == 2 and m["sft"]["truncated"] == 0
    assert m["sft"]["too_long_first"][0] == f"{data}:2 ({full} tokens)"
    assert m["splits"]["train"]["documents"] == 1
    cfg = SFTConfig(corpus=(str(data),), max_len=first_turn + 1, val_fraction=0.0, truncate=True)
    m = prepare_sft(cfg, tok_dir, tmp_path / "cut", progress=False)
    # Line 2 keeps system + user + assistant (whole turns, ending learned with <|eot_id|>);
    # line 3's only assistant turn does not fit, so it is skipped even with truncate.
    assert m["sft"]["truncated"] == 1 and m["sft"]["skipped_too_long"] == 1
    ids, mask = SFTData(tmp_path / "cut").example(1)
    assert ids.tolist() == tokenize_chat(tok, CHATS[0][:3])[0]
    assert ids[-1] == tok.eot_id and mask[-1] == 1
    with pytest.raises(DataError, match="no conversation kept"):
        prepare_sft(
            SFTConfig(corpus=(str(data),), max_len=5), tok_dir, tmp_path / "none", progress=False
        )
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------- CLI
def test_cli_prepare_chat_and_inspect(capsys, tok_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[0]}, *chat_records(20)])
    out = tmp_path / "ds"
    argv = [
        "prepare",
        "--format",
        "chat",
        "--corpus",
        str(data),
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(out),
        "--val-fraction",
        "0",
        "--inspect",
    ]
    assert camelid_main(argv) == 0
    text = capsys.readouterr().out
    assert "21 (16 chat, 5 prompt-completion)" in text
    share = SFTLoader(out, batch_size=1, seq_len=2047).padding_share
    assert f"1 row(s) of 2047 (--max-len - 1) tokens, {share:.1%} padding" in text
    # The first training conversation, as the shards hold it: only assistant content and its
    # <|eot_id|> are outside the brackets.
    assert (
        "[[<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful "
        "assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital "
        "of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n]]"
        "Paris is the capital.<|eot_id|>[[<|start_header_id|>user<|end_header_id|>\n\nAnd of "
        "Italy?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n]]Rome.<|eot_id|>"
    ) in text
    manifest = json.loads((out / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    assert (out / shard["mask"]).stat().st_size == shard["tokens"]  # one uint8 per token
    # A bad line: one message with file and line, exit 1, nothing written.
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            chat_records(1)[0],
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
        ],
    )
    argv = [
        "prepare",
        "--format",
        "chat",
        "--corpus",
        str(bad),
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(tmp_path / "bad"),
    ]
    assert camelid_main(argv) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: message 1: unknown role 'robot'" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_show_example_dims_on_a_terminal(tok):
    ids, mask = tokenize_chat(tok, CHATS[2])
    text = show_example(tok, ids, mask, color=True)
    assert "\x1b[2m<|begin_of_text|>" in text and "\x1b[0mReverse abc: cba.<|eot_id|>" in text


# ------------------------------------------------------------------------------ packing
def tiny_models(vocab: int) -> list[ModelConfig]:
    dense = ModelConfig(
        vocab_size=vocab,
        dim=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        multiple_of=16,
        max_seq_len=256,
    )
    # Llama 4 attention: NoPE every 2nd layer with temperature tuning (floor_scale 4, so it
    # varies over a conversation), chunked attention (chunks of 8, shorter than the
    # conversations) and QK-norm elsewhere, MoE feed-forwards.
    llama4 = ModelConfig(
        vocab_size=vocab,
        dim=48,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        multiple_of=16,
        max_seq_len=256,
        nope_layer_interval=2,
        attention_chunk_size=8,
        attn_temperature_tuning=True,
        floor_scale=4,
        use_qk_norm=True,
        n_experts=4,
        n_shared_experts=1,
        moe_ffn_dim=32,
        moe_interleave_step=2,
    )
    return [dense, llama4]


@pytest.fixture(scope="module")
def packed_dir(tok_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("packed")
    data = write_jsonl(tmp / "chat.jsonl", chat_records(40, seed=1))
    prepare_sft(
        SFTConfig(corpus=(str(data),), val_fraction=0.0), tok_dir, tmp / "ds", progress=False
    )
    return tmp / "ds"


@pytest.mark.parametrize("which", ["dense", "llama4"])
def test_packed_loss_equals_unpacked(tok, packed_dir, which):
    config = tiny_models(tok.vocab_size)[which == "llama4"]
    torch.manual_seed(0)
    model = Transformer(config).eval()
    loader = SFTLoader(packed_dir, batch_size=3, seq_len=240, seed=3)
    x, y, pos, doc = next(loader)
    assert (doc.max(1).values >= 1).all()  # every row holds at least two conversations
    packed = next_token_loss(model, x, y, "sum", input_pos=pos, doc_ids=doc)
    count = int((y != IGNORE_INDEX).sum())
    unpacked, n_conv = torch.zeros((), dtype=torch.float64), 0
    for b in range(len(x)):
        for d in range(int(doc[b].max()) + 1):
            seg = doc[b] == d
            assert pos[b, seg].tolist() == list(range(int(seg.sum())))
            unpacked += next_token_loss(model, x[b, seg][None], y[b, seg][None], "sum").double()
            n_conv += 1
    assert abs(packed.item() / count - unpacked.item() / count) < 1e-6
    # Without the document mask, the same rows give another loss: the check can fail.
    leaky = next_token_loss(model, x, y, "sum", input_pos=pos)
    assert abs(leaky.item() - packed.item()) / count > 1e-4


def test_no_attention_across_conversations(tok, packed_dir):
    for config in tiny_models(tok.vocab_size):
        torch.manual_seed(0)
        model = Transformer(config).eval()
        x, _, pos, doc = next(SFTLoader(packed_dir, batch_size=1, seq_len=240))
        first = doc[0] == 0
        changed = x.clone()
        changed[0, first] = (changed[0, first] + 7) % tok.vocab_size
        with torch.no_grad():
            a = model(x, input_pos=pos, doc_ids=doc)
            b = model(changed, input_pos=pos, doc_ids=doc)
        assert not torch.allclose(a[0, first], b[0, first])
        torch.testing.assert_close(a[0, ~first], b[0, ~first], rtol=0, atol=1e-6)


def test_loader_resume_is_exact_and_ranks_split_rows(packed_dir):
    kwargs = dict(batch_size=2, seq_len=128, seed=5)
    ref = SFTLoader(packed_dir, **kwargs)
    assert 0 < ref.padding_share < 1 and len(ref) >= 2
    for _ in range(len(ref) - 1):
        next(ref)
    state = ref.state_dict()
    want = [next(ref) for _ in range(len(ref) + 1)]  # across the epoch boundary
    resumed = SFTLoader(packed_dir, **kwargs)
    resumed.load_state_dict(state)
    for w, got in zip(want, (next(resumed) for _ in want), strict=True):
        for a, b in zip(w, got, strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(want[0][0], want[-1][0])  # another epoch, another order
    # Two ranks of batch 1 together see exactly the rows of one rank of batch 2.
    one = next(SFTLoader(packed_dir, **kwargs))
    ranks = [
        next(SFTLoader(packed_dir, **{**kwargs, "batch_size": 1}, rank=r, world_size=2))
        for r in range(2)
    ]
    rows = {tuple(row.tolist()) for rank in ranks for row in rank[0]}
    assert rows == {tuple(r.tolist()) for r in one[0]}
    with pytest.raises(DataError, match="seq_len was 128, now 160"):
        SFTLoader(packed_dir, **{**kwargs, "seq_len": 160}).load_state_dict(state)
    with pytest.raises(DataError, match="does not fit seq_len 8"):
        SFTLoader(packed_dir, batch_size=1, seq_len=8)


def test_packed_gradients_equal_unpacked(tok, packed_dir):
    config = tiny_models(tok.vocab_size)[0]
    torch.manual_seed(0)
    model = Transformer(config)
    x, y, pos, doc = next(SFTLoader(packed_dir, batch_size=2, seq_len=240, seed=4))
    next_token_loss(model, x, y, "sum", input_pos=pos, doc_ids=doc).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for b in range(len(x)):
        for d in range(int(doc[b].max()) + 1):
            seg = doc[b] == d
            next_token_loss(model, x[b, seg][None], y[b, seg][None], "sum").backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, rtol=1e-5, atol=1e-5, msg=n)


def test_shards_cut_between_conversations_rerun_reuses_and_failure_undoes(
    tok, tok_dir, tmp_path, monkeypatch
):
    records = chat_records(30, seed=2)
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    cfg = SFTConfig(corpus=(str(data),), val_fraction=0.0, shard_tokens=200)
    m = prepare_sft(cfg, tok_dir, tmp_path / "ds", progress=False)
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["tokens"] >= 200 for s in shards[:-1])
    train = SFTData(tmp_path / "ds")
    want = [tokenize_chat(tok, record_messages(r, "r")[1]) for r in records]
    got = [(ids.tolist(), mask.tolist()) for ids, mask in map(train.example, range(len(train)))]
    assert got == [(ids, mask) for ids, mask in want]  # whole, in order, across shards
    assert prepare_sft(cfg, tok_dir, tmp_path / "ds", progress=False) == m  # reused
    # A run that fails after writing a shard takes back its token and mask files alike.
    from camelid.data import sft

    flush = sft._SFTShardWriter._flush

    def failing(self):
        flush(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(sft._SFTShardWriter, "_flush", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_sft(cfg, tok_dir, tmp_path / "killed", progress=False)
    assert not (tmp_path / "killed").exists()


MULTI_TURN = [
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And doubled? Answer in words, please."},
        {"role": "assistant", "content": "Eighty-four.\n\nThat is 2 x 42."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome. 🦙"},
    ],
    [
        {"role": "user", "content": "Reverse 'camel'."},
        {"role": "assistant", "content": "lemac"},
    ],
]


@pytest.mark.parametrize("family", ["llama3", "llama4"])
@pytest.mark.parametrize("messages", MULTI_TURN)
def test_mask_against_metas_own_chat_format(messages, family, monkeypatch):
    """The real Llama 3 and Llama 4 tokenizer.models and Meta's reference ChatFormats
    (llama-models): the ids are Meta's dialog encoding (less its trailing generation prompt)
    and the mask is, token by token, 0 over each message's header and 1 over exactly an
    assistant message's content and its end-of-turn token, as Meta's per-message encoding
    delimits them."""
    llama_models = pytest.importorskip("llama_models", reason="needs Meta's llama-models")
    import importlib.util

    from llama_models.datatypes import RawMessage, StopReason

    if family == "llama4" and importlib.util.find_spec("torchvision") is None:
        # Meta's Llama 4 chat format imports its image transforms (torchvision) at the top;
        # text never reaches them, so stand-ins let the text path run without torchvision.
        import types

        stub = types.ModuleType("llama_models.llama4.preprocess")
        stub.ResizeNormalizeImageTransform = stub.VariableSizeImageTransform = object
        monkeypatch.setitem(sys.modules, stub.__name__, stub)
    chat_format = importlib.import_module(f"llama_models.{family}.chat_format")
    meta_tokenizer = importlib.import_module(f"llama_models.{family}.tokenizer")
    path = Path(llama_models.__file__).parent / family / "tokenizer.model"
    fmt = chat_format.ChatFormat(meta_tokenizer.Tokenizer(path))
    raw = [RawMessage(role=m["role"], content=m["content"], stop_reason=StopReason.end_of_turn)
           for m in messages]  # fmt: skip
    want_ids = fmt.encode_dialog_prompt(raw).tokens[: -len(fmt._encode_header("assistant"))]
    want_mask = [0]  # <|begin_of_text|>
    for message in raw:
        tokens, _ = fmt.encode_message(message, None)
        header = len(fmt._encode_header(message.role))
        learned = int(message.role == "assistant")
        want_mask += [0] * header + [learned] * (len(tokens) - header)
    ids, mask = tokenize_chat(Tokenizer.load(path), messages)
    assert ids == want_ids
    assert mask == want_mask
