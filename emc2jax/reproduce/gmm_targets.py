"""Reproductions of Bansal, Kavis & Sanghavi (arXiv 2411.03517) on simulated mixtures.

``python -m emc2jax.reproduce NAME --out DIR [--quick]`` with NAME one of:

- ``gmm_fisher``: InfoNCE (dot product and cosine) and SimSiam on a linear
  encoder find the Fisher subspace of an anisotropic shared-covariance mixture
  where PCA provably fails; against LDA (supervised), PCA and random
  subspaces; the isotropic control (PCA succeeds) and two negative controls
  ("same point + small noise" positives; an off-centre mixture).
- ``gmm_noise``: noisy augmentations (the positive's component redrawn with
  probability delta), delta from 0 to 0.9: angle and downstream accuracy.
- ``gmm_rank``: r < k - 1 (the rows stay inside F) and r > k - 1 (the extra
  directions shrink).
- ``gmm_clip``: two modalities trained with the CLIP loss; each encoder's
  leakage outside its own Fisher subspace, against PCA on each modality.

Every sweep is one compiled ``vmap`` over seeds (and the swept parameter);
all hyperparameters are fixed in this module, the same for every claim.
Each target writes ``results.json``, PNG figures and ``report.md``; the report
states for each claim the criterion, the observed value and whether it holds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from emc2jax import gmm
from emc2jax.reproduce.report import new_figure, save_figure, write_report, write_results

Array = jax.Array

PAPER = "Bansal, Kavis & Sanghavi, Understanding Contrastive Learning via Gaussian Mixture Models (arXiv 2411.03517)"

# The design-doc setting: Sigma = Q diag(25 x5, 1 x15) Q^T, k = 4 centred means
# of norm <= 3 inside the low-variance span (so 25 > 1 + 3^2: PCA provably misled).
DIM, NUM_COMPONENTS, RANK = 20, 4, 3
NOISE_DIRECTIONS, NOISE_VARIANCE, SEPARATION = 5, 25.0, 3.0

# Training hyperparameters, shared by every target (not tuned per claim).
LEARNING_RATE = 1e-2  # Adam peak, cosine-decayed to 0, gradients clipped at norm 1
COSINE_TEMPERATURE = 0.5  # for normalize=True; the dot-product runs use tau = 1
CONTROL_NOISE = 0.1  # "same point + small noise" positives
LDA_SIZES = (1024, 4096)  # extra LDA sample sizes, for its error-vs-n curve


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much work a run does.

    Attributes:
      seeds: independent mixtures + trainings (vmapped).
      steps: optimisation steps per training.
      batch: pairs per step (in-batch negatives: batch - 1 per anchor).
      eval_samples: labelled samples for PCA, the NCM classifier's class means
        and its test set.
    """

    seeds: int
    steps: int
    batch: int
    eval_samples: int

    @property
    def pairs_seen(self) -> int:
        return self.steps * self.batch


QUICK = Budget(seeds=16, steps=300, batch=128, eval_samples=4096)
FULL = Budget(seeds=32, steps=1500, batch=256, eval_samples=16384)


def _budget(quick: bool, **overrides: int) -> Budget:
    return dataclasses.replace(QUICK if quick else FULL, **overrides)


# ----------------------------------------------------------------------------
# Per-seed building blocks (pure, traced inside one vmapped call)
# ----------------------------------------------------------------------------


def _mixture(key: Array, noise_variance: Any = NOISE_VARIANCE) -> gmm.GaussianMixture:
    return gmm.anisotropic_mixture(
        key,
        dim=DIM,
        num_components=NUM_COMPONENTS,
        num_noise_directions=NOISE_DIRECTIONS,
        noise_variance=noise_variance,
        separation=SEPARATION,
    )


Moments = tuple[Array, Array, Array]


def _streamed_moments(
    key: Array,
    mixture: gmm.GaussianMixture,
    *,
    num_samples: int,
    chunk: int,
    snapshots: tuple[int, ...] = (),
) -> tuple[Moments, Moments]:
    """:func:`gmm.class_moments` of ``num_samples`` labelled draws, in chunks (constant memory).

    Returns the final moments and, stacked, the running moments after each of
    the ``snapshots`` sample counts (multiples of ``chunk``): LDA's error
    against its sample size from one pass, and one vmapped LDA to compile.
    """
    k = mixture.num_components
    marks = jnp.asarray([n // chunk for n in snapshots], jnp.int32)

    def body(carry, step_key):
        step, moments, snaps = carry
        x, y = gmm.sample(step_key, mixture, chunk)
        moments = jax.tree.map(jnp.add, moments, gmm.class_moments(x, y, num_classes=k))
        hit = marks == step + 1  # (len(snapshots),)
        snaps = jax.tree.map(
            lambda old, new: jnp.where(hit.reshape((-1,) + (1,) * new.ndim), new, old),
            snaps,
            moments,
        )
        return (step + 1, moments, snaps), None

    zeros = (
        jnp.zeros((k,)),
        jnp.zeros((k, mixture.dim)),
        jnp.zeros((mixture.dim, mixture.dim)),
    )
    snaps = jax.tree.map(lambda z: jnp.zeros((len(snapshots),) + z.shape), zeros)
    step_keys = jax.random.split(key, max(num_samples // chunk, 1))
    (_, moments, snaps), _ = lax.scan(body, (jnp.int32(0), zeros, snaps), step_keys)
    return moments, snaps


def _variant_pairs(key: Array, *, mixture, n: int, shift: Array, copy: Array) -> gmm.Pairs:
    """Perfect pairs, or the "same point + noise" control (``copy``), shifted by ``shift``.

    Lets the dot-product InfoNCE run, the off-centre control and the
    same-point control share one vmapped training (one compile instead of three).
    """
    perfect = gmm.sample_pairs(key, mixture, n)
    control = gmm.sample_noisy_copies(
        jax.random.fold_in(key, 1), mixture, n, noise_scale=CONTROL_NOISE
    )

    def pick(a, b):
        return jnp.where(copy, b, a) + shift

    return gmm.Pairs(
        pick(perfect.x, control.x),
        pick(perfect.x_pos, control.x_pos),
        perfect.labels,
        perfect.labels_pos,
    )


def _scores(encoder: Array, fisher: Array, data: tuple[Array, ...]) -> dict[str, Array]:
    """sin of the largest angle to F, leakage outside F, NCM test accuracy."""
    x_tr, y_tr, x_te, y_te = data
    return {
        "sin_angle": gmm.sin_largest_angle(encoder, fisher),
        "leakage": gmm.leakage(encoder, fisher),
        "accuracy": gmm.nearest_class_mean_accuracy(
            x_tr @ encoder.T, y_tr, x_te @ encoder.T, y_te, num_classes=NUM_COMPONENTS
        ),
    }


def _score_all(
    encoders: dict[str, Array], fisher: Array, data: tuple[Array, ...]
) -> dict[str, dict[str, Array]]:
    """:func:`_scores` of every (r, d) encoder, traced once: {metric: {method: value}}."""
    names = list(encoders)
    stacked = jax.vmap(lambda a: _scores(a, fisher, data))(jnp.stack([encoders[n] for n in names]))
    return {metric: {n: v[i] for i, n in enumerate(names)} for metric, v in stacked.items()}


def _eval_data(key: Array, mixture: gmm.GaussianMixture, n: int) -> tuple[Array, ...]:
    k_tr, k_te = jax.random.split(key)
    return (*gmm.sample(k_tr, mixture, n), *gmm.sample(k_te, mixture, n))


def _transpose(per_method: dict[str, dict[str, Array]]) -> dict[str, dict[str, Array]]:
    """{method: {metric: v}} -> {metric: {method: v}}."""
    metrics = next(iter(per_method.values())).keys()
    return {m: {name: scores[m] for name, scores in per_method.items()} for m in metrics}


# ----------------------------------------------------------------------------
# Summaries and reporting helpers (host side, numpy)
# ----------------------------------------------------------------------------


def _summaries(tree: dict[str, Any]) -> dict[str, Any]:
    """Per-seed arrays (seed axis last) -> {median, q25, q75, min, max} floats."""
    return {
        name: _summaries(v) if isinstance(v, dict) else _floats(gmm.summarize(v))
        for name, v in tree.items()
    }


def _floats(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: np.asarray(v).tolist() for k, v in summary.items()}


def _claim(claim: str, criterion: str, observed: Any, supported: bool) -> dict[str, Any]:
    return {
        "claim": claim,
        "criterion": criterion,
        "observed": observed,
        "supported": bool(supported),
    }


def _fmt(s: dict[str, float]) -> str:
    return f"{s['median']:.3f} [{s['q25']:.3f}, {s['q75']:.3f}]"


def _claims_table(claims: dict[str, dict[str, Any]]) -> str:
    rows = ["| claim | criterion | observed | supported |", "|---|---|---|---|"]
    for c in claims.values():
        observed = c["observed"]
        if isinstance(observed, float):
            observed = f"{observed:.3g}"
        rows.append(
            f"| {c['claim']} | {c['criterion']} | {observed} | {'yes' if c['supported'] else '**no**'} |"
        )
    return "\n".join(rows)


def _budget_md(budget: Budget) -> str:
    return (
        f"{budget.seeds} seeds (one mixture and one training per seed, all vmapped in one "
        f"compiled call), {budget.steps} Adam steps of batch {budget.batch} "
        f"({budget.pairs_seen} fresh pairs per training), lr {LEARNING_RATE} cosine-decayed, "
        f"gradient clipping at norm 1, init scale 1e-2"
    )


def _setting_md() -> str:
    return (
        f"d = {DIM}, k = {NUM_COMPONENTS}, r = {RANK}; Sigma = Q diag({NOISE_VARIANCE:g} x"
        f"{NOISE_DIRECTIONS}, 1 x{DIM - NOISE_DIRECTIONS}) Q^T with Q Haar-random; centred "
        f"means (sum_c pi_c ||mu_c||^2 <= {SEPARATION:g}^2) inside the span of the "
        "variance-1 directions, uniform weights"
    )


def _finish(
    out_dir: pathlib.Path, results: dict[str, Any], report: str, start: float
) -> dict[str, Any]:
    results["run_time_s"] = time.perf_counter() - start
    report = report.replace("{RUN_TIME}", f"{results['run_time_s']:.1f} s")
    write_results(out_dir, results)
    write_report(out_dir, report)
    return results


# ----------------------------------------------------------------------------
# gmm_fisher
# ----------------------------------------------------------------------------

FISHER_METHODS = (
    "infonce",
    "infonce_cosine",
    "simsiam",
    "lda",
    "pca",
    "random",
    "control_same_point",
    "infonce_off_centre",
)


def _fisher_seed(key: Array, noise_variance: Array, *, budget: Budget) -> dict[str, Any]:
    keys = jax.random.split(key, 10)
    mixture = _mixture(keys[0], noise_variance)
    fisher = gmm.fisher_subspace(mixture)
    data = _eval_data(keys[1], mixture, budget.eval_samples)
    pairs = functools.partial(gmm.sample_pairs, mixture=mixture, n=budget.batch)
    train = functools.partial(
        gmm.train_infonce, rank=RANK, steps=budget.steps, learning_rate=LEARNING_RATE
    )
    # Three dot-product InfoNCE runs in one vmapped training (same key: paired):
    # perfect pairs; the same mixture shifted off the origin by a random vector of
    # norm SEPARATION (F is unchanged: it depends on centred means); and the
    # "same point + small noise" negative control.
    offset = jax.random.normal(keys[2], (DIM,))
    offset = SEPARATION * offset / jnp.linalg.norm(offset)
    shifts = jnp.stack([jnp.zeros(DIM), offset, jnp.zeros(DIM)])
    copies = jnp.array([False, False, True])
    dot = jax.vmap(
        lambda shift, copy: train(
            keys[3],
            functools.partial(
                _variant_pairs, mixture=mixture, n=budget.batch, shift=shift, copy=copy
            ),
        )
    )(shifts, copies).params["encoder"]
    # Plug-in LDA and PCA on as many (labelled) samples as InfoNCE saw pairs, and
    # LDA on fewer samples for its error-against-n curve.
    sizes = tuple(n for n in LDA_SIZES if n < budget.pairs_seen)
    moments, snapshots = _streamed_moments(
        keys[6], mixture, num_samples=budget.pairs_seen, chunk=budget.batch, snapshots=sizes
    )
    encoders = {
        "infonce": dot[0],
        "infonce_cosine": train(
            keys[4], pairs, normalize=True, temperature=COSINE_TEMPERATURE
        ).params["encoder"],
        "simsiam": gmm.train_simsiam(
            keys[5], pairs, rank=RANK, steps=budget.steps, learning_rate=LEARNING_RATE
        ).params["encoder"],
        "lda": gmm.lda_from_moments(*moments, rank=RANK),
        "pca": gmm.pca_from_moments(*moments, rank=RANK),
        "random": gmm.random_subspace(keys[7], dim=DIM, rank=RANK),
        "control_same_point": dot[2],
        "infonce_off_centre": dot[1],
        "fisher": fisher,
    }
    out = _score_all(encoders, fisher, data)
    lda_small = jax.vmap(lambda *m: gmm.lda_from_moments(*m, rank=RANK))(*snapshots)
    small_sin = jax.vmap(lambda a: gmm.sin_largest_angle(a, fisher))(lda_small)
    out["lda_by_samples"] = {str(n): small_sin[i] for i, n in enumerate(sizes)}
    out["fisher_accuracy"] = out["accuracy"].pop("fisher")
    for metric in ("sin_angle", "leakage"):
        out[metric].pop("fisher")
    return out


def _lda_equivalent_samples(lda_by_n: dict[str, float], target: float) -> dict[str, float]:
    """Fits log(sin) = a - b log(n) to LDA's medians; the n at which LDA reaches ``target``."""
    n = np.array([float(k) for k in lda_by_n])
    s = np.array(list(lda_by_n.values()))
    slope, intercept = np.polyfit(np.log(n), np.log(s), 1)
    return {
        "slope": -slope,
        "equivalent_samples": float(np.exp((intercept - np.log(target)) / -slope)),
    }


def run_fisher(out_dir: pathlib.Path, *, quick: bool) -> dict[str, Any]:
    """gmm_fisher: InfoNCE finds the Fisher subspace where PCA fails (2411.03517)."""
    start = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    budget = _budget(quick)
    raw = gmm.sweep(
        functools.partial(_fisher_seed, budget=budget),
        gmm.seed_keys(0, budget.seeds),
        noise_variance=jnp.array([NOISE_VARIANCE, 1.0]),
    )
    raw = jax.tree.map(np.asarray, raw)
    aniso = jax.tree.map(lambda v: v[0], raw)
    iso = jax.tree.map(lambda v: v[1], raw)
    summary = _summaries(aniso)
    iso_summary = _summaries(iso)
    sin = summary["sin_angle"]
    med = {m: sin[m]["median"] for m in FISHER_METHODS}

    # LDA's error against its sample size (including the matched budget), and
    # how many labelled samples LDA needs to be as close to F as InfoNCE.
    lda_curve = {k: v["median"] for k, v in summary["lda_by_samples"].items()}
    lda_curve[str(budget.pairs_seen)] = med["lda"]
    equivalent = _lda_equivalent_samples(lda_curve, med["infonce"])
    iqr = lambda m: sin[m]["q75"] - sin[m]["q25"]  # noqa: E731
    gap = med["infonce"] - med["lda"]

    # The same test points for every method: a paired comparison.
    accuracy_gap = float(np.median(aniso["accuracy"]["lda"] - aniso["accuracy"]["infonce"]))
    claims = {
        "infonce_finds_fisher": _claim(
            "InfoNCE (dot product) recovers the Fisher subspace",
            "median sin angle <= 0.1",
            med["infonce"],
            med["infonce"] <= 0.1,
        ),
        "infonce_cosine_finds_fisher": _claim(
            "InfoNCE (cosine similarity) recovers the Fisher subspace",
            "median sin angle <= 0.1",
            med["infonce_cosine"],
            med["infonce_cosine"] <= 0.1,
        ),
        "pca_fails": _claim(
            "PCA is misled by the high-variance noise directions",
            "median sin angle >= 0.8",
            med["pca"],
            med["pca"] >= 0.8,
        ),
        "infonce_matches_lda": _claim(
            "InfoNCE's angle to F is within noise of (supervised) LDA's at the same number of samples",
            "median(InfoNCE) - median(LDA) <= IQR(InfoNCE) + IQR(LDA)",
            gap,
            gap <= iqr("infonce") + iqr("lda"),
        ),
        "infonce_matches_lda_accuracy": _claim(
            "InfoNCE matches (supervised) LDA's downstream performance",
            "median over seeds of the paired accuracy gap LDA - InfoNCE <= 0.01",
            accuracy_gap,
            accuracy_gap <= 0.01,
        ),
        "simsiam_in_fisher": _claim(
            "SimSiam (predictor + stop-gradient) learns inside the Fisher subspace",
            "median leakage outside F <= 0.1",
            summary["leakage"]["simsiam"]["median"],
            summary["leakage"]["simsiam"]["median"] <= 0.1,
        ),
        "control_same_point_fails": _claim(
            "Negative control: positives = same point + small noise learn the noise directions",
            "median sin angle >= 0.8",
            med["control_same_point"],
            med["control_same_point"] >= 0.8,
        ),
        "isotropic_pca_succeeds": _claim(
            "Isotropic control: with Sigma = I, PCA finds the Fisher subspace too",
            "median sin angle (PCA, isotropic) <= 0.1",
            iso_summary["sin_angle"]["pca"]["median"],
            iso_summary["sin_angle"]["pca"]["median"] <= 0.1,
        ),
    }
    results = {
        "target": "gmm_fisher",
        "paper": PAPER,
        "quick": quick,
        "setting": {
            "dim": DIM,
            "num_components": NUM_COMPONENTS,
            "rank": RANK,
            "noise_directions": NOISE_DIRECTIONS,
            "noise_variance": NOISE_VARIANCE,
            "separation": SEPARATION,
            "learning_rate": LEARNING_RATE,
            "cosine_temperature": COSINE_TEMPERATURE,
            "control_noise": CONTROL_NOISE,
            **dataclasses.asdict(budget),
            "lda_samples": budget.pairs_seen,
        },
        "methods": list(FISHER_METHODS),
        "sin_angle_to_fisher": sin,
        "leakage": summary["leakage"],
        "accuracy": summary["accuracy"],
        "fisher_accuracy": summary["fisher_accuracy"],
        "lda_sin_angle_by_samples": lda_curve,
        "lda_equivalent_samples_of_infonce": equivalent,
        "isotropic_control": {
            "sin_angle_to_fisher": iso_summary["sin_angle"],
            "leakage": iso_summary["leakage"],
            "accuracy": iso_summary["accuracy"],
        },
        "per_seed_sin_angle": {m: aniso["sin_angle"][m] for m in FISHER_METHODS},
        "claims": claims,
    }

    fig, axes = new_figure(1, 2, figsize=(11, 4), sharey=True)
    for ax, tree, title in (
        (
            axes[0],
            aniso,
            f"anisotropic (Sigma eigenvalues {NOISE_VARIANCE:g} x{NOISE_DIRECTIONS}, 1)",
        ),
        (axes[1], iso, "isotropic control (Sigma = I)"),
    ):
        values = [tree["sin_angle"][m] for m in FISHER_METHODS]
        ax.boxplot(values, showfliers=False)
        for i, v in enumerate(values):
            jitter = np.linspace(-0.15, 0.15, len(v))
            ax.scatter(i + 1 + jitter, v, s=8, alpha=0.6)
        ax.set_xticks(range(1, len(FISHER_METHODS) + 1), FISHER_METHODS, rotation=40, ha="right")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.axhline(0.1, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("sin of largest principal angle to F")
    save_figure(fig, out_dir, "fisher_angles")

    rows = "\n".join(
        f"| {m} | {_fmt(sin[m])} | {_fmt(summary['leakage'][m])} | "
        f"{_fmt(summary['accuracy'][m])} | {_fmt(iso_summary['sin_angle'][m])} | "
        f"{_fmt(iso_summary['leakage'][m])} |"
        for m in FISHER_METHODS
    )
    lda_rows = ", ".join(f"n = {k}: {v:.3f}" for k, v in lda_curve.items())
    report = f"""
# gmm_fisher: InfoNCE finds the Fisher subspace where PCA fails

Paper: {PAPER}: InfoNCE with augmentation = independent same-component
draw recovers the Fisher subspace of a shared-covariance mixture, isotropic or not.

## Setting
- {_setting_md()}.
- {_budget_md(budget)}{" (quick mode)" if quick else ""}.
- InfoNCE: in-batch, dot product with tau = 1 (`losses.infonce(normalize=False)`) and
  cosine with tau = {COSINE_TEMPERATURE}; SimSiam: linear predictor started at the identity,
  stop-gradient, weight decay 1e-3. LDA (labels) and PCA: plug-in estimators on
  {budget.pairs_seen} samples, as many as InfoNCE's pairs.
- Controls: `control_same_point` trains dot-product InfoNCE on x+ = x + {CONTROL_NOISE} N(0, I);
  `infonce_off_centre` on the same mixture shifted by a random vector of norm {SEPARATION:g}.
- Metrics: sin of the largest principal angle between the encoder's row space and F;
  leakage ||A (I - P_F)|| / ||A||; nearest-class-mean (Mahalanobis) test accuracy on the
  embedding (true-Fisher projection: {_fmt(summary["fisher_accuracy"])}).

## Results (median [q25, q75] over {budget.seeds} seeds)

| method | sin angle to F | leakage | NCM accuracy | isotropic: sin angle | isotropic: leakage |
|---|---|---|---|---|---|
{rows}

LDA's median sin angle against its number of labelled samples: {lda_rows}
(fitted slope {equivalent["slope"]:.2f}; 0.5 is the parametric rate). InfoNCE's median
equals LDA's at about {equivalent["equivalent_samples"]:.0f} labelled samples, against the
{budget.pairs_seen} unlabelled pairs InfoNCE trained on.

![angles](fisher_angles.png)

## Claims
{_claims_table(claims)}

Notes. The off-centre control is not a claim of the paper but a pitfall we hit: the
theory's mixture has mean zero, and with a shifted mixture a constant component of the
embedding biases every negative's logit, so the dot-product InfoNCE optimum uses the
direction Sigma^-1 mu_bar and leaves F (median sin angle {med["infonce_off_centre"]:.3f}).
SimSiam has no negatives: in the isotropic control its rows stay in F (leakage
{_fmt(iso_summary["leakage"]["simsiam"])}) but on some seeds a direction collapses, and its
row space is then a *subset* of F (sin angle {_fmt(iso_summary["sin_angle"]["simsiam"])}):
the paper's "SimSiam recovers a subset of the Fisher subspace".

Run time: {{RUN_TIME}} (2-core CPU, including compilation).
"""
    return _finish(out_dir, results, report, start)


# ----------------------------------------------------------------------------
# gmm_noise
# ----------------------------------------------------------------------------


def _noise_seed(key: Array, *, deltas: Array, budget: Budget) -> dict[str, Any]:
    """LDA and the true F once, then InfoNCE at every delta (an inner vmap)."""
    keys = jax.random.split(key, 4)
    mixture = _mixture(keys[0])
    fisher = gmm.fisher_subspace(mixture)
    data = _eval_data(keys[1], mixture, budget.eval_samples)

    def infonce(delta):
        # The same key at every delta: same init and same anchors, paired comparisons.
        pairs = functools.partial(gmm.sample_pairs, mixture=mixture, n=budget.batch, delta=delta)
        return gmm.train_infonce(
            keys[2], pairs, rank=RANK, steps=budget.steps, learning_rate=LEARNING_RATE
        ).params["encoder"]

    encoders = jax.vmap(infonce)(deltas)
    per_delta = jax.vmap(lambda a: _scores(a, fisher, data))(encoders)
    moments, _ = _streamed_moments(
        keys[3], mixture, num_samples=budget.pairs_seen, chunk=budget.batch
    )
    lda = gmm.lda_from_moments(*moments, rank=RANK)
    reference = _score_all({"lda": lda, "fisher": fisher}, fisher, data)
    return {"infonce": per_delta, "reference": reference}


def run_noise(out_dir: pathlib.Path, *, quick: bool) -> dict[str, Any]:
    """gmm_noise: InfoNCE with noisy augmentations, delta in [0, 0.9] (2411.03517)."""
    start = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    budget = _budget(quick, seeds=8 if quick else 16)
    deltas = np.round(np.linspace(0.0, 0.9, 4 if quick else 10), 3)
    raw = gmm.sweep(
        functools.partial(_noise_seed, deltas=jnp.asarray(deltas, jnp.float32), budget=budget),
        gmm.seed_keys(1, budget.seeds),
    )
    raw = jax.tree.map(np.asarray, raw)
    # Seeds are the leading axis here (the delta axis is inside): move them last.
    infonce = _summaries(jax.tree.map(lambda v: np.moveaxis(v, 0, -1), raw["infonce"]))
    ref = raw["reference"]
    reference = {
        name: _summaries({metric: ref[metric][name] for metric in ref})
        for name in ("lda", "fisher")
    }
    sin_med = np.asarray(infonce["sin_angle"]["median"])
    acc_med = np.asarray(infonce["accuracy"]["median"])
    lda_acc = reference["lda"]["accuracy"]["median"]
    tolerated = [float(d) for d, s in zip(deltas, sin_med, strict=True) if s <= 0.1]
    max_ok = max(
        (d for d in tolerated if all(s <= 0.1 for s in sin_med[deltas <= d])), default=None
    )
    half = deltas <= 0.5
    # M-estimator heuristic: the loss curvature around F scales with the excess
    # same-component rate, proportional to (1 - delta), while the gradient noise
    # does not, so the error should grow like 1 / (1 - delta) until it saturates.
    scaled = sin_med * (1.0 - deltas) / sin_med[0]
    moderate = deltas <= 0.6
    claims = {
        "noise_tolerated_to_half": _claim(
            "InfoNCE tolerates noisy augmentations",
            "median sin angle <= 0.1 for every delta <= 0.5",
            float(np.max(sin_med[half])),
            bool(np.all(sin_med[half] <= 0.1)),
        ),
        "accuracy_close_to_lda": _claim(
            "Downstream accuracy stays close to LDA's under noisy augmentations",
            "median NCM accuracy within 0.01 of LDA's for every delta <= 0.5",
            float(lda_acc - np.min(acc_med[half])),
            bool(np.all(lda_acc - acc_med[half] <= 0.01)),
        ),
        "error_scales_like_signal": _claim(
            "The angle grows like 1 / (1 - delta): noise thins the signal, F stays the optimum",
            "sin(delta) (1 - delta) / sin(0) within [0.5, 2] for every delta <= 0.6",
            [round(float(v), 3) for v in scaled[moderate]],
            bool(np.all((scaled[moderate] >= 0.5) & (scaled[moderate] <= 2.0))),
        ),
    }
    same_rate = 1.0 - deltas * (1.0 - 1.0 / NUM_COMPONENTS)
    results = {
        "target": "gmm_noise",
        "paper": PAPER,
        "quick": quick,
        "setting": {
            "dim": DIM,
            "num_components": NUM_COMPONENTS,
            "rank": RANK,
            "noise_directions": NOISE_DIRECTIONS,
            "noise_variance": NOISE_VARIANCE,
            "learning_rate": LEARNING_RATE,
            **dataclasses.asdict(budget),
        },
        "delta": deltas.tolist(),
        "same_component_rate": same_rate.tolist(),
        "infonce": infonce,
        "lda": reference["lda"],
        "fisher_accuracy": reference["fisher"]["accuracy"],
        "largest_delta_with_sin_below_0.1": max_ok,
        "sin_times_one_minus_delta_over_sin0": scaled.tolist(),
        "claims": claims,
    }

    fig, axes = new_figure(1, 2, figsize=(10, 4))
    for ax, metric, label in (
        (axes[0], "sin_angle", "sin of largest angle to F"),
        (axes[1], "accuracy", "NCM test accuracy"),
    ):
        s = infonce[metric]
        ax.plot(deltas, s["median"], "o-", label="InfoNCE (median)")
        ax.fill_between(deltas, s["q25"], s["q75"], alpha=0.3, label="InfoNCE IQR")
        lda = reference["lda"][metric]
        ax.axhline(lda["median"], color="k", ls="--", label="LDA (labels, median)")
        ax.axhspan(lda["q25"], lda["q75"], color="k", alpha=0.1)
        ax.set_xlabel("delta (probability the positive's component is redrawn)")
        ax.set_ylabel(label)
    axes[1].axhline(reference["fisher"]["accuracy"]["median"], color="g", ls=":", label="true F")
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    save_figure(fig, out_dir, "noise_sweep")

    rows = "\n".join(
        f"| {d:.2f} | {r:.3f} | {sin_med[i]:.3f} [{infonce['sin_angle']['q25'][i]:.3f}, "
        f"{infonce['sin_angle']['q75'][i]:.3f}] | {acc_med[i]:.3f} |"
        for i, (d, r) in enumerate(zip(deltas, same_rate, strict=True))
    )
    scaled_text = ", ".join(f"{d:.2f}: {v:.2f}" for d, v in zip(deltas, scaled, strict=True))
    report = f"""
# gmm_noise: InfoNCE under noisy augmentations

Paper: {PAPER}: noisy augmentations (with probability delta the positive comes from a component
redrawn from the mixture weights; the Fisher subspace stays the optimum).

## Setting
- {_setting_md()}.
- {_budget_md(budget)}{" (quick mode)" if quick else ""}; dot-product InfoNCE, tau = 1.
- One compiled call runs the {len(deltas)} x {budget.seeds} grid (delta x seed); the
  same seeds (mixture, initialisation, batches) at every delta: paired comparisons.
- LDA (true labels, {budget.pairs_seen} samples) does not depend on delta.

## Results (median over seeds)

| delta | P(same component) | InfoNCE sin angle [IQR] | InfoNCE NCM accuracy |
|---|---|---|---|
{rows}

LDA: sin angle {_fmt(reference["lda"]["sin_angle"])}, accuracy {_fmt(reference["lda"]["accuracy"])};
true-F accuracy {_fmt(reference["fisher"]["accuracy"])}. Largest delta up to which the median
sin angle stays <= 0.1: {max_ok}.

![noise](noise_sweep.png)

## Claims
{_claims_table(claims)}

Why it degrades: the population optimum is still F for every delta < 1 (a redrawn
positive is independent of the anchor, so it adds zero-mean noise to the logits), but the
signal per pair, the excess same-component rate (1 - delta)(1 - 1/k), shrinks. With the
loss curvature around F proportional to it and the gradient noise roughly constant, the
error at a fixed budget should scale like 1 / (1 - delta) (M-estimator heuristic) until
it saturates near 1; sin(delta)(1 - delta)/sin(0) per delta:
{scaled_text}.

Run time: {{RUN_TIME}} (2-core CPU, including compilation).
"""
    return _finish(out_dir, results, report, start)


# ----------------------------------------------------------------------------
# gmm_rank
# ----------------------------------------------------------------------------


def _rank_seed(key: Array, *, rank: int, budget: Budget) -> dict[str, Any]:
    keys = jax.random.split(key, 5)
    mixture = _mixture(keys[0])
    fisher = gmm.fisher_subspace(mixture)
    pairs = functools.partial(gmm.sample_pairs, mixture=mixture, n=budget.batch)
    train = functools.partial(
        gmm.train_infonce, rank=rank, steps=budget.steps, learning_rate=LEARNING_RATE
    )
    encoders = {
        "infonce": train(keys[1], pairs).params["encoder"],
        "infonce_cosine": train(
            keys[2], pairs, normalize=True, temperature=COSINE_TEMPERATURE
        ).params["encoder"],
    }

    def metrics(a):
        sv = gmm.singular_values(a)
        m = {
            "leakage": gmm.leakage(a, fisher),
            "sin_angle": gmm.sin_largest_angle(a, fisher),
            "effective_rank_entropy": gmm.effective_rank(a),
            "effective_rank_participation": gmm.effective_rank(a, kind="participation"),
            "singular_values": sv / sv[0],
        }
        if rank < NUM_COMPONENTS - 1:
            # Which part of F: the top-r Fisher directions, or any r-dim subspace of F?
            m["sin_angle_to_top_fisher"] = gmm.sin_largest_angle(
                a, gmm.fisher_subspace(mixture, rank=rank)
            )
        if rank > NUM_COMPONENTS - 1:
            m["extra_singular_ratio"] = sv[NUM_COMPONENTS - 1] / sv[NUM_COMPONENTS - 2]
        return m

    names = list(encoders)
    stacked = jax.vmap(metrics)(jnp.stack([encoders[n] for n in names]))
    return {n: jax.tree.map(lambda v, i=i: v[i], stacked) for i, n in enumerate(names)}


def run_rank(out_dir: pathlib.Path, *, quick: bool) -> dict[str, Any]:
    """gmm_rank: r < k - 1 stays inside F; r > k - 1 shrinks the extra directions."""
    start = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    budget = _budget(quick, seeds=8 if quick else 16)
    ranks = (2, 5) if quick else (1, 2, 3, 5, 8)
    keys = gmm.seed_keys(2, budget.seeds)
    per_rank: dict[str, Any] = {}
    for r in ranks:
        raw = gmm.sweep(functools.partial(_rank_seed, rank=r, budget=budget), keys)
        raw = jax.tree.map(np.asarray, raw)
        summary = _summaries(
            {m: {k: v for k, v in d.items() if k != "singular_values"} for m, d in raw.items()}
        )
        for m in raw:
            # seed axis is the first here: per-seed singular value vectors.
            summary[m]["singular_values_median"] = np.median(raw[m]["singular_values"], 0).tolist()
        per_rank[str(r)] = summary

    k1 = NUM_COMPONENTS - 1
    claims: dict[str, Any] = {}
    for r in ranks:
        s = per_rank[str(r)]
        if r < k1:
            claims[f"contained_r{r}"] = _claim(
                f"r = {r} < k - 1: InfoNCE's rows lie inside F",
                "median leakage (dot product) <= 0.1",
                s["infonce"]["leakage"]["median"],
                s["infonce"]["leakage"]["median"] <= 0.1,
            )
        if r > k1:
            ratio = s["infonce"]["extra_singular_ratio"]["median"]
            claims[f"extra_shrink_r{r}"] = _claim(
                f"r = {r} > k - 1: the extra directions shrink",
                "median sigma_k / sigma_(k-1) (dot product) <= 0.2",
                ratio,
                ratio <= 0.2,
            )
            pr = s["infonce"]["effective_rank_participation"]["median"]
            claims[f"effective_rank_r{r}"] = _claim(
                f"r = {r} > k - 1: effective rank ~ k - 1 = {k1}",
                f"median participation-ratio effective rank within 0.5 of {k1}",
                pr,
                abs(pr - k1) <= 0.5,
            )
            claims[f"fisher_inside_r{r}"] = _claim(
                f"r = {r} > k - 1: F lies inside the row space",
                "median sin angle (F vs row space) <= 0.1",
                s["infonce"]["sin_angle"]["median"],
                s["infonce"]["sin_angle"]["median"] <= 0.1,
            )
    results = {
        "target": "gmm_rank",
        "paper": PAPER,
        "quick": quick,
        "setting": {
            "dim": DIM,
            "num_components": NUM_COMPONENTS,
            "ranks": list(ranks),
            "noise_directions": NOISE_DIRECTIONS,
            "noise_variance": NOISE_VARIANCE,
            "learning_rate": LEARNING_RATE,
            "cosine_temperature": COSINE_TEMPERATURE,
            **dataclasses.asdict(budget),
        },
        "by_rank": per_rank,
        "claims": claims,
    }

    fig, axes = new_figure(1, 2, figsize=(11, 4))
    width = 0.38
    for j, method in enumerate(("infonce", "infonce_cosine")):
        leak = [per_rank[str(r)][method]["leakage"]["median"] for r in ranks]
        axes[0].bar(np.arange(len(ranks)) + (j - 0.5) * width, leak, width, label=method)
    axes[0].set_xticks(range(len(ranks)), [f"r = {r}" for r in ranks])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("median leakage ||A (I - P_F)|| / ||A||")
    axes[0].set_title(f"containment in F (k - 1 = {k1})")
    axes[0].legend()
    for r in ranks:
        for method, ls in (("infonce", "-"), ("infonce_cosine", "--")):
            sv = per_rank[str(r)][method]["singular_values_median"]
            axes[1].plot(range(1, len(sv) + 1), sv, ls, marker="o", label=f"{method}, r = {r}")
    axes[1].axvline(k1 + 0.5, color="grey", lw=0.8)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("singular value index")
    axes[1].set_ylabel("sigma_i / sigma_1 (median over seeds)")
    axes[1].legend(fontsize=7)
    save_figure(fig, out_dir, "rank_spectrum")

    lines = []
    for r in ranks:
        for method in ("infonce", "infonce_cosine"):
            s = per_rank[str(r)][method]
            top = s.get("sin_angle_to_top_fisher")
            extra = s.get("extra_singular_ratio")
            lines.append(
                f"| {r} | {method} | {_fmt(s['leakage'])} | {_fmt(s['sin_angle'])} | "
                f"{_fmt(top) if top else '-'} | {_fmt(s['effective_rank_entropy'])} | "
                f"{_fmt(s['effective_rank_participation'])} | {_fmt(extra) if extra else '-'} |"
            )
    rows = "\n".join(lines)
    report = f"""
# gmm_rank: embedding dimension below and above k - 1

Paper: {PAPER}: with r < k - 1 InfoNCE learns a subset of the Fisher subspace; with
r > k - 1 the directions beyond F carry no signal, so they should shrink.

## Setting
- {_setting_md()}; k - 1 = {k1}, r in {list(ranks)}.
- {_budget_md(budget)}{" (quick mode)" if quick else ""}; dot product (tau = 1) and cosine (tau = {COSINE_TEMPERATURE}).

## Results (median [q25, q75] over {budget.seeds} seeds)

For r < k - 1 the sin angle compares the r-dim row space with F (0 = contained) and with
the top-r Fisher directions; for r > k - 1 it measures whether F lies inside the row space.

| r | method | leakage | sin angle to F | sin angle to top-r Fisher | eff. rank (entropy) | eff. rank (participation) | sigma_k / sigma_(k-1) |
|---|---|---|---|---|---|---|---|
{rows}

![spectrum](rank_spectrum.png)

## Claims
{_claims_table(claims)}

Notes. The learnt r-dim subspace of F need not be the top-r Fisher directions: the sin
angle to those is much larger than the one to F. The extra directions shrink but do not
vanish at a finite budget: the loss penalises them only at second order (they add
zero-mean noise to the logits), so their size is set by the optimiser's noise; the
entropy effective rank counts such small directions more than the participation ratio.
With cosine similarity and r = 1 every embedding is +-1, so the loss carries almost no
signal: that configuration fails by construction.

Run time: {{RUN_TIME}} (2-core CPU, including compilation).
"""
    return _finish(out_dir, results, report, start)


# ----------------------------------------------------------------------------
# gmm_clip
# ----------------------------------------------------------------------------

CLIP_DIMS = (20, 16)
CLIP_NOISE_DIRECTIONS = (5, 4)


def _clip_seed(key: Array, *, rank: int, budget: Budget) -> dict[str, Any]:
    keys = jax.random.split(key, 6)
    mixture = gmm.two_modal_mixture(
        keys[0],
        dims=CLIP_DIMS,
        num_components=NUM_COMPONENTS,
        num_noise_directions=CLIP_NOISE_DIRECTIONS,
        noise_variance=NOISE_VARIANCE,
        separation=SEPARATION,
    )
    fishers = (gmm.fisher_subspace(mixture.first), gmm.fisher_subspace(mixture.second))
    pairs = functools.partial(gmm.sample_two_modal_pairs, mixture=mixture, n=budget.batch)
    train = functools.partial(
        gmm.train_clip, rank=rank, steps=budget.steps, learning_rate=LEARNING_RATE
    )
    dot_run = train(keys[1], pairs)
    cos_run = train(keys[2], pairs, normalize=True, temperature=COSINE_TEMPERATURE)
    dot, cos = dot_run.params, cos_run.params
    data = [
        _eval_data(k, m, budget.eval_samples)
        for k, m in zip(jax.random.split(keys[3]), mixture, strict=True)
    ]
    random_keys = jax.random.split(keys[4])
    encoders = {
        "clip": (dot["first"], dot["second"]),
        "clip_cosine": (cos["first"], cos["second"]),
        "pca": tuple(gmm.pca_subspace(d[0], rank=rank) for d in data),
        "random": tuple(
            gmm.random_subspace(k, dim=d, rank=rank)
            for k, d in zip(random_keys, CLIP_DIMS, strict=True)
        ),
    }
    names = list(encoders)
    out: dict[str, Any] = {}
    for modality, (f, d) in enumerate(zip(fishers, data, strict=True)):
        stacked = _score_all({n: encoders[n][modality] for n in names}, f, d)
        for metric, per_method in stacked.items():
            out.setdefault(metric, {}).update(
                {f"{n}_modality{modality + 1}": v for n, v in per_method.items()}
            )
    # The training loss over the last 5% of steps: log(batch) is chance level
    # (the two encoders' embeddings carry no information about each other).
    tail = max(budget.steps // 20, 1)
    out["final_loss"] = {
        "clip": jnp.mean(dot_run.loss[-tail:]),
        "clip_cosine": jnp.mean(cos_run.loss[-tail:]),
    }
    return out


def run_clip(out_dir: pathlib.Path, *, quick: bool) -> dict[str, Any]:
    """gmm_clip: CLIP's encoders stay in their own modality's Fisher subspace (2411.03517)."""
    start = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    budget = _budget(quick, seeds=8 if quick else 16)
    ranks = (3,) if quick else (2, 3, 5)
    keys = gmm.seed_keys(3, budget.seeds)
    per_rank = {}
    for r in ranks:
        raw = gmm.sweep(functools.partial(_clip_seed, rank=r, budget=budget), keys)
        per_rank[str(r)] = _summaries(jax.tree.map(np.asarray, raw))
    main = per_rank[str(RANK)]
    leak = main["leakage"]
    claims = {}
    for m in (1, 2):
        claims[f"clip_in_fisher_modality{m}"] = _claim(
            f"CLIP's modality-{m} encoder lies in its own Fisher subspace (noise filtered)",
            "median leakage (dot product) <= 0.1",
            leak[f"clip_modality{m}"]["median"],
            leak[f"clip_modality{m}"]["median"] <= 0.1,
        )
        claims[f"pca_leaks_modality{m}"] = _claim(
            f"PCA on modality {m} leaks outside F_{m}",
            "median leakage >= 0.8",
            leak[f"pca_modality{m}"]["median"],
            leak[f"pca_modality{m}"]["median"] >= 0.8,
        )
    for r in ranks:
        if r < NUM_COMPONENTS - 1:
            worst = max(per_rank[str(r)]["leakage"][f"clip_modality{m}"]["median"] for m in (1, 2))
            claims[f"subset_r{r}"] = _claim(
                f"r = {r} < k - 1: CLIP learns a subset of each F_m",
                "median leakage (dot product) <= 0.1 in both modalities",
                worst,
                worst <= 0.1,
            )
    results = {
        "target": "gmm_clip",
        "paper": PAPER,
        "quick": quick,
        "setting": {
            "dims": list(CLIP_DIMS),
            "noise_directions": list(CLIP_NOISE_DIRECTIONS),
            "num_components": NUM_COMPONENTS,
            "ranks": list(ranks),
            "noise_variance": NOISE_VARIANCE,
            "separation": SEPARATION,
            "learning_rate": LEARNING_RATE,
            "cosine_temperature": COSINE_TEMPERATURE,
            **dataclasses.asdict(budget),
        },
        "leakage": leak,
        "sin_angle_to_fisher": main["sin_angle"],
        "accuracy": main["accuracy"],
        "by_rank": per_rank,
        "claims": claims,
    }

    # Trained configurations that did not find F, with their final loss against
    # chance level: a plateau (loss ~ log batch) rather than a wrong optimum.
    failures = []
    for r in ranks:
        s = per_rank[str(r)]
        for method in ("clip", "clip_cosine"):
            worst = max(s["leakage"][f"{method}_modality{m}"]["median"] for m in (1, 2))
            if worst > 0.1:
                failures.append(
                    f"{method} at r = {r} (median leakage {worst:.2f}, final loss "
                    f"{s['final_loss'][method]['median']:.3f} vs chance log(batch) = "
                    f"{math.log(budget.batch):.3f})"
                )
    results["not_in_fisher"] = failures
    if failures:
        failure_note = (
            "Not in F: "
            + "; ".join(failures)
            + ". A final loss at log(batch) means the two encoders never became informative"
            " about each other: the run stayed on the plateau around its random init rather"
            " than converging to an optimum outside F (a guess at why: with normalised"
            " embeddings the high-variance noise directions set every embedding's direction"
            " at init, and with r < k - 1 there is less room to escape)."
        )
    else:
        failure_note = "Every trained configuration stayed inside its Fisher subspaces."

    names = ("clip", "clip_cosine", "pca", "random")
    fig, ax = new_figure(figsize=(7, 4))
    width = 0.38
    for j, m in enumerate((1, 2)):
        values = [leak[f"{n}_modality{m}"]["median"] for n in names]
        ax.bar(np.arange(len(names)) + (j - 0.5) * width, values, width, label=f"modality {m}")
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("median leakage outside own Fisher subspace")
    ax.set_title(f"CLIP on a two-modality mixture, r = {RANK}")
    ax.legend()
    save_figure(fig, out_dir, "clip_leakage")

    lines = []
    for r in ranks:
        s = per_rank[str(r)]
        for n in names:
            lines.append(
                f"| {r} | {n} | "
                + " | ".join(
                    f"{_fmt(s['leakage'][f'{n}_modality{m}'])} | {_fmt(s['sin_angle'][f'{n}_modality{m}'])}"
                    for m in (1, 2)
                )
                + f" | {_fmt(s['accuracy'][f'{n}_modality1'])} |"
            )
    rows = "\n".join(lines)
    report = f"""
# gmm_clip: CLIP on a two-modality Gaussian mixture

Paper: {PAPER}: the CLIP loss on linear encoders learns a subset of each
modality's Fisher subspace and filters out the noise directions.

## Setting
- Two modalities sharing the component label (k = {NUM_COMPONENTS}, uniform weights):
  d = {CLIP_DIMS}, each with its own Haar rotation, {CLIP_NOISE_DIRECTIONS} noise directions of
  variance {NOISE_VARIANCE:g} (others 1) and centred means of norm <= {SEPARATION:g} in its
  low-variance span.
- Symmetric CLIP loss (`losses.clip_loss`), dot product (tau = 1) and cosine (tau =
  {COSINE_TEMPERATURE}); r in {list(ranks)}. {_budget_md(budget)}{" (quick mode)" if quick else ""}.
- PCA: top-r principal directions of each modality separately ({budget.eval_samples} samples).

## Results (median [q25, q75] over {budget.seeds} seeds)

| r | method | leakage, mod. 1 | sin angle, mod. 1 | leakage, mod. 2 | sin angle, mod. 2 | NCM accuracy, mod. 1 |
|---|---|---|---|---|---|---|
{rows}

![leakage](clip_leakage.png)

## Claims
{_claims_table(claims)}

{failure_note}

Run time: {{RUN_TIME}} (2-core CPU, including compilation).
"""
    return _finish(out_dir, results, report, start)


__all__ = ["run_clip", "run_fisher", "run_noise", "run_rank"]
