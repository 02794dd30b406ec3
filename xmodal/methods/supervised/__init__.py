"""supervised: the baselines every pretext method is compared with. See :mod:`.method`."""

from xmodal.methods.supervised.method import Supervised, SupervisedSettings

__all__ = ["Supervised", "SupervisedSettings"]
