"""Evaluation of a run: validation loss and image metrics per epoch, and how a finished (or running) run
folder is read and presented.

- `metrics`: pure math on features and image batches (FID, KID, IS, CLIP/DINO cosines, PSNR, SSIM);
- `evaluators`, `inception`: the CLIP, DINO, DINOv2 and Inception feature models; `tiny`: builtin tiny ones;
- `features`: features of files on disk, computed once per model and image content;
- `metric_names`: the one table of every metric (key, label, direction, description);
- `runs`: `load_run(run_dir)` reads a run folder into a `RunSummary`;
- `best`: `choose_best_epoch`, the best-epoch rule;
- `plots`, `report`: `report.html` of one run; `compare`: the table and grid of several runs.

Import from the submodules; model libraries (transformers, torch-fidelity) load only when a model does.
"""
