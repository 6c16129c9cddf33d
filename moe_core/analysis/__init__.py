"""Analyses of trained models: the mechanism behind equifinality (`mechanism`, Equifinality spec 4.3-4.8),
expert paths (`paths`, PathMoE spec 4.1-4.6) and expert utilisation (`utilisation`); `common` holds what they share."""
