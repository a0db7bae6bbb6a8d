"""Training: the jitted step, token losses, checkpoints and MFU accounting."""
