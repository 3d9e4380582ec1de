"""Map maths on batches of explanation maps (B, 1, H, W) in [0, 1]: operations (`ops`), metrics and bootstrap
intervals (`metrics`), and the trivial baselines chosen on val (`baselines`). Imports no stage of the pipeline."""
