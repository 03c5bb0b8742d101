"""`hvsim sweep`: a grid of runs from a TOML spec, run locally or on a Dask cluster, tabulated with pandas."""
