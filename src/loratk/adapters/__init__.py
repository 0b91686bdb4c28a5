"""What is trained, how it is exported and reloaded: one small strategy per kind of adapter (the `Adapter`
protocol is in `loratk.core.protocols`)."""
