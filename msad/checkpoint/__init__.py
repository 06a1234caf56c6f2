"""Weights files: checkpoints a kill cannot truncate and loading that cannot run code, the
model_info.json kept beside them, and the layouts of other projects' checkpoints (the slimmable
ImageNet ResNets, the official MSAD models)."""
