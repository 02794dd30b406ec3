"""kd: cross-modal knowledge distillation as a pretext task (paper 000). See :mod:`.method` and :mod:`.paper`."""

from xmodal.methods.kd.method import KdSettings, KnowledgeDistillation, default_switch_epochs, reachable_parameters
from xmodal.methods.kd.paper import PAPER_TABLE, classify_run, column_of

__all__ = ["PAPER_TABLE", "KdSettings", "KnowledgeDistillation", "classify_run", "column_of", "default_switch_epochs", "reachable_parameters"]
