"""Stage 3, the conditional GAN: the generator registry (`generators`), the networks (`models/`), generator
checkpoints (`checkpoint`: what inference loads), the training data (`data`) and the training loop
(`train`)."""
