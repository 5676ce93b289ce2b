"""Data: corpus sources, cleaning, dedup, token shards (``prepare``) and the pre-training loader."""

from camelid.data.clean import CleanConfig
from camelid.data.loader import TokenLoader, read_manifest
from camelid.data.pipeline import PrepareConfig, prepare

__all__ = ["CleanConfig", "PrepareConfig", "TokenLoader", "prepare", "read_manifest"]
