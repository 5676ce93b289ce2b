"""MoE models through the whole flow: `camelid train` (balanced, guarded, reported), exact
resume, the Hugging Face export, the engine and the server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import camelid_main
from test_train import dataset, recipe_file, step_losses  # noqa: F401 (the fixture)

import camelid
from camelid.train.recipe import load_recipe
from camelid.train.trainer import train

MOE = {"preset": "tiny", "n_experts": 4, "n_experts_per_tok": 2, "n_shared_experts": 1,
       "moe_ffn_dim": 32}  # fmt: skip
BALANCE = {"bias_update_rate": 0.01, "aux_loss_coef": 0.01, "z_loss_coef": 0.001}


def records(run: Path, kind: str) -> dict[int, dict]:
    """Step -> the last record of ``kind`` for that step."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out[r.get("step")] = r
    return out


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, dataset):  # noqa: F811
    root = tmp_path_factory.mktemp("moe-run")
    recipe = load_recipe(recipe_file(root, dataset, model=MOE, train={"steps": 12},
                                     checkpoint={"interval": 6}, moe=BALANCE))  # fmt: skip
    summary = train(recipe, progress=False)
    return recipe, summary, root / "run"


def test_moe_trains_balanced_with_every_steps_loads_recorded(moe_run):
    _, summary, run = moe_run
    assert summary.status == "finished"
    losses = step_losses(run)
    assert losses[12] < losses[1] - 0.5
    experts = records(run, "experts")
    assert sorted(experts) == list(range(1, 13))
    for r in experts.values():
        assert r["layers"] == [0, 1]
        # every token of the step (4 x 32) routed to 2 experts, each counted once
        assert [sum(t) for t in r["tokens"]] == [4 * 32 * 2] * 2
        assert r["aux_loss"] > 0 and r["z_loss"] > 0
        assert len(r["max_mean"]) == 2 and r["dead_total"] == sum(r["dead"])
    assert experts[1]["bias_absmax"] == [0.0, 0.0]  # the biases start neutral ...
    assert all(b > 0 for b in experts[12]["bias_absmax"])  # ... and balancing moved them
    report = (run / "report.md").read_text()
    assert "## Experts" in report and (run / "experts.png").stat().st_size > 1000


def test_moe_resume_is_exact(moe_run, tmp_path):
    recipe, _, run = moe_run
    losses, experts = step_losses(run), records(run, "experts")
    train(recipe, resume=str(run / "checkpoints" / "step-00000006"), progress=False)
    assert step_losses(run) == losses  # steps 7..12 again, bit for bit
    again = records(run, "experts")
    for step in range(7, 13):
        assert again[step]["tokens"] == experts[step]["tokens"]
        assert again[step]["bias_absmax"] == experts[step]["bias_absmax"]


def test_moe_export_keeps_the_balanced_routing(moe_run):
    from safetensors import safe_open

    from camelid.weights.checkpoint import load as load_checkpoint

    _, _, run = moe_run
    hf = run / "hf"
    with safe_open(hf / "model.safetensors", "pt") as f:
        biases = [k for k in f.keys() if k.endswith("router.selection_bias")]  # noqa: SIM118
    assert biases == [f"model.layers.{i}.feed_forward.router.selection_bias" for i in (0, 1)]
    exported = camelid.load(hf).eval()
    trained = load_checkpoint(run / "checkpoints" / "step-00000012").eval()
    assert torch.equal(exported.layers[1].feed_forward.selection_bias,
                       trained.layers[1].feed_forward.selection_bias)  # fmt: skip
    ids = torch.randint(0, exported.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.allclose(exported(ids), trained(ids), atol=1e-5)
    card = (hf / "README.md").read_text()
    assert "active" in card.lower()


def test_moe_generates_and_serves(moe_run, capsys):
    openai = pytest.importorskip("openai")
    from test_serve import LiveServer

    from camelid.serve import create_app

    _, _, run = moe_run
    hf = run / "hf"
    assert camelid_main(["generate", str(hf), "--prompt", "def f", "--max-new-tokens", "6",
                         "--temperature", "0"]) == 0  # fmt: skip
    engine = camelid.Engine(camelid.load(hf), camelid.Tokenizer.load(hf))
    expected = engine.generate("def f", camelid.SamplingParams(max_new_tokens=6, temperature=0))
    assert expected.text in capsys.readouterr().out
    server = LiveServer(create_app(engine, model_name="moe"))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        got = client.completions.create(model="moe", prompt="def f", max_tokens=6,
                                        temperature=0)  # fmt: skip
        assert got.choices[0].text == expected.text
    finally:
        server.close()


def test_router_blowup_skips_the_update_and_rolls_back(tmp_path, dataset):  # noqa: F811
    guard = {"router_logit_limit": 1e-3, "max_bad_steps": 2}
    recipe = load_recipe(recipe_file(tmp_path, dataset, model=MOE, train={"steps": 6},
                                     checkpoint={"interval": 3}, guard=guard))  # fmt: skip
    with pytest.raises(camelid.errors.CamelidError, match="diverged"):
        train(recipe, progress=False)
    kinds = [r["event"] for r in records_all(tmp_path / "run") if r["kind"] == "event"]
    assert kinds.count("router_blowup") >= 2 and "rollback" in kinds
    steps = [r for r in records_all(tmp_path / "run") if r["kind"] == "step"]
    assert all(r["skipped"] for r in steps)


def records_all(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_an_moe_with_no_hf_form_trains_and_generates_from_its_checkpoint(tmp_path, dataset):  # noqa: F811
    model = {**MOE, "router_scoring": "softmax", "n_shared_experts": 0}  # Mixtral-style
    recipe = load_recipe(recipe_file(tmp_path, dataset, model=model, train={"steps": 2},
                                     checkpoint={"interval": 0}))  # fmt: skip
    summary = train(recipe, progress=False)
    assert summary.status == "finished" and summary.export is None
    skipped = [r for r in records_all(tmp_path / "run") if r.get("event") == "export_skipped"]
    assert len(skipped) == 1 and "softmax" in skipped[0]["detail"]
    step = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert camelid_main(["generate", str(step), "--prompt", "def", "--max-new-tokens", "3"]) == 0
