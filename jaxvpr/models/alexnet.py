"""AlexNet conv trunk, torchvision's ``alexnet().features[:-2]`` (NHWC), as used by AdAGeo.

Krizhevsky et al. (NeurIPS 2012), torchvision's single-GPU variant. AdAGeo (WACV
2021) and the VG benchmark take ``features[:-2]``: conv1 11x11/4 (pad 2, 64) ->
ReLU -> max-pool 3/2 -> conv2 5x5 (pad 2, 192) -> ReLU -> max-pool 3/2 -> conv3
3x3 (384) -> ReLU -> conv4 3x3 (256) -> ReLU -> conv5 3x3 (256), dropping the last
ReLU and max-pool: the output is conv5 before its ReLU, (B, ~H/16, ~W/16, 256).

Flax names mirror the torch indices (``features_{i}``). Freezing stages are the 5
convs; the registry default ``trainable_stages=2`` trains conv4+conv5 (AdAGeo §5:
"finetuned from the last two convolutional blocks"; the VG benchmark trains conv5
only, ``trainable_stages=1``).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxvpr.models.layers import max_pool, torch_default_bias_init, torch_default_kernel_init

# (torch index, out channels, kernel, stride, padding) of the convs; pools after 0 and 3.
_ALEXNET_CONVS = ((0, 64, 11, 4, 2), (3, 192, 5, 1, 2), (6, 384, 3, 1, 1), (8, 256, 3, 1, 1), (10, 256, 3, 1, 1))
ALEXNET_CONV_INDICES = tuple(c[0] for c in _ALEXNET_CONVS)
_POOL_AFTER = (0, 3)


class AlexNet(nn.Module):
    """``alexnet().features[:-2]``; ``trainable_stages``: last convs that train (None = all)."""

    trainable_stages: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        num_convs = len(_ALEXNET_CONVS)
        trainable = num_convs if self.trainable_stages is None else min(max(self.trainable_stages, 0), num_convs)
        frozen_convs = num_convs - trainable
        for k, (index, channels, kernel, stride, padding) in enumerate(_ALEXNET_CONVS):
            if k == frozen_convs and frozen_convs > 0:
                x = jax.lax.stop_gradient(x)
            fan_in = x.shape[-1] * kernel * kernel
            conv = nn.Conv(
                channels, (kernel, kernel), strides=(stride, stride),
                padding=((padding, padding), (padding, padding)),
                kernel_init=torch_default_kernel_init, bias_init=torch_default_bias_init(fan_in),
                name=f"features_{index}",
            )
            x = conv(x)
            if k < num_convs - 1:
                x = nn.relu(x)
            if index in _POOL_AFTER:
                x = max_pool(x, 3, 2)
        if frozen_convs == num_convs:
            x = jax.lax.stop_gradient(x)
        return x
