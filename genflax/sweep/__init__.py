"""Hyperparameter sweeps: Optuna studies whose trials are ordinary genflax runs.

    python -m genflax.sweep --config configs/vae_digits.py --sweep latent_beta \
        --workdir runs/sweep_vae --workers 2
    python -m genflax.sweep report runs/sweep_vae
    python -m genflax.sweep dashboard runs/sweep_vae

space.py      search spaces and their grammar
study.py      the sweep's definition (sweep.json), its checks, the Optuna study
worker.py     a worker: claims a trial, runs `genflax.main` for it, tells the study
trial.py      inside a trial: reports each evaluation to the study (pruning)
launch.py     workers on this machine, or a SLURM job array through submitit
report.py     results.csv / results.md and plots
__main__.py   the command line
"""
