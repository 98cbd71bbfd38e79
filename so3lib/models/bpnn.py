"""Behler–Parrinello network: atom-centred symmetry functions (MODELS.md) and one MLP per element.

Cutoff f_c(R) = 0.5 [cos(πR/R_c) + 1] (R ≤ R_c). For centre i with neighbours j, k:
  G1 = Σ_j f_c(R_ij)                G2 = Σ_j exp(−η (R_ij − R_s)²) f_c(R_ij)     G3 = Σ_j cos(κ R_ij) f_c(R_ij)
  G4 = 2^(1−ζ) Σ_{j<k} (1 + λ cos θ_ijk)^ζ exp(−η (R_ij² + R_ik² + R_jk²)) f_c(R_ij) f_c(R_ik) f_c(R_jk)
  G5 = 2^(1−ζ) Σ_{j<k} (1 + λ cos θ_ijk)^ζ exp(−η (R_ij² + R_ik²)) f_c(R_ij) f_c(R_ik)
  ANI (angular, for the `ani` preset, Smith et al. 2017):
       2^(1−ζ) Σ_{j<k} (1 + cos(θ'_ijk − θ_s))^ζ exp(−η ((R_ij + R_ik)/2 − R_s)²) f_c(R_ij) f_c(R_ik),
       θ' = arccos(0.95 cos θ) as in TorchANI (finite gradients at θ = 0, π).
Triplet convention: each unordered neighbour pair {j, k} is counted ONCE (j < k, as in n2p2); Behler's
original double sum over ordered pairs gives exactly twice these values. Radial functions are resolved by the
neighbour's element, angular ones by the unordered element pair (j, k); angular functions use their own cutoff
``cutoff_angular`` ≤ ``cutoff``. Units: η Å⁻², R_s Å, κ Å⁻¹, θ_s rad.

Descriptors are standardised per centre element with training-set mean and standard deviation (stored in the
config), then E = Σ_i NN_{Z_i}(Ĝ_i); the per-element reference and scale/shift come from the potential layer.
"""

from __future__ import annotations

import logging
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from so3lib.graph.geometry import edge_vectors, safe_norm
from so3lib.models.common import ACTIVATIONS, cosine_cutoff
from so3lib.models.registry import ModelConfig, register

log = logging.getLogger(__name__)
RADIAL, ANGULAR = ("G1", "G2", "G3"), ("G4", "G5", "ANI")
# batch keys of the precomputed descriptors (nodes), their edge Jacobians and reference edge vectors (edges)
CACHED_G, CACHED_JACOBIAN, CACHED_VECTORS = "bpnn_descriptors", "bpnn_jacobian", "bpnn_vectors"


class SymmetryFunction(BaseModel):
    """One symmetry function; unused parameters of a kind are ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["G1", "G2", "G3", "G4", "G5", "ANI"]
    eta: float = Field(0.0, ge=0.0, description="Å⁻²")
    rs: float = Field(0.0, ge=0.0, description="Å")
    kappa: float = Field(0.0, ge=0.0, description="Å⁻¹")
    zeta: float = Field(1.0, ge=1.0)
    lam: Literal[-1, 1] = 1
    theta_s: float = Field(0.0, ge=0.0, le=float(np.pi), description="rad")


def _g2_grid(shifts, eta):
    return [SymmetryFunction(kind="G2", eta=float(eta), rs=float(r)) for r in shifts]


def _angular(kind, etas, zetas, lams=(-1, 1)):
    return [
        SymmetryFunction(kind=kind, eta=float(e), zeta=float(z), lam=lam) for e in etas for z in zetas for lam in lams
    ]


def preset(name: str) -> tuple[list[SymmetryFunction], float, float]:
    """(functions, cutoff, angular cutoff) of a named set."""
    if name == "fortnet":  # G2 + G5, Fortnet-style: R_s = 0, η on a geometric grid; G5 with ζ ∈ {1, 2, 4, 16}, λ = ±1
        rc = 6.0
        etas = [(2.0 ** (k / 2) / rc) ** 2 for k in range(8)]
        sfs = [SymmetryFunction(kind="G2", eta=e, rs=0.0) for e in etas] + _angular("G5", [0.01], [1, 2, 4, 16])
        return sfs, rc, rc
    if name == "g2g4g5":  # 12 G2 + 6 G4 + 6 G5, R_c = 8 Å (the set that worked best on Li₂₇)
        rc = 8.0
        shifts = np.linspace(1.0, 7.0, 12)
        eta = 0.5 / (shifts[1] - shifts[0]) ** 2
        return (
            _g2_grid(shifts, eta) + _angular("G4", [0.005], [1, 4, 16]) + _angular("G5", [0.005], [1, 4, 16]),
            rc,
            rc,
        )
    if (
        name == "ani"
    ):  # ANI-1x grid: 16 radial shifts 0.9–4.93 Å, η = 16 (R_c 5.2); 8 sections ζ = 32 × 4 shifts, η = 8 (R_c 3.5)
        rad = _g2_grid(np.linspace(0.9, 4.93125, 16), 16.0)
        ang = [
            SymmetryFunction(kind="ANI", eta=8.0, zeta=32.0, rs=float(rs), theta_s=float(ts))
            for rs in np.linspace(0.9, 2.85, 4)
            for ts in np.pi / 16 + np.arange(8) * np.pi / 8
        ]
        return rad + ang, 5.2, 3.5
    raise ValueError(f"unknown symmetry-function preset '{name}' (fortnet, g2g4g5, ani, auto, custom)")


def auto_set(
    distances: np.ndarray, n_radial: int, n_angular: int, cutoff: float, cutoff_angular: float
) -> list[SymmetryFunction]:
    """Automatic set from the training data's pair distances: G2 shifts at evenly spaced quantiles of the
    distance distribution (shifts go where the neighbours are), widths from the local spacing
    (η = 1/(2Δ²)); G5 functions with η from distance quantiles inside the angular cutoff and ζ/λ cycling
    through the standard set ζ ∈ {1, 2, 4, 16}, λ = ±1."""
    d = np.sort(distances[(distances > 0) & (distances < cutoff)])
    if len(d) < 2:
        raise ValueError("too few pair distances inside the cutoff to choose symmetry functions")
    q = (np.arange(n_radial) + 0.5) / n_radial
    shifts = np.quantile(d, q)
    gaps = np.diff(shifts)
    spacing = (
        np.array([np.mean([gaps[max(k - 1, 0)], gaps[min(k, len(gaps) - 1)]]) for k in range(n_radial)])
        if n_radial > 1
        else np.array([d.std()])
    )
    sfs = [
        SymmetryFunction(kind="G2", eta=float(0.5 / max(s, 0.05) ** 2), rs=float(r)) for r, s in zip(shifts, spacing)
    ]
    da = d[d < cutoff_angular]
    combos = [(z, lam) for z in (1.0, 2.0, 4.0, 16.0) for lam in (1, -1)]
    n_eta = max(1, int(np.ceil(n_angular / len(combos))))
    etas = [float(0.5 / np.quantile(da, (k + 1) / (n_eta + 1)) ** 2) for k in range(n_eta)] if len(da) else [0.01]
    for a in range(n_angular):
        z, lam = combos[a % len(combos)]
        sfs.append(SymmetryFunction(kind="G5", eta=etas[(a // len(combos)) % len(etas)], zeta=z, lam=lam))
    return sfs


@register("bpnn")
class BPNNConfig(ModelConfig):
    name: Literal["bpnn"] = "bpnn"
    cutoff: float = Field(6.0, gt=0.0, le=30.0, description="radial cutoff R_c in Å (presets set their own)")
    cutoff_angular: float | None = Field(None, gt=0.0, description="angular cutoff in Å (default: cutoff)")
    preset: Literal["auto", "fortnet", "g2g4g5", "ani", "custom"] = "auto"
    n_radial: int = Field(12, ge=1, le=256, description="auto set: radial functions")
    n_angular: int = Field(8, ge=0, le=256, description="auto set: angular functions")
    symmetry_functions: list[SymmetryFunction] | None = None
    hidden: tuple[int, ...] = Field((64, 64), description="hidden layer sizes of every element network")
    activation: Literal["tanh", "silu", "ssp", "gelu"] = "tanh"
    standardize: bool = True
    species: list[int] | None = Field(None, description="elements with a network (fitted: training set)")
    precompute_descriptors: bool = Field(
        True,
        description="training: descriptors and their position derivatives computed once per in-memory structure "
        "and reused every step (as n2p2 and ænet do); false: recomputed from the triplets in every step",
    )
    descriptor_mean: list[list[float]] | None = None
    descriptor_std: list[list[float]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if (
            isinstance(data, dict)
            and data.get("preset") in ("fortnet", "g2g4g5", "ani")
            and not data.get("symmetry_functions")
        ):
            sfs, rc, rca = preset(data["preset"])
            data = {**data, "symmetry_functions": [s.model_dump() for s in sfs]}
            data.setdefault("cutoff", rc)
            data.setdefault("cutoff_angular", rca)
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.preset == "custom" and not self.symmetry_functions:
            raise ValueError("preset 'custom' needs symmetry_functions (a list of {kind, eta, rs, kappa, zeta, lam})")
        if self.cutoff_angular is not None and self.cutoff_angular > self.cutoff:
            raise ValueError(f"cutoff_angular ({self.cutoff_angular} Å) must not exceed cutoff ({self.cutoff} Å)")
        return self

    @property
    def triplet_cutoff(self) -> float | None:
        if self.symmetry_functions is not None and not any(s.kind in ANGULAR for s in self.symmetry_functions):
            return None
        return self.cutoff_angular or self.cutoff

    def n_descriptors(self) -> int:
        S = len(self.species or [])
        n_rad = sum(s.kind in RADIAL for s in self.symmetry_functions or [])
        n_ang = sum(s.kind in ANGULAR for s in self.symmetry_functions or [])
        return S * n_rad + S * (S + 1) // 2 * n_ang

    def config_view(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in ("descriptor_mean", "descriptor_std")}

    def readout_params(self) -> tuple[str, ...]:
        """The last layer of every element network (the symmetry functions have no parameters: the hidden
        layers are the learned representation)."""
        n = len(self.hidden)
        return (f"W{n}", f"b{n}", f"Wdev{n}", f"bdev{n}") if self.readout_heads else (f"W{n}", f"b{n}")

    def describe(self) -> str:
        rows = [
            f"{i:3d} {s.kind:3s} eta={s.eta:.4g}/Å² rs={s.rs:.3f} Å kappa={s.kappa:.3g}/Å zeta={s.zeta:g} "
            f"lambda={s.lam:+d} theta_s={s.theta_s:.3f}"
            for i, s in enumerate(self.symmetry_functions or [])
        ]
        return (
            f"BPNN symmetry functions ({self.preset}; R_c {self.cutoff} Å, angular {self.triplet_cutoff} Å; "
            f"elements {self.species}; {self.n_descriptors()} descriptors per atom):\n" + "\n".join(rows)
        )

    def fit(self, dataset) -> BPNNConfig:
        """Species, the automatic set (preset 'auto') and the per-element descriptor statistics."""
        cfg = self
        if cfg.species is None:
            cfg = cfg.replace(species=dataset.species)
        if cfg.symmetry_functions is None:
            from so3lib.graph.batching import NeighbourTable

            sample = dataset.subset(np.linspace(0, len(dataset) - 1, min(len(dataset), 200)).astype(int))
            t = NeighbourTable.build(sample, cfg.cutoff)
            pos = sample.positions
            base = np.repeat(sample.offsets[:-1], t.n_edges)
            cell = np.repeat(sample.cell, t.n_edges, axis=0)
            vec = pos[t.senders + base] - pos[t.receivers + base] + np.einsum("ei,eij->ej", t.shifts, cell)
            sfs = auto_set(
                np.linalg.norm(vec, axis=1), cfg.n_radial, cfg.n_angular, cfg.cutoff, cfg.cutoff_angular or cfg.cutoff
            )
            cfg = cfg.replace(symmetry_functions=[s.model_dump() for s in sfs])
        if cfg.standardize and cfg.descriptor_mean is None:
            mean, std = descriptor_statistics(cfg, dataset)
            cfg = cfg.replace(descriptor_mean=mean.tolist(), descriptor_std=std.tolist())
        if cfg is not self:
            log.info(cfg.describe())
        return cfg

    def build(self) -> nn.Module:
        if self.species is None or self.symmetry_functions is None:
            raise ValueError(
                "BPNN needs species and symmetry functions: call config.fit(training_set) first (the trainer does this)"
            )
        return BPNN(self)


# ---------------------------------------------------------------------------------------------- descriptors
def _params(sfs: list[SymmetryFunction], kinds, dtype):
    sel = [s for s in sfs if s.kind in kinds]
    arr = lambda f: jnp.asarray([f(s) for s in sel], dtype)  # noqa: E731
    return sel, {
        "kind": np.array([kinds.index(s.kind) for s in sel]),
        "eta": arr(lambda s: s.eta),
        "rs": arr(lambda s: s.rs),
        "kappa": arr(lambda s: s.kappa),
        "zeta": arr(lambda s: s.zeta),
        "lam": arr(lambda s: s.lam),
        "theta_s": arr(lambda s: s.theta_s),
    }


def species_lookup(species: list[int]) -> np.ndarray:
    t = np.zeros(119, np.int32)
    t[np.asarray(species)] = np.arange(len(species))
    return t


def _radial_values(p: dict, r: jax.Array, fc: jax.Array) -> jax.Array:
    """(E, n_rad) radial functions of the edge lengths r (E,), cutoff function fc (E,) (0 on padding)."""
    rr = r[:, None]
    kind = p["kind"][None, :]
    kinds = set(p["kind"].tolist())
    g2 = jnp.exp(-p["eta"] * (rr - p["rs"]) ** 2) if 1 in kinds else 0.0
    g3 = jnp.cos(p["kappa"] * rr) if 2 in kinds else 0.0
    return jnp.where(kind == 0, 1.0, jnp.where(kind == 1, g2, g3)) * fc[:, None]


def _angular_values(
    p: dict, v1: jax.Array, v2: jax.Array, r1: jax.Array, r2: jax.Array, tmask: jax.Array, rca: float
) -> jax.Array:
    """(T, n_ang) angular functions of the triplets' edge vectors v1, v2 (T, 3) and lengths r1, r2 (T,); only
    the kinds present are evaluated."""
    kinds = set(p["kind"].tolist())
    ok = tmask & (r1 > 0) & (r2 > 0)
    cos = jnp.where(ok, jnp.sum(v1 * v2, -1) / jnp.where(ok, r1 * r2, 1.0), 0.0)[:, None]
    f1, f2 = (cosine_cutoff(x, rca)[:, None] for x in (r1, r2))
    zeta, lam, eta = p["zeta"], p["lam"], p["eta"]
    norm = 2.0 ** (1.0 - zeta)
    g4 = g5 = gani = 0.0
    if kinds & {0, 1}:
        base = jnp.maximum(1.0 + lam * cos, 0.0)
        g45 = norm * base**zeta * f1 * f2
        if 0 in kinds:
            r3 = safe_norm(v2 - v1, tmask)
            f3 = cosine_cutoff(r3, rca)[:, None]
            g4 = g45 * jnp.exp(-eta * (r1[:, None] ** 2 + r2[:, None] ** 2 + r3[:, None] ** 2)) * f3
        if 1 in kinds:
            g5 = g45 * jnp.exp(-eta * (r1[:, None] ** 2 + r2[:, None] ** 2))
    if 2 in kinds:
        theta = jnp.arccos(0.95 * cos)
        gani = (
            norm
            * (1.0 + jnp.cos(theta - p["theta_s"])) ** zeta
            * jnp.exp(-eta * (0.5 * (r1 + r2)[:, None] - p["rs"]) ** 2)
            * f1
            * f2
        )
    kind = p["kind"][None, :]
    return jnp.where(kind == 0, g4, jnp.where(kind == 1, g5, gani)) * ok[:, None]  # (T, n_ang)


def _pair_index(S: int, sj: jax.Array, sk: jax.Array) -> jax.Array:
    """Index of the unordered element pair (sj, sk) in the upper triangle of S × S."""
    lo, hi = jnp.minimum(sj, sk), jnp.maximum(sj, sk)
    return lo * S - lo * (lo - 1) // 2 + (hi - lo)


def descriptors(cfg: BPNNConfig, graph: jraph.GraphsTuple, vec: jax.Array | None = None) -> jax.Array:
    """(N, D) raw descriptors: [radial (S × n_rad, by neighbour element), angular (P × n_ang, by unordered
    element pair)], D = S·n_rad + S(S+1)/2·n_ang. Differentiable in positions and cell. ``vec`` (E, 3): the
    edge vectors (default `edge_vectors(graph)`); row i depends only on the edges whose receiver is i."""
    dt = cfg.jnp_dtype
    sfs = cfg.symmetry_functions
    S = len(cfg.species)
    n_node = graph.nodes["species"].shape[0]
    sidx = jnp.asarray(species_lookup(cfg.species))[graph.nodes["species"]]
    vec = (edge_vectors(graph) if vec is None else vec).astype(dt)
    emask = jraph.get_edge_padding_mask(graph)
    r = safe_norm(vec, emask)
    out = []
    rad, p = _params(sfs, RADIAL, dt)
    if rad:
        val = _radial_values(p, r, cosine_cutoff(r, cfg.cutoff) * emask)  # (E, n_rad)
        seg = graph.receivers * S + sidx[graph.senders]
        out.append(jax.ops.segment_sum(val, seg, num_segments=n_node * S).reshape(n_node, S * len(rad)))
    ang, p = _params(sfs, ANGULAR, dt)
    if ang:
        if "triplets" not in graph.globals:
            raise ValueError("angular symmetry functions need triplets in the batch (build it with triplet_cutoff)")
        rca = cfg.cutoff_angular or cfg.cutoff
        e1, e2 = graph.globals["triplets"][:, 0], graph.globals["triplets"][:, 1]
        val = _angular_values(p, vec[e1], vec[e2], r[e1], r[e2], graph.globals["triplet_mask"], rca)
        centre = graph.receivers[e1]
        pair = _pair_index(S, sidx[graph.senders[e1]], sidx[graph.senders[e2]])
        P = S * (S + 1) // 2
        out.append(jax.ops.segment_sum(val, centre * P + pair, num_segments=n_node * P).reshape(n_node, P * len(ang)))
    return jnp.concatenate(out, axis=1)


def descriptor_statistics(cfg: BPNNConfig, dataset, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(S, D) mean and standard deviation of the raw descriptors per centre element over ``dataset``
    (std < 1e-8 → 1, so absent element combinations stay 0)."""
    from so3lib.graph.batching import GraphLoader

    cfg64 = cfg.replace(dtype="float64") if jax.config.jax_enable_x64 else cfg
    loader = GraphLoader(
        dataset,
        cfg.cutoff,
        batch_size,
        shuffle=False,
        triplet_cutoff=cfg.triplet_cutoff,
        dtype=np.float64 if cfg64.dtype == "float64" else np.float32,
    )
    fn = jax.jit(lambda g: descriptors(cfg64, g))
    S = len(cfg.species)
    D = cfg.n_descriptors()
    s1, s2, n = np.zeros((S, D)), np.zeros((S, D)), np.zeros(S)
    lookup = species_lookup(cfg.species)
    for g in loader.epoch(0):
        G = np.asarray(fn(g), np.float64)
        mask = np.asarray(jraph.get_node_padding_mask(g))
        z = lookup[np.asarray(g.nodes["species"])[mask]]
        G = G[mask]
        np.add.at(s1, z, G)
        np.add.at(s2, z, G**2)
        np.add.at(n, z, 1)
    n = np.maximum(n, 1)[:, None]
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return mean, np.where(std > 1e-8, std, 1.0)


class BPNN(nn.Module):
    """GraphsTuple (+ triplets) → per-atom energies (N,): E_i = NN_{Z_i}(Ĝ_i), one MLP per element."""

    config: BPNNConfig

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple) -> jax.Array:
        c = self.config
        dt = c.jnp_dtype
        sidx = jnp.asarray(species_lookup(c.species))[graph.nodes["species"]]
        if CACHED_G in graph.nodes:  # descriptors and their derivatives precomputed once (so3lib.models.bpnn_cache)
            from so3lib.models.bpnn_cache import cached_descriptors

            G = cached_descriptors(graph)
        else:
            G = descriptors(c, graph)
        if c.standardize and c.descriptor_mean is not None:
            mean = jnp.asarray(c.descriptor_mean, dt)[sidx]
            std = jnp.asarray(c.descriptor_std, dt)[sidx]
            G = (G - mean) / std
        S = len(c.species)
        h = G
        sizes = tuple(c.hidden) + (1,)
        layer = lambda name, x, width: per_element_dense(self, name, x, sidx, S, width, dt)  # noqa: E731
        for li, width in enumerate(sizes[:-1]):
            h = ACTIVATIONS[c.activation](layer(str(li), h, width))
        n = len(sizes) - 1
        if c.readout_heads:  # K heads: the mean's layer plus centred deviations (as `ReadoutHeads`)
            dev = layer(f"dev{n}", h, c.readout_heads)
            return layer(str(n), h, 1) + dev - jnp.mean(dev, axis=-1, keepdims=True)
        return layer(str(n), h, 1)[:, 0]


def per_element_dense(module, name: str, h, sidx, n_species: int, width: int, dt):
    """(N, width) h W_Z + b_Z with the weights of each atom's own element (parameters W<name>, b<name>)."""
    w = module.param(f"W{name}", nn.initializers.lecun_normal(batch_axis=(0,)), (n_species, h.shape[-1], width), dt)
    b = module.param(f"b{name}", nn.initializers.zeros, (n_species, width), dt)
    out = jnp.einsum("ni,sio->nso", h, w) + b[None]  # every element's network on every atom
    return jnp.take_along_axis(out, sidx[:, None, None], axis=1)[:, 0]  # keep the atom's own element
