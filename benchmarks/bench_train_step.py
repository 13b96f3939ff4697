"""Full training steps: EMC² against SimCLR, every method's throughput, the step's scaling.

Each figure comes from compiled data-parallel steps (``emc2jax.train.make_train_step``
driven by ``emc2jax.parallel.data_parallel``, state donated) on synthetic uint8
images and an on-device image table, built as ``train_and_evaluate`` builds
them (:func:`build_runner`). Steps that are compared are timed side by side in
rounds (:func:`compare`) and ratios are medians of per-round ratios
(:func:`_ratio`), so drift in the machine's load hits both sides alike;
compile time (the first call) is reported separately.

Figures (:func:`run`):

- ``emc2_over_simclr_step_time``: EMC² step time / SimCLR step time, same model,
  batch and device, for the digits ConvNet (8x8x1) and ResNet-18 at 32x32x3.
  EMC² encodes 3B images per step (both views plus each chain's carried-over
  negative) against SimCLR's 2B, so 1.5 is the floor of the encoder's share.
- ``sampler_fraction_by_stub`` (the suite's cross-check of
  ``sampler_fraction_of_emc2_step``): ``1 - stub / full``, where ``stub`` is the
  same EMC² step with the sampler (uniform draws, the MH sweep, the visit
  weights, the chain-table scatter, the diagnostics) replaced by
  :func:`stub_emc2_step`, which returns the same shapes from a few elementwise
  ops. Everything else (the carried-over negatives' gather and extra forward
  pass, the scores, the surrogate) is left in both.
- ``steps_per_second`` / ``examples_per_second`` of each method.
- ``batch_scaling`` / ``dataset_scaling``: step time against B and m.
- ``sampler_state_bytes_per_million``: bytes of each sampler's state for
  m = 10^6, from the array shapes, and the resident memory measured when the
  state is created.
- ``accelerator`` (on a GPU/TPU only): the STL-10 setting, ResNet-18 at 96x96
  in bfloat16, batch 256.

The headline ratios are CPU-time ratios (the work of two XLA programs, which
on a shared machine is steadier than wall-clock time); ``*_wall`` keys hold
the wall-clock ratios. ``EMC2JAX_BENCH_TINY=1`` shrinks everything to a
smoke test.

Run: ``python benchmarks/bench_train_step.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import bench_main, block, machine_info  # noqa: E402
from emc2jax import config as config_lib  # noqa: E402
from emc2jax import methods, parallel, train  # noqa: E402
from emc2jax.samplers import emc2  # noqa: E402

# The digits training split has 1797 examples.
DIGITS_EXAMPLES = 1797


def _resnet18_32(method: str) -> ml_collections.ConfigDict:
    # The EMC² paper's STL-10 recipe (ResNet-18, no batch norm, Adam), its
    # augmentation at 32x32.
    c = config_lib.stl10_config(method)
    c.dataset.image_size = 32
    return c


def _resnet18_96_bf16(method: str) -> ml_collections.ConfigDict:
    c = config_lib.stl10_config(method)
    c.model.dtype = "bfloat16"
    return c


def _digits_mlp(method: str) -> ml_collections.ConfigDict:
    c = config_lib.digits_config(method)
    c.model.name = "mlp"
    c.model.hidden_dims = (256, 256)
    c.dataset.augmentation = "identity"  # Irrelevant to the scaling in m; compiles faster.
    return c


def _tiny_mlp(method: str) -> ml_collections.ConfigDict:
    c = config_lib.digits_config(method)
    c.model.name = "mlp"
    c.model.hidden_dims = (16,)
    c.model.head_hidden_dims = ()
    c.model.embedding_dim = 8
    c.dataset.augmentation = "identity"
    return c


# Model settings: (config recipe, image shape, a word for the tables).
MODELS: dict[str, tuple[Callable[[str], ml_collections.ConfigDict], tuple[int, ...], str]] = {
    "digits_convnet": (config_lib.digits_config, (8, 8, 1), "digits ConvNet, 8x8x1"),
    "resnet18_32": (_resnet18_32, (32, 32, 3), "ResNet-18 (CIFAR stem, no norm), 32x32x3"),
    # A small MLP on 8x8 digits: the encoder costs little, so any growth of the
    # step with the dataset size m (an O(m) copy of a table) would show.
    "digits_mlp": (_digits_mlp, (8, 8, 1), "MLP 64-256-256, 8x8x1, no augmentation"),
    # The STL-10 setting on an accelerator: bfloat16 compute, 96x96 images.
    "resnet18_96_bf16": (
        _resnet18_96_bf16,
        (96, 96, 3),
        "ResNet-18 (CIFAR stem, no norm), 96x96x3, bfloat16",
    ),
    # Smoke-test size (tests/test_benchmarks.py): compiles in seconds.
    "tiny_mlp": (_tiny_mlp, (8, 8, 1), "MLP 64-16, no augmentation"),
}


def bench_config(method: str, model: str, batch_size: int) -> ml_collections.ConfigDict:
    """The training config timed for ``method`` on ``model`` at global batch ``batch_size``."""
    if model not in MODELS:
        raise ValueError(f"model={model!r} is not one of {tuple(MODELS)}")
    config = MODELS[model][0](method)
    config.batch_size = int(batch_size)
    if method == "exact":
        config.dataset.num_augmentations = 2
    return config


# ---------------------------------------------------------------------------
# The sampler stub: same shapes, no sweep, no scatter
# ---------------------------------------------------------------------------


def stub_emc2_step(
    key: jax.Array,
    state: emc2.EMC2State,
    *,
    example_index: jax.Array,
    proposal_log_scores: jax.Array,
    proposal_index: jax.Array,
    proposal_aug: jax.Array,
    proposal_mask: jax.Array | None = None,
    **unused: Any,
) -> tuple[emc2.EMC2State, emc2.EMC2Outputs, emc2.EMC2Info]:
    """``emc2.step`` without the sampler: weights spread evenly, chains untouched.

    Returns outputs of the same shapes and dtypes as :func:`emc2.step`, computed
    by a few elementwise ops from the scores and the mask (so the estimator
    downstream, and its gradient, cost exactly what they cost with the real
    sampler), and the state unchanged (no table write-back).
    """
    del key, proposal_index, proposal_aug, unused
    scores = lax.stop_gradient(proposal_log_scores)
    valid = scores > -jnp.inf
    if proposal_mask is not None:
        valid = valid & jnp.broadcast_to(proposal_mask, scores.shape)
    count = jnp.sum(valid, axis=-1, dtype=jnp.float32) + 1.0  # + the carried state
    b = scores.shape[0]
    rows = state.negative_index[example_index]
    outputs = emc2.EMC2Outputs(
        proposal_weights=valid / count[..., None],
        carried_weights=1.0 / count,
        num_counted=count.astype(jnp.int32),
        final_column=jnp.full((b,), -1, jnp.int32),
        negative_index=rows,
        negative_aug=state.negative_aug[example_index],
        log_score=state.log_score[example_index],
    )
    zero = jnp.zeros((), jnp.float32)
    return state, outputs, emc2.EMC2Info(zero, zero, zero)


@contextlib.contextmanager
def _sampler_replaced(stub: bool) -> Iterator[None]:
    # The objective looks `step` up in the sampler module when it is traced, so
    # patching the module attribute while the step is traced (its first call)
    # swaps the sampler in that one compiled step and nowhere else.
    if not stub:
        yield
        return
    with mock.patch.object(emc2, "step", stub_emc2_step):
        yield


# ---------------------------------------------------------------------------
# A compiled step with its state and inputs
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class StepRunner:
    """A compiled data-parallel train step, its (donated) state and its inputs.

    Calling the runner takes one step on the next of its pre-placed batches and
    returns the metrics (device arrays, not fetched). The state is threaded
    through the calls because the step donates it.

    Attributes:
      name: a label for the tables.
      config: the training config.
      num_examples: m.
      state: the current train state (replicated).
      compile_s: seconds of the first call minus a warm call (tracing + compilation).
      first_call_s: seconds of the first call (compile + one step).
      trace_count: ``[n]``, how many times the per-device step has been traced
        (1: no retracing; see :attr:`traces`).
    """

    name: str
    config: ml_collections.ConfigDict
    num_examples: int
    step: Callable[..., Any]
    state: Any
    batches: list[Any]
    table: Any
    compile_s: float = 0.0
    first_call_s: float = 0.0
    trace_count: list[int] = dataclasses.field(default_factory=lambda: [0])
    _position: int = 0

    def __call__(self) -> Any:
        batch = self.batches[self._position % len(self.batches)]
        self._position += 1
        # No device-to-host transfer may happen inside a step (only at log
        # intervals, in the loop): the guard turns one into an error.
        with jax.transfer_guard_device_to_host("disallow"):
            self.state, metrics = self.step(self.state, batch, self.table)
        return metrics

    @property
    def traces(self) -> int:
        """How many times the per-device step has been traced so far."""
        return self.trace_count[0]

    @property
    def batch_size(self) -> int:
        return int(self.config.batch_size)


def synthetic_table(num_examples: int, image_shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """(m, *image_shape) uint8 random images: the stand-in training set."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num_examples, *image_shape), dtype=np.uint8)


def build_runner(
    method: str,
    *,
    model: str = "digits_convnet",
    batch_size: int = 256,
    num_examples: int = DIGITS_EXAMPLES,
    num_devices: int = 1,
    num_batches: int = 4,
    sampler_stub: bool = False,
    config: ml_collections.ConfigDict | None = None,
    seed: int = 0,
) -> StepRunner:
    """Builds, compiles and warms up the train step of ``method`` (the ``train_and_evaluate`` glue).

    Args:
      method: one of ``emc2jax.config.METHODS``.
      model: a key of :data:`MODELS`.
      batch_size: the global batch B.
      num_examples: m, the size of the synthetic training set (uint8 images of
        the model's shape, on device as the table for the methods that need it).
      num_devices: devices of the data mesh.
      num_batches: distinct batches cycled through (distinct random examples
        each, so the chains of many examples fill up).
      sampler_stub: EMC² only: compile the step with :func:`stub_emc2_step`.
      config: replaces :func:`bench_config` (its ``batch_size`` must be ``batch_size``).
      seed: of the synthetic data.

    Returns:
      A warmed-up :class:`StepRunner` (two steps taken: the compile and one warm).
    """
    if sampler_stub and method != "emc2":
        raise ValueError(f"sampler_stub applies to method 'emc2' only, got method={method!r}")
    if batch_size > num_examples:
        raise ValueError(f"batch_size={batch_size} exceeds num_examples={num_examples}")
    config = bench_config(method, model, batch_size) if config is None else config
    if config.batch_size != batch_size or config.method != method:
        raise ValueError(
            f"config has method={config.method!r}, batch_size={config.batch_size}; "
            f"expected {method!r}, {batch_size}"
        )
    image_shape = MODELS[model][1]
    mesh = parallel.make_data_mesh(num_devices)
    config_lib.validate_config(config, num_devices=num_devices)

    trainer = train.build_trainer(config, image_shape=image_shape, num_examples=num_examples)
    trace_count = [0]

    def counted_step(*args):
        trace_count[0] += 1
        return trainer.train_step(*args)

    step = parallel.data_parallel(
        counted_step, mesh=mesh, backend=config.parallel_backend, num_replicated_args=1
    )

    images = synthetic_table(num_examples, image_shape, seed)
    rng = np.random.default_rng(seed + 1)
    batches = []
    for _ in range(num_batches):
        index = np.sort(rng.choice(num_examples, batch_size, replace=False)).astype(np.int32)
        batches.append(parallel.shard_batch({"image": images[index], "index": index}, mesh))
    table = None
    if methods.METHODS[method].needs_table:
        table = parallel.replicate(jnp.asarray(images), mesh)
    del images
    runner = StepRunner(
        name=method + ("_stub" if sampler_stub else ""),
        config=config,
        num_examples=num_examples,
        step=step,
        state=parallel.replicate(trainer.state, mesh),
        batches=batches,
        table=table,
        trace_count=trace_count,
    )
    with _sampler_replaced(sampler_stub):
        start = time.perf_counter()
        block(runner())
        runner.first_call_s = time.perf_counter() - start
    start = time.perf_counter()
    block(runner())
    runner.compile_s = max(runner.first_call_s - (time.perf_counter() - start), 0.0)
    return runner


_RUNNERS: dict[tuple, StepRunner] = {}
# Traces of every memoised runner's step (kept when the runner is dropped).
_TRACES: dict[tuple, list[int]] = {}


def get_runner(
    method: str,
    *,
    model: str = "digits_convnet",
    batch_size: int = 256,
    num_examples: int | None = None,
    sampler_stub: bool = False,
) -> StepRunner:
    """:func:`build_runner`, memoised: the figures that share a step share one compile.

    ``num_examples`` None: the digits training set's size, or 4B if larger.
    """
    if num_examples is None:
        num_examples = max(DIGITS_EXAMPLES, 4 * batch_size)
    key = (method, model, batch_size, num_examples, sampler_stub)
    if key not in _RUNNERS:
        _RUNNERS[key] = build_runner(
            method,
            model=model,
            batch_size=batch_size,
            num_examples=num_examples,
            sampler_stub=sampler_stub,
        )
        _TRACES[key] = _RUNNERS[key].trace_count
    return _RUNNERS[key]


def clear_runners(model: str | None = None) -> None:
    """Drops the memoised runners of ``model`` (all if None) and their device buffers."""
    for key in [k for k in _RUNNERS if model is None or k[1] == model]:
        del _RUNNERS[key]


def compare(
    runners: Sequence[StepRunner],
    *,
    rounds: int,
    calls_per_round: int = 2,
    rewarm: bool = False,
    labels: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Times the runners side by side: ``rounds`` rounds of a block of calls of each.

    Each round runs every runner in turn, so a drift in the machine's load
    between rounds hits them alike; ratios are then taken round by round
    (:func:`_ratio`). With ``rewarm`` an extra first call of each block is not
    kept (it re-warms the caches after the other runners).

    Returns:
      ``{label: {"median_s", "min_s", "cpu_median_s", "samples", "round_s",
      "round_cpu_s"}}`` (labels default to the runners' names): wall-clock
      seconds per step (median, minimum over the kept calls), the median CPU
      seconds the process spent per step (all threads), and each round's mean
      wall and CPU seconds per step. On a shared machine the CPU time is the
      steadier measure of the work a step does: wall time also counts the time
      the process waited for a core.
    """
    labels = [r.name for r in runners] if labels is None else list(labels)
    wall: dict[str, list[float]] = {label: [] for label in labels}
    cpu: dict[str, list[float]] = {label: [] for label in labels}
    rounds_wall: dict[str, list[float]] = {label: [] for label in labels}
    rounds_cpu: dict[str, list[float]] = {label: [] for label in labels}
    for _ in range(rounds):
        for label, runner in zip(labels, runners, strict=True):
            kept_wall, kept_cpu = [], []
            for call in range(calls_per_round + int(rewarm)):
                start, start_cpu = time.perf_counter(), time.process_time()
                block(runner())
                if call or not rewarm:
                    kept_wall.append(time.perf_counter() - start)
                    kept_cpu.append(time.process_time() - start_cpu)
            wall[label] += kept_wall
            cpu[label] += kept_cpu
            rounds_wall[label].append(statistics.fmean(kept_wall))
            rounds_cpu[label].append(statistics.fmean(kept_cpu))
    return {
        name: {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "cpu_median_s": statistics.median(cpu[name]),
            "samples": len(s),
            "round_s": rounds_wall[name],
            "round_cpu_s": rounds_cpu[name],
        }
        for name, s in wall.items()
    }


def _throughput(runner: StepRunner, timing: dict[str, float]) -> dict[str, Any]:
    return {
        "step_s": timing["median_s"],
        "step_min_s": timing["min_s"],
        "step_cpu_s": timing["cpu_median_s"],
        "steps_per_second": 1.0 / timing["median_s"],
        "examples_per_second": runner.batch_size / timing["median_s"],
        "compile_s": runner.compile_s,
        "traces": runner.traces,
    }


def _ratio(timing: dict[str, dict[str, Any]], a: str, b: str) -> dict[str, float]:
    """``a / b``: medians over the rounds of the per-round ratios (wall clock and CPU time).

    Pairing the two round by round cancels the drift in the machine's load
    between rounds. ``min`` is the ratio of the fastest calls.
    """

    def paired(key: str) -> float:
        return statistics.median(x / y for x, y in zip(timing[a][key], timing[b][key], strict=True))

    return {
        "median": paired("round_s"),
        "cpu": paired("round_cpu_s"),
        "min": timing[a]["min_s"] / timing[b]["min_s"],
    }


# ---------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------


def emc2_vs_simclr(
    model: str,
    batch_size: int,
    *,
    rounds: int,
    calls_per_round: int = 2,
    rewarm: bool = False,
    with_stub: bool,
    others: Sequence[str] = (),
) -> dict[str, Any]:
    """EMC², SimCLR (the stubbed EMC², other methods) on ``model`` at ``batch_size``, side by side.

    Returns the timings, compile times, trace counts, throughput of every
    runner, ``emc2_over_simclr`` and (``with_stub``) ``sampler_fraction``,
    each by wall clock and by CPU time (see :func:`_ratio`).
    """
    names = ["simclr", "emc2", *[m for m in others if m not in ("simclr", "emc2")]]
    runners = [get_runner(name, model=model, batch_size=batch_size) for name in names]
    if with_stub:
        runners.append(get_runner("emc2", model=model, batch_size=batch_size, sampler_stub=True))
    timing = compare(runners, rounds=rounds, calls_per_round=calls_per_round, rewarm=rewarm)
    result: dict[str, Any] = {
        "model": MODELS[model][2],
        "batch_size": batch_size,
        "num_examples": runners[0].num_examples,
        "timing": timing,
        "compile_s": {r.name: r.compile_s for r in runners},
        "traces": {r.name: r.traces for r in runners},
        "emc2_over_simclr": _ratio(timing, "emc2", "simclr"),
        "throughput": {r.name: _throughput(r, timing[r.name]) for r in runners},
    }
    if with_stub:
        stub_over_full = _ratio(timing, "emc2_stub", "emc2")
        result["sampler_fraction"] = {k: 1.0 - v for k, v in stub_over_full.items()}
        result["sampler_s"] = timing["emc2"]["median_s"] - timing["emc2_stub"]["median_s"]
    return result


def batch_scaling(
    batch_sizes: Sequence[int], *, model: str = "digits_convnet", rounds: int
) -> dict[str, Any]:
    """EMC² and SimCLR step time against the batch size B (each B side by side)."""
    rows = []
    for b in batch_sizes:
        runners = [get_runner(name, model=model, batch_size=b) for name in ("simclr", "emc2")]
        timing = compare(runners, rounds=rounds)
        rows.append(
            {
                "batch_size": b,
                "simclr_step_s": timing["simclr"]["median_s"],
                "emc2_step_s": timing["emc2"]["median_s"],
                "emc2_over_simclr": _ratio(timing, "emc2", "simclr")["median"],
                "emc2_over_simclr_cpu": _ratio(timing, "emc2", "simclr")["cpu"],
                "emc2_us_per_example": 1e6 * timing["emc2"]["median_s"] / b,
                "compile_s": {r.name: r.compile_s for r in runners},
            }
        )
    return {"model": MODELS[model][2], "rows": rows}


def dataset_scaling(
    sizes: Sequence[int], *, model: str = "digits_mlp", batch_size: int = 256, rounds: int
) -> dict[str, Any]:
    """EMC² step time against the dataset size m (chain table and image table on device).

    All sizes are built first and then timed side by side, so the ratios to
    the smallest m are not skewed by drift in the machine's load. The state
    (chain table included) is donated, so the chain update is an in-place
    O(B) scatter; the image table is read, never copied.
    """
    runners = [
        get_runner("emc2", model=model, batch_size=batch_size, num_examples=int(m)) for m in sizes
    ]
    names = [f"m={r.num_examples}" for r in runners]
    timing = compare(runners, rounds=rounds, labels=names)
    rows = [
        {
            "num_examples": r.num_examples,
            "step_s": timing[n]["median_s"],
            "step_min_s": timing[n]["min_s"],
            "step_cpu_s": timing[n]["cpu_median_s"],
            "relative_to_smallest": _ratio(timing, n, names[0])["median"],
            "relative_to_smallest_cpu": _ratio(timing, n, names[0])["cpu"],
            "compile_s": r.compile_s,
            "image_table_bytes": int(r.table.nbytes),
            "sampler_state_bytes": _tree_bytes(r.state.sampler_state),
        }
        for r, n in zip(runners, names, strict=True)
    ]
    return {
        "model": MODELS[model][2],
        "batch_size": batch_size,
        "rows": rows,
        # CPU time, like the other XLA-vs-XLA ratios; wall clock beside it.
        "largest_over_smallest": rows[-1]["relative_to_smallest_cpu"],
        "largest_over_smallest_wall": rows[-1]["relative_to_smallest"],
    }


def _tree_bytes(tree: Any) -> int:
    return int(
        sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    )


# Run in a fresh interpreter: there freed memory from earlier work cannot be
# reused for the state, so the growth of the resident set is the state's size.
_RSS_PROBE = """
import json, os, sys
import jax
from emc2jax import config, methods

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

m, cases = int(sys.argv[1]), json.loads(sys.argv[2])
sampler_config = config.base_config().sampler
for _, method, dim in cases:  # Compile the (tiny) fill kernels first.
    jax.block_until_ready(methods.METHODS[method].init_sampler(m, sampler_config, dim))
out, keep = {}, []
for name, method, dim in cases:
    before = rss()
    keep.append(jax.block_until_ready(methods.METHODS[method].init_sampler(m, sampler_config, dim)))
    out[name] = rss() - before
print(json.dumps(out))
"""


def _measured_growth(num_examples: int, cases: dict[str, tuple[str, int]]) -> dict[str, int | None]:
    """Resident-memory growth when each state is created, in a fresh process (None: not Linux)."""
    if not pathlib.Path("/proc/self/statm").exists():
        return dict.fromkeys(cases)
    args = json.dumps([[name, method, dim] for name, (method, dim) in cases.items()])
    done = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(num_examples), args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def sampler_state_memory(num_examples: int = 1_000_000, *, measure: bool = True) -> dict[str, Any]:
    """Bytes of each sampler's state for ``num_examples`` examples, computed and measured.

    ``computed_bytes`` sums the arrays' sizes (``jax.eval_shape``, nothing
    allocated); ``measured_resident_growth_bytes`` is the growth of a fresh
    process's resident memory when the state is created on the CPU device
    (where device memory is host memory). The embedding cache's table is
    m x D: reported for the digits head (D = 64) and the ResNet-18 head (D = 128).
    ``measure=False`` skips the measurement (None).
    """
    sampler_config = config_lib.base_config().sampler
    cases = {
        "emc2": ("emc2", 0),
        "sogclr": ("sogclr", 0),
        "embedding_cache_d64": ("embedding_cache", 64),
        "embedding_cache_d128": ("embedding_cache", 128),
    }
    measured = _measured_growth(num_examples, cases) if measure else dict.fromkeys(cases)
    out: dict[str, Any] = {}
    for name, (method_name, dim) in cases.items():
        shapes = jax.eval_shape(
            functools.partial(
                methods.METHODS[method_name].init_sampler, num_examples, sampler_config, dim
            )
        )
        out[name] = {
            "computed_bytes": _tree_bytes(shapes),
            "computed_bytes_per_example": _tree_bytes(shapes) / num_examples,
            "measured_resident_growth_bytes": measured[name],
            "arrays": {
                field: f"{tuple(leaf.shape)} {leaf.dtype}"
                for field, leaf in zip(shapes._fields, shapes, strict=True)
            },
        }
    return {"num_examples": num_examples, "states": out}


def sizes(quick: bool) -> dict[str, Any]:
    """What :func:`run` measures; ``EMC2JAX_BENCH_TINY=1`` gives smoke-test sizes."""
    if os.environ.get("EMC2JAX_BENCH_TINY"):
        # Every code path at sizes that compile in seconds; the figures mean nothing.
        return {
            "model": "tiny_mlp",
            "batch_size": 16,
            "rounds": 1,
            "methods": ("simclr", "emc2"),
            "resnet": None,
            "batch_sizes": (16,),
            "scaling_model": "tiny_mlp",
            "dataset_sizes": (DIGITS_EXAMPLES,),
            "dataset_batch": 16,
            "memory_examples": 10_000,
            "measure_memory": False,
        }
    common = {"model": "digits_convnet", "batch_size": 256, "scaling_model": "digits_mlp"}
    if quick:
        return {
            **common,
            "rounds": 12,
            "methods": ("simclr", "sogclr", "emc2"),
            # ResNet-18 at batch 256 takes tens of seconds per step on 2 CPU cores.
            "resnet": {"batch_size": 16, "rounds": 3},
            "batch_sizes": (64,),
            "dataset_sizes": (1_000, 1_000_000),
            "dataset_batch": 256,
            "memory_examples": 1_000_000,
        }
    return {
        **common,
        "rounds": 20,
        "methods": ("simclr", "dcl", "clip", "sogclr", "emc2", "embedding_cache", "exact"),
        "resnet": {"batch_size": 256, "rounds": 2},
        "batch_sizes": (32, 64, 128, 512, 1024),
        "dataset_sizes": (1_000, 10_000, 100_000, 1_000_000),
        "dataset_batch": 256,
        "memory_examples": 1_000_000,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """All the train-step figures (quick: fewer sizes and methods, ResNet-18 at batch 16)."""
    size = sizes(quick)
    model, b, rounds = size["model"], size["batch_size"], size["rounds"]
    result: dict[str, Any] = {
        "benchmark": "bench_train_step",
        "quick": quick,
        "machine": machine_info(),
        "load_average_before": os.getloadavg(),
        "num_devices": 1,
    }

    digits = emc2_vs_simclr(model, b, rounds=rounds, with_stub=True, others=size["methods"])
    result["digits"] = digits
    ratios = {"digits_convnet": digits["emc2_over_simclr"]}
    throughput = {"digits_convnet": digits["throughput"]}
    if size["resnet"] is not None:
        resnet = emc2_vs_simclr(
            "resnet18_32",
            size["resnet"]["batch_size"],
            rounds=size["resnet"]["rounds"],
            calls_per_round=1,
            rewarm=False,
            with_stub=False,
        )
        result["resnet18_32"] = resnet
        ratios["resnet18_32"] = resnet["emc2_over_simclr"]
        throughput["resnet18_32"] = resnet["throughput"]
        clear_runners("resnet18_32")  # Large buffers that nothing else reuses.

    # Headline figures: CPU-time medians. Both sides are XLA programs of the
    # same shape, so the ratio of the CPU time they use is the ratio of their
    # work, and unlike wall-clock time it does not count the time the process
    # waited for a core on a shared machine. The wall-clock medians: *_wall.
    result["emc2_over_simclr_step_time"] = {k: v["cpu"] for k, v in ratios.items()}
    result["emc2_over_simclr_step_time_wall"] = {k: v["median"] for k, v in ratios.items()}
    result["sampler_fraction_by_stub"] = digits["sampler_fraction"]["cpu"]
    result["sampler_fraction_by_stub_wall"] = digits["sampler_fraction"]["median"]
    result["steps_per_second"] = {
        m: {name: t["steps_per_second"] for name, t in rows.items()}
        for m, rows in throughput.items()
    }
    result["examples_per_second"] = {
        m: {name: t["examples_per_second"] for name, t in rows.items()}
        for m, rows in throughput.items()
    }
    result["batch_sizes_of_throughput"] = {
        "digits_convnet": b,
        **({"resnet18_32": size["resnet"]["batch_size"]} if size["resnet"] else {}),
    }

    scaling_rounds = max(2, rounds // 2)
    result["batch_scaling"] = batch_scaling(
        sorted({*size["batch_sizes"], b}), model=model, rounds=scaling_rounds
    )
    result["dataset_scaling"] = dataset_scaling(
        size["dataset_sizes"],
        model=size["scaling_model"],
        batch_size=size["dataset_batch"],
        rounds=scaling_rounds,
    )
    memory = sampler_state_memory(size["memory_examples"], measure=size.get("measure_memory", True))
    result["sampler_state_memory"] = memory
    result["sampler_state_bytes_per_million"] = {
        name: 1e6 * row["computed_bytes_per_example"] for name, row in memory["states"].items()
    }
    if jax.default_backend() != "cpu" and not os.environ.get("EMC2JAX_BENCH_TINY"):
        # The accelerator figures (labelled with the device): the paper's
        # STL-10 setting at batch 256 in bfloat16.
        accelerated = emc2_vs_simclr(
            "resnet18_96_bf16", 256, rounds=3 if quick else 10, with_stub=True
        )
        result["accelerator"] = {"device": jax.devices()[0].device_kind, **accelerated}
        clear_runners("resnet18_96_bf16")
    # Every step above was traced once when it was compiled; more would mean
    # a retrace (a changed dtype, weak type or sharding of the returned state).
    result["retraces"] = sum(count[0] - 1 for count in _TRACES.values())
    result["load_average_after"] = os.getloadavg()
    return result


def emc2_step_seconds(batch_size: int = 256, *, rounds: int = 3) -> float:
    """Median seconds of the EMC² digits ConvNet step at ``batch_size`` (the memoised runner)."""
    model = sizes(quick=True)["model"]
    runner = get_runner("emc2", model=model, batch_size=batch_size)
    return compare([runner], rounds=rounds)["emc2"]["median_s"]


def summarize(result: dict[str, Any]) -> None:
    """Prints the figures of :func:`run`."""
    for key in (
        "emc2_over_simclr_step_time",
        "emc2_over_simclr_step_time_wall",
        "sampler_fraction_by_stub",
        "sampler_fraction_by_stub_wall",
        "steps_per_second",
        "sampler_state_bytes_per_million",
    ):
        print(f"{key}: {result[key]}")
    print("dataset_scaling largest/smallest:", result["dataset_scaling"]["largest_over_smallest"])


if __name__ == "__main__":
    bench_main(__doc__, run, summarize, "bench_train_step")
