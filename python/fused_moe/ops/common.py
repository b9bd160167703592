"""What every op wrapper shares."""

from typing import Optional, Union

import mlx.core as mx

# The `stream=` argument of MLX ops.
StreamLike = Optional[Union[mx.Stream, mx.Device]]
