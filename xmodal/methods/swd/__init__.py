"""swd: EO -> SAR few-shot transfer with sliced Wasserstein alignment (paper 002). See :mod:`.method`."""

from xmodal.methods.swd.method import SlicedWassersteinTransfer, SwdSettings

__all__ = ["SlicedWassersteinTransfer", "SwdSettings"]
