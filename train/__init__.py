"""train: the DeepSpeed PAPO trainer for Qwen2.5-VL (run.py, trainer.py, config.py, data.py, rollout.py,
batching.py, sft.py, eval.py, plot.py, tiny.py; configs/ and ds_configs/)."""
