"""LoRA: peft's math and file format, both ways, merge, disable, freezing, bad inputs, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import camelid_main, hf_model, needs_hf, random_llama_dir, save_hf

import camelid
from camelid.errors import CheckpointError, ConfigError
from camelid.model.lora import (
    TARGETS,
    LoraConfig,
    adapters_disabled,
    apply_lora,
    check_adapters_effective,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)
from camelid.weights.lora import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_adapter,
    load_lora_state_dict,
    save_adapter,
)

try:
    import peft
except ImportError:
    peft = None

TOKENS = torch.tensor([[1, 5, 17, 200, 33, 7, 99, 250, 3, 64, 12, 8]])


def needs_peft() -> None:
    needs_hf()
    if peft is None:
        pytest.skip("needs peft (the test-time reference)")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-zero A and B everywhere, so every adapter changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize(
    "targets, r, alpha",
    [
        (("q_proj", "v_proj"), 4, 8.0),
        (("k_proj", "o_proj", "down_proj"), 3, 5.0),
        (TARGETS, 8, 16.0),
    ],
)
def test_camelid_adapter_loads_in_peft(tmp_path: Path, targets, r, alpha) -> None:
    needs_peft()
    base = random_llama_dir(tmp_path / "base")
    model = apply_lora(camelid.load(base), LoraConfig(r=r, alpha=alpha, target_modules=targets))
    randomize(model, seed=r)
    save_adapter(model.eval(), tmp_path / "adapter", base_model_name_or_path=str(base))
    with torch.no_grad():
        ours = model(TOKENS)
        with adapters_disabled(model):
            plain = model(TOKENS)
    ref = peft.PeftModel.from_pretrained(hf_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = ref(TOKENS).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    cfg = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (
        r,
        alpha,
        sorted(targets),
    )


def test_peft_adapter_loads_in_camelid(tmp_path: Path) -> None:
    needs_peft()
    hf = hf_model()
    base = save_hf(hf, tmp_path / "base")
    cfg = peft.LoraConfig(r=5, lora_alpha=7, target_modules=["q_proj", "k_proj", "v_proj",
                          "gate_proj", "up_proj"], task_type="CAUSAL_LM")  # fmt: skip
    ref = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ref.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        theirs = ref.eval()(TOKENS).logits
        plain = camelid.load(base)(TOKENS)
    assert (theirs - plain).abs().max() > 1e-3  # the adapter does something
    model = load_adapter(camelid.load(base), tmp_path / "adapter").eval()
    assert sorted(model.lora_config.target_modules) == sorted(cfg.target_modules)
    with torch.no_grad():
        ours = model(TOKENS)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_save_load_round_trip_and_merge(tmp_path: Path) -> None:
    base = random_llama_dir(tmp_path / "base")
    model = apply_lora(camelid.load(base), LoraConfig(r=4, alpha=6, target_modules=TARGETS))
    randomize(model, seed=1)
    save_adapter(model, tmp_path / "adapter")
    back = load_adapter(camelid.load(base), tmp_path / "adapter", base_name=str(base))
    with torch.no_grad():
        want = model(TOKENS)
        torch.testing.assert_close(back(TOKENS), want, atol=0, rtol=0)
        merged = merge_lora(back)
        assert type(merged.layers[0].attention.wqkv) is torch.nn.Linear
        assert not lora_modules(merged)
        torch.testing.assert_close(merged(TOKENS), want, atol=1e-5, rtol=0)


def test_disabled_adapters_are_the_base(tmp_path: Path) -> None:
    base = random_llama_dir(tmp_path / "base")
    with torch.no_grad():
        plain = camelid.load(base)(TOKENS)
    model = apply_lora(camelid.load(base), LoraConfig(target_modules=("v_proj", "up_proj")))
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), plain, atol=0, rtol=0)  # B = 0 at init
        randomize(model, seed=2)
        assert (model(TOKENS) - plain).abs().max() > 1e-3
        with adapters_disabled(model):
            torch.testing.assert_close(model(TOKENS), plain, atol=0, rtol=0)
        assert (model(TOKENS) - plain).abs().max() > 1e-3  # back on after the block


def test_only_adapters_train(tmp_path: Path) -> None:
    config = LoraConfig(r=2, dropout=0.1, target_modules=("q_proj", "down_proj"))
    model = apply_lora(camelid.load(random_llama_dir(tmp_path / "base")), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert len(trainable) == 2 * 2 * model.config.n_layers  # (A, B) x 2 targets x layers
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # the base keeps its own names (saved, hashed as before): no ".base." renaming
    assert "layers.0.attention.wqkv.weight" in dict(model.named_parameters())
    model.train()
    before = lora_state_dict(model)
    before = {k: v.clone() for k, v in before.items()}
    with pytest.raises(ConfigError, match=r"no effect.*wqkv\.q_proj"):
        check_adapters_effective(before, model)  # B is still zero
    opt = torch.optim.SGD(lora_parameters(model), lr=0.1)
    for _ in range(2):  # B moves on step 1, then A gets a gradient too
        opt.zero_grad()
        model(TOKENS).logsumexp(-1).mean().backward()
        opt.step()
    check_adapters_effective(before, model)
    with pytest.raises(ConfigError, match="unchanged by training"):
        check_adapters_effective(lora_state_dict(model), model)
    # a checkpoint's adapters restore exactly; other adapters are refused by name
    trained = {k: v.clone() for k, v in lora_state_dict(model).items()}
    load_lora_state_dict(model, before)
    assert all(torch.equal(v, before[k]) for k, v in lora_state_dict(model).items())
    load_lora_state_dict(model, trained)
    assert all(torch.equal(v, trained[k]) for k, v in lora_state_dict(model).items())
    first = next(iter(trained))
    with pytest.raises(CheckpointError, match=f"LoRA state: missing {first}"):
        load_lora_state_dict(model, {k: v for k, v in trained.items() if k != first})


def test_bad_targets() -> None:
    with pytest.raises(ConfigError, match=r"unknown 'qproj', 'lm_head'; valid: q_proj, k_proj"):
        LoraConfig(target_modules=("qproj", "lm_head"))
    with pytest.raises(ConfigError, match="r: must be a positive"):
        LoraConfig(r=0)


def test_targets_that_match_no_module_are_named() -> None:
    # An MoE model whose every FFN is routed experts (no shared expert): nothing to adapt
    # for the FFN targets, which must be said rather than training attention alone.
    config = camelid.ModelConfig.from_preset("tiny", n_experts=4, n_experts_per_tok=1,
                                             moe_ffn_dim=32)  # fmt: skip
    model = camelid.Transformer(config)
    with pytest.raises(ConfigError, match=r"'gate_proj', 'down_proj' match no module of this "
                       r"model; it has q_proj, o_proj"):  # fmt: skip
        apply_lora(model, LoraConfig(target_modules=("q_proj", "o_proj", "gate_proj",
                                                     "down_proj")))  # fmt: skip


def test_adapter_for_another_base_model(tmp_path: Path) -> None:
    base = random_llama_dir(tmp_path / "base", seed=0)
    other = random_llama_dir(tmp_path / "other", seed=1)  # same shapes, other weights
    wide = random_llama_dir(tmp_path / "wide", intermediate_size=150)
    model = apply_lora(camelid.load(base), LoraConfig(target_modules=("q_proj", "down_proj")))
    randomize(model, seed=0)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    with pytest.raises(CheckpointError, match=rf"another base model \({base}\) than {other}.*"
                       "digest"):  # fmt: skip
        load_adapter(camelid.load(other), tmp_path / "adapter", base_name=str(other))
    with pytest.raises(CheckpointError, match=rf"another base model \({base}\) than {wide}.*"
                       "down_proj.lora_A.weight has shape"):  # fmt: skip
        load_adapter(camelid.load(wide), tmp_path / "adapter", base_name=str(wide),
                     check_digest=False)  # fmt: skip
    # the digest is compared in the recorded dtype: the base in bf16 matches an adapter
    # trained on its exact fp32 upcast, and another base does not match in any dtype
    bf16 = tmp_path / "bf16"
    camelid.save(camelid.load(base, dtype=torch.bfloat16), bf16)
    model = apply_lora(
        camelid.load(bf16, dtype=torch.float32), LoraConfig(target_modules=("q_proj",))
    )
    save_adapter(model, tmp_path / "on-upcast")
    load_adapter(camelid.load(bf16, dtype=torch.bfloat16), tmp_path / "on-upcast")
    with pytest.raises(CheckpointError, match=r"digest is \w+, this model's is \w+ \(in F32\)"):
        load_adapter(camelid.load(other, dtype=torch.bfloat16), tmp_path / "adapter")


def test_unsupported_adapter_config(tmp_path: Path) -> None:
    base = random_llama_dir(tmp_path / "base")
    model = apply_lora(camelid.load(base), LoraConfig(target_modules=("q_proj",)))
    save_adapter(model, tmp_path / "adapter")
    file = tmp_path / "adapter" / CONFIG_NAME
    cfg = json.loads(file.read_text())
    file.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora = true is not supported"):
        load_adapter(camelid.load(base), tmp_path / "adapter")
    file.write_text(json.dumps({**cfg, "target_modules": ["q_proj", "lm_head"]}))
    with pytest.raises(CheckpointError, match="unknown 'lm_head'"):
        load_adapter(camelid.load(base), tmp_path / "adapter")
    (tmp_path / "adapter" / WEIGHTS_NAME).unlink()
    file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"no {WEIGHTS_NAME}"):
        load_adapter(camelid.load(base), tmp_path / "adapter")


# ---------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> Path:
    """A tiny random Llama with a small BPE tokenizer: a MODEL the CLI can generate with."""
    from camelid.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("lora") / "base"
    texts = [f"The quick brown fox jumps over the lazy dog {i}. " * 3 for i in range(100)]
    tok = train_tokenizer(texts, 400, num_special=16)
    random_llama_dir(root, vocab_size=tok.vocab_size)
    tok.save(root)
    return root


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = camelid_main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return code, out.out, out.err


def test_cli_export_merge_and_generate_adapter(capsys, tmp_path: Path, chat_base: Path) -> None:
    model = apply_lora(camelid.load(chat_base), LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    randomize(model, seed=5)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(chat_base))
    tokens = TOKENS.clamp(max=model.config.vocab_size - 1)
    with torch.no_grad():
        want = model(tokens)

    code, out, err = cli(capsys, "export", chat_base, "--adapter", tmp_path / "adapter",
                         "--merge", tmp_path / "merged")  # fmt: skip
    assert code == 0, err
    assert "(merged)" in out and "merged the LoRA adapter" in err
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "tokenizer.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(camelid.load(merged_dir)(tokens), want, atol=1e-5, rtol=0)

    flags = ["-p", "The quick", "-n", 12, "--device", "cpu", "--greedy", "--ignore-eos"]
    code, with_adapter, err = cli(capsys, "generate", chat_base, "--adapter",
                                  tmp_path / "adapter", *flags)  # fmt: skip
    assert code == 0, err
    assert "merged the LoRA adapter" in err
    code, from_merged, _ = cli(capsys, "generate", merged_dir, *flags)
    assert code == 0
    assert with_adapter == from_merged and with_adapter.strip()
    # the engine (and so the server) reports the digest of the weights it runs: the merged ones
    from camelid.infer.load import load_engine
    from camelid.weights.digest import directory_digest

    engine = load_engine(chat_base, device="cpu", adapter=tmp_path / "adapter")
    assert engine.weights_digest == directory_digest(merged_dir)


def test_cli_adapter_errors(capsys, tmp_path: Path, chat_base: Path) -> None:
    other = random_llama_dir(tmp_path / "other", seed=1, vocab_size=camelid.load(chat_base)
                             .config.vocab_size)  # fmt: skip
    model = apply_lora(camelid.load(other), LoraConfig(target_modules=("q_proj",)))
    randomize(model, seed=0)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(other))
    code, _, err = cli(capsys, "export", chat_base, tmp_path / "out", "--adapter",
                       tmp_path / "adapter")  # fmt: skip
    assert code != 0 and "--adapter needs --merge" in err
    code, _, err = cli(capsys, "export", chat_base, tmp_path / "out", "--adapter",
                       tmp_path / "adapter", "--merge")  # fmt: skip
    assert code != 0
    assert f"another base model ({other}) than {chat_base}" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    code, _, err = cli(capsys, "generate", chat_base, "--adapter", tmp_path / "nope", "-p", "x",
                       "--device", "cpu")  # fmt: skip
    assert code != 0 and "no such adapter directory" in err


def test_llama4_adapter_loads_in_peft(tmp_path: Path) -> None:
    """Llama 4: q/k rows in HF's interleaved RoPE order (B's rows permuted as the base's),
    dense and MoE layers (the shared expert's gate/up/down), both ways through peft."""
    needs_peft()
    import transformers

    hf_config = dict(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=16, intermediate_size_mlp=48,
        num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=2,
        no_rope_layer_interval=2, attention_chunk_size=8, use_qk_norm=True,
        max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )  # fmt: skip
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(**hf_config)
    hf = transformers.Llama4ForCausalLM._from_config(config, attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path / "base")
    model = apply_lora(camelid.load(tmp_path / "base"), LoraConfig(r=4, target_modules=TARGETS))
    assert "layers.1.feed_forward.shared.w1" in lora_modules(model)  # the MoE layer's
    randomize(model, seed=4)
    save_adapter(model.eval(), tmp_path / "adapter")
    tokens = TOKENS.clamp(max=299)
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(tokens), ref(tokens).logits
        with adapters_disabled(model):
            assert (ours - model(tokens)).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    ref.save_pretrained(tmp_path / "back")  # and what peft writes loads back equal
    back = load_adapter(camelid.load(tmp_path / "base"), tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), ours, atol=1e-5, rtol=0)


def test_serve_applies_the_adapter(tmp_path: Path, chat_base: Path) -> None:
    """`camelid serve MODEL --adapter DIR`: answers from the merged weights, and reports their
    digest (not the base's) on its startup line."""
    import os
    import socket
    import subprocess
    import sys
    import time

    httpx = pytest.importorskip("httpx")
    from camelid.infer.export import export_merged
    from camelid.weights.digest import directory_digest

    model = apply_lora(camelid.load(chat_base), LoraConfig(r=2, target_modules=("v_proj",)))
    randomize(model, seed=7)
    save_adapter(model, tmp_path / "adapter")
    export_merged(chat_base, tmp_path / "adapter", tmp_path / "merged")
    merged = camelid.Engine(camelid.load(tmp_path / "merged"), camelid.Tokenizer.load(chat_base))
    want = merged.generate("The quick", max_new_tokens=8, temperature=0, ignore_eos=True).text
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CAMELID_API_KEY", None)
    env["PYTHONPATH"] = (
        str(Path(camelid.__file__).parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "camelid", "serve", str(chat_base), "--port", str(port),
         "--adapter", str(tmp_path / "adapter"), "--device", "cpu"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line, seen = "", []
        deadline = time.monotonic() + 120
        while f"127.0.0.1:{port}" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            line = proc.stderr.readline()
            seen.append(line)
        assert any("merged the LoRA adapter" in s for s in seen)
        assert f"weights {directory_digest(tmp_path / 'merged')[:16]})" in line
        body = {"model": "base", "prompt": "The quick", "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
    finally:
        proc.kill()
        proc.wait()


def test_gradients_equal_peft(tmp_path: Path) -> None:
    """Training parity: the gradients of every A and B (the fused wqkv's slices included)
    equal peft's on the same model, adapter and loss."""
    needs_peft()
    base = random_llama_dir(tmp_path / "base")
    model = apply_lora(camelid.load(base), LoraConfig(r=3, alpha=5, target_modules=TARGETS))
    randomize(model, seed=9)
    save_adapter(model, tmp_path / "adapter")
    ref = peft.PeftModel.from_pretrained(hf_model(), tmp_path / "adapter", is_trainable=True)
    targets = TOKENS.roll(-1, dims=1)
    loss = torch.nn.functional.cross_entropy(model(TOKENS)[0], targets[0])
    loss.backward()
    ref_loss = torch.nn.functional.cross_entropy(ref(TOKENS).logits[0], targets[0])
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    theirs = {n: p.grad for n, p in ref.named_parameters() if "lora_" in n}
    names = {"wqkv": "self_attn", "wo": "self_attn.o_proj", "w1": "mlp.gate_proj",
             "w3": "mlp.up_proj", "w2": "mlp.down_proj"}  # fmt: skip
    compared = 0
    for name, module in lora_modules(model).items():
        layer, attr = name.split(".")[1], name.rsplit(".", 1)[1]
        for target in module.slices:
            hf_module = f"{names[attr]}.{target}" if attr == "wqkv" else names[attr]
            for x in ("A", "B"):
                key = f"base_model.model.model.layers.{layer}.{hf_module}.lora_{x}.default.weight"
                ours = getattr(module, f"lora_{x}")[target].weight.grad
                torch.testing.assert_close(ours, theirs[key], atol=1e-6, rtol=1e-5)
                compared += 1
    assert compared == len(theirs) == 2 * 7 * model.config.n_layers


def test_dpo_reference_is_the_base_with_adapters_off(tmp_path: Path) -> None:
    """DPO with LoRA: the reference log-probs computed with the adapters off are the base
    model's (bound to the base's digest), and a DPO step moves only the adapters."""
    from camelid.train.dpo import PreferencePair, PreferenceSet, dpo_step, reference_logps
    from camelid.weights.digest import model_digest

    base_dir = random_llama_dir(tmp_path / "base")
    pairs = [
        PreferencePair(1, (1, 5, 9), (20, 21, 22), (30, 31)),
        PreferencePair(2, (1, 7), (40, 41), (50, 51, 52, 53)),
    ]
    data = PreferenceSet("pairs.jsonl", pairs, "tok", pad_id=0, max_len=16)
    base = camelid.load(base_dir)
    want = reference_logps(base, data, batch_size=2)
    model = apply_lora(camelid.load(base_dir), LoraConfig(r=2, target_modules=("q_proj",)))
    randomize(model, seed=11)
    ref = reference_logps(model, data, batch_size=2, reference=lambda: adapters_disabled(model))
    assert ref.weights_digest == want.weights_digest == model_digest(base)
    torch.testing.assert_close(ref.logps, want.logps, atol=0, rtol=0)
    assert not torch.equal(reference_logps(model, data, batch_size=2).logps, want.logps)
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(lora_parameters(model), lr=0.5)
    dpo_step(model.train(), data.batches(2), ref, beta=0.1)
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(lora_state_dict(model))
