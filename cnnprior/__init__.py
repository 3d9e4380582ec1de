"""cnnprior: interpret CNNs with conditional GANs that use per-layer Grad-CAM maps as conditional priors."""

__version__ = "0.1.0"
