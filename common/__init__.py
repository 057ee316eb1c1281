"""Layers and helpers shared by the parts (``cnn/``, ``p2g/``); no part imports another part."""
