"""cnnprior: interpret CNNs with conditional GANs that use per-layer Grad-CAM maps as conditional priors.

    import cnnprior
    ex = cnnprior.Explainer.from_checkpoints(generator="models/fashion_resnet18-lsft.pt",
                                             cnn="models/fashion_resnet18-cnn.pt", device="cpu")
    maps = ex(images)            # (B, 3, H, W) RGB in [0, 1] -> numpy float32 (B, H, W) in [0, 1]
    cam = cnnprior.GANCAM(ex)    # pytorch-grad-cam's CAM protocol

The package follows the pipeline: `core` (shared plumbing), `data`, `cnn`, `priors`, `gan`, `explain`,
`evaluate`; `cli` is the `cnnprior` command.
"""

from cnnprior.core.version import __version__
from cnnprior.explain.api import GANCAM, Explainer, Explanation

__all__ = ["GANCAM", "Explainer", "Explanation", "__version__"]
