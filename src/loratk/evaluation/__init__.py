"""Evaluation of generated images: `metrics` (pure math on features and image batches), `evaluators` (the CLIP,
DINO, DINOv2 and Inception feature models; `inception` holds the Inception one), `features` (features of
files on disk, computed once per model and image content) and `tiny` (the builtin tiny evaluators for tests).

Import from the submodules; model libraries (transformers, torch-fidelity) load only when a model does.
"""
