"""Rendering images: the epoch samples of a run, `loratk sample`, DreamBooth's class images.

- `specs`: what to render (prompt lines x seeds -> one spec per image);
- `pipeline`: schedulers, the family's pipeline over the live parts, seeded batched rendering;
- `images`: A1111 PNG text and labelled grids;
- `hook`: the epoch hook of training; `command`: `loratk sample`; `class_images`: prior images.
"""
