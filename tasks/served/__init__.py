"""The served model: what the registry holds and a user loads, in-process or behind MLflow's
scoring server. `predictor` scores raw rows (encoder, fitted reduction, network), `entry` is
the MLflow "models from code" file, `pyfunc` says how the model is saved and timed.

A room on the stage floor that, unlike the stages, may import `mlflow` — its model format
only (`mlflow.pyfunc`, `mlflow.models`): the registered model is an MLflow pyfunc, so
building it and measuring it as users load it needs that. Tracking (runs, metrics, the
registry) stays on the orchestration floor.
"""
