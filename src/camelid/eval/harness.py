"""lm-evaluation-harness on a camelid model: :class:`CamelidLM`, registered as "camelid".

    lm = CamelidLM("path/to/model", batch_size=8)        # or CamelidLM(engine=engine)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])
    camelid lm-eval --model camelid --model_args pretrained=DIR --tasks hellaswag
    python -m camelid.eval.harness --model camelid --model_args pretrained=DIR --tasks ...

lm-eval (0.4.13) knows a model name only once a module that registers it has been imported: its
registry has no entry-point (plugin) lookup, and ``--include_path`` adds tasks, not models. So
its own ``lm_eval`` command cannot run "camelid"; :func:`main` imports this module and then runs
lm-eval's command line with the arguments unchanged (``camelid lm-eval`` calls it too).

Tokenisation is that of lm-eval's ``hf`` model on the same directory (lm-eval's own
``TemplateLM.loglikelihood`` splits each pair): a context's trailing whitespace moves onto the
continuation; the continuation's ids are those of ``encode(context + continuation)`` after the
length of ``encode(context)``; both start with BOS (not added again to a text that already
starts with the BOS text, as a chat template's output does); an empty context is BOS alone;
special-token text becomes control ids, as ``transformers`` tokenizers read it. Requests longer
than ``max_length + 1`` tokens lose their oldest context tokens.

Scoring is batched: the model inputs, sorted longest first (as lm-eval does), go
``batch_size`` rows to one forward pass (right-padded; only the continuation positions are
projected to the vocabulary), and requests with the same input (choices of one token after the
same context) share one row. ``loglikelihood_rolling`` scores every token of a text once, in
lm-eval's disjoint windows of ``max_length`` tokens, the first conditioned on BOS.
``generate_until`` runs through :meth:`Engine.generate`, ``batch_size`` prompts at a time,
each with its own sampling settings and seed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own names: the registry loads them only if empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from camelid.errors import CamelidError, RequestError, TokenizerError
from camelid.infer import Engine, SamplingParams, derive_seed
from camelid.infer.load import load_engine
from camelid.tokenizer.chat import chat_pieces, find_chat_format

MODEL_ARGS = (
    "pretrained", "device", "dtype", "batch_size", "max_batch_size", "max_length", "seed",
    "compile",
)  # fmt: skip
# generate_until settings understood (after lm-eval's normalize_gen_kwargs, which turns
# max_new_tokens / max_tokens / max_completion_tokens into max_gen_toks).
GEN_KWARGS = (
    "until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "seed",
)  # fmt: skip
DEFAULT_BATCH = 16  # what "auto" batch sizes mean (nothing is probed)
MAX_GEN_TOKS = 256  # as lm-eval's hf model
SEED = 1234  # lm-eval's default torch/numpy seed: sampled runs repeat unless told otherwise

Request = tuple[tuple[str, str] | None, list[int], list[int]]


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@register_model("camelid")
class CamelidLM(TemplateLM):
    """A camelid :class:`Engine` as an lm-eval model (a ``TemplateLM``: lm-eval's ``LM`` with
    its own splitting of (context, continuation) pairs, the one its hf model uses).

    From a MODEL (``pretrained``: a Hugging Face directory, a training run or a checkpoint, as
    everywhere in camelid) or an ``engine`` already loaded. ``batch_size``: rows per forward
    pass and prompts per generation batch ("auto" means ``max_batch_size`` or 16).
    ``max_length``: the context (default and at most: the engine's). ``seed``: sampled
    generations draw request i's seed from (seed, i). ``device`` "auto" is CUDA if available;
    a CUDA device on a machine without one falls back to the CPU, as lm-eval's hf model does
    (its command line passes ``cuda:0`` unless told ``--device``). ``dtype`` "auto" is
    bfloat16 on CUDA, float32 on the CPU. ``compile`` compiles the decode step.
    """

    def __init__(
        self,
        pretrained: str | Path | None = None,
        *,
        engine: Engine | None = None,
        device: str | None = "auto",
        dtype: str = "auto",
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        seed: int = SEED,
        compile: bool = False,
        trust_remote_code: bool | None = None,  # passed by lm-eval's --trust_remote_code; unused
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise RequestError(
                f"unknown camelid model_args: {', '.join(sorted(unknown))} (known: "
                f"{', '.join(MODEL_ARGS)})"
            )
        if pretrained is None and engine is None:
            raise RequestError("camelid model_args: pretrained=MODEL is missing")
        if pretrained is not None and engine is not None:
            raise RequestError("camelid: give pretrained=MODEL or an engine, not both")
        self.batch_size = _batch_size(batch_size, max_batch_size)
        if max_length is not None and (not _is_int(max_length) or max_length < 2):
            raise RequestError(f"invalid max_length={max_length!r}: must be an integer >= 2")
        if not _is_int(seed):
            raise RequestError(f"invalid seed={seed!r}: must be an integer")
        if engine is None:
            engine = load_engine(
                str(pretrained),
                device=_device(device),
                dtype=str(dtype),
                max_batch_size=self.batch_size,
                max_seq_len=max_length,
                compile=bool(compile),
                progress=False,
                log=_log,
            )
        elif max_length is not None and max_length > engine.max_seq_len:
            raise RequestError(
                f"max_length={max_length} is longer than the engine's context "
                f"({engine.max_seq_len})"
            )
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_length = (
            engine.max_seq_len if max_length is None else min(max_length, engine.max_seq_len)
        )
        self.seed = int(seed)
        self.pretrained = None if pretrained is None else str(pretrained)
        self._device = engine.device
        self._bos_text = self.tokenizer.decode([self.tokenizer.bos_id])

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> CamelidLM:
        """From ``--model_args`` and lm-eval's own settings (``--batch_size``, ``--device``);
        a key in both is taken from the model_args (lm-eval's command line always passes a
        batch size and a device, defaults included)."""
        given = additional_config or {}
        extra = {k: v for k, v in given.items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> CamelidLM:
        """From ``"pretrained=DIR,batch_size=8,..."`` (see :meth:`create_from_arg_obj`)."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------------ tokenisation (TemplateLM)
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on: BOS."""
        return self.tokenizer.bos_id

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Ids as lm-eval's hf model gets them: BOS first unless ``add_special_tokens`` is
        False (or, when None, the text starts with the BOS text); special-token text as ids."""
        bos = (
            not string.startswith(self._bos_text)
            if add_special_tokens is None
            else bool(add_special_tokens)
        )
        ids = self.tokenizer.encode(string, bos=bos, allow_special=True)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(log-probability of each continuation, whether it is the greedy one) for
        ``(key, context ids, continuation ids)`` requests, batched as the module says."""
        wholes, starts = [], []
        rows: dict[tuple[int, ...], list[int]] = {}  # model input -> the requests it serves
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise RequestError("a loglikelihood request needs context and continuation ids")
            if len(continuation) > self.max_length:
                raise RequestError(
                    f"a continuation of {len(continuation)} tokens does not fit the context "
                    f"of {self.max_length} tokens (max_length)"
                )
            whole = (context + continuation)[-(self.max_length + 1) :]
            wholes.append(whole)
            starts.append(len(whole) - len(continuation))  # the first scored token
            rows.setdefault(tuple(whole[:-1]), []).append(i)
        order = sorted(rows, key=lambda inp: (-len(inp), inp))  # longest first, as lm-eval
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for b0 in range(0, len(order), self.batch_size):
            chunk = order[b0 : b0 + self.batch_size]
            tokens = torch.zeros(len(chunk), len(chunk[0]), dtype=torch.long)
            select = torch.zeros_like(tokens, dtype=torch.bool)
            first = []  # per row: the first position whose logits are needed
            for b, inp in enumerate(chunk):
                tokens[b, : len(inp)] = torch.tensor(inp)
                first.append(min(starts[i] for i in rows[inp]) - 1)
                select[b, first[-1] : len(inp)] = True
            logits = self.engine.logits(tokens, select)  # (scored positions, vocab)
            offset = 0
            for b, inp in enumerate(chunk):
                n = len(inp) - first[b]
                row = torch.log_softmax(logits[offset : offset + n], dim=-1)  # one row's copy
                offset += n
                for i in rows[inp]:
                    picked = row[starts[i] - 1 - first[b] :]
                    target = torch.tensor(wholes[i][starts[i] :], device=picked.device)
                    lp = picked.gather(1, target.unsqueeze(1))
                    greedy = not bool((picked > lp).any())  # rank 1 at every token
                    results[i] = (float(lp.double().sum()), greedy)
                    key = requests[i][0]
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, results[i])
                bar.update(len(rows[inp]))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood: every token scored once, in lm-eval's disjoint windows
        of ``max_length`` tokens (the first conditioned on BOS, each later one on as many
        tokens before it as fit). lm-eval's hf model, on a tokenizer that adds BOS (Llama 3's),
        scores BOS + the text's ids after another BOS: a BOS-after-BOS term, and the text
        conditioned on two BOS tokens."""
        windows: list[Request] = []
        owner: list[int] = []
        for n, (text,) in enumerate(
            tqdm([r.args for r in requests], disable=disable_tqdm, desc="Rolling windows")
        ):
            for context, pred in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, pred))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(
            owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm), strict=True
        ):
            totals[n] += lp
        for r, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    # ---------------------------------------------------------------------------- generation
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Complete each context until one of its ``until`` strings (cut off, as lm-eval
        does), a stop token or ``max_gen_toks``; greedy unless ``do_sample``. The context
        keeps its last ``max_length - max_gen_toks`` tokens."""
        prompts, params = [], []
        for i, r in enumerate(requests):
            context, gen_kwargs = r.args
            p = self._sampling(gen_kwargs, i)
            budget = self.max_length - p.max_new_tokens
            if budget < 1:
                raise RequestError(
                    f"max_gen_toks={p.max_new_tokens} leaves no room for a prompt in the "
                    f"context of {self.max_length} tokens (max_length)"
                )
            prompts.append(self.tok_encode(context, left_truncate_len=budget))
            params.append(p)
        order = sorted(range(len(requests)), key=lambda i: (-len(prompts[i]), i))
        out: list[str] = [""] * len(requests)
        bar = tqdm(
            total=len(requests), disable=disable_tqdm, desc="Running generate_until requests"
        )
        for b0 in range(0, len(order), self.batch_size):
            chunk = order[b0 : b0 + self.batch_size]
            done = self.engine.generate([prompts[i] for i in chunk], [params[i] for i in chunk])
            for i, completion in zip(chunk, done, strict=True):
                out[i] = completion.text
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
            bar.update(len(chunk))
        bar.close()
        return out

    def _sampling(self, gen_kwargs: Any, index: int) -> SamplingParams:
        """lm-eval's gen_kwargs as the engine's settings: greedy unless ``do_sample``, which
        samples the model's distribution (temperature 1, top_p 1, no top_k) unless told."""
        if not isinstance(gen_kwargs, dict):
            raise RequestError(f"generate_until: gen_kwargs must be a dict, got {gen_kwargs!r}")
        if gen_kwargs.get("do_sample") and "temperature" not in gen_kwargs:
            gen_kwargs = {**gen_kwargs, "temperature": 1.0}  # said here, not warned about
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            hint = " (use max_gen_toks)" if "max_length" in unknown else ""
            raise RequestError(
                f"generate_until: unsupported gen_kwargs {', '.join(unknown)}{hint}; camelid "
                f"understands {', '.join(GEN_KWARGS)}"
            )
        until = kwargs["until"]
        if isinstance(until, str):
            until = [until]
        if not all(isinstance(s, str) for s in until):
            raise RequestError(f"generate_until: until must be strings, got {until!r}")
        temperature = 0.0
        if kwargs["do_sample"]:
            temperature = float(kwargs["temperature"])
            if not temperature > 0:
                raise RequestError(
                    f"generate_until: do_sample=True needs a temperature > 0, got {temperature}"
                )
        seed = kwargs.get("seed", self.seed)
        if seed is not None and not _is_int(seed):
            raise RequestError(f"generate_until: invalid seed={seed!r}: must be an integer")
        return SamplingParams(  # checks each value's type and range, naming the field
            max_new_tokens=kwargs["max_gen_toks"],
            temperature=temperature,
            top_p=kwargs.get("top_p", 1.0),
            top_k=kwargs.get("top_k", 0),
            min_p=kwargs.get("min_p", 0.0),
            repetition_penalty=kwargs.get("repetition_penalty", 1.0),
            seed=None if seed is None else derive_seed(seed, index),
            stop=tuple(s for s in until if s),
        )

    # --------------------------------------------------------------------------------- chat
    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer by what it does (its digest): lm-eval keys cached chat prompts
        on it."""
        return f"camelid-{self.tokenizer.digest[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's chat format as the Jinja template ``transformers`` would read (for
        lm-eval's record of the run); None when not asked for."""
        if not chat_template:
            return None
        fmt = find_chat_format(self.tokenizer.special_tokens)
        if fmt is None:
            raise TokenizerError(
                f"--apply_chat_template: {self.tokenizer.source} has no chat format (no chat "
                "header tokens)"
            )
        return fmt.jinja()

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation in the model's chat format, as text. Without
        ``add_generation_prompt`` the last message is left open (no end of turn), as
        ``transformers``' ``continue_final_message``: lm-eval's prefix for the answer."""
        self.chat_template(True)  # a tokenizer without a chat format: one clear error
        fmt = find_chat_format(self.tokenizer.special_tokens)
        pieces = chat_pieces(fmt, chat_history, add_generation_prompt)
        if not add_generation_prompt and chat_history and pieces[-1].text == fmt.eot:
            pieces = pieces[:-1]
        return "".join(p.text for p in pieces)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in its results' config."""
        model = self.engine.model
        return {
            "model_num_parameters": sum(p.numel() for p in model.parameters()),
            "model_dtype": str(self.engine.dtype).removeprefix("torch."),
            "model_device": str(self.engine.device),
            "max_length": self.max_length,
            "tokenizer_digest": self.tokenizer.digest,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
    """An integer, or lm-eval's "auto" / "auto:N" (camelid probes nothing: that means
    ``max_batch_size``, or 16)."""
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return int(max_batch_size or DEFAULT_BATCH)
    try:
        size = int(batch_size)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or isinstance(batch_size, bool | float):
        raise RequestError(f"invalid batch_size={batch_size!r}: a positive integer or auto")
    return size


def _device(device: str | None) -> str:
    """lm-eval's device name as camelid's; a CUDA device without CUDA falls back to the CPU."""
    if device is None or device == "auto":
        return "auto"
    name = str(device)
    if name.startswith("cuda") and not torch.cuda.is_available():
        _log(
            f"camelid: device {name} (lm-eval's default without --device) has no CUDA here; "
            "using the CPU"
        )
        return "cpu"
    return name


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's command line (``run ...``, ``ls ...``, or its legacy form without a
    subcommand) with "camelid" registered; returns its exit status."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _run_as_script(run: Callable[[], int]) -> int:
    """``python -m camelid.eval.harness``: errors a user can cause as one line, exit 1."""
    try:
        return run()
    except CamelidError as e:
        print(f"camelid: error: {e}", file=sys.stderr)
        return 1


__all__ = ["CamelidLM", "main"]

if __name__ == "__main__":
    sys.exit(_run_as_script(main))
