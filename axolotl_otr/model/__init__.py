"""What the loss needs to know about a model: its lm_head (``output_layer``), its final
hidden state (``capture``), whether its logits are a measured transform of the lm_head's
output (``exactness``), its router loss (``router_loss``), and the path the loss takes
(``loss_path``). Torch and transformers models only; no trainer logic."""
