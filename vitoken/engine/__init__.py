"""The engine floor: optimizers, checkpoints, sharding, metrics and multi-process start-up.

It stands on the models and the converters (it restores a big_vision `.npz`, and takes the
plain ViT's layer-decay groups as the default) but knows no task and no training loop: the
trainer, `vitoken.load` and the tasks all stand on it, and it imports none of them.
"""
