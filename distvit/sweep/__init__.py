"""Hyperparameter sweeps across workers and Slurm job arrays (`distvit sweep run|report`), on Optuna.

    spec.py     the sweep file: parsed and checked into a `SweepSpec` (keys against the config schema)
    folder.py   the sweep folder: what it holds, whose it is, the search space it was started with
    study.py    the Optuna study in the folder's journal file: samplers, pruner, asking for trials
    claims.py   which worker runs which trial: claim files, heartbeats, hand-overs
    trial.py    one trial: its config, its run launched as a subprocess, its evaluations reported
    worker.py   the pull loop of `distvit sweep run`
    report.py   the table, the plots and best.yaml of `distvit sweep report`

A trial is an ordinary run folder (SWEEP_DIR/trials/NNNN/), trained by a `distvit train` (or `accelerate
launch`) subprocess; this package reads run folders and never imports the engine.
"""
