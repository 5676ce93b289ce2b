"""The Llama transformer (dense, or with Llama 4 MoE layers): plain PyTorch, no I/O.

Block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``. Attention is grouped-query with RoPE
through ``scaled_dot_product_attention``; the FFN is SwiGLU, or on the MoE layers of an MoE
config (``ModelConfig.is_moe_layer``) the mixture of experts of :mod:`camelid.model.moe`. The
q/k/v projections are fused into one ``wqkv`` matrix, so one matmul and one RoPE pass serve all
three; the mapping to the separate Hugging Face tensors lives in ``camelid.weights.hf``. The
model computes no loss: given a ``head`` callable it returns ``head(hidden, output_weight)``
instead of the logits, which is how ``camelid.loss`` fuses the head with the cross-entropy.
Given a :class:`KVCache`, attention writes each token's keys and values into it at the token's
position and attends over everything cached so far (prefill and decode are the same code).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from camelid.config import ModelConfig
from camelid.model.moe import MoE
from camelid.model.ops import (
    lean_autograd,
    recompute_saved,
    rms_norm,
    rms_norm_reference,
    rope_qkv,
    swiglu,
    swiglu_reference,
)
from camelid.model.rope import apply_rope, inv_frequencies, rope_cos_sin


class RMSNorm(nn.Module):
    """RMS norm computed in fp32, cast back to the input dtype, then scaled (as HF and Meta do)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # in training, saves x and rstd only

    def recompute(self, x: torch.Tensor) -> torch.Tensor:
        """This norm's output for ``x`` again, bit-identical (for :func:`recompute_saved`)."""
        return rms_norm_reference(x, self.weight, self.eps)


class KVCache:
    """Preallocated keys and values for every layer, each (batch, kv_heads, max_len, head_dim).

    Row ``b`` of the cache belongs to row ``b`` of the tokens passed with it. A token at
    position ``p`` writes slot ``p`` and attends to slots ``0..p`` of its row, so a row can be
    reused for a new sequence without clearing it: slots are always written before they are read.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.batch_size, self.max_len = batch_size, max_len

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows ``start:stop`` (writes go to this cache)."""
        view = object.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.batch_size, view.max_len = stop - start, self.max_len
        return view

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# What one layer's attention needs of a KVCache: its key and value buffers, the (rows, :,
# positions) index the new tokens are written at, the visibility mask (B, 1, group * T,
# kv_len) (the query heads of a kv group folded into the query axis) and how many slots to read.
_LayerCache = tuple[torch.Tensor, torch.Tensor, tuple, torch.Tensor, int]


class Attention(nn.Module):
    """Grouped-query attention, with Llama 4's per-layer variants (FIELD-NOTES §2) when the
    config asks: a NoPE layer (``config.is_nope_layer``) skips RoPE, attends causally over the
    whole context and, with ``attn_temperature_tuning``, scales q by ``1 + attn_scale *
    ln(floor((pos + 1) / floor_scale) + 1)`` at absolute position pos; a RoPE layer attends
    within blocks of ``attention_chunk_size`` tokens (query i sees key j iff j <= i and
    i // C == j // C) and, with ``use_qk_norm``, RMS-normalises q and k per head after RoPE
    (no learnable weight). A dense Llama config turns all of these off."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
        )
        q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.wqkv = nn.Linear(config.dim, q + 2 * kv, bias=config.attention_bias)
        self.wo = nn.Linear(q, config.dim, bias=config.attention_bias)
        self.use_rope = not config.is_nope_layer(layer)
        self.chunk_size = config.attention_chunk_size if self.use_rope else None
        self.qk_norm_eps = config.norm_eps if config.use_qk_norm and self.use_rope else None
        self.temperature = (
            (config.attn_scale, config.floor_scale)
            if config.attn_temperature_tuning and not self.use_rope
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: _LayerCache | None = None,
        pos: torch.Tensor | None = None,
        doc_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``pos``: the tokens' absolute positions, (T,) or (B, T); needed only by the Llama 4
        variants (chunks, temperature) and 0..T-1 when not given. ``doc_mask`` (B, T, T): which
        keys each query may see in a packed row (causal within its own document), replacing
        the plain causal mask; chunking still applies, on the positions within a document."""
        B, T, _ = x.shape
        H, K = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(B, T, H + 2 * K, self.head_dim)
        if self.use_rope and lean_autograd(qkv):  # training: q, k and v in one new tensor
            q, k, v = rope_qkv(qkv, cos, sin, H + K).split((H, K, K), dim=2)
        else:
            if self.use_rope:  # one pass for q and k
                q, k = apply_rope(qkv[:, :, : H + K], cos, sin).split((H, K), dim=2)
            else:
                q, k = qkv[:, :, :H], qkv[:, :, H : H + K]
            v = qkv[:, :, H + K :]
        if self.qk_norm_eps is not None:
            q = F.rms_norm(q.float(), (self.head_dim,), eps=self.qk_norm_eps).to(x.dtype)
            k = F.rms_norm(k.float(), (self.head_dim,), eps=self.qk_norm_eps).to(x.dtype)
        if (self.temperature is not None or self.chunk_size) and pos is None:
            pos = torch.arange(T, device=x.device)
        if self.temperature is not None:
            attn_scale, floor_scale = self.temperature
            scale = torch.log1p(torch.floor((pos.float() + 1.0) / floor_scale)) * attn_scale + 1.0
            q = (q * scale.expand(B, T)[..., None, None]).to(x.dtype)
        # (B, heads, T, head_dim); query head h reads kv head h // (n_heads // n_kv_heads).
        q = q.transpose(1, 2)
        if cache is None and self.chunk_size and T > 1:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            p = pos.expand(B, T)
            chunk = torch.div(p, self.chunk_size, rounding_mode="floor")
            mask = (p[:, None, :] <= p[:, :, None]) & (chunk[:, None, :] == chunk[:, :, None])
            if doc_mask is not None:
                mask = mask & doc_mask
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.unsqueeze(1), enable_gqa=K != H
            )
        elif cache is None and doc_mask is not None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=doc_mask.unsqueeze(1), enable_gqa=K != H
            )
        elif cache is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=K != H)
        else:
            k_buf, v_buf, index, mask, kv_len = cache
            k_buf[index] = k  # slots (row, position) <- (B, T, K, head_dim)
            v_buf[index] = v
            # The H // K query heads of a group share one kv head: fold the group into the
            # query axis, (B, K, group * T, head_dim), so the cache is read once per kv head
            # and never expanded to H heads.
            q = q.reshape(B, K, -1, self.head_dim)
            k, v = k_buf[:B, :, :kv_len], v_buf[:B, :, :kv_len]
            if T == 1:  # decoding: a few query rows, where plain math beats the fused kernels
                scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
                probs = scores.masked_fill(~mask, -math.inf).softmax(-1, dtype=torch.float32)
                y = probs.to(q.dtype) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            y = y.view(B, H, T, self.head_dim)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1(x)) * w3(x))`` (w1 is HF's gate_proj, w3 its up_proj)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Kept as two matmuls: on CPU a fused gate/up matmul measured slower (wider outputs).
        self.w1 = nn.Linear(config.dim, config.ffn_hidden_dim, bias=config.mlp_bias)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden_dim, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.ffn_hidden_dim, config.dim, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            # Training saves w1's and w3's outputs only: silu and the product w2 reads are
            # recomputed from them in backward (camelid.model.ops).
            a, b = self.w1(x), self.w3(x)
            p = swiglu(a, b)
            with recompute_saved(p, lambda: swiglu_reference(a, b)):
                return self.w2(p)
        # Inference: work in place in w1's output instead of allocating two more buffers
        # (measurably faster on CPU); autograd forbids it in training, where silu needs its input.
        return self.w2(F.silu(self.w1(x), inplace=True).mul_(self.w3(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward: FeedForward | MoE = (
            MoE(config) if config.is_moe_layer(layer) else FeedForward(config)
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: _LayerCache | None = None,
        pos: torch.Tensor | None = None,
        doc_mask: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # In training the norms' outputs are not saved by the projections that read them:
        # rebuilt from x (and h), which the norms save, when backward needs them.
        n = self.attention_norm(x)
        with recompute_saved(n, lambda: self.attention_norm.recompute(x)):
            h = x + self.attention(n, cos, sin, cache, pos, doc_mask)
        n = self.ffn_norm(h)
        with recompute_saved(n, lambda: self.ffn_norm.recompute(h)):
            if valid is not None and isinstance(self.feed_forward, MoE):
                return h + self.feed_forward(n, valid)
            return h + self.feed_forward(n)


class Transformer(nn.Module):
    """A Llama model. ``model(tokens)`` maps ids (B, T) to logits (B, T, vocab).

    Build it on the meta device (``with torch.device("meta"):``) to get shapes and counts without
    allocating weights; ``to_empty(device=...)``, ``tie_weights()`` then ``init_weights()`` or a
    checkpoint load makes it real.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        # RoPE frequencies stay fp32 whatever dtype the model is cast to, so they are kept out
        # of the module's buffers and moved to the input's device on first use.
        self._inv_freq = inv_frequencies(config)
        self.init_weights()

    @classmethod
    def empty(
        cls,
        config: ModelConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Transformer:
        """The model with uninitialised storage on ``device``: for weights about to be copied
        in (a checkpoint, a gathered state dict), without the cost of a random init. Built on
        the meta device, allocated once, the tie restored."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype).to_empty(device=device)
        model.tie_weights()
        model._reset_selection_bias()  # state, not weights: an HF checkpoint has none
        return model

    @torch.no_grad()
    def _reset_selection_bias(self) -> None:
        """MoE selection biases start neutral (zero) and their step accumulators empty, all in
        fp32 whatever dtype the model was cast to (a bias moved by 1e-3 steps needs it)."""
        for module in self.modules():
            if isinstance(module, MoE):
                for name, buf in module.named_buffers(recurse=False):
                    dtype = torch.long if name == "tokens_seen" else torch.float32
                    setattr(module, name, torch.zeros(buf.shape, dtype=dtype, device=buf.device))

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config ties them. Called again
        after ``to_empty``, which re-creates each module's parameters and so undoes the tie."""
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_plan(self, std: float = 0.02) -> Iterator[tuple[str, str, float]]:
        """How each parameter is initialised for training from scratch, in a fixed order:
        ``(name, "normal" | "ones" | "zeros", std)``. A tied head appears once.

        Embedding and every linear weight ~ N(0, std); the projections that write into the
        residual stream (``wo``, ``w2`` and the experts' ``w2``) use std / sqrt(2 · n_layers) so
        the residual's variance does not grow with depth (GPT-2's scheme); biases 0, norm
        weights 1. The plan is data, so a sharded model (``camelid.train.parallelize``) draws
        the same values.
        """
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        residual = ("wo.weight", "w2.weight", "experts.w2")
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                yield name, "zeros", 0.0
            elif p.ndim == 1:  # RMSNorm weights
                yield name, "ones", 0.0
            else:
                yield name, "normal", residual_std if name.endswith(residual) else std

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Initialise in place by :meth:`init_plan` (the global RNG unless ``generator``)."""
        params = dict(self.named_parameters())
        for name, kind, s in self.init_plan(std):
            p = params[name]
            if kind == "normal":
                p.normal_(0.0, s, generator=generator)
            else:
                p.fill_(1.0 if kind == "ones" else 0.0)
        self._reset_selection_bias()

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        kv_len: int | None = None,
        last_only: bool = False,
        head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for ``tokens`` (B, T).

        ``input_pos`` gives each token's absolute position, (T,) or (B, T); by default 0..T-1.
        Without a cache, attention is causal within the given tokens. With ``cache``, row b's
        tokens are written into cache row b at their positions and attend to the cached slots
        at or before their own position; ``kv_len`` (default: the whole cache) bounds the slots
        read, so eager decoding reads only what is filled while a compiled step keeps static
        shapes. ``last_only`` returns the logits of the last position only, (B, 1, vocab): all
        a generation prefill needs. ``head`` replaces the output projection: the result is
        ``head(h, output_weight)`` for the final normed hidden state h (B, T, dim), e.g. a loss
        fused with the projection (``camelid.loss.next_token_loss``).

        ``doc_ids`` (B, T) packs several documents into one row (training, no cache): a token
        attends only to earlier tokens with the same id, so nothing crosses a document
        boundary; pass ``input_pos`` restarting at 0 for each document, and the row computes
        what the documents would on their own. Ids need only differ between neighbours; a
        negative id is padding, which an MoE layer routes but leaves out of its load statistics
        and router losses (``camelid.model.moe.MoE``).
        """
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        if self._inv_freq.device != tokens.device:
            self._inv_freq = self._inv_freq.to(tokens.device)
        h = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(self._inv_freq, input_pos, h.dtype)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        if cache is None:
            doc_mask = valid = None
            if doc_ids is not None:
                causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
                doc_mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
                if self.config.is_moe:
                    valid = (doc_ids >= 0).reshape(-1)  # padding: left out of MoE statistics
            for layer in self.layers:
                h = layer(h, cos, sin, None, input_pos, doc_mask, valid)
        else:
            if doc_ids is not None:
                raise ValueError("doc_ids (packed documents) is for training, not a KV cache")
            kv_len = cache.max_len if kv_len is None else kv_len
            pos = input_pos.expand(B, T)
            rows = torch.arange(B, device=tokens.device).unsqueeze(1)
            index = (rows, slice(None), pos)
            slots = torch.arange(kv_len, device=tokens.device)
            group = self.config.n_heads // self.config.n_kv_heads

            def grouped(mask: torch.Tensor) -> torch.Tensor:  # (B, T, kv_len) -> (B, 1, gT, kv)
                return mask.unsqueeze(1).expand(B, group, T, kv_len).reshape(B, 1, -1, kv_len)

            causal = slots <= pos.unsqueeze(-1)
            mask = grouped(causal)
            chunk = self.config.attention_chunk_size
            chunked = mask
            if chunk and any(layer.attention.chunk_size for layer in self.layers):
                same = (slots // chunk) == torch.div(pos, chunk, rounding_mode="floor")[..., None]
                chunked = grouped(causal & same)
            for layer, k_buf, v_buf in zip(self.layers, cache.k, cache.v, strict=True):
                m = chunked if layer.attention.chunk_size else mask
                h = layer(h, cos, sin, (k_buf, v_buf, index, m, kv_len), input_pos)
        h = self.norm(h)
        if head is not None:
            return head(h, self.output.weight)
        return self.output(h[:, -1:] if last_only else h)

    def num_params(self) -> int:
        """Parameters actually held (a tied head is counted once)."""
        return sum(p.numel() for p in self.parameters())
