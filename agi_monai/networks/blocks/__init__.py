from agi_monai.networks.blocks.cagr import CAGR, ChannelLayerNorm, CrossGroupAttention, GroupRoll, PortableGroupRoll, RoutingFeatures, RoutingFunction, channel_shuffle
from agi_monai.networks.blocks.resblock import ResBlock

__all__ = ["CAGR", "ChannelLayerNorm", "CrossGroupAttention", "GroupRoll", "PortableGroupRoll", "ResBlock", "RoutingFeatures", "RoutingFunction", "channel_shuffle"]
