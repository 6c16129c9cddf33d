"""moe_core: the ST-MoE (Equifinality) and PathMoE models, routers, trainer and analyses."""
__version__ = "0.6.1"  # enters every run hash: bump when training numerics change
