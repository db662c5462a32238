"""The built-in trainer (``kind = "train"`` jobs): a small byte-level GPT in plain PyTorch."""
