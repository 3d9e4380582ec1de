"""Using a trained generator: the Python API (`api`: `Explainer`, `GANCAM`), inputs (prior files or images),
the scores written beside every run (`scores`) and the inference command (`inference`)."""
