"""Stage 0, the images: image sources (`sources/`) and the train / val / test splits every stage reads
(`splits`). A new source is an `ImageSource` and an opener registered with `register_source`."""

from cnnprior.data.sources.base import ImageSource
from cnnprior.data.splits import load_split, open_source, register_source

__all__ = ["ImageSource", "load_split", "open_source", "register_source"]
