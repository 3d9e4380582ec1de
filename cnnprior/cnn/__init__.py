"""Stage 1, the target CNN: the model and its checkpoint (`model`), its CAM layers and Grad-CAM target layer
(`layers`), randomised copies (`randomise`), importing your own CNN (`importer`), the classifier stage
(`train`). `python -m cnnprior.cnn import ...` imports a CNN."""
