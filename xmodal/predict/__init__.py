"""Tiled, georeferenced prediction of whole scenes with any exported segmenter (``xmodal predict``).

:mod:`.model` finds the checkpoint, its segmenter export and how its training data was prepared;
:mod:`.windows` lays overlapping windows over scenes and prepares them as training did;
:mod:`.outputs` blends window predictions on disk and writes the GeoTIFFs, previews and scores;
:mod:`.run` checks a request, runs Ray Data batch inference (or the plain path) and writes
``predict.json``.
"""

from xmodal.predict.run import PredictSettings, predict

__all__ = ["PredictSettings", "predict"]
