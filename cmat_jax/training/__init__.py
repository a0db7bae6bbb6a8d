"""Training: the one trainer (`trainer.Trainer`), its jitted step with a pluggable loss
(`step.TrainStep`), token losses, checkpoints and MFU accounting."""
