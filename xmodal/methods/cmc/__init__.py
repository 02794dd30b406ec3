"""cmc: contrastive multiview coding across SAR, optical and label-mask views (paper 001). See :mod:`.method` and :mod:`.paper`."""

from xmodal.methods.cmc.method import CmcNetwork, CmcSettings, ContrastiveMultiview, encode_mask
from xmodal.methods.cmc.paper import PAPER_TABLES, classify_run, source_row

__all__ = ["PAPER_TABLES", "CmcNetwork", "CmcSettings", "ContrastiveMultiview", "classify_run", "encode_mask", "source_row"]
