"""Scaling laws: IsoFLOP sweeps of small runs, Chinchilla's approaches 2 and 3, Llama 3's compute-optimal
token law, and two-step prediction of a benchmark's accuracy (docs/scaling.md)."""

from llamaherd.scaling.laws import (
    CHINCHILLA,
    LLAMA3,
    ParametricLaw,
    PowerLaw,
    Run,
    ScalingWarning,
    TokenLaw,
    fit_isoflop,
    fit_parametric,
    fit_sweep,
    optimal,
)

__all__ = ["CHINCHILLA", "LLAMA3", "ParametricLaw", "PowerLaw", "Run", "ScalingWarning", "TokenLaw", "fit_isoflop",
           "fit_parametric", "fit_sweep", "optimal"]
