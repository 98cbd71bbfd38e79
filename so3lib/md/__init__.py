"""Molecular dynamics with trained potentials: on-device (jax-md) engine, stability analysis."""
from so3lib.md.engine import MDBlowUp, MDConfig, MDResult, run_md

__all__ = ["MDBlowUp", "MDConfig", "MDResult", "run_md"]
