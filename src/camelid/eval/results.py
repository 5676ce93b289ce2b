"""Result files that name the exact weights, data and prompts they were measured on, and their
verification.

A result is one JSON file: the task (name, kind, data SHA-256, how many items), the template
that shaped the prompts (and its hash), the model (what was given, weights and tokenizer
digests, a config summary), how it was scored (in-process or through which server, device,
dtype, camelid version and git commit), the metrics, and every item's outputs and scores. A
``seal`` holds the SHA-256 of each of those sections and of the whole; an edit to any section
shows as a seal mismatch naming it. A seal can be recomputed by whoever edits the file, so
:func:`verify` also recomputes the metrics from the items, re-scores a random sample of items
on the model, and, with a public key, checks an Ed25519 signature over the seal that only the
holder of the private key can make.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from camelid.eval import ledger as ledger_mod
from camelid.eval.ledger import canonical
from camelid.eval.tasks import EvalError

FORMAT = "camelid-eval-result/1"
SECTIONS = (
    "created",
    "task",
    "template",
    "template_sha256",
    "model",
    "scoring",
    "metrics",
    "items",
    "ledger",
)


def template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(template)).hexdigest()


def seal(result: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of each section and of all of them together (``result``)."""
    parts = {s: hashlib.sha256(canonical(result.get(s))).hexdigest() for s in SECTIONS}
    parts["result"] = hashlib.sha256(canonical(parts)).hexdigest()
    return parts


def git_commit() -> str | None:
    """The commit of the camelid checkout this code runs from, if it is one (with ``+dirty``
    when it has uncommitted changes)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------- signatures
def sign(result: dict[str, Any], private_key: Path) -> dict[str, str]:
    """An Ed25519 signature over the seal's ``result`` hash, with the public key to check it."""
    key = _load_key(private_key, private=True)
    from cryptography.hazmat.primitives import serialization

    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    value = key.sign(result["seal"]["result"].encode())
    return {"algorithm": "ed25519", "public_key": public.hex(), "value": value.hex()}


def _load_key(path: Path, private: bool):
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise EvalError(
            "signing needs the 'cryptography' package: pip install cryptography"
        ) from None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvalError(f"{path}: cannot read the key ({e.strerror})") from None
    try:
        if private:
            key = serialization.load_pem_private_key(data, password=None)
            want = ed25519.Ed25519PrivateKey
        else:
            key = serialization.load_pem_public_key(data)
            want = ed25519.Ed25519PublicKey
    except (ValueError, TypeError) as e:
        kind = "private" if private else "public"
        raise EvalError(f"{path}: not a PEM {kind} key ({e})") from None
    if not isinstance(key, want):
        raise EvalError(f"{path}: not an Ed25519 key")
    return key


def _check_signature(result: dict[str, Any], public_key: Path) -> str | None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    sig = result.get("signature")
    if not sig:
        return "signature: the result is not signed, but --key was given"
    key = _load_key(public_key, private=False)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    if sig.get("public_key") != raw:
        return "signature: made with another key than --key"
    try:
        key.verify(bytes.fromhex(sig.get("value", "")), result["seal"]["result"].encode())
    except (InvalidSignature, ValueError):
        return "signature: does not match the result (the seal or the signature was edited)"
    return None


# ---------------------------------------------------------------------------------- writing
def write(path: Path, result: dict[str, Any], private_key: Path | None = None) -> dict[str, Any]:
    """Seal (and sign) ``result`` and write it atomically."""
    from camelid.io import write_text_atomic

    result = {
        "format": FORMAT,
        **{k: v for k, v in result.items() if k not in ("seal", "signature")},
    }
    result["seal"] = seal(result)
    if private_key is not None:
        result["signature"] = sign(result, private_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


def read(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalError(f"{path}: no such result file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: not a result file (not JSON: {e})") from None
    if not isinstance(result, dict) or result.get("format") != FORMAT:
        raise EvalError(f"{path}: not a camelid result file (format {FORMAT} expected)")
    return result


# -------------------------------------------------------------------------------- verifying
@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_file(result: dict[str, Any]) -> Verdict:
    """What can be checked from the file alone: its seal, section by section, and that its
    metrics follow from its items."""
    v = Verdict()
    recorded = result.get("seal") or {}
    fresh = seal(result)
    edited = [s for s in SECTIONS if recorded.get(s) != fresh[s]]
    for s in edited:
        v.problems.append(
            f"{s}: the section was edited after the result was written (seal differs)"
        )
    if not edited and recorded.get("result") != fresh["result"]:
        v.problems.append("seal: the seal itself was edited")
    v.checked.append("seal")
    for name, want, got in _metric_mismatches(result):
        v.problems.append(f"metrics.{name}: recorded {want!r}, but the items give {got!r}")
    v.checked.append("metrics from items")
    return v


def _metric_mismatches(result: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    from camelid.eval import runner

    kind = (result.get("task") or {}).get("kind")
    items = result.get("items") or []
    metrics = result.get("metrics") or {}
    fresh = runner.metrics_from_items(kind, items, result.get("template") or {})
    out = []
    for name, got in fresh.items():
        want = metrics.get(name)
        if isinstance(got, float) and isinstance(want, (int, float)):
            if abs(got - want) > 1e-9 * max(1.0, abs(got)):
                out.append((name, want, got))
        elif want != got:
            out.append((name, want, got))
    return out


def verify(
    result_path: Path,
    model: str | Path,
    *,
    sample: int = 16,
    seed: int | None = None,
    tolerance: float = 1e-4,
    public_key: Path | None = None,
    task_path: Path | None = None,
    ledger_path: Path | None = None,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
) -> Verdict:
    """Check ``result_path`` against ``model``: the seal and metrics (:func:`check_file`), the
    signature (with ``public_key``), the model's weights and tokenizer digests, the task data's
    digest, the ledger entry, and a re-score of ``sample`` random items (0: none; -1: all)."""
    from camelid.eval import runner
    from camelid.eval.tasks import load_task
    from camelid.infer.load import load_engine, resolve_model
    from camelid.weights.digest import source_digest

    say = log or (lambda _: None)
    result = read(result_path)
    v = check_file(result)
    if public_key is not None:
        problem = _check_signature(result, public_key)
        if problem:
            v.problems.append(problem)
        v.checked.append("signature")
    recorded_model = result.get("model") or {}
    source = resolve_model(model)
    say(f"digesting {source.path}")
    weights = source_digest(source)
    want = recorded_model.get("weights_digest")
    if weights != want:
        v.problems.append(
            f"model: the result was measured on weights {want}, but {model} has weights {weights}"
        )
    v.checked.append("weights digest")
    engine = None
    task_rec = result.get("task") or {}
    task = None
    source_file = task_path or (
        Path(task_rec["source"]) if _is_path(task_rec.get("source")) else None
    )
    spec = str(source_file) if source_file is not None else task_rec.get("source", "")
    try:
        task = load_task(_spec(task_rec, spec), skip_bad=True)
    except EvalError as e:
        v.problems.append(f"task: cannot read the task data to check it ({e})")
    if task is not None:
        found = task_rec.get("contamination") or {}
        if found.get("clean_only"):  # scored on the clean items only: so is the re-score
            dirty = set(found.get("dirty_ids") or ())
            task.items = [item for item in task.items if item.id not in dirty]
        if task.sha256 != task_rec.get("sha256"):
            v.problems.append(
                f"task: the result was measured on data {task_rec.get('sha256')}, but "
                f"{task.source} has {task.sha256} (the task file was edited or is another)"
            )
        v.checked.append("task data digest")
    _check_ledger(result, result_path, ledger_path, v)
    if sample and task is not None and not any(p.startswith("model:") for p in v.problems):
        scoring = result.get("scoring") or {}
        engine = load_engine(
            model, device=device, dtype=scoring.get("dtype", "auto"), progress=False
        )
        if engine.tokenizer.digest != recorded_model.get("tokenizer_digest"):
            v.problems.append(
                f"model: the result used tokenizer {recorded_model.get('tokenizer_digest')}, "
                f"{model} has {engine.tokenizer.digest}"
            )
        items = result.get("items") or []
        picks = list(range(len(items)))
        if sample > 0 and sample < len(picks):
            picks = sorted(random.Random(seed).sample(picks, sample))
        say(f"re-scoring {len(picks)} of {len(items)} items")
        for index, problem in runner.rescore(engine, task, result, picks, tolerance):
            v.problems.append(f"items[{index}] (id {items[index].get('id')}): {problem}")
        v.checked.append(f"re-scored {len(picks)} items")
    return v


def _is_path(source: Any) -> bool:
    return isinstance(source, str) and not source.startswith("builtin:")


def _spec(task_rec: dict[str, Any], path: str) -> str:
    source = task_rec.get("source", "")
    if isinstance(source, str) and source.startswith("builtin:"):
        return source.removeprefix("builtin:")
    kind = task_rec.get("kind")
    return f"{kind}:{path}" if kind and not Path(path).is_dir() else path


def _check_ledger(
    result: dict[str, Any], result_path: Path, given: Path | None, v: Verdict
) -> None:
    entry = result.get("ledger")
    if not entry:
        v.problems.append("ledger: the result has no ledger entry (written with --no-ledger)")
        return
    path = given or Path(entry.get("path", ""))
    if not path.is_absolute() and given is None:
        path = (result_path.parent / path).resolve()
    try:
        check = ledger_mod.read(path)
    except EvalError as e:
        v.problems.append(f"ledger: {e}")
        return
    v.problems.extend(f"ledger: {p}" for p in check.problems)
    seq = entry.get("seq")
    mine = check.entries[seq] if isinstance(seq, int) and 0 <= seq < len(check.entries) else None
    if mine is None or mine.get("hash") != entry.get("hash"):
        v.problems.append(
            f"ledger: entry {seq} of this result is not in {path} (removed, or another ledger)"
        )
    elif mine.get("content_sha256") != seal({**result, "ledger": None})["result"]:
        v.problems.append(
            f"ledger: entry {seq} was made for another result (its content hash differs)"
        )
    v.checked.append("ledger")
