"""Data layer: tiles, band metadata, readers, synthetic world, tile store, Ray Data pipeline."""
