"""Image sources, one module each (`data.source`): shapes, imagefolder, fashion_mnist and cifar10 (torchvision_sets).

A source is an `ImageSource` (base.py): a labelled pool of images at their native size. To add one, write its
class and an opener registered with `cnnprior.data.register_source("<name>")` (docs/development.md, "Add a data
source").
"""
