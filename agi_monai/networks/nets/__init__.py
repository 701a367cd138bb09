from agi_monai.networks.nets.resunet import STAGES, AGINet, ResUNet

__all__ = ["AGINet", "ResUNet", "STAGES"]
