"""Training: All-in-One loop, optimiser set-up, exact-resume checkpoints, torchrun plumbing."""
