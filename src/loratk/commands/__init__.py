"""The `loratk` commands besides `train`: each module adds its parser and runs it (`cli` dispatches). Heavy
libraries load inside `run`, so `loratk --help` is instant."""
