"""Shared plumbing every stage uses: config and its schema, errors, runtime (devices, seeds, atomic files),
torch.distributed helpers, map maths, metrics, trivial baselines, reports and pictures."""
