"""Data: corpus sources, cleaning, dedup, token shards (``prepare``), the pre-training loader,
and SFT data (``prepare_sft``: conversations with a loss mask) with its packing loader."""

from camelid.data.clean import CleanConfig
from camelid.data.loader import TokenLoader, read_manifest
from camelid.data.packing import SFTData, SFTLoader
from camelid.data.pipeline import PrepareConfig, prepare
from camelid.data.sft import SFTConfig, prepare_sft

__all__ = [
    "CleanConfig",
    "PrepareConfig",
    "SFTConfig",
    "SFTData",
    "SFTLoader",
    "TokenLoader",
    "prepare",
    "prepare_sft",
    "read_manifest",
]
