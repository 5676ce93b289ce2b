"""Model definitions: pure ``nn.Module`` code that depends only on :mod:`camelid.config`."""

from camelid.model.transformer import KVCache, Transformer

__all__ = ["KVCache", "Transformer"]
