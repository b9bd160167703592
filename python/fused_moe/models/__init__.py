"""fused_moe inside mlx-lm models: the modules (MoE block, attention, dense
quantized layers), putting them into a model (`patch`), opening checkpoints
as patched models (`load`) and tensor parallelism (`tensor_parallel`)."""
