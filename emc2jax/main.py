"""Training CLI: ``python -m emc2jax.main --config configs/X.py --workdir DIR [--config.key=value ...]``.

Validates the config, trains with a progress bar, checkpoints and resumes
(restarting the same command in the same workdir continues from the latest
complete checkpoint), and prints where everything went.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from emc2jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/ (get_config()).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (or JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # orbax and TFDS log every file they touch at INFO; keep the console for
    # the progress bar unless the user asked for more (--verbosity=0).
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from emc2jax import parallel

    parallel.initialize_distributed(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
    from emc2jax import train
    from emc2jax.checkpoint import IncompatibleCheckpointError
    from emc2jax.data.sources import DatasetNotPreparedError

    config = _CONFIG.value
    try:
        results = train.train_and_evaluate(config, _WORKDIR.value)
    except (config_lib.ConfigError, DatasetNotPreparedError, IncompatibleCheckpointError) as error:
        # A user error (a workdir holding another config's checkpoint included):
        # one clear message, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    except train.NonFiniteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    print(json.dumps(results, indent=2, sort_keys=True))
    print(f"metrics: {_WORKDIR.value}/metrics.jsonl")
    print(f"tensorboard: tensorboard --logdir {_WORKDIR.value}/tensorboard")
    if config.checkpoint_every_steps:
        print(f"checkpoints: {_WORKDIR.value}/checkpoints")
    logging.flush()
    return 0


def run() -> None:
    """Console-script entry point (``emc2jax-train``)."""
    app.run(main)


if __name__ == "__main__":
    run()
