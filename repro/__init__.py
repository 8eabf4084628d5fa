"""repro: reproduce DepthG (Sick et al., CVPR 2024) and STEGO (Hamilton et al., ICLR 2022)."""

__version__ = "0.1.0"
