"""xmodal: optical-to-SAR cross-modal pretext training on Ray.

Layers, each importing only those before it::

    data -> models -> methods -> engine -> cli
"""

__version__ = "0.1.0"
