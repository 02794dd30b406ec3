"""Command-line interface: ``xmodal data|train|run|demo|bench|report|sweep``."""
