"""Evaluation of a run: validation loss and image metrics per epoch, and how a finished (or running) run
folder is read and presented.

- `metric_names`: the one table of every metric (key, label, direction, description);
- `runs`: `load_run(run_dir)` reads a run folder into a `RunSummary`;
- `best`: `choose_best_epoch`, the best-epoch rule;
- `plots`, `report`: `report.html` of one run; `compare`: the table and grid of several runs.
"""
