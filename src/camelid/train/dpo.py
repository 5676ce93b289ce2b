"""Direct preference optimisation (DPO): preference data, sequence log-probs, the sigmoid loss,
reference log-probs computed once, and one optimizer step's forward and backward.

It lives in train/ rather than in :mod:`camelid.loss`: that module holds the next-token losses
every stage shares (pre-training, SFT masks, validation, evaluation), while DPO is a training
objective over *pairs* that needs a frozen reference and a β; nothing outside train/ uses it.
The masking convention is the house one (:data:`camelid.loss.IGNORE_INDEX`).

The maths is trl's ``DPOTrainer`` (``loss_type="sigmoid"``): with per-sequence log-probs
summed over the completion tokens, policy ``pc``/``pr`` and reference ``rc``/``rr`` for the
chosen and rejected completions,

    loss = -logsigmoid(β · ((pc - rc) - (pr - rr)))                (mean over pairs)
    rewards/chosen = β (pc - rc), rewards/rejected = β (pr - rr),
    rewards/margins = their difference, rewards/accuracies = share with chosen > rejected.

``label_smoothing`` ε > 0 is conservative DPO (cDPO): ``-(1-ε) logsigmoid(βΔ) - ε
logsigmoid(-βΔ)``, the form trl's "sigmoid" loss had before 1.0 (trl 1.x applies ε only in its
"robust"/"aot" losses; its "aot" loss on a single pair is this formula).

Preference JSONL, one pair a line::

    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": "Go away."}

Each pair is rendered with the tokenizer's chat format: the prompt with the generation prompt
(``...<|start_header_id|>assistant<|end_header_id|>\\n\\n``), then the completion's content
and its end-of-turn token; the completion mask is 1 on exactly those completion tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from camelid.data.loader import check_resumable
from camelid.data.packing import epoch_order
from camelid.errors import CheckpointError, DataError, TokenizerError
from camelid.io import atomic_path
from camelid.loss import IGNORE_INDEX
from camelid.tokenizer import Tokenizer
from camelid.train.distributed import World, all_reduce_sum

PROMPT_ROLES = ("system", "user", "assistant", "tool")
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)

# A factory of the context in which the model computes as the reference, e.g. "adapters off"
# for a LoRA model: ``lambda: adapters_disabled(model)`` (camelid.model.lora). None: the
# model as it is (the frozen start).
ReferenceContext = Callable[[], AbstractContextManager[Any]] | None


# ------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class PreferencePair:
    """One tokenised pair: the prompt's ids (BOS through the assistant header) and each
    completion's ids (content + end-of-turn, unless ``truncated``); ``line`` is its JSONL line."""

    line: int
    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    truncated: bool = False


@dataclass
class PreferenceBatch:
    """``input_ids`` and ``completion_mask`` (2B, T): the B chosen sequences, then the B
    rejected ones (trl's layout), right-padded; ``index`` (B,): the pairs' dataset positions,
    where their reference log-probs are found."""

    input_ids: torch.Tensor
    completion_mask: torch.Tensor
    index: torch.Tensor

    @property
    def pairs(self) -> int:
        return len(self.index)

    @property
    def tokens(self) -> int:
        """The batch's tokens without the padding: each row's prompt and completion."""
        T = self.completion_mask.shape[1]
        ends = (self.completion_mask > 0) * torch.arange(1, T + 1, device=self.input_ids.device)
        return int(ends.max(dim=1).values.sum())

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(
            self.input_ids.to(device), self.completion_mask.to(device), self.index.to(device)
        )


@dataclass
class PreferenceSet:
    """The pairs of a preference file, in file order, and what reading them did."""

    path: str
    pairs: list[PreferencePair]
    tokenizer_digest: str
    pad_id: int
    max_len: int
    skipped: list[int] = field(default_factory=list)  # lines too long for ``max_len``

    @property
    def truncated(self) -> int:
        return sum(p.truncated for p in self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def digest(self) -> str:
        """SHA-256 of the tokenised pairs and the tokenizer: a reference computed on other data
        (or other ids for the same text) does not match it."""
        h = hashlib.sha256(self.tokenizer_digest.encode())
        for p in self.pairs:
            h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
        return h.hexdigest()

    def batches(
        self, batch_size: int, indices: Sequence[int] | None = None
    ) -> list[PreferenceBatch]:
        """The pairs (all, or those at ``indices``, in that order) as batches of ``batch_size``."""
        order = list(range(len(self.pairs))) if indices is None else list(indices)
        return [
            collate([self.pairs[i] for i in chunk], chunk, self.pad_id)
            for chunk in (order[s : s + batch_size] for s in range(0, len(order), batch_size))
        ]


def collate(pairs: Sequence[PreferencePair], index: Sequence[int], pad_id: int) -> PreferenceBatch:
    """Pairs as one batch: chosen rows then rejected rows, right-padded with ``pad_id`` (a pad
    is never in the mask, so it may be any id, the end-of-turn token included)."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, completion) in enumerate(rows):
        n, m = len(prompt), len(completion)
        ids[r, : n + m] = torch.tensor(prompt + completion, dtype=torch.long)
        mask[r, n : n + m] = 1
    return PreferenceBatch(ids, mask, torch.tensor(list(index), dtype=torch.long))


class PairLoader:
    """Training batches of preference pairs (:class:`PreferenceBatch`), resumable exactly like
    ``camelid.data``'s loaders.

    An epoch visits every pair once, in an order drawn from ``(seed, epoch)`` (file order
    without ``shuffle``); rank r of W takes every W-th pair of it, and a batch is
    ``batch_size`` of a rank's pairs, so the pairs of one optimizer step (micro-batches ×
    ranks) are the same for any number of ranks of the same global batch. The pairs left at
    an epoch's end, fewer than a global batch, wait for the next epoch's order.
    ``state_dict()`` / ``load_state_dict()`` hold ``(epoch, batch)`` and what must not change:
    the data (the pairs' digest), the seed, the order, the global batch.
    """

    def __init__(
        self,
        data: PreferenceSet,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.digest = data.digest
        self.batches_per_epoch = len(data) // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{data.path}: {len(data)} preference pairs, fewer than one batch of "
                f"{batch_size} per rank for {world_size} rank(s)"
            )
        self.epoch, self.batch = 0, 0
        self._order: list[int] | None = None

    def __iter__(self) -> PairLoader:
        return self

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __next__(self) -> PreferenceBatch:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        first = self.batch * self.batch_size
        index = self._epoch_order()[first : first + self.batch_size]
        self.batch += 1
        return collate([self.data.pairs[i] for i in index], index, self.data.pad_id)

    def _epoch_order(self) -> list[int]:
        """This rank's pairs for the current epoch, in visiting order."""
        if self._order is None:
            self._order = epoch_order(len(self.data), self.seed, self.epoch, self.shuffle,
                                      self.batches_per_epoch * self.batch_size, self.rank,
                                      self.world_size).tolist()  # fmt: skip
        return self._order

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "data_digest": self.digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the same pairs, order and global batch (the number of
        ranks may change while batch_size × world_size stays)."""
        check_resumable(state, self.state_dict(), ("data_digest", "seed", "shuffle"),
                        "the pair loader", "pairs",
                        {"data_digest": "the preference pairs (their digest)"})  # fmt: skip
        self.epoch, self.batch, self._order = int(state["epoch"]), int(state["batch"]), None


def read_preferences(
    path: str | Path, tokenizer: Tokenizer, max_len: int, *, truncate: bool = False
) -> PreferenceSet:
    """Read and tokenise a preference JSONL file (see the module docstring).

    A pair longer than ``max_len`` tokens is skipped and counted (``skipped``), or with
    ``truncate`` its completions are cut to fit (``truncated``; they lose their end-of-turn
    token); a prompt that leaves no room for a completion, or completions cut to the same
    tokens, are always skipped. Any bad line — not
    JSON, a missing or empty field, an unknown role, chosen equal to rejected — is a
    :class:`DataError` naming ``path:line``; nothing is returned half-read.
    """
    path = Path(path)
    if max_len < 2:
        raise DataError(f"max_len must be at least 2, got {max_len}")
    try:
        tokenizer.apply_chat_template([])
    except TokenizerError as e:
        raise DataError(f"{path}: preference pairs need a chat format: {e}") from None
    try:
        pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else tokenizer.eos_id
        pairs: list[PreferencePair] = []
        skipped: list[int] = []
        for number, line in _lines(path):
            where = f"{path}:{number}"
            try:
                prompt, chosen, rejected = _record(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg})") from None
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
            try:
                pair = _tokenise(tokenizer, number, prompt, chosen, rejected)
            except TokenizerError as e:
                raise DataError(f"{where}: {e}") from None
            if pair.chosen == pair.rejected:
                raise DataError(f"{where}: chosen and rejected are the same completion")
            pair = _fit(pair, max_len, truncate)
            if pair is None:
                skipped.append(number)
            else:
                pairs.append(pair)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not pairs:
        why = f" (all {len(skipped)} longer than max_len={max_len})" if skipped else ""
        raise DataError(f"{path}: no preference pairs{why}")
    return PreferenceSet(str(path), pairs, tokenizer.digest, pad_id, max_len, skipped)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, line
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _record(r: Any) -> tuple[list[dict], str, str]:
    """The prompt as messages and the two completions' text; ValueError names the field."""
    if not isinstance(r, dict):
        raise ValueError(f"expected a JSON object, got {type(r).__name__}")
    for name in ("prompt", "chosen", "rejected"):
        if name not in r:
            raise ValueError(f'missing field "{name}" (a pair needs prompt, chosen, rejected)')
    prompt = r["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError('"prompt" is empty')
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = [_message(m, f"prompt[{i}]", PROMPT_ROLES) for i, m in enumerate(prompt)]
    else:
        raise ValueError('"prompt" must be a non-empty string or list of messages')
    return messages, _completion(r["chosen"], "chosen"), _completion(r["rejected"], "rejected")


def _message(m: Any, where: str, roles: Sequence[str]) -> dict:
    if not isinstance(m, dict):
        raise ValueError(f'"{where}" must be a message object, got {type(m).__name__}')
    role, content = m.get("role"), m.get("content")
    if role not in roles:
        allowed = ", ".join(roles)
        raise ValueError(f'"{where}": unknown role {role!r} (expected one of {allowed})')
    if not isinstance(content, str) or not content.strip():
        raise ValueError(f'"{where}": "content" must be a non-empty string')
    return {"role": role, "content": content}


def _completion(c: Any, name: str) -> str:
    """A completion given as text, one assistant message, or a list of exactly one."""
    if isinstance(c, list):
        if len(c) != 1:
            raise ValueError(f'"{name}" must hold exactly one assistant message, got {len(c)}')
        c = c[0]
    if isinstance(c, dict):
        c = _message(c, name, ("assistant",))["content"]
    if not isinstance(c, str):
        raise ValueError(f'"{name}" must be a string or an assistant message')
    if not c.strip():
        raise ValueError(f'"{name}" is empty')
    return c


def _tokenise(
    tokenizer: Tokenizer, line: int, prompt: list[dict], chosen: str, rejected: str
) -> PreferencePair:
    """The prompt through the generation prompt, then each completion (content + end-of-turn).

    camelid tokenises the chat piece by piece, so the prompt's ids are exactly a prefix of the
    whole conversation's (checked): the completion starts where the prompt ends, with no
    boundary merges as a tokenise-the-whole-string template can give.
    """
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    completions = []
    for text in (chosen, rejected):
        ids = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": text}])
        if ids[: len(head)] != head:  # the chat format's pieces guarantee it
            raise TokenizerError("the prompt's tokens are not a prefix of the conversation's")
        completions.append(tuple(ids[len(head) :]))
    return PreferencePair(line, tuple(head), *completions)


def _fit(pair: PreferencePair, max_len: int, truncate: bool) -> PreferencePair | None:
    longest = len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))
    if longest <= max_len:
        return pair
    room = max_len - len(pair.prompt)
    chosen, rejected = pair.chosen[:room], pair.rejected[:room]
    if not truncate or room < 1 or chosen == rejected:  # cut to one text: nothing to prefer
        return None
    return PreferencePair(pair.line, pair.prompt, chosen, rejected, truncated=True)


# ------------------------------------------------------------------------------ log-probs
def _logps_head(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row sums of the targets' log-probs (fp32) for hidden states h (B, T, dim): the
    model's head applied inside its forward, as :func:`camelid.loss.next_token_loss` does.
    Only the completion positions go through the head, so the logits held are (completion
    tokens, vocab), not (B, T, vocab): the prompts and pads cost no head FLOPs or memory."""
    keep = targets != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]
    logits = F.linear(h[keep], weight).float()
    logps = -F.cross_entropy(logits, targets[keep], reduction="none")
    return torch.zeros(len(h), dtype=logps.dtype, device=h.device).index_add(0, rows, logps)


def completion_targets(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets (B, T): position t predicts token t+1 where that token is in the
    completion; ``IGNORE_INDEX`` everywhere else (the prompt, the pads, the last position)."""
    targets = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, IGNORE_INDEX)
    return F.pad(targets, (0, 1), value=IGNORE_INDEX)


def sequence_logps(
    model: nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Each row's log-probability of its completion tokens, summed (fp32, shape (B,)), from
    one forward of the camelid model over all rows (chosen and rejected together, as trl).
    Rows are right-padded: with causal attention a pad never changes an earlier position. An
    MoE model is told which positions are padding (document id -1), so they stay out of its
    expert statistics; the row's own tokens are one causal document, as without the ids."""
    targets = completion_targets(input_ids, completion_mask)
    doc_ids = None
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_moe", False):
        T = completion_mask.shape[1]
        ends = ((completion_mask > 0) * torch.arange(1, T + 1, device=input_ids.device)).amax(1)
        real = torch.arange(T, device=input_ids.device) < ends.unsqueeze(1)
        doc_ids = torch.where(real, 0, -1)
    return model(input_ids, head=partial(_logps_head, targets=targets), doc_ids=doc_ids)


# ----------------------------------------------------------------------------------- loss
def _pair_terms(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the two rewards (detached)."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _check_beta(beta: float, label_smoothing: float) -> None:
    if not beta > 0:
        raise ValueError(f"DPO beta must be positive, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"DPO label_smoothing must be in [0, 0.5), got {label_smoothing}")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The sigmoid DPO loss, mean over the pairs, from per-sequence log-probs (B,) each, and
    trl's metrics (detached 0-d tensors) under trl's names (:data:`METRICS`)."""
    _check_beta(beta, label_smoothing)
    losses, chosen, rejected = _pair_terms(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing
    )
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    return losses.mean(), metrics


# ------------------------------------------------------------------------------ reference
@dataclass(frozen=True)
class Reference:
    """Reference log-probs of every pair, (N, 2) fp32 (chosen, rejected) in dataset order,
    bound to the start weights and the data by ``checksum``, so a resumed run can check that it
    goes on against the same reference (:meth:`verify`)."""

    logps: torch.Tensor
    weights_digest: str
    data_digest: str
    checksum: str

    def verify(self, weights_digest: str | None = None, data_digest: str | None = None) -> None:
        """Raise :class:`CheckpointError` when the values no longer match their checksum, or
        were computed from other start weights or other data than those given."""
        if reference_checksum(self.logps, self.weights_digest, self.data_digest) != self.checksum:
            raise CheckpointError(
                "DPO reference log-probs do not match their checksum (changed or corrupt)"
            )
        if weights_digest is not None and weights_digest != self.weights_digest:
            raise CheckpointError(
                f"DPO reference was computed from start weights {self.weights_digest[:12]}, "
                f"not these ({weights_digest[:12]}); recompute it"
            )
        if data_digest is not None and data_digest != self.data_digest:
            raise CheckpointError(
                f"DPO reference was computed on data {self.data_digest[:12]}, not this data "
                f"({data_digest[:12]}); recompute it"
            )

    def save(self, path: str | Path) -> None:
        """One safetensors file (written atomically), the digests and checksum in its metadata."""
        meta = {
            "weights_digest": self.weights_digest,
            "data_digest": self.data_digest,
            "checksum": self.checksum,
        }
        with atomic_path(path) as tmp:
            save_file({"logps": self.logps.contiguous().cpu()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read what :meth:`save` wrote and :meth:`verify` its checksum."""
        try:
            with safe_open(str(path), "pt") as f:
                logps, meta = f.get_tensor("logps"), f.metadata()
            ref = cls(logps, meta["weights_digest"], meta["data_digest"], meta["checksum"])
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: not a DPO reference file ({e})") from None
        try:
            ref.verify()
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return ref


def reference_checksum(logps: torch.Tensor, weights_digest: str, data_digest: str) -> str:
    """SHA-256 of the fp32 values (little-endian, row-major), then of both digests."""
    h = hashlib.sha256()
    h.update(logps.detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4").tobytes())
    h.update(weights_digest.encode("ascii"))
    h.update(data_digest.encode("ascii"))
    return h.hexdigest()


def reference_logps(
    model: nn.Module,
    dataset: PreferenceSet,
    *,
    weights_digest: str | None = None,
    batch_size: int = 8,
    reference: ReferenceContext = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    world: World | None = None,
) -> Reference:
    """The reference log-probs of every pair of ``dataset``, computed once, without gradients,
    from ``model`` as it is now (the frozen start) or inside ``reference()`` (e.g. a LoRA model
    with its adapters off). ``weights_digest`` names the start weights
    (:func:`camelid.weights.digest.model_digest` of the model by default; pass it for a
    sharded model).

    Under torchrun (``world``) rank r computes every W-th batch and the table is summed over
    the ranks: each value comes from one rank and the others add zeros, so every rank ends with
    the same table. Every rank runs as many forwards (FSDP2's all-gathers are collective): one
    with a batch fewer repeats a batch and discards it."""
    world = world or World()
    if weights_digest is None:
        from camelid.weights.digest import model_digest

        weights_digest = model_digest(model)
    device = next(model.parameters()).device
    out = torch.zeros((len(dataset), 2), dtype=torch.float32)
    batches = dataset.batches(batch_size)
    mine = [(b, True) for b in batches[world.rank :: world.world_size]]
    rounds = -(-len(batches) // world.world_size)
    work: Iterable[tuple[PreferenceBatch, bool]] = mine + [(batches[0], False)] * (
        rounds - len(mine)
    )
    if progress:
        from tqdm import tqdm

        work = tqdm(work, desc="reference log-probs", unit="batch", total=rounds)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), reference() if reference else contextlib.nullcontext():
            for batch, keep in work:
                batch = batch.to(device)
                with _autocast(device, autocast_dtype):
                    logps = sequence_logps(model, batch.input_ids, batch.completion_mask)
                if keep:
                    out[batch.index.cpu()] = logps.float().view(2, -1).t().cpu()
    finally:
        model.train(was_training)
    if world.distributed:
        out = all_reduce_sum(out.to(device), world).cpu()
    return Reference(
        out, weights_digest, dataset.digest, reference_checksum(out, weights_digest, dataset.digest)
    )


# ----------------------------------------------------------------------------------- step
def dpo_step(
    model: nn.Module,
    batches: PreferenceBatch | Iterable[PreferenceBatch],
    ref: Reference | torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    world: World | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate the gradients of one optimizer step over the micro-batches ``batches``;
    return its DPO loss and metrics (detached, the same on every rank).

    The loss is the sum of the per-pair losses of the whole step — all micro-batches, all ranks
    — divided by the step's pairs, so uneven micro-batches give the exact mean over pairs (as
    :func:`camelid.train.step.forward_backward` does over tokens). ``ref`` holds the reference
    log-probs of every pair (:func:`reference_logps`), read at each batch's ``index``. The
    caller clips, steps the optimizer and zeroes the gradients.
    """
    return _pairs_pass(model, batches, ref, beta, label_smoothing, autocast_dtype, world, True)


def dpo_evaluate(
    model: nn.Module,
    batches: PreferenceBatch | Iterable[PreferenceBatch],
    ref: Reference | torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    world: World | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`dpo_step`'s loss and metrics for held-out pairs, without gradients and in eval
    mode (no adapter dropout): validation at the trainer's eval intervals."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _pairs_pass(
                model, batches, ref, beta, label_smoothing, autocast_dtype, world, False
            )
    finally:
        model.train(was_training)


def _pairs_pass(
    model: nn.Module,
    batches: PreferenceBatch | Iterable[PreferenceBatch],
    ref: Reference | torch.Tensor,
    beta: float,
    label_smoothing: float,
    autocast_dtype: torch.dtype | None,
    world: World | None,
    backward: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    _check_beta(beta, label_smoothing)
    world = world or World()
    batches = [batches] if isinstance(batches, PreferenceBatch) else list(batches)
    if not batches:
        raise ValueError("a DPO step needs at least one batch")
    table = ref.logps if isinstance(ref, Reference) else ref
    device = batches[0].input_ids.device
    n_pairs = all_reduce_sum(
        torch.tensor(float(sum(b.pairs for b in batches)), dtype=torch.float64, device=device),
        world,
    )
    # FSDP2 averages gradients over ranks; scaling by the world size turns that into the sum.
    scale = world.world_size / n_pairs
    sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=device)
    for batch in batches:
        with _autocast(device, autocast_dtype):
            logps = sequence_logps(model, batch.input_ids, batch.completion_mask)
        policy_chosen, policy_rejected = logps.float().chunk(2)
        r = table[batch.index.cpu()].to(device=device, dtype=torch.float32)
        losses, chosen, rejected = _pair_terms(
            policy_chosen, policy_rejected, r[:, 0], r[:, 1], beta, label_smoothing
        )
        loss = losses.sum()
        if backward:
            (loss * scale.to(loss.dtype)).backward()
        parts = (
            loss.detach(),
            chosen.sum(),
            rejected.sum(),
            (chosen > rejected).float().sum(),
            (chosen - rejected).sum(),
            policy_chosen.detach().sum(),
            policy_rejected.detach().sum(),
        )
        sums += torch.stack(parts).double()
    means = (all_reduce_sum(sums, world) / n_pairs).float()
    return means[0], dict(zip(METRICS, means[1:].unbind(), strict=True))


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
