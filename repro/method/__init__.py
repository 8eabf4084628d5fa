"""Floor 1: the papers' equations (STEGO and DepthG losses, farthest-point sampling, 3D-LHP, schedules, guidance pooling); imports only ``repro.method`` and ``repro.utils``."""
