"""Stage 3, the conditional GAN: the networks (`models/`; their registry, `generators`, lives in cnnprior/core/),
generator checkpoints (`checkpoint`: what inference loads), the training data (`data`) and the training loop
(`train`)."""
