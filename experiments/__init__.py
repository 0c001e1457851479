"""Scripts around cmix_jax (studies, sweeps, benchmarks, drills); run `python -m experiments.NAME`."""
