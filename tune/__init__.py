"""Ray Tune experiments that fit the cost model on the run history and publish artifacts.

Thin on purpose: the model, its features and its artifact format live in
``ray_qalloc.costmodel``; this package only searches hyper-parameters and calls the registry.
"""
