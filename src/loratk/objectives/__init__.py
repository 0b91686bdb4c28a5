"""What the model is trained on and how the loss is built: one small strategy per objective
(the `Objective` protocol and `LossOutput` are in `loratk.core.protocols`)."""
