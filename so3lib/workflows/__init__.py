"""Workflows: the benchmarks and studies behind the ``so3lib`` command, as library functions with typed options.

- `train` (any files), `md17` (the rMD17/MD17 protocol), `spice` (the SPICE benchmark), `sweeps` (ablations),
  `md_report` (MD with a stability report), `predict` (a run evaluated on a file), `inspect`, `descriptors`.
Each module has an ``Options`` model (the command's options, with the defaults it really uses) and a ``run``
function; front ends (`so3lib.cli`, ``experiments/``) only parse, call and print.
"""
