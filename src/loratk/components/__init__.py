"""Recipe -> objects: the only place besides `recipe` that reads a recipe. `methods` is the registry; the
other modules build the strategies, the data, the hooks and the launch for a run."""
