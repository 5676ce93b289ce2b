"""Model definitions: pure ``nn.Module`` code that depends only on :mod:`camelid.config`."""

from camelid.model.transformer import Transformer

__all__ = ["Transformer"]
