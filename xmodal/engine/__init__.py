"""Engine layer: Ray Train loop, checkpoints, experiment runner, Ray Tune sweeps, benchmarks."""
