"""DPO: the loss, rewards and gradients equal trl's ``DPOTrainer`` on a fixed batch; the whole
chain (tokenised pairs, batch, per-sequence log-probs, loss, rewards, head gradient) equals
trl's on a tiny random Llama; bad preference lines name their file:line; the reference
checksum catches a change."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import hf_model, needs_hf

import camelid
from camelid.errors import CheckpointError, DataError
from camelid.tokenizer import train_tokenizer
from camelid.train import dpo

BETA = 0.1
WORDS = "the cat sat on a mat what is two plus four five six seven be brief no yes".split()


@pytest.fixture(scope="module")
def tok():
    texts = [" ".join(WORDS[i:] + WORDS[:i]) + "?" for i in range(len(WORDS))] * 4
    return train_tokenizer(texts, 400, num_special=16)


RECORDS = [
    {"prompt": "what is two plus two?", "chosen": "four", "rejected": "five"},
    {
        "prompt": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "the cat"},
        ],
        "chosen": [{"role": "assistant", "content": "sat on the mat"}],
        "rejected": "sat",
    },
    {
        "prompt": [
            {"role": "user", "content": "two plus four?"},
            {"role": "assistant", "content": "six"},
            {"role": "user", "content": "plus one?"},
        ],
        "chosen": {"role": "assistant", "content": "seven"},
        "rejected": "no, five is what two plus four plus one is",
    },
]


def conversational(r: dict) -> dict:
    """The record in trl's conversational form (every field a list of messages)."""

    def msgs(x, role):
        if isinstance(x, str):
            return [{"role": role, "content": x}]
        return x if isinstance(x, list) else [x]

    return {
        "prompt": msgs(r["prompt"], "user"),
        "chosen": msgs(r["chosen"], "assistant"),
        "rejected": msgs(r["rejected"], "assistant"),
    }


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------ data
def test_pairs_mask_exactly_the_completion(tok, tmp_path):
    ds = dpo.read_preferences(write_jsonl(tmp_path / "p.jsonl", RECORDS), tok, 256)
    assert [p.line for p in ds.pairs] == [1, 2, 3] and not ds.skipped and not ds.truncated
    for r, pair in zip(RECORDS, ds.pairs, strict=True):
        prompt = conversational(r)["prompt"]
        assert list(pair.prompt) == tok.apply_chat_template(prompt, add_generation_prompt=True)
        assert list(pair.prompt).count(tok.bos_id) == 1
        for name, ids in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            content = conversational(r)[name][0]["content"]
            assert list(ids) == [*tok.encode(content), tok.eot_id]  # content + end of turn
    batch = ds.batches(2)[0]
    assert batch.input_ids.shape[0] == 4 and batch.index.tolist() == [0, 1]
    rows = [(p, c) for c in ("chosen", "rejected") for p in ds.pairs[:2]]
    for row, (pair, which) in enumerate(rows):
        ids, mask = batch.input_ids[row], batch.completion_mask[row]
        completion = getattr(pair, which)
        n = len(pair.prompt)
        assert ids[: n + len(completion)].tolist() == list(pair.prompt + completion)
        assert mask.nonzero().flatten().tolist() == list(range(n, n + len(completion)))
        last = n + len(completion) - 1
        assert ids[last] == tok.eot_id and mask[last] == 1  # the end of turn is learned
    # targets: exactly the completion tokens, each predicted from the position before it
    targets = dpo.completion_targets(batch.input_ids, batch.completion_mask)
    kept = targets != -100
    assert kept.sum() == batch.completion_mask.sum()
    assert torch.equal(targets[kept], batch.input_ids[batch.completion_mask == 1])


def test_long_pairs_skip_or_truncate(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    full = dpo.read_preferences(path, tok, 256)
    p3 = full.pairs[2]
    limit = len(p3.prompt) + len(p3.chosen) + 1  # pair 3's rejected does not fit
    assert len(p3.rejected) > len(p3.chosen) + 1
    skipped = dpo.read_preferences(path, tok, limit)
    assert [p.line for p in skipped.pairs] == [1, 2] and skipped.skipped == [3]
    cut = dpo.read_preferences(path, tok, limit, truncate=True)
    assert cut.truncated == 1 and not cut.skipped
    t = cut.pairs[2]
    assert (
        t.truncated and t.chosen == p3.chosen and t.rejected == p3.rejected[: limit - len(t.prompt)]
    )
    with pytest.raises(DataError, match=r"p\.jsonl: no preference pairs \(all 3 longer"):
        dpo.read_preferences(path, tok, 8, truncate=True)  # no prompt leaves room
    # completions that differ only after the cut are skipped: there is nothing to prefer
    same = {"prompt": "what is", "chosen": "the cat sat on a mat", "rejected": "the cat sat on no"}
    one = dpo.read_preferences(write_jsonl(tmp_path / "s.jsonl", [same]), tok, 256).pairs[0]
    assert one.chosen[:3] == one.rejected[:3]
    short = {"prompt": "what is", "chosen": "yes", "rejected": "no"}  # 1 token + end of turn
    path = write_jsonl(tmp_path / "s.jsonl", [short, same])
    cut = dpo.read_preferences(path, tok, len(one.prompt) + 2, truncate=True)
    assert len(cut) == 1 and cut.skipped == [2]


def test_tokenizer_without_chat_format(tok, tmp_path):
    plain = copy.copy(tok)
    plain._chat = None
    need = r"p\.jsonl: preference pairs need a chat format: .*no chat header tokens"
    with pytest.raises(DataError, match=need):
        dpo.read_preferences(write_jsonl(tmp_path / "p.jsonl", RECORDS), plain, 64)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ('["a"]', "expected a JSON object, got list"),
        ('{"prompt": "q", "chosen": "a"}', 'missing field "rejected"'),
        ('{"prompt": "  ", "chosen": "a", "rejected": "b"}', '"prompt" is empty'),
        ('{"prompt": "q", "chosen": "", "rejected": "b"}', '"chosen" is empty'),
        ('{"prompt": "q", "chosen": "a", "rejected": 3}', '"rejected" must be a string'),
        ('{"prompt": "q", "chosen": "a", "rejected": "a "}', "chosen and rejected are the same"),
        (
            '{"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"}',
            "\"prompt\\[0\\]\": unknown role 'bot'",
        ),
        (
            '{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}',
            "\"chosen\": unknown role 'user' \\(expected one of assistant\\)",
        ),
        (
            '{"prompt": [{"role": "user", "content": ""}], "chosen": "a", "rejected": "b"}',
            '"prompt\\[0\\]": "content" must be a non-empty string',
        ),
    ],
)
def test_bad_lines_name_file_and_line(tok, tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], "", line])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: {message}"):
        dpo.read_preferences(path, tok, 256)


def test_empty_or_missing_file(tok, tmp_path):
    with pytest.raises(DataError, match=r"empty\.jsonl: no preference pairs$"):
        dpo.read_preferences(write_jsonl(tmp_path / "empty.jsonl", ["", " "]), tok, 64)
    with pytest.raises(DataError, match=r"nope\.jsonl: cannot read"):
        dpo.read_preferences(tmp_path / "nope.jsonl", tok, 64)


# ------------------------------------------------------------------- trl's loss function
def trl_trainer(tmp_path: Path, tok, model, ref_model, records: list, **config):
    """A tiny real ``DPOTrainer`` (CPU, fp32, no logging), its tokenizer camelid's own."""
    needs_hf()
    trl = pytest.importorskip("trl")
    import datasets
    import transformers

    tok.save(tmp_path / "tok")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=BETA,
        report_to=[],
        use_cpu=True,
        bf16=False,  # trl autocasts to bf16 by default; the comparison is fp32
        per_device_train_batch_size=len(records),
        dataset_num_proc=None,
        **config,
    )
    data = datasets.Dataset.from_list([conversational(r) for r in records])
    return trl.DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=hf_tok
    )


class LogpsModel(torch.nn.Module):
    """Stands in for the policy in trl's ``_compute_loss``: its per-token log-probs put each
    row's sequence log-prob at the first completion position, so trl's sum over the sequence is
    exactly the given value and its gradient flows back to it."""

    def __init__(self, logps: torch.Tensor, seq_len: int) -> None:
        super().__init__()
        self.logps, self.seq_len = logps, seq_len

    def forward(self, input_ids, labels=None, fused_lm_head=False, **_):
        rows, t = input_ids.shape
        per_token = torch.zeros(rows, t - 1).index_put(
            (torch.arange(rows), torch.zeros(rows, dtype=torch.long)), self.logps
        )
        zeros = torch.zeros(rows, t - 1)
        return SimpleNamespace(
            log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


FIXED = dict(  # 4 pairs; pair 2 has its rejected completion rewarded more
    pc=[-10.5, -3.25, -20.0, -7.0],
    pr=[-12.0, -2.5, -19.0, -9.75],
    rc=[-11.0, -3.0, -21.5, -6.5],
    rr=[-11.5, -2.0, -20.0, -10.0],
)


def trl_loss_from_logps(trainer, pc, pr, rc, rr):
    """trl's own loss path from given log-probs: its loss, metrics and d loss / d policy."""
    policy = torch.cat([pc, pr]).clone().requires_grad_(True)
    n, t = len(pc), 6
    inputs = {
        "input_ids": torch.ones(2 * n, t, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, t, dtype=torch.long),
        "completion_mask": torch.cat([torch.zeros(2 * n, 1), torch.ones(2 * n, t - 1)], 1).long(),
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    trainer.precompute_ref_logps = True  # read the reference from the inputs
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    logged.clear()
    loss = trainer._compute_loss(LogpsModel(policy, t), inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in logged.items()}
    return loss.detach(), metrics, policy.grad.chunk(2)


@pytest.fixture(scope="module")
def small_trainer(tok, tmp_path_factory):
    needs_hf()
    model = hf_model(vocab_size=tok.vocab_size)
    return trl_trainer(
        tmp_path_factory.mktemp("t"), tok, model, hf_model(1, vocab_size=tok.vocab_size), RECORDS
    )


def test_loss_rewards_and_grads_equal_trl(small_trainer):
    fixed = {k: torch.tensor(v) for k, v in FIXED.items()}
    ref_loss, ref_metrics, (ref_gc, ref_gr) = trl_loss_from_logps(small_trainer, **fixed)
    pc = fixed["pc"].clone().requires_grad_(True)
    pr = fixed["pr"].clone().requires_grad_(True)
    loss, metrics = dpo.dpo_loss(pc, pr, fixed["rc"], fixed["rr"], BETA)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-6
    assert 0 < metrics["rewards/accuracies"].item() < 1  # the batch exercises both outcomes
    for name in dpo.METRICS:
        assert abs(metrics[name].item() - ref_metrics[name]) < 1e-6, name
    torch.testing.assert_close(pc.grad, ref_gc, rtol=0, atol=1e-6)
    torch.testing.assert_close(pr.grad, ref_gr, rtol=0, atol=1e-6)
    assert pc.grad.abs().min() > 1e-3  # a real gradient, not zeros on both sides


def test_label_smoothing_is_cdpo_as_trl(small_trainer):
    """cDPO's ε: trl 1.x's "aot" loss on one pair is that formula (its sort is then a no-op)."""
    eps = 0.2
    fixed = {k: torch.tensor(v) for k, v in FIXED.items()}
    args = small_trainer.args
    small_trainer.loss_types, small_trainer.label_smoothing = ["aot"], eps
    try:
        ref = [
            trl_loss_from_logps(
                small_trainer, *(fixed[k][i : i + 1] for k in ("pc", "pr", "rc", "rr"))
            )
            for i in range(4)
        ]
    finally:
        small_trainer.loss_types, small_trainer.label_smoothing = (
            args.loss_type,
            args.label_smoothing,
        )
    pc = fixed["pc"].clone().requires_grad_(True)
    loss, _ = dpo.dpo_loss(pc, fixed["pr"], fixed["rc"], fixed["rr"], BETA, label_smoothing=eps)
    loss.backward()
    assert abs(loss.item() - sum(r[0].item() for r in ref) / 4) < 1e-6
    torch.testing.assert_close(pc.grad, torch.cat([r[2][0] for r in ref]) / 4, rtol=0, atol=1e-6)
    plain, _ = dpo.dpo_loss(fixed["pc"], fixed["pr"], fixed["rc"], fixed["rr"], BETA)
    assert abs(plain.item() - loss.item()) > 1e-3


# ------------------------------------------------------------------------- end to end
def test_end_to_end_equals_trl(tok, tmp_path):
    """camelid's pairs, batch, log-probs, loss, rewards and head gradient equal trl's for the
    same tiny Llama policy and reference (different random weights)."""
    needs_hf()
    policy_hf = hf_model(0, vocab_size=tok.vocab_size)
    ref_hf = hf_model(1, vocab_size=tok.vocab_size)
    policy_hf.save_pretrained(tmp_path / "policy")
    ref_hf.save_pretrained(tmp_path / "ref")
    policy = camelid.load(tmp_path / "policy", dtype=torch.float32)
    ref_model = camelid.load(tmp_path / "ref", dtype=torch.float32)
    trainer = trl_trainer(tmp_path, tok, policy_hf, ref_hf, RECORDS)

    ds = dpo.read_preferences(write_jsonl(tmp_path / "p.jsonl", RECORDS), tok, 256)
    theirs = trainer.train_dataset  # trl's tokenisation through the saved Jinja template
    for i, pair in enumerate(ds.pairs):
        assert list(pair.prompt) == theirs[i]["prompt_ids"]
        assert list(pair.chosen) == theirs[i]["chosen_ids"]
        assert list(pair.rejected) == theirs[i]["rejected_ids"]
    inputs = trainer.data_collator([theirs[i] for i in range(len(theirs))])
    (batch,) = ds.batches(len(ds))
    assert torch.equal(batch.completion_mask, inputs["completion_mask"])
    real = inputs["attention_mask"] == 1
    assert torch.equal(batch.input_ids[real], inputs["input_ids"][real])

    with torch.no_grad():
        trl_pc, trl_pr = trainer.compute_ref_log_probs(trainer.model, inputs)
        trl_rc, trl_rr = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
        mine = dpo.sequence_logps(policy, batch.input_ids, batch.completion_mask)
    torch.testing.assert_close(mine, torch.cat([trl_pc, trl_pr]), rtol=0, atol=1e-5)
    reference = dpo.reference_logps(ref_model, ds, batch_size=2)
    torch.testing.assert_close(reference.logps, torch.stack([trl_rc, trl_rr], 1), rtol=0, atol=1e-5)
    assert reference.weights_digest == camelid.weights.digest.model_digest(ref_model)

    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    logged.clear()
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in logged.items()}
    loss, metrics = dpo.dpo_step(policy, batch, reference, BETA)
    assert abs(loss.item() - trl_loss.item()) < 1e-5
    for name in dpo.METRICS:
        assert abs(metrics[name].item() - trl_metrics[name]) < 1e-5, name
    torch.testing.assert_close(
        policy.output.weight.grad, policy_hf.lm_head.weight.grad, rtol=1e-4, atol=1e-6
    )


# ----------------------------------------------------------------------------- step, ref
@pytest.fixture(scope="module")
def pairs(tok, tmp_path_factory):
    path = write_jsonl(
        tmp_path_factory.mktemp("d") / "p.jsonl", [*RECORDS, RECORDS[0] | {"rejected": "six"}]
    )
    return dpo.read_preferences(path, tok, 256)


def tiny_model(tok, seed: int) -> camelid.Transformer:
    config = camelid.ModelConfig.from_hf(
        {
            "model_type": "llama",
            "vocab_size": tok.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
        }
    )
    torch.manual_seed(seed)
    model = camelid.Transformer(config)
    model.init_weights()
    return model


def test_step_accumulates_over_pairs(tok, pairs):
    """Uneven micro-batches (3 + 1 pairs) give the one-batch loss, metrics and gradients."""
    model = tiny_model(tok, 0)
    ref = dpo.reference_logps(tiny_model(tok, 1), pairs)
    order = [3, 1, 0, 2]  # any order: the reference is read at each pair's index
    whole, whole_metrics = dpo.dpo_step(model, pairs.batches(4, order), ref, BETA)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    parts, part_metrics = dpo.dpo_step(model, pairs.batches(3, order), ref, BETA)
    assert abs(whole.item() - parts.item()) < 1e-6
    for name in dpo.METRICS:
        assert abs(whole_metrics[name].item() - part_metrics[name].item()) < 1e-5, name
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        logps = dpo.sequence_logps(
            model, *(lambda b: (b.input_ids, b.completion_mask))(pairs.batches(4)[0])
        )
    loss, _ = dpo.dpo_loss(*logps.chunk(2), ref.logps[:, 0], ref.logps[:, 1], BETA)
    assert abs(loss.item() - whole.item()) < 1e-6
    # at the start, policy == reference: loss log 2, all rewards zero
    same, m = dpo.dpo_step(model, pairs.batches(4), dpo.reference_logps(model, pairs), BETA)
    assert abs(same.item() - torch.log(torch.tensor(2.0)).item()) < 1e-6
    assert abs(m["rewards/margins"].item()) < 1e-6


def test_reference_checksum_detects_change(tok, pairs, tmp_path):
    model = tiny_model(tok, 0)
    ref = dpo.reference_logps(model, pairs, batch_size=3)
    ref.verify(camelid.weights.digest.model_digest(model), pairs.digest)
    ref.save(tmp_path / "ref.safetensors")
    again = dpo.Reference.load(tmp_path / "ref.safetensors")
    assert torch.equal(again.logps, ref.logps) and again.checksum == ref.checksum
    # one value changed by one ulp
    changed = ref.logps.clone()
    changed[2, 1] = torch.nextafter(changed[2, 1], torch.tensor(0.0))
    bad = dpo.Reference(changed, ref.weights_digest, ref.data_digest, ref.checksum)
    with pytest.raises(CheckpointError, match="do not match their checksum"):
        bad.verify()
    bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: DPO reference log-probs do not"):
        dpo.Reference.load(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="computed from start weights"):
        ref.verify(camelid.weights.digest.model_digest(tiny_model(tok, 2)))
    with pytest.raises(CheckpointError, match="computed on data"):
        ref.verify(
            data_digest=dpo.read_preferences(Path(pairs.path), tok, 256, truncate=True).digest[::-1]
        )
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a DPO reference file"):
        dpo.Reference.load(tmp_path / "junk.safetensors")


def test_reference_context_is_used(tok, pairs):
    """``reference`` (e.g. "adapters off") is entered for the reference pass, and only then."""
    model, start = tiny_model(tok, 0), tiny_model(tok, 3)
    entered = []

    @contextlib.contextmanager
    def start_weights():  # as disabling adapters would: compute with other weights, then back
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(start.state_dict())
        entered.append(True)
        try:
            yield
        finally:
            model.load_state_dict(saved)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = dpo.reference_logps(model, pairs, reference=start_weights, weights_digest="w" * 64)
    assert entered == [True] and ref.weights_digest == "w" * 64
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(ref.logps, dpo.reference_logps(start, pairs).logps, rtol=0, atol=0)
    assert not torch.allclose(ref.logps, dpo.reference_logps(model, pairs).logps)


def test_steps_learn_the_preferences(tok, pairs):
    """A few optimizer steps of ``dpo_step`` with the trainer's optimizer: the loss falls from
    log 2 and the policy comes to prefer every chosen completion."""
    from camelid.train.step import build_optimizer

    model = tiny_model(tok, 0)
    ref = dpo.reference_logps(model, pairs)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(15):
        loss, metrics = dpo.dpo_step(model, pairs.batches(2), ref, BETA)
        first = loss.item() if first is None else first
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert abs(first - torch.log(torch.tensor(2.0)).item()) < 1e-6
    assert loss.item() < 0.45  # measured 0.31 (from 0.693)
    assert metrics["rewards/accuracies"].item() == 1.0 and metrics["rewards/margins"].item() > 0
