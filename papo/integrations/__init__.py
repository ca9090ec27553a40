"""Ways to plug the PAPO loss into a trainer. `torch_loop`: a plain PyTorch loop (the reference
for custom trainers); our DeepSpeed trainer lives in train/."""
