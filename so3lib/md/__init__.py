"""Molecular dynamics with trained potentials: on-device (jax-md) engine, stability analysis (loaded on first use)."""

from so3lib._lazy import lazy_attributes

_WHERE = {name: "so3lib.md.engine" for name in ("MDBlowUp", "MDConfig", "MDResult", "run_md")}
__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
__all__ = list(_WHERE)
