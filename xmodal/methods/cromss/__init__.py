"""cromss: cross-modal sample selection for pretraining on noisy labels (paper 003). See :mod:`.method` and :mod:`.paper`."""

from xmodal.methods.cromss.method import CromssSettings, CrossModalSampleSelection
from xmodal.methods.cromss.paper import PAPER_TABLES, classify_run, pretraining_row

__all__ = ["PAPER_TABLES", "CromssSettings", "CrossModalSampleSelection", "classify_run", "pretraining_row"]
