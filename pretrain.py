"""Train a Tiny Recursive Model, with plain gradient descent or Jacobian descent.

    python pretrain.py                                   # the embedded demo (4x4 Sudoku, CPU, minutes)
    python pretrain.py experiment=arc1                   # a paper preset (config/experiment/)
    python pretrain.py jd.split=iwrm_with_q_halt_in jd.aggregator=upgrad
    torchrun --nproc-per-node 4 pretrain.py experiment=arc1
    python pretrain.py ... load_checkpoint=runs/PROJECT/RUN   # continue a run from its newest checkpoint
    torchrun --max-restarts 3 --nproc-per-node 4 pretrain.py run_name=NAME ...   # restarts resume by themselves

Flow: Hydra composes ``config/`` -> :func:`training.config.parse_config` validates it (errors stop the
run here, before any compute) -> :class:`training.trainer.Trainer` builds data, model, optimizers and
the run directory -> ``fit()`` trains, evaluates, checkpoints and prints where the run lives.

Every command line goes through ``@hydra.main`` (``--multirun``, ``--cfg job``, ``--help`` included). A
command line of overrides (``key=value``) is composed and validated first with Hydra's compose API, so that
every mistake, Hydra's own included (an unknown preset, a malformed override), becomes one line on stderr with
status 2 before ``@hydra.main`` composes the same config for the run.

Exit status:
    0  the run finished, or was stopped by SIGTERM/SIGINT after writing a checkpoint (the last lines
       say how to resume it);
    2  bad input (config, dataset, checkpoint, run directory): ``error: ...`` on stderr, before any compute;
    3  training diverged: ``max_nonfinite_steps`` non-finite steps in a row, or non-finite parameters
       (nothing is saved over the last good checkpoint);
    130 / 143  a second SIGINT / SIGTERM stopped the run at once, without a new checkpoint.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType


def _stopped_while_importing(signum: int, _frame: FrameType | None) -> None:
    os.write(2, f"\n{signal.Signals(signum).name} received while starting: stopped (no step was trained, no checkpoint written)\n".encode())
    raise SystemExit(128 + signum)


def _stopped_at_once(signum: int, _frame: FrameType | None) -> None:
    """Outside the start-up and training phases (which say more: training.interrupt), e.g. while a failed run shuts down."""
    os.write(2, f"\n{signal.Signals(signum).name} received: stopped at once (the checkpoints already written are kept)\n".encode())
    raise SystemExit(128 + signum)


if __name__ == "__main__":  # before the heavy imports (torch, hydra: seconds), so that a signal then is not silent
    for _signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signal, _stopped_while_importing)

import hydra  # after the signal handlers above
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from dataset.common import DatasetError
from training.checkpoint import CheckpointError
from training.config import (
    DEMO_DATA_PATH,
    ConfigError,
    TrainConfig,
    known_keys,
    parse_config,
    register_hydra_defaults,
    unknown_key_message,
)
from training.distributed import DistInfo, setup_distributed, teardown_distributed
from training.interrupt import StartupSignals
from training.run_dir import RunDirError
from training.threads import choose_threads

register_hydra_defaults()  # TrainConfig's defaults, which config/cfg_pretrain.yaml composes first

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, RunDirError)
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_SIGINT = 130  # the shell's status for a process stopped by Ctrl-C
CONFIG_DIR = Path(__file__).resolve().parent / "config"
CONFIG_NAME = "cfg_pretrain"


def ensure_demo_data(config: TrainConfig, dist_info: DistInfo) -> None:
    """Build the demo dataset on first use (only for the default ``data_paths``)."""
    if config.data_paths != [DEMO_DATA_PATH] or Path(DEMO_DATA_PATH).exists():
        return
    if dist_info.is_main:
        from dataset.build_sudoku_dataset import build_generated_sudoku

        print(f"Building the demo dataset (4x4 Sudoku with a unique solution) in {DEMO_DATA_PATH} ...", flush=True)
        build_generated_sudoku(DEMO_DATA_PATH, size=4, num_train=2000, num_test=200, min_givens=6, max_givens=9, seed=0, progress=False)
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def run(config: TrainConfig) -> dict:
    """Train one run from a validated config; return its summary.

    Raises ``ConfigError``, ``DatasetError``, ``CheckpointError`` or ``RunDirError`` for bad input
    (before any compute) and :class:`training.trainer.NonFiniteError` when training diverges.
    """
    from training.trainer import Trainer

    with StartupSignals():  # a signal while starting is not silent; training installs its own handlers
        dist_info = setup_distributed(config.device)
    try:
        threads, note = choose_threads(config.threads, dist_info.device)
        torch.set_num_threads(threads)
        with StartupSignals():
            ensure_demo_data(config, dist_info)
            trainer = Trainer(config, dist_info)
        if note and dist_info.is_main:  # after every input check: a bad-input error stays the only line
            report(note)
        summary = trainer.fit()
        if dist_info.is_main:
            shown = {k: round(v, 4) for k, v in summary["eval"].items() if "accuracy" in k or "pass@" in k}
            print(f"\nRun {summary['status']} at step {summary['final_step']}. Evaluation: {shown}")
            print(f"Run directory: {summary['run_dir']}")
        return summary
    finally:
        teardown_distributed()


# ------------------------------------------------------------------------------- configuration
def check_group_choices(overrides: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Refuse ``GROUP=NAME`` when ``config/GROUP/NAME.yaml`` does not exist.

    Hydra itself would silently ignore an unknown name of an *optional* group (``experiment=arc3``
    would train the demo), and reports the others over many lines.
    """
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        group = config_dir / key
        if not sep or not key or not group.is_dir() or value in ("", "null"):
            continue
        accepted = sorted(path.stem for path in group.glob("*.yaml"))
        if value not in accepted:
            raise ConfigError(f"{key}={value}: no such preset; accepted: {accepted} (files in {group})")


def check_override_keys(overrides: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Refuse ``KEY=VALUE`` for a key no config has, suggesting the closest one (Hydra would suggest
    ``+KEY=VALUE``, which then fails as an unknown key)."""
    known = set(known_keys())
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or key.startswith(("+", "~", "hydra.", "hydra/")) or (config_dir / key).is_dir():
            continue
        if key not in known and not any(key.startswith(k + ".") for k in known if k.endswith("_kwargs") or k == "evaluators"):
            raise ConfigError(unknown_key_message(key))


def check_overrides(overrides: list[str]) -> None:
    """Refuse, as one-line :class:`ConfigError`, what Hydra would refuse over many lines or silently accept:
    malformed overrides, unknown keys (with the closest one) and unknown preset names."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except HydraException as error:
            raise ConfigError(f"bad override {override!r}: {one_line(error)}") from None
    check_group_choices(overrides)
    check_override_keys(overrides)


def compose_config(overrides: list[str]) -> TrainConfig:
    """The validated config of ``config/cfg_pretrain.yaml`` with command-line ``overrides``, without running
    anything (``analysis.study`` checks a grid's runs with it). Every problem, Hydra's included, is raised as a
    one-line :class:`ConfigError`."""
    check_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            raw = compose(config_name=CONFIG_NAME, overrides=overrides)
        return parse_config(raw)
    except (HydraException, OmegaConfBaseException) as error:
        override = getattr(error, "override", None)  # set by Hydra's override parser only
        where = f" {override!r}" if isinstance(override, str) else ""
        raise ConfigError(f"bad override{where}: {one_line(error)}") from None


def one_line(error: BaseException) -> str:
    """An error message on a single line."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def report(line: str) -> None:
    """One line on stderr in a single write (lines of several ranks never interleave)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def resume_hint(argv: list[str], run_dir: str) -> str:
    """The command that continues an interrupted run: the same arguments plus ``load_checkpoint=RUN_DIR``."""
    kept = [arg for arg in argv if arg.lstrip("+~").partition("=")[0] not in ("load_checkpoint", "resume")]
    launcher = "torchrun [the same options] pretrain.py" if "TORCHELASTIC_RUN_ID" in os.environ else "python pretrain.py"
    return f"{launcher} {shlex.join([*kept, f'load_checkpoint={run_dir}'])}"


# --------------------------------------------------------------------------------------- entry
def execute(config_factory: Callable[[], TrainConfig], argv: list[str], outcome: dict | None = None) -> int:
    """Build the config, run, and turn the expected failures into one line and an exit status.

    ``outcome`` (when given) receives the run's ``objective`` value: the final evaluation's metric that
    ``config.objective`` names, NaN when the run failed or that metric was not evaluated."""
    from training.trainer import NonFiniteError

    if outcome is not None:
        outcome["objective"] = float("nan")
    try:
        config = config_factory()
        summary = run(config)
    except USER_ERRORS as error:
        report(f"error: {one_line(error)}")
        return EXIT_BAD_INPUT
    except NonFiniteError as error:
        report(f"error: training diverged: {one_line(error)}")
        return EXIT_NONFINITE
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once (checkpoints are atomic, the earlier ones stay valid)
        report("stopped by a second SIGINT without a new checkpoint")
        return EXIT_SIGINT
    if summary["status"].startswith("interrupted") and int(os.environ.get("RANK", "0")) == 0:
        print(f"Resume with: {resume_hint(argv, summary['run_dir'])}", flush=True)
    if outcome is not None:
        value = summary["eval"].get(config.objective)
        if value is None:
            report(f"note: objective={config.objective} was not evaluated (evaluated: {sorted(summary['eval'])}); the run returns NaN")
        outcome["objective"] = float("nan") if value is None else float(value)
    return 0


@hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base=None)  # absolute: also when imported
def hydra_main(raw: DictConfig) -> float:
    """Hydra's own command line (``--multirun``, sweepers, ``--cfg``, ``--help`` and other flags).

    Returns the run's ``objective`` (what a sweeper such as Optuna's optimises). In a multirun a run that
    failed or never evaluated its objective returns the worst value, ``-inf`` (``+inf`` when the sweeper
    minimises), its error line printed, so that the sweep goes on: a NaN would stop the whole sweep
    (hydra-optuna-sweeper 1.3 with Optuna 2.10 tells a failed trial twice and raises). A single run
    exits with its status."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    overrides = list(HydraConfig.get().overrides.task)

    def config_factory() -> TrainConfig:
        check_group_choices(overrides)
        try:
            return parse_config(raw)
        except OmegaConfBaseException as error:  # an interpolation that does not resolve
            raise ConfigError(f"bad config: {one_line(error)}") from None

    hydra_config = HydraConfig.get()
    if hydra_config.mode != RunMode.MULTIRUN:
        status = execute(config_factory, overrides)
        if status:
            sys.exit(status)
        return 0.0
    print(f"trial {hydra_config.job.num}: {' '.join(overrides)}", flush=True)  # which values it runs (a sweeper's choice)
    outcome: dict = {}
    execute(config_factory, overrides, outcome)
    value = outcome["objective"]
    if value != value:  # NaN: the worst value for the sweeper's direction instead
        minimising = str(hydra_config.sweeper.get("direction", "maximize")).lower().endswith("minimize")
        value = float("inf") if minimising else float("-inf")
        report(f"note: this trial returns {value} to the sweeper (the worst value: it failed or did not evaluate its objective)")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run ``pretrain.py`` with command-line arguments ``argv`` (``sys.argv[1:]`` by default); return the exit status.

    Every run goes through ``@hydra.main`` (one config path); a command line of overrides only is composed and
    validated first (:func:`compose_config`, nothing run), so that its mistakes, Hydra's own included, are one
    ``error:`` line with status 2 rather than Hydra's report."""
    args = sys.argv[1:] if argv is None else list(argv)
    if __name__ == "__main__":  # imports done: the start-up message would mislead from here on (run() installs its own)
        for handled in (signal.SIGTERM, signal.SIGINT):
            signal.signal(handled, _stopped_at_once)
    if not any(arg.startswith("-") for arg in args):  # Hydra's flags (--multirun, --cfg, ...) take their values apart
        try:
            compose_config(args)
        except ConfigError as error:
            report(f"error: {one_line(error)}")
            return EXIT_BAD_INPUT
    saved = sys.argv
    sys.argv = [sys.argv[0], *args]
    try:
        hydra_main()
    except SystemExit as stop:  # a run's status (hydra_main exits with it), or Hydra's own
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
