"""The sweep's Optuna study, kept in SWEEP_DIR/study.journal: Optuna's journal file storage, an
append-only log guarded by file locks, so workers on several machines share it through a shared
filesystem without a database server.

Each trial is asked for under the sweep folder's lock, with a sampler seeded by the sweep's seed plus the
trial's number: a serial sweep with a fixed seed suggests the same parameters every time it runs; K
workers in parallel do not (which trial sees which results depends on timing). A grid sweep uses
Optuna's GridSampler, which takes each point once. The pruner is successive halving (ASHA) over the
trials' per-epoch evaluations, from `pruner.min_epochs` on.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from distvit.errors import ConfigError
from distvit.sweep.folder import JOURNAL
from distvit.sweep.spec import SweepSpec

FINISHED = ("COMPLETE", "PRUNED", "FAIL")
"""Trial states that count against the sweep's number of trials (Optuna's TrialState names)."""


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("sweeps need Optuna: pip install 'distvit[sweep]' (or pip install optuna).") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


class SweepStudy:
    """The study of one sweep folder: ask for trials, report evaluations, tell results, count."""

    def __init__(self, spec: SweepSpec):
        optuna = self.optuna = _optuna()
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = str(Path(spec.dir) / JOURNAL)
        self.spec = spec
        self.storage = optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
        if spec.pruner.type == "asha":
            pruner = optuna.pruners.SuccessiveHalvingPruner(
                min_resource=spec.pruner.min_epochs, reduction_factor=spec.pruner.reduction_factor
            )
        else:
            pruner = optuna.pruners.NopPruner()
        self.study = optuna.create_study(
            study_name=spec.name,
            storage=self.storage,
            direction=spec.objective.direction,
            pruner=pruner,
            load_if_exists=True,
        )
        self.study_id = self.storage.get_study_id_from_name(spec.name)

    def trials(self) -> list:
        """Every trial (Optuna FrozenTrials, by number)."""
        return sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number)

    def states(self) -> dict[int, str]:
        return {trial.number: trial.state.name for trial in self.trials()}

    def finished(self) -> int:
        return sum(state in FINISHED for state in self.states().values())

    def sampler(self, number: int):
        if self.spec.grid:  # its seed orders the grid: the same for every trial
            space = {p.name: list(p.values) for p in self.spec.space}
            return self.optuna.samplers.GridSampler(space, seed=self.spec.seed)
        return self.optuna.samplers.TPESampler(seed=self.spec.seed + number)

    def ask(self) -> tuple[int, dict[str, Any]]:
        """A new trial and its parameters (call under the sweep folder's lock: the number it gets is the
        number of trials so far, which seeds its sampler)."""
        self.study.sampler = self.sampler(len(self.trials()))
        trial = self.study.ask()
        values = {}
        for param in self.spec.space:
            if param.kind == "loguniform":
                values[param.name] = trial.suggest_float(param.name, param.low, param.high, log=True)
            elif param.kind == "uniform":
                values[param.name] = trial.suggest_float(param.name, param.low, param.high, step=param.step)
            elif param.kind == "int":
                values[param.name] = trial.suggest_int(param.name, param.low, param.high, step=param.step or 1)
            else:
                values[param.name] = trial.suggest_categorical(param.name, list(param.values))
        return trial.number, values

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def params(self, number: int) -> dict[str, Any]:
        return self.storage.get_trial(self._trial_id(number)).params

    def report(self, number: int, epoch: int, value: float) -> bool:
        """Record trial `number`'s evaluation after `epoch`; whether the pruner stops it there."""
        trial_id = self._trial_id(number)
        trial = self.storage.get_trial(trial_id)
        if epoch in trial.intermediate_values:  # a resumed trial logs its earlier epochs again: decided then
            return False
        self.storage.set_trial_intermediate_value(trial_id, epoch, value)
        return self.study.pruner.prune(self.study, self.storage.get_trial(trial_id))

    def tell(self, number: int, state: str, value: float | None = None, note: str = "") -> None:
        """End trial `number` (once: a trial already finished stays as it was); `note`: why (the report's)."""
        trial_id = self._trial_id(number)
        if self.storage.get_trial(trial_id).state.name != "RUNNING":
            return
        if note:
            self.storage.set_trial_user_attr(trial_id, "note", note)
        # The sampler's end-of-trial hook is for optimize() (a finished grid would call Study.stop here).
        self.study.sampler = self.optuna.samplers.RandomSampler()
        self.study.tell(
            number,
            value if state == "COMPLETE" else None,
            state=self.optuna.trial.TrialState[state],
            skip_if_finished=True,
        )
