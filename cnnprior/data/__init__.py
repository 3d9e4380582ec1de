"""Stage 0, the images: image sources (`sources/`) and the train / val / test splits every stage reads
(`splits`)."""
