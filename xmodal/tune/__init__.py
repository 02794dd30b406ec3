"""Sweeps layer: sweep configs (:mod:`.spec`, no Ray) and the Ray Tune + Optuna engine (:mod:`.sweep`)."""
