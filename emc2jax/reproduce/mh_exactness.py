"""``mh_exactness``: with frozen embeddings the EMC² chain samples the exact softmax.

Setting (``shared/design.md``, "EMC² chain"): a finite dataset of m examples
with ``n_aug`` fixed augmentations each, embeddings frozen (random unit
vectors, so the scores are fixed), and a few anchor examples whose target is

    pi_i(j, a) ∝ exp(beta <u_i, z_{j,a}>),   j != i,

over (m - 1) * n_aug candidates, far from uniform. Many independent chain
tables run :func:`emc2jax.samplers.emc2.step` for many steps (a jitted
``lax.scan`` over steps, vmapped over tables); the empirical distribution of
the states they visit -- read off the step's ``proposal_weights`` and
``carried_weights``, exactly as the estimator uses them -- is compared with
pi_i in total-variation distance. Three exact configurations: uniform
proposals over the dataset (cached, stale scores), in-batch-style proposals
(columns shared by the anchors, own example masked), and uniform proposals
with ``refresh_score``; a burn-in and few proposals per step make the
carried-over states a large share of the visits.

A fourth configuration measures a property of the official algorithm rather
than checking exactness: two view segments per step over the SAME columns
(``mh_step`` called once per view on one chain). Re-proposing a candidate the
chain has already seen is not independent of its state, so that step is not
exactly pi-invariant (it flattens the distribution a little; the bias shrinks
as P grows).

``results.json``: ``tv_distance`` (worst exact configuration and anchor),
``tv_distance_uniform`` (uniform vs softmax), ``tv_noise_scale`` (half the TV
between two independent halves of the chain tables), ``tv_distance_dropping_carried``
(the same visits with the carried-over states dropped, as the official code
does when burn-in > 0) and ``tv_distance_two_views_shared_columns``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emc2jax.reproduce import report
from emc2jax.samplers import emc2, exact

CONFIGS = {
    "uniform": {"proposals": "uniform", "refresh": False, "num_views": 1},
    "batch": {"proposals": "batch", "refresh": False, "num_views": 1},
    "uniform_refresh": {"proposals": "uniform", "refresh": True, "num_views": 1},
}
# Informational: the official two-views-one-chain sweep over shared columns.
SHARED_VIEWS = "two_views_shared_columns"
SHARED_VIEWS_CONFIG = {"proposals": "batch", "refresh": False, "num_views": 2}


def problem(
    *, num_examples: int, num_augmentations: int, num_anchors: int, dim: int, beta: float, seed: int
) -> np.ndarray:
    """Frozen log-scores ``L[i, j, a] = beta <u_i, z_{j,a}>`` for anchors i < num_anchors.

    Returns:
      (num_anchors, m, n_aug) float32.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(num_examples, num_augmentations, dim))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    u = z[:num_anchors, 0]  # the anchor's own first view
    return (beta * np.einsum("id,jad->ija", u, z)).astype(np.float32)


def target_distribution(log_scores: np.ndarray) -> np.ndarray:
    """pi_i over the flattened (j, a) candidates, own example excluded: (A, m * n_aug)."""
    a, m, n_aug = log_scores.shape
    own = np.arange(m)[None, :, None] == np.arange(a)[:, None, None]
    mask = np.broadcast_to(~own, log_scores.shape).reshape(a, m * n_aug)
    return np.asarray(exact.exact_negative_distribution(log_scores.reshape(a, -1), mask))


def simulate(
    key: jax.Array,
    log_scores: np.ndarray,
    *,
    proposals: str,
    refresh: bool,
    num_tables: int,
    num_steps: int,
    warmup_steps: int,
    num_proposals: int,
    num_views: int = 2,
    burn_in: int = 2,
) -> dict[str, np.ndarray]:
    """Runs ``num_tables`` independent chain tables; returns visit histograms.

    Returns:
      ``visits`` (num_tables, A, m * n_aug) summed visit fractions of the
      steps after ``warmup_steps`` (carried-over states included) and
      ``visits_no_carried`` (the same without the carried-over states).
    """
    num_anchors, m, n_aug = log_scores.shape
    table = jnp.asarray(log_scores)
    anchors = jnp.arange(num_anchors, dtype=jnp.int32)
    rows = anchors[:, None]
    p, v = num_proposals, num_views

    def one_step(state, inputs):
        step_key, counted = inputs
        k_proposal, k_step = jax.random.split(step_key)
        if proposals == "uniform":
            index, aug = emc2.uniform_proposals(
                k_proposal, anchors, num_examples=m, num_augmentations=n_aug, num_proposals=p
            )  # (A, P)
            mask = None
        else:
            k_index, k_aug = jax.random.split(k_proposal)
            # Columns shared by all anchors, like a batch's views; own example masked.
            index = jnp.broadcast_to(jax.random.randint(k_index, (p,), 0, m), (num_anchors, p))
            aug = jnp.broadcast_to(jax.random.randint(k_aug, (p,), 0, n_aug), (num_anchors, p))
            mask = (index != rows)[:, None, :]
        scores = jnp.broadcast_to(table[rows, index, aug][:, None, :], (num_anchors, v, p))
        carried_index, carried_aug, carried_valid = emc2.carried_negatives(state, anchors)
        carried_score = table[anchors, carried_index, carried_aug] if refresh else None
        state, out, info = emc2.step(
            k_step,
            state,
            example_index=anchors,
            proposal_log_scores=scores,
            proposal_index=index[:, None, :],
            proposal_aug=aug[:, None, :],
            proposal_mask=mask,
            burn_in=burn_in,
            carried_log_score=carried_score,
        )
        weight = counted.astype(jnp.float32)
        columns = (
            jnp.zeros((num_anchors, m * n_aug))
            .at[rows, index * n_aug + aug]
            .add(weight * out.proposal_weights.sum(axis=1))
        )
        carried = (
            jnp.zeros((num_anchors, m * n_aug))
            .at[anchors, carried_index * n_aug + carried_aug]
            .add(weight * jnp.where(carried_valid, out.carried_weights.sum(axis=1), 0.0))
        )
        return state, (columns, carried, info.acceptance_rate)

    def one_table(table_key):
        keys = jax.random.split(table_key, num_steps)
        counted = jnp.arange(num_steps) >= warmup_steps
        _, (columns, carried, acceptance) = jax.lax.scan(one_step, emc2.init(m), (keys, counted))
        return columns.sum(0), carried.sum(0), acceptance.mean()

    columns, carried, acceptance = jax.jit(jax.vmap(one_table))(jax.random.split(key, num_tables))
    return {
        "visits": np.asarray(columns + carried),
        "visits_no_carried": np.asarray(columns),
        "acceptance_rate": float(np.mean(acceptance)),
    }


def _normalise(counts: np.ndarray) -> np.ndarray:
    return counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1e-30)


def run(out_dir: pathlib.Path, *, quick: bool) -> dict[str, Any]:
    """Runs the three configurations; writes results.json, mh_exactness.png, report.md."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    setting = {
        "num_examples": 33,
        "num_augmentations": 2,
        "num_anchors": 2,
        "dim": 3,
        "beta": 3.0,
        "num_proposals": 8,
        "burn_in": 2,
        "num_tables": 128 if quick else 512,
        "num_steps": 300 if quick else 1000,
        "warmup_steps": 10,
    }
    log_scores = problem(
        num_examples=setting["num_examples"],
        num_augmentations=setting["num_augmentations"],
        num_anchors=setting["num_anchors"],
        dim=setting["dim"],
        beta=setting["beta"],
        seed=0,
    )
    target = target_distribution(log_scores)
    candidates = target > 0
    uniform = candidates / candidates.sum(axis=-1, keepdims=True)
    tv_uniform = np.asarray(exact.total_variation(uniform, target))
    results: dict[str, Any] = {
        "setting": setting,
        "num_candidates": int(candidates[0].sum()),
        "tv_distance_uniform": float(tv_uniform.min()),
        "configs": {},
    }
    all_configs = {**CONFIGS, SHARED_VIEWS: SHARED_VIEWS_CONFIG}
    for offset, (name, config) in enumerate(all_configs.items()):
        sim = simulate(
            jax.random.key(offset),
            log_scores,
            proposals=config["proposals"],
            refresh=config["refresh"],
            num_tables=setting["num_tables"],
            num_steps=setting["num_steps"],
            warmup_steps=setting["warmup_steps"],
            num_proposals=setting["num_proposals"],
            num_views=config["num_views"],
            burn_in=setting["burn_in"],
        )
        visits = sim["visits"]
        empirical = _normalise(visits.sum(axis=0))
        half = visits.shape[0] // 2
        halves = [_normalise(visits[:half].sum(0)), _normalise(visits[half:].sum(0))]
        no_carried = _normalise(sim["visits_no_carried"].sum(axis=0))
        results["configs"][name] = {
            "tv_distance": np.asarray(exact.total_variation(empirical, target)).tolist(),
            "tv_noise_scale": (0.5 * np.asarray(exact.total_variation(*halves))).tolist(),
            "tv_distance_dropping_carried": np.asarray(
                exact.total_variation(no_carried, target)
            ).tolist(),
            "num_views": config["num_views"],
            "acceptance_rate": sim["acceptance_rate"],
            "counted_sweeps_per_anchor": int(
                setting["num_tables"]
                * (setting["num_steps"] - setting["warmup_steps"])
                * config["num_views"]
                * (setting["num_proposals"] - setting["burn_in"])
            ),
            "empirical": empirical,
        }
    configs = results["configs"]
    exact_configs = [configs[name] for name in CONFIGS]
    results["tv_distance"] = max(max(c["tv_distance"]) for c in exact_configs)
    results["tv_noise_scale"] = max(max(c["tv_noise_scale"]) for c in exact_configs)
    results["tv_distance_dropping_carried"] = min(
        min(c["tv_distance_dropping_carried"]) for c in exact_configs
    )
    results["tv_distance_two_views_shared_columns"] = max(configs[SHARED_VIEWS]["tv_distance"])
    _figure(out_dir, target, configs)
    serialisable = {
        **results,
        "configs": {
            name: {k: v for k, v in c.items() if k != "empirical"} for name, c in configs.items()
        },
    }
    report.write_results(out_dir, serialisable)
    report.write_report(out_dir, _markdown(serialisable, quick))
    return serialisable


def _figure(out_dir: pathlib.Path, target: np.ndarray, configs: dict[str, Any]) -> None:
    fig, axes = report.new_figure(1, len(configs), figsize=(5 * len(configs), 3.6), sharey=True)
    anchor = 0
    order = np.argsort(-target[anchor])
    order = order[target[anchor, order] > 0]
    x = np.arange(order.size)
    for ax, (name, config) in zip(np.atleast_1d(axes), configs.items(), strict=True):
        ax.bar(x - 0.2, target[anchor, order], width=0.4, label="exact softmax pi_u")
        ax.bar(x + 0.2, config["empirical"][anchor, order], width=0.4, label="EMC² chain visits")
        ax.axhline(1.0 / order.size, color="grey", lw=0.8, ls="--", label="uniform")
        ax.set_title(f"{name}: TV = {config['tv_distance'][anchor]:.3f}")
        ax.set_xlabel("candidate (j, a), by decreasing pi_u")
    np.atleast_1d(axes)[0].set_ylabel("probability")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    report.save_figure(fig, out_dir, "mh_exactness")


def _markdown(results: dict[str, Any], quick: bool) -> str:
    s = results["setting"]
    lines = [
        "# mh_exactness: the EMC² chain samples the exact softmax (frozen embeddings)",
        "",
        f"Setting{' (quick)' if quick else ''}: m = {s['num_examples']} examples x "
        f"{s['num_augmentations']} augmentations, {results['num_candidates']} candidate "
        f"negatives per anchor, beta = {s['beta']}, {s['num_anchors']} anchors, "
        f"{s['num_tables']} independent chain tables x {s['num_steps']} steps "
        f"({s['warmup_steps']} discarded), P = {s['num_proposals']} proposals per view "
        f"segment, burn-in {s['burn_in']} per segment.",
        "",
        "| configuration | views | TV(chain, softmax) per anchor | noise scale | "
        "TV dropping carried states | acceptance |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in results["configs"].items():
        lines.append(
            f"| {name} | {c['num_views']} | {', '.join(f'{t:.4f}' for t in c['tv_distance'])} | "
            f"{max(c['tv_noise_scale']):.4f} | "
            f"{', '.join(f'{t:.3f}' for t in c['tv_distance_dropping_carried'])} | "
            f"{c['acceptance_rate']:.2f} |"
        )
    lines += [
        "",
        f"TV(uniform, softmax) = {results['tv_distance_uniform']:.3f}: the target is far from "
        f"uniform. Worst TV(chain, softmax) over the exact configurations = "
        f"{results['tv_distance']:.4f} (tolerance 0.05); the noise scale (half the TV between "
        f"two independent halves of the tables) is {results['tv_noise_scale']:.4f}.",
        "",
        "Dropping the carried-over states (what the official code does whenever burn-in > 0) "
        f"biases the visits: TV >= {results['tv_distance_dropping_carried']:.3f}.",
        "",
        f"`{SHARED_VIEWS}` (the official sweep: one chain, two view segments over the same "
        f"columns): TV = {results['tv_distance_two_views_shared_columns']:.4f}. Re-proposing "
        "candidates the chain has already seen is not independent of its state, so that step "
        "is only approximately pi-invariant; the bias shrinks as P grows.",
        "",
        "![chain vs softmax](mh_exactness.png)",
    ]
    return "\n".join(lines)
