"""The machinery the scripts run on: the search and training loops, data and
loaders, devices and precision, CUDA graphs, checkpoints and run directories,
metrics, diagnostics and cost counting.

The search space and the networks a researcher edits (operations, attentions,
genotypes, model_search, model, architect) live at the repository root, next to
the scripts.  Inside this package, the run mechanics (atomic, errors, parallel,
precision, cuda_graphs, dispatch, recompute, data, experiment, metrics, history,
figures, complexity, early_stop) know no network class; the loops (searching,
training), what they measure of a supernet (curvature, diagnostics) and the
published fixes of a collapsing search (collapse_fixes) build on the root's networks.  reproduce.py's pipeline (pipeline, launchers, result_card)
runs the scripts as subprocess jobs.  Nothing here imports a script.
"""
