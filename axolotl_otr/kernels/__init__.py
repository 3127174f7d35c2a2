"""The chunked loss kernels (pure torch): per-chunk math, the chunk budget, the logit
transform, the fp32 weight gradient, and the autograd functions that tie them together.
Nothing here knows about models, trainers or Axolotl."""
