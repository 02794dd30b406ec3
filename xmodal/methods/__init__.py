"""Methods layer: one module per method (its losses, its steps, its defaults), found by registry.

A method never imports Ray: the engine hands it a :class:`~xmodal.methods.base.MethodContext`
with the device and a ``prepare_module`` callable (DDP wrapping) instead.
"""

from xmodal.methods.base import METHODS, DataSpec, EvalResult, Export, Method, MethodContext, get_method, register_method

__all__ = ["METHODS", "DataSpec", "EvalResult", "Export", "Method", "MethodContext", "get_method", "register_method"]
