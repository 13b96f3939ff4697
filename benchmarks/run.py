"""The benchmark suite: every benchmark in one process, one JSON, one Markdown table.

    python benchmarks/run.py [--quick] --out DIR [--only NAME ...]

writes ``DIR/benchmarks.json`` (the headline figures at the top level, each
benchmark's full result under ``"benchmarks"``, the targets and whether they
are met, the machine and its load) and ``DIR/benchmarks.md`` (the same as
Markdown tables; ``benchmarks/README.md`` keeps the latest). Every figure is a
ratio of timings taken side by side in this process after warm-up (medians of
several repeats; compile time reported separately), because the machines are
shared and absolute times drift. ``--quick`` aims at under 5 minutes on 2 CPU
cores. ``EMC2JAX_BENCH_TINY=1`` shrinks every size to a smoke test
(``tests/test_benchmarks.py``); its figures mean nothing.

Benchmarks (``benchmarks/bench_<name>.py``, each ``run(quick) -> dict``):
``train_step`` (first: the sampler benchmark reuses its compiled EMC² step),
``sampler``, ``gmm``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pathlib
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, save_json  # noqa: E402

BENCHMARKS = ("train_step", "sampler", "gmm")
QUICK_BUDGET_S = 300.0


@dataclasses.dataclass(frozen=True)
class Target:
    """A headline figure, where it comes from, and the bound it must meet."""

    key: str
    benchmark: str
    read: Callable[[dict[str, Any]], Any]
    bound: float
    upper: bool  # True: value <= bound; False: value >= bound
    note: str

    def check(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value <= self.bound if self.upper else value >= self.bound


TARGETS = (
    Target(
        "mh_sweep_speedup_vs_numpy_loop",
        "sampler",
        lambda r: r["mh_sweep_speedup_vs_numpy_loop"],
        3.0,
        False,
        "EMC² sweep, B = 256, 2(2B-2) proposals per chain: jitted vs the per-proposal NumPy "
        "loop; wall clock",
    ),
    Target(
        "sampler_fraction_of_emc2_step",
        "sampler",
        lambda r: r["sweep_share_of_train_step"],
        0.05,
        True,
        "the jitted sampler step (MH sweep, visit weights, chain write-back) alone / the full "
        "EMC² training step, digits ConvNet, B = 256; wall clock (cross-check with a stubbed "
        "sampler: see the note below)",
    ),
    Target(
        "emc2_over_simclr_step_time/digits_convnet",
        "train_step",
        lambda r: r["emc2_over_simclr_step_time"]["digits_convnet"],
        1.6,
        True,
        "full step, EMC² / SimCLR, digits ConvNet, B = 256 (EMC² encodes 1.5x the images); "
        "CPU time",
    ),
    Target(
        "emc2_over_simclr_step_time/resnet18_32",
        "train_step",
        lambda r: r["emc2_over_simclr_step_time"].get("resnet18_32"),
        1.6,
        True,
        "full step, EMC² / SimCLR, ResNet-18 at 32x32 (batch: see the table below); CPU time",
    ),
    Target(
        "gmm_vmap_speedup_vs_loop",
        "gmm",
        lambda r: r["gmm_vmap_speedup_vs_loop"],
        10.0,
        False,
        "64-seed mixture sweep, vmapped vs a Python loop over seeds",
    ),
    Target(
        "dataset_scaling_largest_over_smallest",
        "train_step",
        lambda r: r["dataset_scaling"]["largest_over_smallest"],
        1.2,
        True,
        "EMC² step time at the largest m / at the smallest (flat: the chain update is O(B)); "
        "CPU time",
    ),
)


def run_suite(quick: bool, only: tuple[str, ...] = BENCHMARKS) -> dict[str, Any]:
    """Runs the benchmarks named in ``only`` (in :data:`BENCHMARKS` order) in this process.

    A benchmark that fails is recorded under ``"errors"`` (with its traceback)
    and the others still run.
    """
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; choose from {BENCHMARKS}")
    start, start_cpu = time.perf_counter(), time.process_time()
    report: dict[str, Any] = {
        "quick": quick,
        "tiny": bool(os.environ.get("EMC2JAX_BENCH_TINY")),
        "machine": machine_info(),
        "accelerator": "none: CPU figures only",
        "load_average_before": os.getloadavg(),
        "benchmarks": {},
        "elapsed_s": {},
        "process_cpu_s": {},
        "errors": {},
    }
    for name in (b for b in BENCHMARKS if b in only):
        began, began_cpu = time.perf_counter(), time.process_time()
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            report["benchmarks"][name] = module.run(quick=quick)
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            report["errors"][name] = traceback.format_exc()
            print(f"benchmark {name} failed:\n{report['errors'][name]}", file=sys.stderr)
        report["elapsed_s"][name] = time.perf_counter() - began
        report["process_cpu_s"][name] = time.process_time() - began_cpu
        print(f"[{name}] {report['elapsed_s'][name]:.0f} s", file=sys.stderr)
    report["elapsed_s"]["total"] = time.perf_counter() - start
    report["process_cpu_s"]["total"] = time.process_time() - start_cpu
    report["load_average_after"] = os.getloadavg()
    _headline(report, quick)
    return report


def _headline(report: dict[str, Any], quick: bool) -> None:
    """Copies the headline figures to the top level and checks them against the targets."""
    results = report["benchmarks"]
    train = results.get("train_step", {})
    for key in (
        "emc2_over_simclr_step_time",
        "emc2_over_simclr_step_time_wall",
        "steps_per_second",
        "examples_per_second",
        "batch_sizes_of_throughput",
        "batch_scaling",
        "dataset_scaling",
        "sampler_state_bytes_per_million",
    ):
        if key in train:
            report[key] = train[key]
    # 1 - stub / full: the sampler's cost inside the fused step, but a
    # difference of two close timings, so within the machine's noise.
    for key in ("sampler_fraction_by_stub", "sampler_fraction_by_stub_wall"):
        if key in train:
            report[key] = train[key]
    if "sampler" in results:
        report["sampler_fraction_of_emc2_step"] = results["sampler"]["sweep_share_of_train_step"]
        report["mh_sweep_speedup_vs_numpy_loop"] = results["sampler"][
            "mh_sweep_speedup_vs_numpy_loop"
        ]
        report["mh_sweep_speedup_vs_numpy_loop_cpu"] = results["sampler"][
            "mh_sweep_speedup_vs_numpy_loop_cpu"
        ]
    if "gmm" in results and "gmm_vmap_speedup_vs_loop" in results["gmm"]:
        report["gmm_vmap_speedup_vs_loop"] = results["gmm"]["gmm_vmap_speedup_vs_loop"]

    targets = {}
    for target in TARGETS:
        value = None
        if target.benchmark in results:
            try:
                value = target.read(results[target.benchmark])
            except (KeyError, TypeError):
                value = None
        targets[target.key] = {
            "value": value,
            "bound": ("<= " if target.upper else ">= ") + f"{target.bound:g}",
            "met": target.check(value),
            "what": target.note,
        }
    if quick:
        total = report["elapsed_s"]["total"]
        targets["quick_elapsed_s"] = {
            "value": total,
            "bound": f"<= {QUICK_BUDGET_S:g}",
            "met": total <= QUICK_BUDGET_S,
            "what": "wall time of `run.py --quick` (its CPU time: "
            f"{report['process_cpu_s']['total']:.0f} s)",
        }
    report["targets"] = targets


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: targets, then one table per figure family."""
    machine = report["machine"]
    mode = "tiny (smoke test)" if report["tiny"] else "quick" if report["quick"] else "full"
    load = report["load_average_before"], report["load_average_after"]
    out = [
        f"# Benchmarks ({mode})",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPU cores, backend "
        f"`{machine['backend']}` ({', '.join(sorted(set(machine['devices'])))}), "
        f"jax {machine['jax']}, Python {machine['python']}. No accelerator: CPU figures only.",
        f"Load average (1/5/15 min) before: {', '.join(f'{x:.1f}' for x in load[0])}; "
        f"after: {', '.join(f'{x:.1f}' for x in load[1])}.",
        "Elapsed: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["elapsed_s"].items()) + ".",
        "",
        "## Targets",
        "",
    ]
    out += _table(
        ["figure", "value", "target", "met", "what"],
        [[k, t["value"], t["bound"], t["met"], t["what"]] for k, t in report["targets"].items()],
    )
    notes = []
    if "emc2_over_simclr_step_time_wall" in report:
        notes.append(
            "Ratios are medians over rounds of per-round ratios (each round times every "
            "program in turn). EMC²/SimCLR, the sampler fraction and the dataset scaling "
            "compare XLA programs: judged on CPU time (the work; on a shared machine "
            "wall-clock time also counts waiting for a core). By wall clock: EMC²/SimCLR "
            + ", ".join(
                f"{k} {v:.3f}" for k, v in report["emc2_over_simclr_step_time_wall"].items()
            )
            + "."
        )
    if "sampler_fraction_by_stub" in report:
        notes.append(
            "Sampler fraction cross-check, 1 - (EMC² step with the sampler stubbed) / (EMC² "
            f"step): {report['sampler_fraction_by_stub']:.3f} by CPU time, "
            f"{report['sampler_fraction_by_stub_wall']:.3f} by wall clock (a difference of "
            "two close timings: within the machine's noise, which is why the target reads the "
            "direct measurement)."
        )
    if "mh_sweep_speedup_vs_numpy_loop_cpu" in report:
        notes.append(
            "The MH sweep speedup compares XLA (which may use both cores) with single-threaded "
            "NumPy: judged on wall clock; by CPU time it is "
            f"{report['mh_sweep_speedup_vs_numpy_loop_cpu']:.2f}."
        )
    out += [" ".join(notes), ""] if notes else []
    train = report["benchmarks"].get("train_step")
    if train:
        out += _train_step_tables(train)
    sampler = report["benchmarks"].get("sampler")
    if sampler:
        out += ["## EMC² sweep vs the NumPy loop", ""]
        out += _table(
            ["B", "jax ms", "numpy loop ms", "speedup", "speedup (CPU time)", "compile s"],
            [
                [
                    r["batch_size"],
                    1e3 * r["jax_s"],
                    1e3 * r["numpy_loop_s"],
                    r["speedup_vs_numpy_loop"],
                    r["speedup_vs_numpy_loop_cpu"],
                    r["jax_compile_and_first_call_s"],
                ]
                for r in sampler["rows"]
            ],
        )
        options = sampler["sweep_options"]
        out += [
            f"Sweep options at B = {options['batch_size']} (fastest: {options['fastest']}):",
            "",
        ]
        out += _table(
            ["unroll", "chunk_size", "ms", "CPU ms"],
            [
                [r["unroll"], r["chunk_size"], 1e3 * r["jax_s"], 1e3 * r["jax_cpu_s"]]
                for r in options["rows"]
            ],
        )
    gmm = report["benchmarks"].get("gmm")
    if gmm:
        out += ["## GMM sweep", ""]
        scalars = {k: v for k, v in gmm.items() if isinstance(v, (int, float, str, bool))}
        out += _table(["key", "value"], [[k, v] for k, v in sorted(scalars.items())])
    for name, error in report["errors"].items():
        out += [f"## {name}: FAILED", "", "```", error.strip().splitlines()[-1], "```", ""]
    return "\n".join(out)


def _train_step_tables(train: dict[str, Any]) -> list[str]:
    out = ["## Training step throughput", ""]
    rows = []
    batch = train["batch_sizes_of_throughput"]
    for model_key, section in (("digits_convnet", "digits"), ("resnet18_32", "resnet18_32")):
        if section not in train:
            continue
        for name, t in train[section]["throughput"].items():
            rows.append(
                [
                    train[section]["model"],
                    batch[model_key],
                    name,
                    1e3 * t["step_s"],
                    1e3 * t["step_cpu_s"],
                    t["steps_per_second"],
                    t["examples_per_second"],
                    t["compile_s"],
                ]
            )
    out += _table(
        ["model", "B", "method", "step ms", "CPU ms", "steps/s", "examples/s", "compile s"], rows
    )
    out += ["## Step time vs batch size (EMC² and SimCLR)", ""]
    out += _table(
        ["B", "SimCLR ms", "EMC² ms", "EMC²/SimCLR", "EMC²/SimCLR (CPU)", "EMC² µs/example"],
        [
            [
                r["batch_size"],
                1e3 * r["simclr_step_s"],
                1e3 * r["emc2_step_s"],
                r["emc2_over_simclr"],
                r["emc2_over_simclr_cpu"],
                r["emc2_us_per_example"],
            ]
            for r in train["batch_scaling"]["rows"]
        ],
    )
    scaling = train["dataset_scaling"]
    out += [
        f"## EMC² step time vs dataset size ({scaling['model']}, B = {scaling['batch_size']})",
        "",
    ]
    out += _table(
        ["m", "step ms", "CPU ms", "relative", "relative (CPU)", "image table MB", "chains MB"],
        [
            [
                r["num_examples"],
                1e3 * r["step_s"],
                1e3 * r["step_cpu_s"],
                r["relative_to_smallest"],
                r["relative_to_smallest_cpu"],
                r["image_table_bytes"] / 1e6,
                r["sampler_state_bytes"] / 1e6,
            ]
            for r in scaling["rows"]
        ],
    )
    memory = train["sampler_state_memory"]
    out += [f"## Sampler state memory (m = {memory['num_examples']:,})", ""]
    out += _table(
        ["state", "arrays", "MB per million examples", "measured RSS growth MB"],
        [
            [
                name,
                "; ".join(f"{k} {v}" for k, v in row["arrays"].items()),
                row["computed_bytes_per_example"],
                None
                if row["measured_resident_growth_bytes"] is None
                else row["measured_resident_growth_bytes"] / 1e6,
            ]
            for name, row in memory["states"].items()
        ],
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes (< 5 min on 2 cores)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="output directory")
    parser.add_argument(
        "--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="a subset"
    )
    args = parser.parse_args(argv)
    report = run_suite(args.quick, tuple(args.only))
    save_json(args.out / "benchmarks.json", report)
    text = markdown(report)
    (args.out / "benchmarks.md").write_text(text + "\n")
    print(text)
    print(json.dumps({k: t["met"] for k, t in report["targets"].items()}), file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
