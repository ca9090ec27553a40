"""Ways to plug the PAPO loss into a trainer. `torch_loop`: a plain PyTorch loop (the reference
for custom trainers); `trl`: PAPOTrainer on TRL's GRPOTrainer; `verl`: hooks for verl 0.9.1.
Our DeepSpeed trainer lives in train/."""
