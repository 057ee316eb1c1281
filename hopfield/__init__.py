"""Modern Hopfield networks as pure JAX functions (IST DL 2024-25, Homework 2, Question 1)."""

from hopfield.attention import cccp_step_batch, cross_attention, jax_attention
from hopfield.cccp import Retrieval, cccp_retrieve, cccp_step
from hopfield.classic import ClassicRetrieval, binary_sign, classic_retrieve, classic_step, classic_weights
from hopfield.derivatives import (
    attention_weights,
    grad_energy_convex,
    grad_neg_energy_concave,
    hessian_energy_convex,
    hessian_neg_energy_concave,
)
from hopfield.energy import energy, energy_concave, energy_convex, lse, max_norm
from hopfield.layers import (
    Hopfield,
    HopfieldLayer,
    HopfieldPooling,
    hopfield_iterate,
    hopfield_update,
    hopfield_weights,
    masked_softmax,
)

__all__ = [
    "ClassicRetrieval",
    "Hopfield",
    "HopfieldLayer",
    "HopfieldPooling",
    "Retrieval",
    "attention_weights",
    "binary_sign",
    "cccp_retrieve",
    "cccp_step",
    "cccp_step_batch",
    "classic_retrieve",
    "classic_step",
    "classic_weights",
    "cross_attention",
    "energy",
    "energy_concave",
    "energy_convex",
    "jax_attention",
    "grad_energy_convex",
    "grad_neg_energy_concave",
    "hessian_energy_convex",
    "hessian_neg_energy_concave",
    "hopfield_iterate",
    "hopfield_update",
    "hopfield_weights",
    "lse",
    "masked_softmax",
    "max_norm",
]
