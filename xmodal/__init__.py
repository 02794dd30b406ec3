"""xmodal: optical-to-SAR cross-modal pretext training on Ray.

Layers, each importing only those before it (``tests/test_layers.py`` checks the source)::

    data -> models -> losses -> methods -> figures -> engine -> tune -> report -> bench -> cli
"""

__version__ = "0.1.0"
