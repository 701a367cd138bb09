from agi_monai.networks.blocks.cagr import CAGR, ChannelLayerNorm, CrossGroupAttention, GroupRoll, PortableGroupRoll, RoutingFunction, channel_shuffle
from agi_monai.networks.blocks.resblock import ResBlock

__all__ = ["CAGR", "ChannelLayerNorm", "CrossGroupAttention", "GroupRoll", "PortableGroupRoll", "ResBlock", "RoutingFunction", "channel_shuffle"]
