"""The packed expert format: its names and version (`spec`), and packing
mlx-lm's stacked experts into it and back (`experts`)."""
