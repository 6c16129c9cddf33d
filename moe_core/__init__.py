"""moe_core: the ST-MoE (Equifinality) and PathMoE models, routers, trainer and analyses."""
__version__ = "0.1.0"
