"""The training program DeepSpeed launches (`python -m engine.trainer` / `deepspeed --module engine.trainer`).

It reads one TOML (engine.config.TrainConfig), writes metrics.jsonl, LoRA folders and DeepSpeed
checkpoints into its run directory, and knows nothing of the studio.
"""
