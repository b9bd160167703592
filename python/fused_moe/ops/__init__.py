"""The fused ops: thin wrappers over the native extension's MLX primitives
(lazy, usable under ``mx.compile``, ``stream=`` like MLX ops).

* `experts`: ``gate_up_swiglu`` and ``down_combine`` on a PackedExperts;
* `router`: ``route``, MiniMax's router in one primitive;
* `linear`: ``quantized_matmul`` and ``quantized_embedding``;
* `attention`: ``scaled_dot_product_attention`` and ``norm_rope``.
"""
