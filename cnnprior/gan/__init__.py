"""Stage 3, the conditional GAN: the networks (`models/`: one file per generator, registered by name in
`models/base.py`), generator checkpoints (`checkpoint`: what inference loads), the training data (`data`) and the
training loop (`train`)."""
