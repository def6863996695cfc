"""The engine floor: optimizers, checkpoints, sharding, metrics and multi-process start-up.

Everything here knows arrays, meshes and files, never a task or a model family: the trainer,
`vitoken.load` and the tasks all stand on it, and it imports none of them.
"""
