"""AGI-Net and its parts, MONAI style: ``agi_monai.networks.AGINet`` for bundle ``_target_``s."""

from agi_monai.networks.blocks import CAGR, ChannelLayerNorm, CrossGroupAttention, GroupRoll, ResBlock, RoutingFunction
from agi_monai.networks.nets import STAGES, AGINet, ResUNet

__all__ = [
    "AGINet",
    "CAGR",
    "ChannelLayerNorm",
    "CrossGroupAttention",
    "GroupRoll",
    "ResBlock",
    "ResUNet",
    "RoutingFunction",
    "STAGES",
]
