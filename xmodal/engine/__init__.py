"""Engine layer: set-up and checks, the training loop both engines run, the Ray Train worker and
runner, the plain (no Ray) engine, phase chains, run results, collectives, the Ray session.

Modules: :mod:`.config` (experiment configs), :mod:`.setup` (data as a method needs it, the tested-
weights tracker), :mod:`.training` (the epoch loop), :mod:`.loop` (Ray Train worker), :mod:`.runner`
(Ray runs), :mod:`.plain` (the same without Ray), :mod:`.chain` (phase chains), :mod:`.results`
(``run.json``, panels, artifacts), :mod:`.collectives` (``all_gather`` / ``all_reduce``),
:mod:`.session` (``ray.init``), :mod:`.storage` (local or object-store paths).
"""
