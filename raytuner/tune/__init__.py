"""``raytuner tune``: hyperparameter sweeps of LoKr training runs with Ray Tune, Optuna and ASHA."""
