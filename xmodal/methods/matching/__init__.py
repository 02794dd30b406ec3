"""matching: semi-supervised SAR-optical patch matching with adversarial autoencoders (paper 004). See :mod:`.method` and :mod:`.search`."""

from xmodal.methods.matching.method import AdversarialMatching, MatchingSettings
from xmodal.methods.matching.search import correspondence_map, crop, error_statistics, peak, window_count

__all__ = ["AdversarialMatching", "MatchingSettings", "correspondence_map", "crop", "error_statistics", "peak", "window_count"]
